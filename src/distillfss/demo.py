"""``distillfss demo``: the whole story on the bundled datasets, offline, on CPU.

For each dataset: K support images from train/ (midpoint sampler), then on every test image

* ``teacher``: the teacher before adaptation (fresh decoder, identity-initialised attention), with the K shots;
* ``transferfss``: the teacher fine-tuned on the support set;
* ``distillfss``: the support-free student;
* ``linear_probe``: per-pixel logistic regression on the same frozen backbone's features and support set, at
  ``--probe-size`` (default 384 px, where it is strongest on these sets; the models run at their own size);
* ``prototype``: training-free prototype matching (masked average pooling + cosine), same features and size;
  both baselines choose their feature levels (and the probe its L2 strength and class weighting) by
  cross-validation on the support set;
* ``distillfss_unlabeled``: the student refined on the train images outside the support set as unlabeled images
  (labelled by the adapted teacher; their masks are never read), ``--no-unlabeled`` leaves it out.

TransferFSS and DistillFSS run once per ``--seeds`` entry (default 0, 1, 2) and are reported as mean ± std; the other
methods do not depend on the seed.

Writes report.md, results.json, overlays/ and miou.png into the output folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import DEMO_ADAPT, REFINE_ITERATIONS, AdaptConfig
from .data import DataError, load_pair, load_split
from .model_io import resolve_teacher
from .outputs import check_output, machine, output_folder, timestamp, write_json_atomic
from .predictor import Predictor
from .protocol import METHODS, RANDOM_START, BackboneCache, Cell, RunConfig, run_seeds
from .stats import mean_std
from .viz import overlay, with_legend

DEMO_METHODS = (*METHODS, "distillfss_unlabeled")
# The default sets: lung_ct (every method at 0-1 mIoU at 256 px: its lesions are a few pixels there) runs with
# --datasets lung_ct or --datasets all; leaving it out keeps the demo within 10 minutes on 2 CPU cores.
DEMO_DATASETS = ("aerial_buildings", "nuclei")

log = logging.getLogger("distillfss")

N_OVERLAYS = 3


def demo_root() -> Path:
    return Path(str(resources.files("distillfss") / "demo_data"))


def demo_datasets() -> list[str]:
    return sorted(p.name for p in demo_root().iterdir() if (p / "dataset.json").is_file())


@dataclass(frozen=True, kw_only=True)
class DemoConfig(RunConfig):
    """Everything the demo depends on (the CLI's flags, typed). Invalid values raise ``DataError``."""

    out: Path = Path("demo_out")
    datasets: tuple[str, ...] = DEMO_DATASETS  # bundled names, or ("all",)
    shots: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    adapt: AdaptConfig = DEMO_ADAPT  # its seed is replaced by each of ``seeds``
    compare_random: bool = False  # also adapt from a random teacher (rows *_random) when the start is meta-trained
    unlabeled: bool = True  # the distillfss_unlabeled row

    def __post_init__(self) -> None:
        super().__post_init__()
        known = demo_datasets()
        unknown = sorted(set(self.datasets) - {*known, "all"})
        if unknown or not self.datasets:
            raise DataError(f"unknown demo dataset(s) {unknown or '(none named)'}; bundled: {known}")
        if self.shots < 1:
            raise DataError(f"--shots: expected >= 1, got {self.shots}")


def run_demo(cfg: DemoConfig) -> dict:
    """The demo: every method on the bundled sets -> its results (also in ``cfg.out``: report, plot, overlays)."""
    methods = DEMO_METHODS if cfg.unlabeled else METHODS
    names = demo_datasets() if "all" in cfg.datasets else list(cfg.datasets)
    check_output(cfg.out, cfg.overwrite)
    seeds = list(dict.fromkeys(cfg.seeds))
    device = torch.device(cfg.device)
    rows: list[dict] = []
    backbones = BackboneCache(cfg.backbone, cfg.backbone_weights, device)
    with output_folder(cfg.out, cfg.overwrite) as tmp:
        (tmp / "overlays").mkdir()
        for name in names:
            root = demo_root() / name
            train, test = load_split(root, "train"), load_split(root, "test")
            mcfg = cfg.model_config(train.num_classes)
            start, label = resolve_teacher(cfg.teacher, mcfg)
            compare = cfg.compare_random and start is not None
            cell = Cell(
                name,
                train,
                test,
                min(cfg.shots, len(train.samples)),
                mcfg,
                cfg.adapt,
                cfg.probe_size or mcfg.image_size,
                methods + (RANDOM_START if compare else ()),
                teacher=start,
                teacher_label=label,
                vote_chunk=cfg.vote_chunk,
            )
            log.info("[%s] %d shots, starting teacher: %s, seeds %s", name, cell.shots, label, seeds)
            cell_rows, predictors = run_seeds(cell, seeds, backbones, log_path=tmp / f"train_log_{name}.jsonl")
            for row in cell_rows:
                log.info(
                    "[%s] %-12s seed %-4s mIoU %6.2f  (%.1f ms/image)",
                    name,
                    row["method"],
                    row["seed"],
                    row["miou"],
                    row["ms_per_image"],
                )
            rows += cell_rows
            _write_overlays(tmp / "overlays", name, test, predictors, methods)

        results = {
            "created": timestamp(),
            "device": str(device),
            "machine": machine(device),
            "threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "seeds": seeds,
            "rows": rows,
        }
        write_json_atomic(tmp / "results.json", results)
        _bar_plot(rows, names, methods, tmp / "miou.png")
        (tmp / "report.md").write_text(_report(results, names, methods))
    log.info("demo written to %s", cfg.out)
    return results


def _write_overlays(folder: Path, name: str, test, predictors: dict[str, Predictor], methods: tuple[str, ...]) -> None:
    """One strip per test image: ground truth, then each method's prediction (first seed), tinted on the image."""
    for sample in test.samples[:N_OVERLAYS]:
        image, mask = load_pair(sample, test.num_classes)
        tiles = [overlay(image, mask)] + [overlay(image, predictors[m].predict(image)) for m in methods]
        strip = with_legend(tiles, ["ground truth", *methods], test.classes)
        Image.fromarray(strip).save(folder / f"{name}_{sample.stem}.png")


def _bar_plot(rows: list[dict], names: list[str], methods: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 * len(names) + 2, 3.5))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        stats = [_summary(rows, n, method) for n in names]
        x = np.arange(len(names)) + j * width
        ax.bar(x, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=2, label=method)
    ax.set_xticks(np.arange(len(names)) + width * (len(methods) - 1) / 2, names)
    ax.set_ylabel("foreground mIoU (%), mean ± std over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summary(rows: list[dict], dataset: str, method: str, key: str = "miou") -> tuple[float, float, int]:
    """Mean, std and number of runs of one method on one dataset."""
    values = [r[key] for r in rows if r["dataset"] == dataset and r["method"] == method]
    return (*mean_std(values), len(values))


def _cell(rows: list[dict], dataset: str, method: str, key: str = "miou", digits: int = 1) -> str:
    mean, std, n = _summary(rows, dataset, method, key)
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _report(results: dict, names: list[str], methods: tuple[str, ...]) -> str:
    rows = results["rows"]
    cfg = rows[0]["model"]
    acfg = next(r["adapt"] for r in rows if r["adapt"])
    # the refined rows record their own steps (the paper's rows, which come first, have none)
    refine = next((r["adapt"]["refine_iterations"] for r in rows if r["method"] == "distillfss_unlabeled"), None)
    refine = refine or REFINE_ITERATIONS
    probe = next(r["image_size"] for r in rows if r["method"] == "linear_probe")
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines = [
        "# distillfss demo",
        "",
        f"Created {results['created']} on {results['device']} with {results['threads']} threads "
        f"(deterministic algorithms: {results['deterministic']}). "
        f"Backbone `{cfg['backbone']}` (frozen), {cfg['image_size']} px, adaptation: {acfg['iterations']} steps, "
        f"mode `{acfg['mode']}`, trainable set {acfg['trainable']}, {acfg['precision']}, lr {acfg['lr']}, "
        f"class weights {acfg['class_weights']}, seeds {seeds}. Starting teacher: "
        f"`{rows[0]['teacher_init'] or 'n/a'}`.",
        "",
        "Foreground mIoU (%) on every test image, from one confusion matrix per dataset at the images' original "
        "resolution; methods that depend on the seed show mean ± std over the seeds. `teacher` = before "
        "adaptation; `transferfss` = the adapted teacher (needs the support images); `distillfss` = the "
        "support-free student; `linear_probe` = logistic regression on the same frozen backbone's features and "
        f"support set, at {probe} px; `prototype` = training-free prototype matching (masked average pooling + "
        "cosine), same features and size; both baselines choose their feature levels (the probe also its L2 "
        "strength and class weighting) by cross-validation on the support set. `distillfss_unlabeled` = the "
        f"student refined for {refine} steps on the train images outside "
        "the support set, used as unlabeled images labelled by the adapted teacher (their masks are never read). "
        "With 8-16 test images per set, differences of a few points are within "
        "the seed-to-seed spread; `distillfss benchmark --seeds ... --draws ...` gives paired intervals.",
        "",
        "| dataset | shots | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for n in names:
        shots = next(r["shots"] for r in rows if r["dataset"] == n)
        lines.append(f"| {n} | {shots} | " + " | ".join(_cell(rows, n, m) for m in methods) + " |")
    lines += [
        "",
        "Timings: adaptation seconds (support encoding included; mean over seeds) and milliseconds per test image "
        "(resize, forward, resize back).",
        "",
        "| dataset | adapt s (TransferFSS+DistillFSS) | adapt s (+ unlabeled refinement) | fit s (probe, CV "
        "included) | " + " | ".join(f"ms/img {m}" for m in methods) + " |",
        "|---|---|---|---|" + "---|" * len(methods),
    ]
    for n in names:
        refined = _summary(rows, n, "distillfss_unlabeled", "adapt_seconds")
        lines.append(
            f"| {n} | {_summary(rows, n, 'distillfss', 'adapt_seconds')[0]:.1f} | "
            f"{f'{refined[0]:.1f}' if refined[2] else 'n/a'} | "
            f"{_summary(rows, n, 'linear_probe', 'adapt_seconds')[0]:.1f} | "
            + " | ".join(f"{_summary(rows, n, m, 'ms_per_image')[0]:.0f}" for m in methods)
            + " |"
        )
    lines += _start_table(rows, names)
    lines += [
        "",
        "![mIoU per dataset and method](miou.png)",
        "",
        "Overlays (ground truth, then " + ", ".join(methods) + "; first seed) are in `overlays/`.",
        "",
    ]
    return "\n".join(lines)


def _start_table(rows: list[dict], names: list[str]) -> list[str]:
    """The starting teacher's effect: the meta-trained start against a random one, same support and schedule."""
    if not any(r["method"] in RANDOM_START for r in rows):
        return []
    lines = [
        "",
        "Starting teacher: the same adaptation from the meta-trained teacher and from a random initialisation "
        "(mean ± std over the seeds). Plateau = the first step from which a loss (trailing mean over 10 steps) "
        "stays within 10 % of its range above its final value, for the total joint loss and for the teacher's and "
        "the student's own focal (segmentation) loss; seconds include the support encoding; means over the seeds.",
        "",
        "| dataset | start | teacher before | TransferFSS | DistillFSS | adapt s | plateau step (s): total loss | "
        "teacher focal | student focal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def plateau(n: str, m: str, kind: str) -> str:
        step, seconds = (
            _summary(rows, n, m, f"plateau_step{kind}")[0],
            _summary(rows, n, m, f"plateau_seconds{kind}")[0],
        )
        return f"{step:.0f} ({seconds:.1f})"

    for n in names:
        for suffix in ("", "_random"):
            d, t = f"distillfss{suffix}", f"transferfss{suffix}"
            init = next(r["teacher_init"] for r in rows if r["dataset"] == n and r["method"] == d)
            lines.append(
                f"| {n} | {init} | {_cell(rows, n, f'teacher{suffix}')} | {_cell(rows, n, t)} | "
                f"{_cell(rows, n, d)} | {_summary(rows, n, d, 'adapt_seconds')[0]:.1f} | "
                f"{plateau(n, d, '')} | {plateau(n, t, '_segmentation')} | {plateau(n, d, '_segmentation')} |"
            )
    return lines
