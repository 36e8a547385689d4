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
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .adapt import adapt
from .backbones import FrozenBackbone, build_backbone
from .baselines import LinearProbe, PrototypeMatcher
from .cli import model_config, timestamp, write_json
from .config import AdaptConfig
from .data import DataError, class_sets, load_pair, load_split, load_support_tensors
from .evaluate import evaluate_predictor
from .model_io import check_output, output_folder
from .predictor import Predictor
from .sampling import sample_support
from .teacher import build_teacher, encode_support
from .viz import overlay

log = logging.getLogger("distillfss")

METHODS = ("teacher", "transferfss", "distillfss", "linear_probe", "prototype")
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
    with output_folder(args.out, args.overwrite) as tmp:
        (tmp / "overlays").mkdir()
        backbone = None
        probe_backbones: dict[int, FrozenBackbone] = {}
        for name in names:
            root = demo_root() / name
            train, test = load_split(root, "train"), load_split(root, "test")
            mcfg = model_config(args, train.num_classes)
            if backbone is None:
                backbone = build_backbone(mcfg.backbone, mcfg.image_size, args.backbone_weights).to(device)
            shots = min(args.shots, len(train.samples))
            stems = sample_support([s.stem for s in train.samples], shots, class_sets(train))
            images, labels = load_support_tensors(train, stems, mcfg.image_size)
            images, labels = images.to(device), labels.to(device)
            acfg = AdaptConfig(
                iterations=args.iterations,
                mode=args.mode,
                trainable=args.trainable,
                precision=args.precision,
                lr=args.lr,
                schedule=args.schedule,
                seed=args.seed,
            )
            log.info("[%s] %d shots: %s", name, shots, ", ".join(stems))
            base = {"dataset": name, "shots": shots, "support": stems, "model": mcfg.to_dict()}
            probe_res = args.probe_size or mcfg.image_size

            torch.manual_seed(args.seed)
            fresh = build_teacher(backbone, mcfg).to(device)
            support = encode_support(backbone, images, labels, mcfg.num_classes)
            predictors = {"teacher": Predictor(fresh, mcfg.image_size, support)}
            adapt_seconds = {"teacher": 0.0}

            result = adapt(backbone, images, labels, mcfg, acfg, log_path=tmp / f"train_log_{name}.jsonl")
            predictors["transferfss"] = Predictor(result.teacher, mcfg.image_size, support)
            predictors["distillfss"] = Predictor(result.student, mcfg.image_size)
            adapt_seconds["transferfss"] = adapt_seconds["distillfss"] = result.seconds

            t0 = time.perf_counter()
            probe_size = args.probe_size or mcfg.image_size
            if probe_size not in probe_backbones:
                probe_backbones[probe_size] = build_backbone(mcfg.backbone, probe_size, args.backbone_weights).to(
                    device
                )
            probe = LinearProbe(probe_backbones[probe_size], mcfg.num_classes).to(device)
            probe_images, probe_labels = load_support_tensors(train, stems, probe_size)
            probe.fit(probe_images.to(device), probe_labels.to(device))
            adapt_seconds["linear_probe"] = time.perf_counter() - t0
            predictors["linear_probe"] = Predictor(probe, probe_size)
            t0 = time.perf_counter()
            proto = PrototypeMatcher(probe_backbones[probe_size], mcfg.num_classes).to(device)
            proto.fit(probe_images.to(device), probe_labels.to(device))
            adapt_seconds["prototype"] = time.perf_counter() - t0
            predictors["prototype"] = Predictor(proto, probe_size)

            for method in METHODS:
                ev = evaluate_predictor(predictors[method], test, progress=False)
                row = {
                    **base,
                    "method": method,
                    "miou": ev.miou,
                    "miou_with_background": ev.miou_with_background,
                    "per_class": ev.per_class,
                    "adapt_seconds": round(adapt_seconds[method], 2),
                    "ms_per_image": round(ev.seconds_per_image * 1000, 1),
                    "n_images": ev.n_images,
                    "adapt": acfg.to_dict() if method in ("transferfss", "distillfss") else None,
                    "image_size": probe_res if method in ("linear_probe", "prototype") else mcfg.image_size,
                }
                rows.append(row)
                log.info("[%s] %-12s mIoU %6.2f  (%.1f ms/image)", name, method, ev.miou, row["ms_per_image"])
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
        f"class weights {acfg['class_weights']}, seed {acfg['seed']}.",
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
    lines += [
        "",
        "![mIoU per dataset and method](miou.png)",
        "",
        "Overlays (ground truth, then " + ", ".join(METHODS) + ") are in `overlays/`.",
        "",
    ]
    return "\n".join(lines)
