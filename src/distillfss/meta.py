"""Meta-training of the teacher on a source domain (DCAMA's training, method.md §1.6-1.7).

Episodic: each optimizer step draws ``batch`` episodes (1-shot by default), runs every episode's query against its
own shots, and minimises ``0.5 CE(logits, gt) + 2 BCE(c, gt)``, c the mean over all layers of the coarse masks
(each upsampled to the ground-truth size, then clamped to [0, 1]). Everything but the frozen backbone trains.

* **Features once**: the frozen backbone's features of every item are cached (the whole bank for the
  self-supervised source), so a step costs only the attention and the decoder.
* **Validation**: mIoU (per class, intersections and unions summed over that class's episodes, as DCAMA's test) on
  a fixed set of episodes of the held-out split; the best step's weights are the checkpoint.
* **Resume**: the full state (weights, optimizer, best so far) is saved every ``save_every`` steps; episodes and
  dropout are seeded by (seed, step), so a resumed run ends exactly where an uninterrupted one would.
* **Many processes** (``torchrun --nproc_per_node N``): DistributedDataParallel, gloo on CPU and nccl on GPU; each
  rank takes every N-th episode of the global batch (the distributed sampler), so the global batch and the episodes
  do not depend on N; rank 0 logs and writes the checkpoint.

Output folder: ``config.json`` + ``model.safetensors`` (the best teacher, no support set: start ``adapt --teacher``
from it), ``train_log.jsonl``, ``state.pt`` (the resume state).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .backbones import FrozenBackbone, Pyramid
from .config import MetaConfig, ModelConfig
from .data import DataError
from .data.episodes import EpisodeSource, EpisodeSpec, episode_generator, sample_episode, usable_classes
from .errors import UserError
from .losses import IGNORE
from .model_io import CONFIG, LOG, WEIGHTS, ModelError, own_state, save_teacher_checkpoint
from .outputs import GrowingFolder, replace_atomically, sha256_file
from .teacher import Teacher, build_teacher
from .transfer import seeded, trainable_parameters

log = logging.getLogger(__name__)

STATE = "state.pt"
# Everything meta-train writes into its folder: `--overwrite` removes these and nothing else.
COMMAND = "distillfss meta-train"  # the writer its folders record (the CLI and the library alike)


# Settings that may change between an interrupted run and its resumption.
_RESUMABLE = {"steps", "val_every"}


@dataclass
class MetaResult:
    teacher: Teacher
    best_step: int
    best_miou: float
    log: list[dict]


class FeatureCache:
    """Backbone features of source items, computed on first use and kept while they fit in ``capacity_gb``
    (on the training device); items beyond that are recomputed whenever an episode uses them."""

    def __init__(
        self, backbone: FrozenBackbone, source: EpisodeSource, device: torch.device, capacity_gb: float
    ) -> None:
        self.backbone, self.source, self.device = backbone, source, device
        self.free = int(capacity_gb * 2**30)  # bytes left
        self._store: dict[tuple[str, int], Pyramid] = {}

    @torch.no_grad()
    def get(self, split: str, items: list[int]) -> Pyramid:
        missing = sorted({i for i in items if (split, i) not in self._store})
        fresh: dict[int, Pyramid] = {}
        for start in range(0, len(missing), 16):
            chunk = missing[start : start + 16]
            images = torch.stack([self.source.image(split, i) for i in chunk]).to(self.device)
            p = self.backbone(images)
            for j, i in enumerate(chunk):
                one = Pyramid(p.skip4[j : j + 1].clone(), tuple(t[j : j + 1].clone() for t in p.layers))
                fresh[i] = one
                size = sum(t.numel() * t.element_size() for t in (one.skip4, *one.layers))
                if size <= self.free:
                    self._store[(split, i)] = one
                    self.free -= size
        parts = [self._store.get((split, i)) or fresh[i] for i in items]
        return Pyramid(
            torch.cat([p.skip4 for p in parts]), tuple(torch.cat(t) for t in zip(*(p.layers for p in parts)))
        )

    def fill(self, split: str, items: list[int], progress: bool) -> None:
        for start in tqdm(
            range(0, len(items), 64), desc=f"features ({split})", disable=None if progress else True, leave=False
        ):
            self.get(split, items[start : start + 64])


class EpisodeForward(nn.Module):
    """The teacher on B independent episodes (each query with its own K shots); what DDP wraps."""

    def __init__(self, teacher: Teacher, bf16: bool) -> None:
        super().__init__()
        self.teacher = teacher
        self.bf16 = bf16

    def forward(
        self, query: Pyramid, support: Pyramid, support_masks: Tensor, shots: int
    ) -> tuple[Tensor, list[Tensor]]:
        """support: features of B*K images, episode-major; support_masks: (B*K, 1, S, S) float in [0, 1].
        Returns 2-class logits (B, 2, S, S) and the coarse masks, per layer (B, 1, h, w)."""
        t = self.teacher
        b = query.skip4.shape[0]
        coarse, masks = [], {}
        for g, q, s in zip(t.groups, query.layers, support.layers):
            att = t.attention[g]
            size = tuple(s.shape[-2:])
            if size not in masks:  # several layers share a resolution
                m = F.interpolate(support_masks, size=size, mode="bilinear", align_corners=True)
                masks[size] = m.reshape(b, 1, -1)  # (B, 1, K*h*w), shot-major like the keys
            m = masks[size]
            coarse.append(att(q, att.episode_keys(s, shots), m, torch.ones_like(m)))
        present = torch.ones(b, 1, dtype=torch.bool, device=query.skip4.device)
        with torch.autocast(query.skip4.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = t.decode(coarse, query, present)
        return out.logits.float(), out.coarse


def meta_loss(logits: Tensor, coarse: list[Tensor], target: Tensor, cfg: MetaConfig) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss, ce, bce); target (B, S, S) long in {0, 1, 255}."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    size = target.shape[-2:]
    c = torch.stack([F.interpolate(x.float(), size=size, mode="bilinear", align_corners=True) for x in coarse])
    c = c.mean(dim=0)[:, 0].clamp(0, 1)  # (B, S, S)
    valid = target != IGNORE
    bce = F.binary_cross_entropy(c[valid], target[valid].float())
    return cfg.ce_weight * ce + cfg.bce_weight * bce, ce, bce


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batch(source: EpisodeSource, cache: FeatureCache, split: str, specs: list[EpisodeSpec], device: torch.device):
    query = cache.get(split, [s.query for s in specs])
    support = cache.get(split, [i for s in specs for i in s.support])
    target = torch.stack([source.mask(split, s.query, s.cls) for s in specs]).to(device)
    smasks = torch.stack([source.mask(split, i, s.cls) == 1 for s in specs for i in s.support]).float()
    return query, support, smasks[:, None].to(device), target


@torch.no_grad()
def validate(
    forward: EpisodeForward, source: EpisodeSource, cache: FeatureCache, specs: list[EpisodeSpec], cfg: MetaConfig
) -> tuple[float, dict[int, float]]:
    """mIoU over the classes of ``specs`` (this rank's share; sums are all-reduced across ranks)."""
    rank, world = _world()
    classes = sorted({s.cls for s in specs})
    inter = torch.zeros(len(classes), dtype=torch.float64)
    union = torch.zeros(len(classes), dtype=torch.float64)
    mine = specs[rank::world]
    was_training = forward.training
    forward.eval()
    for start in range(0, len(mine), cfg.batch):
        chunk = mine[start : start + cfg.batch]
        query, support, smasks, target = _batch(source, cache, "val", chunk, cache.device)
        logits, _ = forward(query, support, smasks, cfg.shots)
        pred = logits.argmax(dim=1)
        for s, p, t in zip(chunk, pred, target):
            v = t != IGNORE
            k = classes.index(s.cls)
            inter[k] += ((p == 1) & (t == 1) & v).sum().item()
            union[k] += (((p == 1) | (t == 1)) & v).sum().item()
    forward.train(was_training)
    if world > 1:
        both = torch.stack([inter, union]).to(cache.device)
        dist.all_reduce(both)
        inter, union = both[0].cpu(), both[1].cpu()
    iou = {c: 100.0 * float(i / u) if u > 0 else 0.0 for c, i, u in zip(classes, inter, union)}
    return sum(iou.values()) / max(1, len(iou)), iou


def validation_episodes(source: EpisodeSource, cfg: MetaConfig) -> list[EpisodeSpec]:
    """A fixed set: the held-out classes in turn, episodes seeded independently of training."""
    classes = usable_classes(source, "val", cfg.shots)
    if not classes:
        raise DataError(f"{source.name}: no validation class has {cfg.shots + 1} images")
    return [
        sample_episode(
            source, "val", classes, cfg.shots, episode_generator(cfg.seed + 7919, 0, i), classes[i % len(classes)]
        )
        for i in range(cfg.val_episodes)
    ]


def meta_train(
    source: EpisodeSource,
    backbone: FrozenBackbone,
    model_cfg: ModelConfig,
    cfg: MetaConfig,
    out: Path | GrowingFolder,
    progress: bool = True,
    save_every: int = 25,
    cache_gb: float = 8.0,
    on_step=None,
) -> MetaResult:
    """Train a teacher on ``source``; write (rank 0) the best checkpoint, the log and the resume state to ``out``.

    ``out``: a folder (claimed here: new, empty, or one an earlier meta-train wrote) or one the caller claimed
    (``GrowingFolder.claim``, as ``distillfss meta-train --overwrite`` does). A folder holding the state of a run
    with the same config resumes it (``steps`` may grow); a folder another command wrote, or one holding files
    distillfss did not write, is refused. ``on_step(row)`` is called after every step (tests use it to interrupt a run).
    Initialisation and dropout draw from a private random state seeded from ``cfg.seed``; the process's own random
    state is left as it was.
    """
    with seeded(cfg.seed, next(backbone.parameters()).device):
        return _meta_train(source, backbone, model_cfg, cfg, out, progress, save_every, cache_gb, on_step)


def _meta_train(
    source: EpisodeSource,
    backbone: FrozenBackbone,
    model_cfg: ModelConfig,
    cfg: MetaConfig,
    target: Path | GrowingFolder,
    progress: bool = True,
    save_every: int = 25,
    cache_gb: float = 8.0,
    on_step=None,
) -> MetaResult:
    rank, world = _world()
    if cfg.batch % world:
        raise DataError(f"--batch {cfg.batch} must be a multiple of the number of processes ({world})")
    device = next(backbone.parameters()).device
    out = target.root if isinstance(target, GrowingFolder) else Path(target)
    teacher = build_teacher(backbone, model_cfg).to(device)
    params = trainable_parameters(teacher, "B")  # everything but the frozen backbone
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, best_step, best_miou = 0, 0, -1.0
    state_path = out / STATE
    # Rank 0 reads the folder and every rank gets its verdict: the same resume state (weights, optimizer, step),
    # or the same error, also when the other processes do not share rank 0's file system.
    verdict: list = [None]
    folder = None
    if rank == 0:
        try:
            folder = (
                target if isinstance(target, GrowingFolder) else GrowingFolder.claim(out, False, command=COMMAND)[0]
            )
            if STATE in folder.files() and state_path.is_file():
                state = torch.load(state_path, map_location="cpu", weights_only=True)
                _check_same_run(state, cfg, model_cfg, state_path)
                verdict = [state]
        except UserError as e:
            verdict = [str(e)]
    if world > 1:
        dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], str):
        raise ModelError(verdict[0])
    if verdict[0] is not None:
        state = verdict[0]
        teacher.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        start, best_step, best_miou = state["step"], state["best_step"], state["best_miou"]
        if rank == 0:
            log.info("resuming %s at step %d of %d", out, start, cfg.steps)
    if rank == 0:
        _truncate_log(folder.path(LOG), start)
    forward: nn.Module = EpisodeForward(teacher, cfg.precision == "bf16")
    if world > 1:
        forward = nn.parallel.DistributedDataParallel(forward, broadcast_buffers=False)
    plain = forward.module if world > 1 else forward
    cache = FeatureCache(backbone, source, device, cache_gb)
    train_classes = usable_classes(source, "train", cfg.shots)
    if not train_classes:
        raise DataError(f"{source.name}: no training class has {cfg.shots + 1} images")
    val_specs = validation_episodes(source, cfg)
    every = {s: sorted({i for c in source.classes(s) for i in source.items_with(s, c)}) for s in ("train", "val")}
    probe = cache.get("val", every["val"][:1])
    per_item = sum(t.numel() * t.element_size() for t in (probe.skip4, *probe.layers))
    if sum(len(v) for v in every.values()) * per_item <= cache.free:  # all fit: compute them now, with a progress bar
        for split, items in every.items():
            cache.fill(split, items, progress and rank == 0)
    rows: list[dict] = []
    t0 = time.perf_counter()
    forward.train()
    bar = tqdm(
        range(start, cfg.steps),
        desc="meta-train",
        disable=None if progress and rank == 0 else True,
        initial=start,
        total=cfg.steps,
    )
    for step in bar:
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout; the same after a resume
        specs = [
            sample_episode(source, "train", train_classes, cfg.shots, episode_generator(cfg.seed, step, j))
            for j in range(cfg.batch)
        ][rank::world]
        query, support, smasks, target = _batch(source, cache, "train", specs, device)
        logits, coarse = forward(query, support, smasks, cfg.shots)
        loss, ce, bce = meta_loss(logits, coarse, target, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats = torch.stack([loss.detach(), ce.detach(), bce.detach()]).float()
        if world > 1:
            dist.all_reduce(stats)
            stats /= world
        row = {"step": step + 1, "loss": round(stats[0].item(), 5), "ce": round(stats[1].item(), 5)}
        row["bce"] = round(stats[2].item(), 5)
        done = step + 1 == cfg.steps
        if (step + 1) % cfg.val_every == 0 or done:
            miou, per_class = validate(plain, source, cache, val_specs, cfg)
            row["val_miou"] = round(miou, 3)
            if miou > best_miou:
                best_miou, best_step = miou, step + 1
                if rank == 0:
                    _save_best(folder, teacher, model_cfg, cfg, source, best_step, best_miou, per_class)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        if rank == 0:
            with open(folder.path(LOG), "a") as f:
                f.write(json.dumps(row) + "\n")
            if (step + 1) % save_every == 0 or done:
                _save_state(folder.path(STATE), teacher, opt, step + 1, best_step, best_miou, cfg, model_cfg)
            bar.set_postfix(loss=f"{row['loss']:.4f}", best_val=f"{best_miou:.1f}" if best_miou >= 0 else "-")
        if on_step is not None:
            on_step(row)
    if rank == 0 and CONFIG in folder.files():
        folder.write_text("MODEL_CARD.md", model_card(out))
    if world > 1:
        dist.barrier()
    return MetaResult(teacher.eval(), best_step, best_miou, rows)


def _check_same_run(state: dict, cfg: MetaConfig, model_cfg: ModelConfig, path: Path) -> None:
    old, new = state["config"], cfg.to_dict()
    differ = sorted(k for k in new if k not in _RESUMABLE and old.get(k) != new[k])
    if state["model_config"] != model_cfg.to_dict():
        differ.append("model")
    if differ:
        raise ModelError(
            f"{path}: holds a run with other settings ({', '.join(differ)}); use another --out or --overwrite"
        )


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past the resumed step (written after the last saved state) and any half-written line."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
        if row["step"] <= step:
            keep.append(line)
    text = "".join(line + "\n" for line in keep)
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def _save_state(path: Path, teacher: Teacher, opt, step: int, best_step: int, best_miou: float, cfg, model_cfg) -> None:
    state = {
        "model": own_state(teacher),
        "optimizer": opt.state_dict(),
        "step": step,
        "best_step": best_step,
        "best_miou": best_miou,
        "config": cfg.to_dict(),
        "model_config": model_cfg.to_dict(),
    }
    replace_atomically(path, lambda tmp: torch.save(state, tmp))


def provenance() -> dict[str, str | None]:
    """What made a run: the code's git commit (None outside a git checkout) and the package versions."""
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return {
        "code_commit": (commit + (" (with uncommitted changes)" if dirty else "")) or None,
        "distillfss": __version__,
        "torch": torch.__version__,
        "scikit_image": pkg("scikit-image"),
        "python": platform.python_version(),
    }


def _save_best(folder: GrowingFolder, teacher, model_cfg, cfg, source, step, miou, per_class) -> None:
    meta = {
        "provenance": provenance(),
        "meta_train": cfg.to_dict(),
        "source": source.describe(),
        "step": step,
        "val_miou": round(miou, 3),
        "val_per_class": {str(c): round(v, 3) for c, v in per_class.items()},
    }
    folder.path(WEIGHTS), folder.path(CONFIG)  # recorded as this command's files before they are written
    save_teacher_checkpoint(folder.root, teacher, model_cfg, meta)


def _source_lines(src: dict) -> list[str]:
    """The model card's description of one source (``describe()``)."""
    images = [f"- `{n}`: {lic}" for n, lic in src.get("images", {}).items()]
    if src["name"] == "selfsup":
        return [
            "Self-supervised episodes: SLIC superpixel pseudo-masks on two augmented views (crop, scale, flip, "
            "brightness/contrast) of the same image. Images (scikit-image's bundled data, licences from its "
            "docstrings), disjoint from every demo and evaluation image:",
            "",
            *images,
            "",
            f"Training images: {', '.join(src['train_images'])}; validation (held out): {', '.join(src['val_images'])}; "
            f"{src['views_per_image']} views per image; {src['classes']['train']} training and "
            f"{src['classes']['val']} validation pseudo-classes.",
        ]
    if src["name"] == "synthetic":
        return [
            "Synthetic episodes with exact masks: composites of materials (regions of photographs, smooth noise, "
            "stripes, checks, dots) as blobs or rectangles, one large object or many small instances, on a "
            "background material, with colour jitter, lighting, blur and noise; a class is a material, an episode "
            "two composites holding it. Photographs (scikit-image's bundled data), disjoint from every demo and "
            "evaluation image:",
            "",
            *images,
            "",
            f"Training photographs: {', '.join(src['train_photos'])}; validation classes' photographs (held out): "
            f"{', '.join(src['val_photos'])}; {src['items']['train']} training and {src['items']['val']} validation "
            f"composites; {src['classes']['train']} training and {src['classes']['val']} validation classes.",
        ]
    return [
        f"{src['name']} fold {src['fold']}: training classes {src['train_classes']}, validation classes "
        f"{src['val_classes']}; images {src['images']}.",
    ]


def _provenance_line(p: dict | None) -> str:
    if not p:
        return "- code commit and package versions: not recorded by the run"
    return (
        f"- code: commit {p.get('code_commit') or 'unknown (not a git checkout)'}, distillfss {p.get('distillfss')}, "
        f"torch {p.get('torch')}, scikit-image {p.get('scikit_image') or 'not installed'}, Python {p.get('python')}"
    )


def recipe(cfg: MetaConfig, model_cfg: ModelConfig, out: str = "OUT") -> str:
    """The command line that reproduces a run (flags that differ from the defaults)."""
    from .config import PRESETS
    from .data.sources import OFFLINE_SOURCES

    offline = cfg.source in OFFLINE_SOURCES
    flags = [f"--source {cfg.source}"] + ([] if offline else ["--data DATA"]) + [f"--out {out}"]
    defaults = MetaConfig()
    for k, v in cfg.to_dict().items():
        if k != "source" and v != getattr(defaults, k):
            flags.append(f"--{k.replace('_', '-')} {v}")
    m, base = model_cfg.to_dict(), ModelConfig().to_dict()
    preset = next(
        (n for n, p in PRESETS.items() if all(m[k] == v for k, v in {**base, **p}.items() if k != "num_classes")), None
    )
    if m["backbone"] != base["backbone"]:
        flags.append(f"--backbone {m['backbone']}")
    if preset is None:
        flags.append(f"--image-size {m['image_size']}  # heads {m['heads']}/{m['heads_stride8']}")
    elif preset != "fast":
        flags.append(f"--preset {preset}")
    return "distillfss meta-train " + " ".join(flags)


def model_card(out: Path) -> str:
    """MODEL_CARD.md of a meta-training folder, from its config.json and train_log.jsonl."""
    import platform

    config = json.loads((out / "config.json").read_text())
    cfg, model_cfg = MetaConfig.from_dict(config["meta_train"]), ModelConfig.from_dict(config["model"])
    rows = [json.loads(line) for line in (out / LOG).read_text().splitlines() if line.strip()]
    wall, last = 0.0, 0.0
    for r in rows:  # "seconds" restarts when a run is resumed: add up the segments
        if r["seconds"] < last:
            wall += last
        last = r["seconds"]
    wall += last
    src = config["source"]
    vals = [(r["step"], r["val_miou"]) for r in rows if "val_miou" in r]
    lines = [
        f"# Meta-trained DistillFSS teacher: `{model_cfg.backbone}`, {model_cfg.image_size} px, source `{src['name']}`",
        "",
        "A starting point for `distillfss adapt --teacher` (the backbone is not stored: it is rebuilt from its "
        "pretrained weights). It has no support set and does not predict by itself.",
        "",
        "## Data",
        "",
    ]
    for part in src.get("parts", [src]):
        lines += [*_source_lines(part), ""]
    lines += [
        "## Recipe",
        "",
        "```",
        recipe(cfg, model_cfg),
        "```",
        "",
        f"Loss {cfg.ce_weight} CE + {cfg.bce_weight} BCE (mean coarse mask), {cfg.optimizer} lr {cfg.lr} weight decay "
        f"{cfg.weight_decay}, {cfg.batch} episodes of {cfg.shots} shot(s) per step, {cfg.precision} decoder, seed "
        f"{cfg.seed}. Model: `{json.dumps({k: v for k, v in config['model'].items() if k != 'num_classes'})}`.",
        "",
        "## Run",
        "",
        f"- weights: `model.safetensors`, sha256 `{sha256_file(out / 'model.safetensors')}`",
        f"- steps: {rows[-1]['step'] if rows else 0} of {cfg.steps}; kept: step {config['step']} (best validation)",
        f"- validation mIoU of the kept step: {config['val_miou']:.1f} % ({cfg.val_episodes} fixed episodes of "
        "held-out classes; per class, intersections and unions summed over its episodes)",
        f"- training wall time: {wall / 60:.1f} min on {platform.machine()} with {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "- validation curve (step: mIoU): " + ", ".join(f"{s}: {v:.1f}" for s, v in vals),
        _provenance_line(config.get("provenance")),
        "",
        "## Limits",
        "",
        "Offline sources hold no semantic class: superpixels are regions, synthetic classes are materials. The "
        "teacher learns to match regions between images, which is what few-shot transfer needs, but it has never "
        "seen an object class. Measure it on your data: `distillfss demo --compare-random` reports every demo "
        "dataset from this teacher and from a random one.",
        "",
    ]
    return "\n".join(lines)
