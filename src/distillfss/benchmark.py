"""``distillfss benchmark``: the protocol over datasets x shots, resumable, with a Table-1-shaped table and plots.

Each cell (dataset, K) uses the fixed, nested support set of the midpoint sampler; every method is adapted on it and
evaluated on every test image. ``results.json`` is rewritten after each finished cell, so an interrupted run
started again with the same command skips the cells it already has.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import BENCHMARK_METHODS
from .data import DataError, load_split
from .demo import demo_datasets, demo_root
from .model_io import ModelError, resolve_teacher
from .outputs import MANIFEST, GrowingFolder, machine, provenance, refuse_unsafe_output, timestamp, written_files
from .protocol import ALL_METHODS, BackboneCache, Cell, RunConfig, run_seeds
from .stats import mean_std, paired_comparison
from .tiling import choose_scale

log = logging.getLogger("distillfss")

PAPER_DATASETS = ("lung", "isic", "kvasir", "nucleus", "weedmap", "pothole", "industrial")


def resolve_dataset(spec: str, data_root: Path = Path("datasets")) -> tuple[str, Path]:
    """A bundled demo dataset name, one of the paper's seven names (converted under ``data_root``; Industrial-5i
    as ``industrial_fold<f>``), or a folder in the project format."""
    if spec in demo_datasets():
        return spec, demo_root() / spec
    path = Path(spec)
    if path.is_dir():
        return path.name, path
    name = spec.lower()
    if name in PAPER_DATASETS:
        found = sorted(data_root.glob(f"{name}*/dataset.json"))
        if len(found) == 1:
            return found[0].parent.name, found[0].parent
        raise DataError(
            f"{spec}: no converted copy in {data_root}/ ({len(found)} matches); convert the download first with "
            f"`distillfss data convert {name} SRC {data_root}/{name}` or pass the folder"
        )
    raise DataError(f"{spec}: neither a bundled dataset ({', '.join(demo_datasets())}) nor a folder")


@dataclass(frozen=True, kw_only=True)
class BenchmarkConfig(RunConfig):
    """Everything a benchmark run depends on (the CLI's flags, typed). Invalid values raise ``DataError``."""

    data: tuple[str, ...]  # bundled demo names, the paper's names (under data_root) or dataset folders
    out: Path
    shots: tuple[int, ...] = (1, 2, 5)
    methods: tuple[str, ...] = BENCHMARK_METHODS
    draws: int = 1
    per_class: bool = False
    eval_size: int = 384  # 0: original resolution (WeedMap always native)
    data_root: Path = Path("datasets")
    max_unlabeled: int = 64
    scale: str = "auto"  # the pixel scale asked for (``adapt --scale``)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise DataError("--data: name at least one dataset")
        if not self.shots or min(self.shots) < 1:
            raise DataError(f"--shots: expected integers >= 1, got {list(self.shots)}")
        if self.draws < 1:
            raise DataError(f"--draws: expected a positive number of support draws, got {self.draws}")
        bad = sorted(set(self.methods) - set(ALL_METHODS))
        if bad:
            raise DataError(f"--methods: unknown {bad}; choose from {', '.join(ALL_METHODS)}")
        if self.max_unlabeled < 1:
            raise DataError(f"--max-unlabeled: expected a positive number, got {self.max_unlabeled}")
        if not (self.eval_size == 0 or 32 <= self.eval_size <= 4096):
            raise DataError(f"--eval-size: 0 (each image's own size) or 32 to 4096 px, got {self.eval_size}")
        try:
            choose_scale([], 1, self.scale)
        except ValueError as e:
            raise DataError(f"--scale: {e}") from None


COMMAND = "distillfss benchmark"


def run_benchmark(
    cfg: BenchmarkConfig, inputs: Sequence[Path | None] = (), command: str = COMMAND, invocation: str | None = None
) -> dict:
    """Run (or resume) the benchmark -> its results (also in ``cfg.out``: results.json, table.md, plots).

    ``cfg.out``: a new or empty folder, or one an earlier benchmark (``command``) wrote: resumed when it holds the
    same configuration, started again (its files removed, nothing else) with ``cfg.overwrite``. ``inputs``: paths
    the run reads besides the datasets (a config file, a teacher folder), which the output may not touch.
    ``invocation``: the full command line, recorded in the results' ``provenance`` (with the commit, machine and
    date; a resume is added to its ``resumed`` list); default ``command``."""
    datasets = [resolve_dataset(s, cfg.data_root) for s in cfg.data]
    names = [name for name, _ in datasets]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        paths = ", ".join(str(root) for name, root in datasets if name == clash[0])
        raise DataError(f"--data: two datasets are named {clash[0]} ({paths}); results are keyed by name, rename one")
    for _, root in datasets:  # a plain images/ + masks/ folder would be scored on its own support images
        missing = [s for s in ("train", "test") if not (root / s).is_dir()]
        if missing:
            raise DataError(
                f"{root}: no {' or '.join(f'{s}/' for s in missing)} split; a benchmark draws support sets from "
                "train/ and scores test/ (images it never adapted on)"
            )
    shots = sorted(set(cfg.shots))
    seeds = list(dict.fromkeys(cfg.seeds))
    methods = cfg.methods
    acfg = cfg.adapt
    config = {
        "preset": cfg.preset,
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        "probe_size": cfg.probe_size,
        "adapt": {**acfg.to_dict(), "seed": None},  # the seeds are below
        "seeds": seeds,
        "draws": cfg.draws,
        "vote_chunk": cfg.vote_chunk,
        "max_unlabeled": cfg.max_unlabeled,
        "scale": cfg.scale,
        "methods": list(methods),
        "per_class": cfg.per_class,
        "eval_size": cfg.eval_size,
        "teacher": cfg.teacher,
        "data": {name: str(root.resolve()) for name, root in datasets},
        "device": cfg.device,
        "threads": torch.get_num_threads(),
    }
    config = json.loads(json.dumps(config))  # as results.json holds it (tuples as lists), so a resume compares equal
    out = cfg.out
    roots = [root for _, root in datasets]
    refuse_unsafe_output(out, [*roots, *inputs])
    results_path = out / "results.json"
    made = provenance(invocation or command, cfg.device)
    results = {"created": timestamp(), "provenance": made, "config": config, "rows": []}
    if not cfg.overwrite and (out / MANIFEST).is_file() and "results.json" in written_files(out):
        previous = json.loads(results_path.read_text())
        if previous.get("config") != config:
            raise ModelError(f"{results_path}: was made with another configuration; use another --out or --overwrite")
    folder, resumed = GrowingFolder.claim(out, cfg.overwrite, [*roots, *inputs], command=command)
    if resumed and "results.json" in folder.files():
        results = json.loads(results_path.read_text())
        if "provenance" in results:  # (files written before it was recorded have none)
            results["provenance"].setdefault("resumed", []).append(made)
        log.info("resuming: %d rows already in %s", len(results["rows"]), results_path)
    done = {(r["dataset"], r["shots"], r.get("draw", 0)) for r in results["rows"]}
    here = machine(cfg.device)
    backbones = BackboneCache(cfg.backbone, cfg.backbone_weights, torch.device(cfg.device))
    for name, root in datasets:
        train, test = load_split(root, "train"), load_split(root, "test")
        for k in shots:
            total = k * train.num_classes if cfg.per_class else k
            if total > len(train.samples):
                log.warning("[%s] K=%d skipped: the pool has %d images", name, k, len(train.samples))
                continue
            mcfg = cfg.model_config(train.num_classes)
            start, label = resolve_teacher(cfg.teacher, mcfg)
            # The paper scores WeedMap at its native tile size and every other dataset at 384 x 384.
            native = cfg.eval_size == 0 or name.lower().startswith("weedmap")
            for draw in range(cfg.draws):
                if (name, k, draw) in done:
                    continue
                cell = Cell(
                    name,
                    train,
                    test,
                    k,
                    mcfg,
                    acfg,
                    cfg.probe_size or mcfg.image_size,
                    methods,
                    cfg.per_class,
                    None if native else cfg.eval_size,
                    start,
                    label,
                    draw,
                    cfg.vote_chunk,
                    max_unlabeled=cfg.max_unlabeled,
                    scale=cfg.scale,
                )
                log.info("[%s] K=%d draw %d, seeds %s", name, k, draw, seeds)
                stem = f"train_log_{name}_{k}shot_draw{draw}_"
                for stale in [f for f in folder.files() if f.startswith(stem)]:  # an interrupted cell starts over
                    folder.remove(stale)
                rows, _ = run_seeds(cell, seeds, backbones, log_to=lambda tag, s=stem: folder.path(f"{s}{tag}.jsonl"))
                rows = [{**r, "machine": here} for r in rows]  # a resumed run may finish on another machine
                for r in rows:
                    log.info(
                        "[%s] K=%-3d draw %d seed %-4s %-12s mIoU %6.2f",
                        name,
                        k,
                        draw,
                        r["seed"],
                        r["method"],
                        r["miou"],
                    )
                results["rows"] += rows
                folder.write_json("results.json", results)  # after every cell: an interrupted run resumes from here
    folder.write_json("results.json", results)
    folder.write_text("table.md", table(results))
    folder.write_with("miou_vs_shots.png", lambda tmp: plot(results, tmp))
    return results


def _runs(rows: list[dict], method: str, dataset: str, shots: int) -> list[dict]:
    return [r for r in rows if r["method"] == method and r["dataset"] == dataset and r["shots"] == shots]


def table(results: dict) -> str:
    """Rows = methods, column groups = datasets, columns = K (the paper's Table 1 layout); each cell the mean ± std
    over every run (support draws x seeds), then paired comparisons with their intervals and verdicts."""
    rows = results["rows"]
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = [(n, k) for n in names for k in sorted({r["shots"] for r in rows if r["dataset"] == n})]
    config = results.get("config", {})
    size = config.get("eval_size")
    weedmap = any(n.lower().startswith("weedmap") for n in names)
    where = "at original resolution"
    if size:
        where = f"with the ground truth resized to {size} x {size}, as in the paper" + (
            " (WeedMap native)" if weedmap else ""
        )
    seeds, draws = config.get("seeds", [config.get("adapt", {}).get("seed")]), config.get("draws", 1)
    lines = [
        f"Foreground mIoU (%), dataset-level confusion matrix {where}; mean ± std over {draws} support draw(s) x "
        f"seeds {seeds} (the baselines, and a teacher that starts from a saved one, do not depend on the seed: one "
        "run per draw); `mean` = mean of the columns. Configuration in results.json.",
        "",
        "| method | " + " | ".join(f"{n} K={k}" for n, k in cols) + " | mean |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for m in methods:
        cells, col_means = [], []
        for n, k in cols:
            runs = _runs(rows, m, n, k)
            if not runs:
                cells.append("-")
                continue
            mean, std = mean_std([r["miou"] for r in runs])
            col_means.append(mean)
            cells.append(f"{mean:.1f}" if len(runs) == 1 else f"{mean:.1f} ± {std:.1f}")
        overall = sum(col_means) / len(col_means) if col_means else float("nan")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {overall:.1f} |")
    lines += ["", *comparisons(rows)]
    return "\n".join(lines) + "\n"


def _paired(rows: list[dict], a: str, b: str, field: str = "miou") -> tuple[list[float], list[float], list[tuple]]:
    """a's and b's ``field`` (mIoU) on every run they share (same dataset, K and draw, and the same seed where b
    depends on it), with each pair's group (dataset, K, draw): the runs of a group share their support set."""
    ref = {(r["dataset"], r["shots"], r.get("draw", 0), r.get("seed")): r[field] for r in rows if r["method"] == b}
    xs, ys, groups = [], [], []
    for r in rows:
        if r["method"] != a:
            continue
        key = (r["dataset"], r["shots"], r.get("draw", 0))
        y = ref.get((*key, r.get("seed")), ref.get((*key, None)))
        if y is not None:
            xs.append(r[field])
            ys.append(y)
            groups.append(key)
    return xs, ys, groups


def comparisons(rows: list[dict]) -> list[str]:
    """Every adapted method against each simple baseline, the teacher before adaptation and TransferFSS (and each
    DistillFSS variant against each DistillFSS row its name extends, e.g. distillfss_fast_unlabeled against
    distillfss_fast): the mean paired difference over runs (dataset x K x draw x seed), its 95 % paired-bootstrap
    interval, and a verdict."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    adapted = [m for m in methods if m.startswith(("transferfss", "distillfss"))]
    refs = [m for m in ("linear_probe", "prototype", "teacher", "transferfss") if m in methods]
    lines = []
    for a in adapted:
        # a variant also against each DistillFSS row its name extends (distillfss_fast_unlabeled: distillfss,
        # distillfss_fast)
        for b in refs + [m for m in methods if m.startswith("distillfss") and a.startswith(f"{m}_")]:
            if b == a:
                continue
            xs, ys, groups = _paired(rows, a, b)
            if not xs:
                continue
            c = paired_comparison(xs, ys, groups)
            interval = "" if c.n < 2 else f" [{c.low:+.1f}, {c.high:+.1f}]"
            lines.append(f"| {a} | {b} | {c.mean:+.1f}{interval} | {c.n} | {c.verdict} |")
    if not lines:
        return []
    return [
        "Paired differences (method − reference, mIoU points): mean over the shared runs (dataset x K x draw x seed) "
        "with its 95 % interval from a hierarchical paired bootstrap (support sets (dataset, K, draw) resampled, then "
        "seeds within them); an interval that contains 0 is noise.",
        "",
        "| method | vs | difference [95 % interval] | runs | verdict |",
        "|---|---|---|---|---|",
        *lines,
    ]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, n in zip(axes[0], names):
        for m in dict.fromkeys(r["method"] for r in rows):
            ks = sorted({r["shots"] for r in rows if r["dataset"] == n and r["method"] == m})
            stats = [mean_std([r["miou"] for r in _runs(rows, m, n, k)]) for k in ks]
            ax.errorbar(ks, [s[0] for s in stats], yerr=[s[1] for s in stats], fmt="-o", label=m, ms=3, capsize=2)
        ax.set_title(n)
        ax.set_xlabel("shots K")
        ax.set_ylabel("fg mIoU (%), mean ± std")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
