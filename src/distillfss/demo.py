"""``distillfss demo``: the product on every bundled dataset, offline, on CPU.

For each dataset: K support images from train/ (the midpoint sampler, as ``adapt --shots K``), then on every test
image

* ``teacher``: the starting teacher with the K shots, before adaptation;
* ``transferfss``: the teacher fine-tuned on the support set (it needs the support images at inference);
* ``distillfss_fast``: **the default student** (what ``distillfss adapt`` writes; its teacher is ``transferfss``);
* ``distillfss``: the paper's ConvDist student, trained beside the teacher;
* ``linear_probe``: per-pixel logistic regression on the same frozen backbone's features and support set, its
  feature levels, L2 strength and class weighting chosen by cross-validation on the support set;
* ``prototype``: training-free prototype matching (masked average pooling + cosine), same features.

The adapted rows run once per ``--seeds`` entry (default 0, 1, 2) and are reported as mean ± std, with paired
intervals against the baselines. The demo's schedule (``DEMO_ADAPT``) is shorter than ``adapt``'s default so that
it finishes in minutes on two CPU cores; ``distillfss benchmark`` runs the defaults.

Writes report.md, results.json, overlays/ and miou.png into the output folder.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import DEMO_ADAPT, AdaptConfig
from .data import DataError, load_pair, load_split
from .model_io import resolve_teacher
from .outputs import check_output, machine, output_folder, timestamp, write_json_atomic
from .predictor import Predictor
from .protocol import RANDOM_START, BackboneCache, Cell, RunConfig, run_seeds
from .stats import mean_std
from .viz import overlay, with_legend

DEMO_METHODS = ("teacher", "transferfss", "distillfss_fast", "distillfss", "linear_probe", "prototype")

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
    datasets: tuple[str, ...] = ("all",)  # bundled names, or ("all",)
    shots: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    adapt: AdaptConfig = DEMO_ADAPT  # its seed is replaced by each of ``seeds``
    probe_size: int = 0  # the baselines at the model's size (the probe is then also the fast student's labeller)
    compare_random: bool = False  # also adapt from a random teacher (rows *_random) when the start is meta-trained

    def __post_init__(self) -> None:
        super().__post_init__()
        known = demo_datasets()
        unknown = sorted(set(self.datasets) - {*known, "all"})
        if unknown or not self.datasets:
            raise DataError(f"unknown demo dataset(s) {unknown or '(none named)'}; bundled: {known}")
        twice = sorted({d for d in self.datasets if self.datasets.count(d) > 1})
        if twice:
            raise DataError(f"--datasets: {', '.join(twice)} named twice")
        if self.shots < 1:
            raise DataError(f"--shots: expected >= 1, got {self.shots}")


COMMAND = "distillfss demo"


def run_demo(cfg: DemoConfig, inputs: Sequence[Path | None] = (), command: str = COMMAND) -> dict:
    """The demo: every method on the bundled sets -> its results (also in ``cfg.out``: report, plot, overlays).
    ``inputs``: paths it reads (a config file, a teacher folder), which ``cfg.out`` may not touch."""
    names = demo_datasets() if "all" in cfg.datasets else list(cfg.datasets)
    check_output(cfg.out, cfg.overwrite, inputs, command=command)
    seeds = list(dict.fromkeys(cfg.seeds))
    device = torch.device(cfg.device)
    rows: list[dict] = []
    backbones = BackboneCache(cfg.backbone, cfg.backbone_weights, device)
    with output_folder(cfg.out, cfg.overwrite, inputs, command=command) as tmp:
        (tmp / "overlays").mkdir()
        t0 = time.perf_counter()
        for i, name in enumerate(names, 1):
            root = demo_root() / name
            train, test = load_split(root, "train"), load_split(root, "test")
            mcfg = cfg.model_config(train.num_classes)
            start, label = resolve_teacher(cfg.teacher, mcfg)
            methods = DEMO_METHODS + (RANDOM_START if cfg.compare_random and start is not None else ())
            cell = Cell(
                name,
                train,
                test,
                min(cfg.shots, len(train.samples)),
                mcfg,
                cfg.adapt,
                cfg.probe_size or mcfg.image_size,
                methods,
                teacher=start,
                teacher_label=label,
                vote_chunk=cfg.vote_chunk,
            )
            elapsed = time.perf_counter() - t0
            left = "" if i == 1 else f", about {_minutes(elapsed / (i - 1) * (len(names) - i + 1))} left"
            log.info(
                "[%s] dataset %d of %d (%s elapsed%s): %d shots, starting teacher: %s, seeds %s",
                *(name, i, len(names), _minutes(elapsed), left, cell.shots, label, seeds),
            )
            cell_rows, predictors = run_seeds(
                cell, seeds, backbones, log_to=lambda tag, n=name: tmp / f"train_log_{n}_{tag}.jsonl"
            )
            for row in cell_rows:
                log.info("[%s] %-16s seed %-4s mIoU %6.2f", name, row["method"], row["seed"], row["miou"])
            rows += cell_rows
            _write_overlays(tmp / "overlays", name, test, predictors, methods)

        results = {
            "created": timestamp(),
            "command": command,
            "config": {"adapt": {**cfg.adapt.to_dict(), "seed": None}, "seeds": seeds, "shots": cfg.shots},
            "device": str(device),
            "machine": machine(device),
            "threads": torch.get_num_threads(),
            "seeds": seeds,
            "step_seconds": step_seconds(sorted(tmp.glob("train_log_*.jsonl"))),
            "rows": rows,
        }
        write_json_atomic(tmp / "results.json", results)
        _bar_plot(rows, names, methods, tmp / "miou.png")
        (tmp / "report.md").write_text(report(results))
    log.info("demo written to %s (%s)", cfg.out, _minutes(time.perf_counter() - t0))
    return results


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


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


def step_seconds(logs: Sequence[Path]) -> dict[str, float]:
    """Median seconds per optimizer step by stage (teacher, joint, fast, ...) over training logs (JSON lines with
    cumulative ``seconds``; rows an adaptation reused from another seed are skipped): what to compare machines by."""
    per_stage: dict[str, list[float]] = {}
    for path in logs:
        last: dict[str, float] = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("reused"):  # another seed's stage, counted where it ran
                continue
            stage, t = row["stage"], row["seconds"]
            if stage in last:
                per_stage.setdefault(stage, []).append(t - last[stage])
            last = {stage: t}
    return {stage: round(float(np.median(d)), 3) for stage, d in sorted(per_stage.items())}


def report(results: dict) -> str:
    """The demo's report.md: what ran, the mIoU table with paired intervals (``benchmark.table``) and timings."""
    from .benchmark import table

    rows = results["rows"]
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    acfg = results["config"]["adapt"]
    lines = [
        "# distillfss demo",
        "",
        f"Created {results['created']} on {results['machine']} ({results['device']}, {results['threads']} threads). "
        f"Backbone `{rows[0]['model']['backbone']}` (frozen) at {rows[0]['model']['image_size']} px; starting teacher "
        f"`{rows[0]['teacher_init']}`; the demo's schedule: {acfg['iterations']} teacher steps, "
        f"{acfg['fast_iterations']} fast-student steps (`distillfss adapt` defaults: "
        f"{AdaptConfig.iterations} and {AdaptConfig.fast_iterations}); seeds {results['seeds']}.",
        "",
        table(results),
        "Seconds to adapt (support encoding included; mean over seeds) and milliseconds per test image; median "
        "seconds per optimizer step on this machine: "
        + ", ".join(f"{stage} {t:.2f}" for stage, t in results.get("step_seconds", {}).items())
        + " (compare machines by these).",
        "",
        "| dataset | " + " | ".join(f"{m} s" for m in methods) + " | " + " | ".join(f"{m} ms" for m in methods) + " |",
        "|---|" + "---|" * (2 * len(methods)),
    ]
    for n in names:
        fit = [f"{_summary(rows, n, m, 'adapt_seconds')[0]:.1f}" for m in methods]
        ms = [f"{_summary(rows, n, m, 'ms_per_image')[0]:.0f}" for m in methods]
        lines.append(f"| {n} | " + " | ".join(fit + ms) + " |")
    for n in names:
        adapted = [r["miou"] for r in rows if r["dataset"] == n and r["teacher_init"] is not None]
        if adapted and max(adapted) < 1.0:  # the baselines (no teacher) may pick up a pixel or two
            scale = next(r["scale"] for r in rows if r["dataset"] == n)
            lines += [
                "",
                f"`{n}`: every adapted method scores about 0. Its structures may be too small at the pixel scale it ran at "
                f"({scale:.2g} model pixels per image pixel) to span more than one or two of the teacher's stride-8 "
                "tokens: on lung CT an enlarged scale (`distillfss adapt --scale 2`) is what reached the nodules "
                "(docs/results.md).",
            ]
    lines += ["", "![mIoU per dataset and method](miou.png)", "", "Overlays (first seed) are in `overlays/`.", ""]
    return "\n".join(lines)
