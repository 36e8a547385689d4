"""The work behind each CLI subcommand (argparse namespace in, files out)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .adapt import adapt as run_adapt
from .backbones import build_backbone
from .config import SPEED_ADAPT, SPEED_INFERENCE, AdaptConfig, ModelConfig, read_adapt_config, warm_config
from .config import model_config as preset_config
from .data import DataError, Split, class_sets, load_image, load_split, load_support_tensors, load_unlabeled
from .data.folder import image_files
from .errors import UserError
from .evaluate import evaluate_predictor
from .model_io import (
    LOG,
    TEACHER,
    ModelError,
    load_adapted_teacher,
    load_model,
    load_teacher_weights,
    read_config,
    resolve_teacher,
    save_model,
)
from .outputs import (
    GrowingFolder,
    OutputError,
    check_output,
    check_output_file,
    output_file,
    output_folder,
    replace_atomically,
    sha256_file,
    timestamp,
    write_json_file,
)
from .sampling import sample_support
from .viz import overlay, with_legend

if TYPE_CHECKING:
    from .export import OnnxPredictor
    from .predictor import Predictor

log = logging.getLogger("distillfss")


def int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DataError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise DataError(f"{flag}: expected integers >= {minimum}, got {text!r}")
    return values


def model_config(args: argparse.Namespace, num_classes: int) -> ModelConfig:
    return preset_config(args.backbone, num_classes, args.preset, args.image_size)


def config_from_args(cls, args: argparse.Namespace):  # noqa: ANN001, ANN201 - any config dataclass
    """A config dataclass from the flags of this subcommand that name its fields; its defaults for the rest."""
    return cls.from_dict({k: v for k, v in vars(args).items() if v is not None})


def adapt_config(args: argparse.Namespace, base: AdaptConfig | None = None) -> AdaptConfig:
    """The AdaptConfig of adapt, demo or benchmark: ``base`` (default: AdaptConfig's defaults), then the fields
    of ``--config FILE``, then the adaptation flags given on the command line."""
    fields = (base or AdaptConfig()).to_dict()
    if args.config is not None:
        fields.update(read_adapt_config(args.config))
    names = {f.name for f in dataclasses.fields(AdaptConfig)}
    fields.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    try:
        return AdaptConfig(**fields)
    except UserError as e:
        if args.config is None:
            raise
        raise UserError(f"{e} (flags and {args.config})") from None


def at_least(flag: str, value: float, low: float) -> None:
    """A flag's number below its least meaningful value is a one-line error naming the flag."""
    if value < low:
        raise DataError(f"{flag}: expected >= {low}, got {value}")


DEFAULT_SHOTS = 5  # support images sampled from a dataset's train/ when --shots is not given


def resolve_support(path: Path, shots: int | None) -> tuple[Split, list[str]]:
    """A dataset folder (K sampled from train/) or a plain images/+masks/ folder (all, or K sampled)."""
    if not path.is_dir():
        raise DataError(f"{path}: support folder not found")
    split = load_split(path, "train")
    stems = [s.stem for s in split.samples]
    if shots is None:  # a dataset's train/ with fewer than 5 images: all of them
        shots = min(DEFAULT_SHOTS, len(stems)) if (path / "train").is_dir() else len(stems)
    if shots > len(stems):
        raise DataError(f"{path}: {shots} shots requested but the pool has only {len(stems)} images")
    sets = class_sets(split)  # also validates every mask of the pool
    return split, sample_support(stems, shots, sets)


def command(args: argparse.Namespace) -> str:
    """How the manifest and the marks name the command that wrote a file."""
    sub = getattr(args, "data_command", None)
    return f"distillfss {args.command}" + (f" {sub}" if sub else "")


def teacher_input(spec: str | None) -> Path | None:
    """``--teacher``'s folder when it names one (an input like any other), else None."""
    return None if spec in (None, "auto", "shipped", "random") else Path(spec)


def scale_of(requested: str, files: list[Path], size: int) -> float | None:
    """``--scale`` for these support images (``tiling.choose_scale``; their sizes read from the file headers)."""
    from .data.folder import image_size
    from .tiling import choose_scale

    try:
        return choose_scale([image_size(f) for f in files], size, requested)
    except ValueError as e:
        raise DataError(f"--scale: {e}") from None


def adapt(args: argparse.Namespace) -> int:
    inputs = [args.support, args.unlabeled, args.config, teacher_input(args.teacher), args.backbone_weights]
    inputs.append(args.warm_from)
    check_output(args.out, args.overwrite, inputs, command=command(args))
    acfg = adapt_config(args)
    acfg.for_unlabeled(args.unlabeled is not None)  # refuse a bad combination before any image is read
    earlier = warm_source(args) if args.warm_from is not None else None
    if earlier is not None:
        acfg = warm_config(acfg, given_steps(args))
    split, stems = resolve_support(args.support, args.shots)
    device = torch.device(args.device)
    if earlier is not None:
        if tuple(split.classes) != earlier.classes:
            raise DataError(
                f"{args.support}: classes {list(split.classes)} differ from {args.warm_from}'s "
                f"{list(earlier.classes)}; a warm start keeps the classes (adapt without --from)"
            )
        mcfg = earlier.model_cfg
    else:
        mcfg = model_config(args, split.num_classes)
    support_files = [s.image for s in split.samples if s.stem in stems]
    scale = earlier.config.get("scale") if earlier is not None else scale_of(args.scale, support_files, mcfg.image_size)
    images, labels, sources = load_support_tensors(split, stems, mcfg.image_size, scale)
    unlabeled, unlabeled_names = None, []
    if args.unlabeled is not None:
        unlabeled, unlabeled_names = load_unlabeled(
            args.unlabeled, mcfg.image_size, args.max_unlabeled, support_files, scale
        )
        log.info("%d unlabeled images from %s", len(unlabeled_names), args.unlabeled)
    weights = args.backbone_weights or (earlier.config.get("backbone_weights") if earlier is not None else None)
    backbone = build_backbone(mcfg.backbone, mcfg.image_size, weights).to(device)
    student_init = None
    if earlier is not None:
        teacher, _, _ = load_adapted_teacher(args.warm_from, backbone)
        student_init = load_model(args.warm_from, backbone=backbone, device=device).model
        label = f"warm start from {args.warm_from}"
    else:
        start, label = resolve_teacher(args.teacher, mcfg)
        teacher = load_teacher_weights(start, backbone, mcfg) if start is not None else None
    log.info("starting teacher: %s", label)
    with output_folder(args.out, args.overwrite, inputs, command=command(args)) as tmp:
        log.info("adapting on %d support images of %s: %s", len(stems), split.root, ", ".join(stems))
        result = run_adapt(
            backbone,
            images.to(device),
            labels.to(device),
            mcfg,
            acfg,
            teacher=teacher,
            unlabeled=None if unlabeled is None else unlabeled.to(device),
            log_path=tmp / LOG,
            student_init=student_init,  # type: ignore[arg-type]
            probe_settings=earlier.config.get("probe") if earlier is not None else None,
            sources=sources,
        )
        model = result.student if result.student is not None else result.teacher
        meta = {
            "created": timestamp(),
            "adapt": result.config.to_dict(),
            "backbone_weights": str(weights) if weights else None,
            "support": {"dataset": str(split.root.resolve()), "stems": stems, "shots": len(stems)},  # any cwd
            "unlabeled": {"folder": str(args.unlabeled.resolve()), "images": unlabeled_names}
            if args.unlabeled
            else None,
            "teacher_init": label,
            "adapt_seconds": round(result.seconds, 2),
            "scale": scale,
            "estimate": result.estimate.to_dict(),
            "probe": result.probe_settings,
        }
        save_model(tmp, model, mcfg, split.classes, meta, support=(images, labels), teacher=result.teacher)
    kind = "student" if result.student is not None else "teacher"
    log.info("wrote %s (%s, %.1f s)", args.out, kind, result.seconds)
    print(f"{args.out}: {result.estimate.advice}")
    return 0


def warm_source(args: argparse.Namespace):  # noqa: ANN201 - a LoadedModel's config parts
    """``adapt --from MODEL``: the earlier model's config (its classes, architecture, pixel scale), checked before
    any training: a student folder written by adapt with its adapted teacher."""
    if teacher_input(args.teacher) is not None or args.teacher in ("shipped", "random"):
        raise DataError("--from starts from the earlier model's teacher: leave out --teacher")
    config = read_config(args.warm_from)
    if config.get("kind") != "student" or config.get("student") != "fast":
        raise ModelError(f"{args.warm_from}: --from needs a fast student folder written by adapt")
    if not (args.warm_from / TEACHER).is_file():
        raise ModelError(f"{args.warm_from}: no {TEACHER} (written by adapt since this version); adapt without --from")
    earlier = ModelConfig.from_dict(config["model"])
    _check_kept(args, earlier, config.get("scale"))
    return WarmSource(earlier, tuple(config["classes"]), config)


def _check_kept(args: argparse.Namespace, earlier: ModelConfig, scale: float | None) -> None:
    """A warm start keeps the earlier model's backbone, preset, size and pixel scale: a flag that asks for others
    is refused (it would be ignored)."""
    from .tiling import choose_scale

    def same_scale(requested: str) -> bool:
        try:
            return requested != "auto" and choose_scale([], 1, requested) == scale
        except ValueError:
            return False

    def same_preset(preset: str) -> bool:
        kept = dataclasses.replace(earlier, num_classes=1)
        return preset_config(earlier.backbone, 1, preset, earlier.image_size) == kept

    asked = {
        f"--backbone {args.backbone}": args.backbone not in (ModelConfig.backbone, earlier.backbone),
        f"--preset {args.preset}": args.preset != "fast" and not same_preset(args.preset),
        f"--image-size {args.image_size}": args.image_size not in (None, earlier.image_size),
        f"--scale {args.scale}": args.scale != "auto" and not same_scale(args.scale),
    }
    refused = [flag for flag, differs in asked.items() if differs]
    if refused:
        raise DataError(
            f"--from keeps {args.warm_from}'s backbone, preset, size and pixel scale ({earlier.backbone}, "
            f"{earlier.image_size} px, scale {'fit' if scale is None else f'{scale:g}'}): leave out {', '.join(refused)}"
            " (or adapt without --from)"
        )


@dataclasses.dataclass(frozen=True)
class WarmSource:
    model_cfg: ModelConfig
    classes: tuple[str, ...]
    config: dict


def given_steps(args: argparse.Namespace) -> list[str]:
    """The step counts the user set (flags or --config), which a warm start keeps."""
    given = [k for k in ("iterations", "fast_iterations") if getattr(args, k, None) is not None]
    if args.config is not None:
        given += [k for k in read_adapt_config(args.config) if k in ("iterations", "fast_iterations")]
    return given


def predict(args: argparse.Namespace) -> int:
    """Segment an image file or folder into --out. Under torchrun, each process takes every world-th image of the
    name-sorted list; images whose labels are already in --out (written by an earlier predict) are skipped, so a
    run that stopped resumes on any number of processes. Labels and overlays are each written atomically; the
    folder's manifest lists them all at the end."""
    import os

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    inputs = [args.images, args.model, args.backbone_weights]
    at_least("--batch", args.batch, 1)
    earlier = GrowingFolder.check(args.out, inputs, command=command(args))
    settings = _predict_settings(args)
    if earlier is not None and not args.overwrite:  # resume only what the same model and settings began
        record = args.out / PREDICT_RECORD
        before = json.loads(record.read_text()) if record.is_file() else None
        changed = [k for k in settings if k != "model" and before is not None and before.get(k) != settings[k]]
        if changed:
            what = " and ".join("model" if k == "model_sha256" else "--" + k.replace("_", "-") for k in changed)
            raise DataError(
                f"{args.out}: holds labels predicted with another {what} (from {before.get('model')}); resuming "
                "would mix them: --overwrite starts it again, or choose another --out"
            )
    files = image_files(args.images)
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise DataError(f"{f}: has the stem of {stems[f.stem]}; both would be written as {f.stem}.png")
        stems[f.stem] = f
    predictor, classes, _ = _predictor(args)
    folder = _predict_folder(args, inputs, rank, world)
    if rank == 0 and PREDICT_RECORD not in folder.files():
        folder.write_json(PREDICT_RECORD, settings)
    outputs = ("{}.png", "{}_overlay.png") if args.overlay else ("{}.png",)
    done = set(folder.files())
    mine = [f for f in files[rank::world] if not all(o.format(f.stem) in done for o in outputs)]
    if len(mine) < len(files[rank::world]):
        log.info("%d of %d images already in %s: skipped", len(files[rank::world]) - len(mine), len(files), args.out)
    unreadable: list[str] = []
    loaded: list[tuple[Path, np.ndarray]] = []

    def images():  # read as they are needed (bounded memory), unreadable ones named at the end
        for f in mine:
            try:
                img = load_image(f, keep_uint8=True)
            except DataError as e:
                unreadable.append(str(e))
                continue
            loaded.append((f, img))
            yield img

    journal = args.out / f"{JOURNAL}{rank}"
    with (
        open(journal, "a") as written,
        tqdm(total=len(mine), desc="predict", disable=None if rank == 0 else True) as bar,
    ):
        for labels in predictor.stream(images(), batch=args.batch):
            f, img = loaded.pop(0)
            pngs = {f"{f.stem}.png": labels}
            if args.overlay:
                shown = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img
                pngs[f"{f.stem}_overlay.png"] = with_legend(
                    [overlay(shown, labels)], [f"{f.name} ({args.model.name})"], classes
                )
            for name in pngs:  # refused before anything of this image is written or recorded
                _check_ours(args.out / name, name in done)
            written.write("".join(n + "\n" for n in pngs))  # recorded first: a kill never leaves a file unrecorded
            written.flush()
            for name, array in pngs.items():
                replace_atomically(args.out / name, lambda tmp, a=array: Image.fromarray(a).save(tmp, format="PNG"))
            bar.update(1)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        folder.merge_journals(JOURNAL)
    if world > 1:
        dist.destroy_process_group()
    log.info("wrote %d label maps to %s", len(mine) - len(unreadable), args.out)
    if unreadable:
        raise DataError(
            f"{len(unreadable)} of {len(files)} images could not be read (every other image was predicted into "
            f"{args.out}): " + "; ".join(unreadable)
        )
    return 0


JOURNAL = ".distillfss-journal."  # per process: the files predict wrote, merged into the manifest at the end
PREDICT_RECORD = ".distillfss-predict.json"  # what made the labels in a predict folder: a resume must match it


def _predict_settings(args: argparse.Namespace) -> dict:
    """What decides predict's labels besides the images: the model's files (their SHA-256), the engine, precision,
    voting chunk and backbone weights. ``model`` (where it was read) is kept for messages, not compared."""
    model = args.model.resolve()
    parts = [model] if model.is_file() else sorted(model.glob("*.json")) + sorted(model.glob("*.safetensors"))
    digest = "".join(f"{p.name}:{sha256_file(p)};" for p in parts if not p.name.startswith("."))
    return {
        "model": str(model),
        "model_sha256": hashlib.sha256(digest.encode()).hexdigest(),
        "engine": args.engine,
        "precision": args.precision,
        "vote_chunk": args.vote_chunk,
        "backbone_weights": str(args.backbone_weights) if args.backbone_weights else None,
    }


def _predict_folder(args: argparse.Namespace, inputs: list, rank: int, world: int) -> GrowingFolder:
    """Rank 0 claims --out (new, resumed, or started again with --overwrite) and records what a stopped run wrote;
    under torchrun the other processes wait for it (gloo: no GPU needed to coordinate)."""
    folder = None
    if rank == 0:
        if GrowingFolder.check(args.out, inputs, command=command(args)) is not None:
            GrowingFolder(args.out, command(args)).merge_journals(JOURNAL)  # what a stopped run wrote is ours
        folder, _ = GrowingFolder.claim(args.out, args.overwrite, inputs, command=command(args))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()
    return folder or GrowingFolder(args.out, command(args))


def _check_ours(path: Path, recorded: bool) -> None:
    """A file of this name that predict did not record is never replaced."""
    if not recorded and (path.exists() or path.is_symlink()):
        raise OutputError(f"{path}: was not written by distillfss and would be replaced; nothing more written")


def _predictor(args: argparse.Namespace) -> tuple[Predictor | OnnxPredictor, tuple[str, ...], str]:
    """The model of ``--model`` as a predictor -> (predictor, class names, kind: student / teacher / onnx)."""
    if args.vote_chunk < 0:
        raise DataError(f"--vote-chunk: expected >= 0 (0: every shot at once), got {args.vote_chunk}")
    if args.engine == "onnx":
        from .export import OnnxPredictor

        if not args.model.is_file():
            raise DataError(f"{args.model}: --engine onnx needs the .onnx file written by export")
        predictor = OnnxPredictor(args.model)
        return predictor, predictor.classes, "onnx"
    loaded = load_model(
        args.model,
        args.backbone_weights,
        device=args.device,
        precision=args.precision,
        vote_chunk=args.vote_chunk,
    )
    return loaded.predictor, loaded.classes, loaded.kind


def evaluate(args: argparse.Namespace) -> int:
    inputs = [args.model, args.data, args.backbone_weights]
    if args.json is not None:
        check_output_file(args.json, args.overwrite, inputs, command=command(args))
    predictor, classes, kind = _predictor(args)
    split = load_split(args.data, args.split)
    if split.classes != classes:
        raise DataError(f"{args.data}: classes {list(split.classes)} differ from the model's {list(classes)}")
    at_least("--eval-size", args.eval_size, 0)
    per_image: list[dict] | None = [] if args.per_image else None
    result = evaluate_predictor(predictor, split, eval_size=args.eval_size or None, per_image=per_image)
    own = _support_scored(args.model, split)
    report = {
        **result.to_json(),
        "vote_chunk": (predictor.vote_chunk if predictor.voting else 0) if kind == "teacher" else None,
        "eval_resolution": args.eval_size or "original",
        "support_images_scored": own,
    }
    if per_image is not None:
        report["per_image"] = per_image
    print(json.dumps(report, indent=2))
    if own:
        log.warning(
            "note: %d of the %d images scored are the model's own support images: this mIoU is not a test score",
            own,
            len(split.samples),
        )
    if args.json:
        write_json_file(args.json, report, args.overwrite, inputs, command=command(args))
    return 0


def _support_scored(model: Path, split: Split) -> int:
    """How many of the split's images are the model's own support images (as ``adapt`` recorded them)."""
    if not model.is_dir():
        return 0
    support = read_config(model).get("support") or {}
    root, stems = support.get("dataset"), set(support.get("stems") or ())
    if not root or not stems:
        return 0
    base = Path(root) / "train" if (Path(root) / "train").is_dir() else Path(root)
    images = (base / "images").resolve()
    return sum(1 for s in split.samples if s.stem in stems and s.image.parent.resolve() == images)


def suggest(args: argparse.Namespace) -> int:
    from .api import FewShotSegmenter

    inputs = [args.model, args.images, args.backbone_weights]
    if args.json is not None:
        check_output_file(args.json, args.overwrite, inputs, command=command(args))
    at_least("--top", args.top, 0)
    files = image_files(args.images)
    seg = FewShotSegmenter.load(args.model, device=args.device, backbone_weights=args.backbone_weights)
    scored, unreadable = [], []
    for start in range(0, len(files), SUGGEST_BATCH):  # a batch of images in memory at a time
        chunk = []
        for f in files[start : start + SUGGEST_BATCH]:
            try:
                chunk.append((f, load_image(f)))
            except DataError as e:  # named at the end, as predict does; the other images are ranked
                unreadable.append(str(e))
        scored += [(chunk[i][0], score) for i, score in seg.suggest([im for _, im in chunk])] if chunk else []
    scored.sort(key=lambda t: (-t[1], t[0]))
    ranking = [{"image": str(f), "score": round(score, 2)} for f, score in scored]
    shown = ranking[: args.top] if args.top else ranking
    print(f"label next ({len(shown)} of {len(ranking)}; score: student vs probe disagreement, 0-100)")
    for rank, row in enumerate(shown, 1):
        print(f"{rank:4d}  {row['score']:6.2f}  {row['image']}")
    if args.json:
        report = {"model": str(args.model), "images": str(args.images), "ranking": ranking, "unreadable": unreadable}
        write_json_file(args.json, report, args.overwrite, inputs, command=command(args))
    if unreadable:
        raise DataError(
            f"{len(unreadable)} of {len(files)} images could not be read (every other image is ranked above): "
            + "; ".join(unreadable)
        )
    return 0


SUGGEST_BATCH = 32  # images read at a time by suggest


def speed(args: argparse.Namespace) -> int:
    from .speed import ONNX_MODELS, run_speed, table

    # each mode's own flags: given in the other mode, they are refused rather than ignored
    own, other = (SPEED_ADAPT, SPEED_INFERENCE) if args.adapt else (SPEED_INFERENCE, SPEED_ADAPT)
    stray = [f"--{k.replace('_', '-')}" for k in other if getattr(args, k) is not None]
    if stray:
        them = "it" if len(stray) == 1 else "them"
        why = (
            f"inference timing only; leave {them} out with --adapt"
            if args.adapt
            else f"set what --adapt times; add --adapt or leave {them} out"
        )
        raise DataError(f"{', '.join(stray)}: {why}")
    opt = {k: default if getattr(args, k) is None else getattr(args, k) for k, default in own.items()}
    if args.json is not None:
        check_output_file(args.json, args.overwrite, [args.backbone_weights], command=command(args))
    shots = int_list(args.shots, "--shots")
    if args.threads is not None:
        at_least("--threads", args.threads, 1)
    if not args.timeout > 0:
        raise DataError(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    if args.adapt:
        return _speed_adapt(args, shots, opt)
    ways = int_list(opt["ways"], "--ways")
    for flag, value, low in (
        ("--warmup", opt["warmup"], 0),
        ("--iters", opt["iters"], 1),
        ("--chunk", opt["chunk"], 0),
    ):
        at_least(flag, value, low)
    models = tuple(m.strip() for m in opt["models"].split(","))
    known = ("backbone", "student", "student_fast", *ONNX_MODELS, "teacher")
    bad = set(models) - set(known)
    if bad:
        raise DataError(f"--models: unknown {sorted(bad)}; choose from {', '.join(known)}")
    if set(ONNX_MODELS) & set(models) and args.device != "cpu":
        raise DataError("--models onnx runs on onnxruntime's CPU provider; use --device cpu")
    mcfg = model_config(args, 1)
    result = run_speed(
        mcfg,
        ways,
        shots,
        args.device,
        opt["warmup"],
        opt["iters"],
        args.threads,
        models,
        progress=log.info,
        precision=args.precision,
        channels_last=opt["channels_last"],
        compile=opt["compile"],
        chunk=opt["chunk"],
        timeout_s=args.timeout,
    )
    print(table(result))
    if args.json is not None:
        write_json_file(args.json, result, args.overwrite, [args.backbone_weights], command=command(args))
    return 0


def _speed_adapt(args: argparse.Namespace, shots: list[int], opt: dict) -> int:
    from .adapt_speed import adapt_table, run_adapt_speed

    sets = [t.strip() for t in opt["trainable"].split(",") if t.strip()]
    if not sets or set(sets) - {"A", "B", "C"}:
        raise DataError(f"--trainable: expected a comma-separated subset of A,B,C, got {opt['trainable']!r}")
    caps = int_list(opt["max_shots"], "--max-shots", minimum=0)
    at_least("--steps", opt["steps"], 1)
    result = run_adapt_speed(
        model_config(args, 1),
        shots,
        sets,
        caps,
        opt["steps"],
        args.device,
        args.threads,
        args.timeout,
        log.info,
        precision=args.precision,
    )
    print(adapt_table(result))
    if args.json is not None:
        write_json_file(args.json, result, args.overwrite, [args.backbone_weights], command=command(args))
    return 0


def app(args: argparse.Namespace) -> int:
    try:
        from .app import launch
    except ImportError as e:
        raise DataError(f"distillfss app needs Gradio: pip install 'distillfss[app]' ({e})") from None
    at_least("--steps", args.steps, 1)
    if not 0 <= args.port <= 65535:
        raise DataError(f"--port: expected 0 (any free port) to 65535, got {args.port}")
    if args.port and not _port_free(args.port):  # before the workspace is made
        raise DataError(f"--port {args.port}: in use on 127.0.0.1 (another app?); pick another, or 0 for any free one")
    options = {"backbone": args.backbone, "preset": args.preset, "image_size": args.image_size, "teacher": args.teacher}
    options.update(backbone_weights=args.backbone_weights, device=args.device)
    log.info("workspace %s; open http://127.0.0.1:%d in a browser (Ctrl-C stops)", args.workspace, args.port)
    launch(args.workspace, args.port or None, args.model, steps=args.steps, **options)
    return 0


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def export(args: argparse.Namespace) -> int:
    from .export import export_onnx, mark_onnx, onnx_path

    inputs = [args.model, args.calibration, args.backbone_weights]
    check_output_file(args.out, args.overwrite, inputs, command=command(args))
    onnx_path(args.out)
    loaded = load_model(args.model, args.backbone_weights)
    if loaded.kind != "student":
        raise DataError(f"{args.model}: is a {loaded.kind}; only students export (they need no support input)")
    calibration = _calibration_set(args, loaded) if args.quantize == "int8" else None
    with output_file(args.out, args.overwrite, inputs, command=command(args)) as tmp:
        scale = loaded.config.get("scale")
        export_onnx(loaded.model, loaded.model_cfg.image_size, loaded.classes, tmp, name=args.out, scale=scale)
        if calibration is not None:
            _quantize(args, loaded, tmp, calibration)
        mark_onnx(tmp, command(args))
    log.info("wrote %s", args.out)
    return 0


def _quantize(args: argparse.Namespace, loaded, fp32: Path, calibration: tuple[np.ndarray, np.ndarray, str]) -> None:
    """Replace the exported fp32 graph ``fp32`` with its checked int8 version (or refuse, naming ``--out``)."""
    from .export import Int8Refused, onnx_ms_per_image, quantize_int8_checked

    images, labels, where = calibration
    int8 = fp32.with_name(f"{fp32.stem}.int8.onnx")

    def tried(t: dict) -> None:
        log.info("int8 plan %r: mIoU %.2f (fp32 %.2f) on %s", t["plan"], t["miou"], t["fp32"], where)

    try:
        report = quantize_int8_checked(fp32, int8, images, labels, loaded.classes, MAX_INT8_DROP, tried)
        log.info(
            "%s: int8 plan %r, mIoU %.2f against fp32 %.2f on %d images of %s",
            args.out, report["plan"], report["int8"], report["fp32"], len(images), where,
        )  # fmt: skip
        ms8, ms32 = (onnx_ms_per_image(p, images) for p in (int8, fp32))
        log.info("onnxruntime, one image: int8 %.1f ms, fp32 %.1f ms (median of 5 calls, this machine)", ms8, ms32)
        int8.replace(fp32)
    except Int8Refused as e:
        best = max(e.tried, key=lambda t: t["miou"])
        raise ModelError(
            f"{args.out}: not written: every int8 plan loses more than {MAX_INT8_DROP} mIoU points against "
            f"fp32 ({e.fp32_miou:.2f}) on {where} (best: {best['plan']!r}, {best['miou']:.2f}); export "
            "without --quantize"
        ) from None
    finally:
        int8.unlink(missing_ok=True)


MAX_INT8_DROP = 1.0  # mIoU points an int8 export may lose against fp32 on its calibration images
MAX_CALIBRATION = 32  # images


def _calibration_set(args: argparse.Namespace, loaded) -> tuple[np.ndarray, np.ndarray, str]:
    """Images and labels at the working size for int8 calibration and its mIoU check: ``--calibration`` (a dataset
    folder's train split, or an images/ + masks/ folder; at most 32, evenly spread), else the model's own support
    images, read from the dataset folder its config.json records."""
    size = loaded.model_cfg.image_size
    if args.calibration is not None:
        split = load_split(args.calibration, "train")
        stems = [s.stem for s in split.samples]
        if len(stems) > MAX_CALIBRATION:
            stems = [stems[int(i)] for i in np.unique(np.linspace(0, len(stems) - 1, MAX_CALIBRATION).round())]
        where = str(args.calibration)
    else:
        recorded = (loaded.config.get("support") or {}).get("dataset")
        if not recorded or not Path(recorded).is_dir():
            raise DataError(
                f"{args.model}: its support folder ({recorded}) is not readable here; give --calibration DIR "
                "(images with masks of the same domain) for the int8 calibration and check"
            )
        split, stems, where = load_split(Path(recorded), "train"), loaded.config["support"]["stems"], "its support set"
    if split.classes != loaded.classes:
        raise DataError(f"{split.root}: classes {list(split.classes)} differ from the model's {list(loaded.classes)}")
    images, labels, _ = load_support_tensors(split, stems, size, loaded.config.get("scale"))
    return images.numpy(), labels.numpy(), where


def benchmark(args: argparse.Namespace) -> int:
    from .benchmark import BenchmarkConfig, run_benchmark, table

    cfg = BenchmarkConfig(
        data=tuple(s.strip() for s in args.data.split(",") if s.strip()),
        out=args.out,
        shots=tuple(int_list(args.shots, "--shots")),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        seeds=tuple(int_list(args.seeds, "--seeds", minimum=0)) if args.seeds else (0,),
        draws=args.draws,
        adapt=adapt_config(args),
        **_shared_run_flags(args),
        per_class=args.per_class,
        eval_size=args.eval_size,
        data_root=args.data_root,
        max_unlabeled=args.max_unlabeled,
        scale=args.scale,
    )
    inputs = [args.config, teacher_input(args.teacher), args.backbone_weights]
    print(table(run_benchmark(cfg, inputs=inputs, command=command(args), invocation=args.invocation)))
    return 0


def _shared_run_flags(args: argparse.Namespace) -> dict:
    """The flags of the fields demo and benchmark share (protocol.RunConfig) other than the seeds and the adaptation
    config, which each command parses itself."""
    from .protocol import RunConfig

    skip = ("seeds", "adapt")
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(RunConfig)
        if f.name not in skip and hasattr(args, f.name)
    }


def data(args: argparse.Namespace) -> int:
    from .data.paper import convert

    if not args.src.is_dir():  # before anything else is said about it
        raise DataError(f"{args.src}: folder not found (the {args.name} dataset as downloaded)")
    with output_folder(args.dst, args.overwrite, [args.src], command=command(args)) as tmp:
        counts = convert(args.name, args.src, tmp, args.fold, args.trust_pickle)
    log.info("wrote %s: %d train, %d test images", args.dst, counts["train"], counts["test"])
    return 0


def demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_ADAPT, DemoConfig, demo_datasets, run_demo

    spec = args.datasets or ",".join(demo_datasets())
    cfg = DemoConfig(
        datasets=tuple(n.strip() for n in spec.split(",") if n.strip()),
        out=args.out,
        shots=args.shots,
        seeds=tuple(int_list(args.seeds, "--seeds", minimum=0)),
        adapt=adapt_config(args, DEMO_ADAPT),
        compare_random=args.compare_random,
        **_shared_run_flags(args),
    )
    run_demo(cfg, inputs=[args.config, teacher_input(args.teacher), args.backbone_weights], command=command(args))
    return 0


def meta_train(args: argparse.Namespace) -> int:
    """Source-domain teacher training; under torchrun each process joins the process group first."""
    import os

    import torch.distributed as dist

    from .config import MetaConfig
    from .data.sources import build_source
    from .meta import meta_train as run_meta_train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device)
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    try:
        inputs = [args.data, args.backbone_weights]
        GrowingFolder.check(args.out, inputs, command=command(args))  # refused before the source is read
        cfg = config_from_args(MetaConfig, args)
        mcfg = model_config(args, 1)
        at_least("--save-every", args.save_every, 1)
        at_least("--cache-gb", args.cache_gb, 0)
        source = build_source(cfg.source, args.data, mcfg.image_size, cfg.fold, cfg.views, cfg.seed)
        backbone = build_backbone(mcfg.backbone, mcfg.image_size, args.backbone_weights).to(device)
        # Rank 0 claims the folder (started, resumed, or started again with --overwrite); the others wait for it.
        folder = None
        if rank == 0:
            folder, _ = GrowingFolder.claim(args.out, args.overwrite, inputs, command=command(args))
        if world > 1:
            dist.barrier()
        result = run_meta_train(
            source, backbone, mcfg, cfg, folder or args.out, save_every=args.save_every, cache_gb=args.cache_gb
        )
        if rank == 0:
            log.info("wrote %s: best validation mIoU %.1f at step %d", args.out, result.best_miou, result.best_step)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0
