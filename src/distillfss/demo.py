"""``distillfss demo``: the whole story on the bundled datasets, offline, on CPU.

For each dataset: K support images from train/ (midpoint sampler), then on every test image

* ``teacher``: the teacher before adaptation (fresh decoder, identity-initialised attention), with the K shots;
* ``transferfss``: the teacher fine-tuned on the support set;
* ``distillfss``: the support-free student;
* ``linear_probe``: per-pixel logistic regression on the same frozen backbone's features and support set, at
  ``--probe-size`` (default 384 px, where it is strongest on these sets; the models run at their own size);
* ``prototype``: training-free prototype matching (masked average pooling + cosine), same features and size.

Writes report.md, results.json, overlays/ and miou.png into the output folder.
"""

from __future__ import annotations

import argparse
import logging
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cli import config_from_args, model_config, timestamp, write_json
from .config import AdaptConfig
from .data import DataError, load_pair, load_split
from .model_io import check_output, output_folder, resolve_teacher
from .predictor import Predictor
from .protocol import METHODS, RANDOM_START, BackboneCache, Cell, run_cell
from .viz import overlay

log = logging.getLogger("distillfss")

N_OVERLAYS = 3


def demo_root() -> Path:
    return Path(str(resources.files("distillfss") / "demo_data"))


def demo_datasets() -> list[str]:
    return sorted(p.name for p in demo_root().iterdir() if (p / "dataset.json").is_file())


def run_demo(args: argparse.Namespace) -> dict:
    names = demo_datasets() if not args.datasets else [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(demo_datasets()))
    if unknown:
        raise DataError(f"unknown demo dataset(s) {unknown}; bundled: {demo_datasets()}")
    check_output(args.out, args.overwrite)
    device = torch.device(args.device)
    rows: list[dict] = []
    backbones = BackboneCache(args.backbone, args.backbone_weights, device)
    with output_folder(args.out, args.overwrite) as tmp:
        (tmp / "overlays").mkdir()
        for name in names:
            root = demo_root() / name
            train, test = load_split(root, "train"), load_split(root, "test")
            mcfg = model_config(args, train.num_classes)
            start, label = resolve_teacher(args.teacher, mcfg)
            compare = args.compare_random and start is not None
            cell = Cell(
                name,
                train,
                test,
                min(args.shots, len(train.samples)),
                mcfg,
                config_from_args(AdaptConfig, args),
                args.probe_size or mcfg.image_size,
                METHODS + (RANDOM_START if compare else ()),
                teacher=start,
                teacher_label=label,
            )
            log.info("[%s] %d shots, starting teacher: %s", name, cell.shots, label)
            cell_rows, predictors = run_cell(cell, backbones, log_path=tmp / f"train_log_{name}.jsonl")
            for row in cell_rows:
                log.info(
                    "[%s] %-12s mIoU %6.2f  (%.1f ms/image)", name, row["method"], row["miou"], row["ms_per_image"]
                )
            rows += cell_rows
            _write_overlays(tmp / "overlays", name, test, predictors)

        results = {
            "created": timestamp(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        write_json(tmp / "results.json", results)
        _bar_plot(rows, names, tmp / "miou.png")
        (tmp / "report.md").write_text(_report(results, names))
    log.info("demo written to %s", args.out)
    return results


def _write_overlays(folder: Path, name: str, test, predictors: dict[str, Predictor]) -> None:
    """One strip per test image: ground truth, then each method's prediction, tinted on the image."""
    for sample in test.samples[:N_OVERLAYS]:
        image, mask = load_pair(sample, test.num_classes)
        tiles = [overlay(image, mask)] + [overlay(image, predictors[m].predict(image)) for m in METHODS]
        gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
        strip = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
        Image.fromarray(strip).save(folder / f"{name}_{sample.stem}.png")


def _bar_plot(rows: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 * len(names) + 2, 3.5))
    width = 0.8 / len(METHODS)
    for j, method in enumerate(METHODS):
        vals = [next(r["miou"] for r in rows if r["dataset"] == n and r["method"] == method) for n in names]
        ax.bar(np.arange(len(names)) + j * width, vals, width, label=method)
    ax.set_xticks(np.arange(len(names)) + width * (len(METHODS) - 1) / 2, names)
    ax.set_ylabel("foreground mIoU (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(results: dict, names: list[str]) -> str:
    rows = results["rows"]
    cfg = rows[0]["model"]
    acfg = next(r["adapt"] for r in rows if r["adapt"])
    probe = next(r["image_size"] for r in rows if r["method"] == "linear_probe")
    lines = [
        "# distillfss demo",
        "",
        f"Created {results['created']} on {results['device']} with {results['threads']} threads. "
        f"Backbone `{cfg['backbone']}` (frozen), {cfg['image_size']} px, adaptation: {acfg['iterations']} steps, "
        f"mode `{acfg['mode']}`, trainable set {acfg['trainable']}, {acfg['precision']}, lr {acfg['lr']}, "
        f"class weights {acfg['class_weights']}, seed {acfg['seed']}. Starting teacher: "
        f"`{rows[0]['teacher_init'] or 'n/a'}`.",
        "",
        "Foreground mIoU (%) on every test image, from one confusion matrix per dataset at the images' original "
        "resolution. `teacher` = before adaptation; `transferfss` = the adapted teacher (needs the support "
        "images); `distillfss` = the support-free student; `linear_probe` = logistic regression on the same "
        f"frozen backbone's features and support set, at {probe} px; `prototype` = training-free prototype "
        f"matching (masked average pooling + cosine), same features and size.",
        "",
        "| dataset | shots | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for n in names:
        r = {x["method"]: x for x in rows if x["dataset"] == n}
        lines.append(f"| {n} | {r['teacher']['shots']} | " + " | ".join(f"{r[m]['miou']:.1f}" for m in METHODS) + " |")
    lines += [
        "",
        "Timings: adaptation seconds (support encoding included) and milliseconds per test image (resize, "
        "forward, resize back).",
        "",
        "| dataset | adapt s (TransferFSS+DistillFSS) | fit s (probe) | "
        + " | ".join(f"ms/img {m}" for m in METHODS)
        + " |",
        "|---|---|---|" + "---|" * len(METHODS),
    ]
    for n in names:
        r = {x["method"]: x for x in rows if x["dataset"] == n}
        lines.append(
            f"| {n} | {r['distillfss']['adapt_seconds']:.1f} | {r['linear_probe']['adapt_seconds']:.1f} | "
            + " | ".join(f"{r[m]['ms_per_image']:.0f}" for m in METHODS)
            + " |"
        )
    lines += _start_table(rows, names)
    lines += [
        "",
        "![mIoU per dataset and method](miou.png)",
        "",
        "Overlays (ground truth, then " + ", ".join(METHODS) + ") are in `overlays/`.",
        "",
    ]
    return "\n".join(lines)


def _start_table(rows: list[dict], names: list[str]) -> list[str]:
    """The starting teacher's effect: the meta-trained start against a random one, same support and schedule."""
    if not any(r["method"] in RANDOM_START for r in rows):
        return []
    lines = [
        "",
        "Starting teacher: the same adaptation from the meta-trained teacher and from a random initialisation. "
        "Plateau = the first step from which a loss (trailing mean over 10 steps) stays within 10 % of its "
        "range above its final value, for the total joint loss and for the teacher's and the student's own "
        "focal (segmentation) loss; seconds include the support encoding.",
        "",
        "| dataset | start | teacher before | TransferFSS | DistillFSS | adapt s | plateau step (s): total loss | "
        "teacher focal | student focal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = {x["method"]: x for x in rows if x["dataset"] == n}
        for suffix in ("", "_random"):
            d, t = r[f"distillfss{suffix}"], r[f"transferfss{suffix}"]
            lines.append(
                f"| {n} | {d['teacher_init']} | {r[f'teacher{suffix}']['miou']:.1f} | {t['miou']:.1f} | "
                f"{d['miou']:.1f} | {d['adapt_seconds']:.1f} | {d['plateau_step']} ({d['plateau_seconds']:.1f}) | "
                f"{t['plateau_step_segmentation']} ({t['plateau_seconds_segmentation']:.1f}) | "
                f"{d['plateau_step_segmentation']} ({d['plateau_seconds_segmentation']:.1f}) |"
            )
    return lines
