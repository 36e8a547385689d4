"""``distillfss benchmark``: the protocol over datasets x shots, resumable, with a Table-1-shaped table and plots.

Each cell (dataset, K) uses the fixed, nested support set of the midpoint sampler; every method is adapted on it and
evaluated on every test image. ``results.json`` is rewritten after each finished cell, so an interrupted run
started again with the same command skips the cells it already has.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from .cli import config_from_args, int_list, model_config, timestamp, write_json
from .config import AdaptConfig
from .data import DataError, load_split
from .demo import demo_datasets, demo_root
from .model_io import ModelError, resolve_teacher
from .protocol import ALL_METHODS, BackboneCache, Cell, run_cell

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


def run_benchmark(args: argparse.Namespace) -> dict:
    specs = [s.strip() for s in args.data.split(",") if s.strip()]
    datasets = [resolve_dataset(s, args.data_root) for s in specs]
    shots = sorted(set(int_list(args.shots, "--shots")))
    methods = tuple(m.strip() for m in args.methods.split(","))
    bad = sorted(set(methods) - set(ALL_METHODS))
    if bad:
        raise DataError(f"--methods: unknown {bad}; choose from {', '.join(ALL_METHODS)}")
    acfg = config_from_args(AdaptConfig, args)
    config = {
        "preset": args.preset,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "probe_size": args.probe_size,
        "adapt": acfg.to_dict(),
        "methods": list(methods),
        "per_class": args.per_class,
        "eval_size": args.eval_size,
        "teacher": args.teacher,
    }
    out: Path = args.out
    results_path = out / "results.json"
    results = {"created": timestamp(), "config": config, "rows": []}
    if results_path.is_file():
        previous = json.loads(results_path.read_text())
        if previous.get("config") != config and not args.overwrite:
            raise ModelError(f"{results_path}: was made with another configuration; use another --out or --overwrite")
        if previous.get("config") == config:
            results = previous
            log.info("resuming: %d rows already in %s", len(results["rows"]), results_path)
    elif out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ModelError(f"{out}: folder exists and is not empty (pass --overwrite to reuse it)")
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["dataset"], r["shots"]) for r in results["rows"]}
    backbones = BackboneCache(args.backbone, args.backbone_weights, torch.device(args.device))
    for name, root in datasets:
        train, test = load_split(root, "train"), load_split(root, "test")
        for k in shots:
            if (name, k) in done:
                continue
            total = k * train.num_classes if args.per_class else k
            if total > len(train.samples):
                log.warning("[%s] K=%d skipped: the pool has %d images", name, k, len(train.samples))
                continue
            mcfg = model_config(args, train.num_classes)
            start, label = resolve_teacher(args.teacher, mcfg)
            # The paper scores WeedMap at its native tile size and every other dataset at 384 x 384.
            native = args.eval_size == 0 or name.lower().startswith("weedmap")
            cell = Cell(
                name,
                train,
                test,
                k,
                mcfg,
                acfg,
                args.probe_size or mcfg.image_size,
                methods,
                args.per_class,
                None if native else args.eval_size,
                start,
                label,
            )
            log.info("[%s] K=%d", name, k)
            rows, _ = run_cell(cell, backbones, log_path=out / f"train_log_{name}_{k}shot.jsonl")
            for r in rows:
                log.info("[%s] K=%-3d %-12s mIoU %6.2f", name, k, r["method"], r["miou"])
            results["rows"] += rows
            write_json(results_path, results)  # after every cell: an interrupted run resumes from here
    write_json(results_path, results)
    (out / "table.md").write_text(table(results))
    plot(results, out / "miou_vs_shots.png")
    return results


def table(results: dict) -> str:
    """Rows = methods, column groups = datasets, columns = K (the paper's Table 1 layout)."""
    rows = results["rows"]
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cols = [(n, k) for n in names for k in sorted({r["shots"] for r in rows if r["dataset"] == n})]
    size = results.get("config", {}).get("eval_size")
    where = f"{size} x {size} (WeedMap native)" if size else "original resolution"
    lines = [
        f"Foreground mIoU (%), dataset-level confusion matrix at {where}; configuration in results.json.",
        "",
        "| method | " + " | ".join(f"{n} K={k}" for n, k in cols) + " | mean |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    means: dict[str, float] = {}
    for m in methods:
        vals = []
        for n, k in cols:
            r = next((r for r in rows if r["method"] == m and r["dataset"] == n and r["shots"] == k), None)
            vals.append(r["miou"] if r else None)
        present = [v for v in vals if v is not None]
        mean = sum(present) / len(present) if present else float("nan")
        if len(present) == len(cols):
            means[m] = mean
        cells = ["-" if v is None else f"{v:.1f}" for v in vals]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean:.1f} |")
    lines += ["", *verdict(means)]
    return "\n".join(lines) + "\n"


def verdict(means: dict[str, float]) -> list[str]:
    """One sentence per adapted method: does it beat both simple baselines on the mean over every column?"""
    baselines = [b for b in ("linear_probe", "prototype") if b in means]
    out = []
    for m in ("transferfss", "distillfss"):
        if m not in means or not baselines:
            continue
        losing = [b for b in baselines if means[b] >= means[m]]
        gaps = ", ".join(f"{means[m] - means[b]:+.1f} vs {b}" for b in baselines)
        word = "beats" if not losing else "does NOT beat"
        out.append(f"- {m} {word} {' and '.join(losing or baselines)} on the mean ({gaps}).")
    return out


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
            pts = sorted((r["shots"], r["miou"]) for r in rows if r["dataset"] == n and r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=m, ms=3)
        ax.set_title(n)
        ax.set_xlabel("shots K")
        ax.set_ylabel("fg mIoU (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
