"""``distillfss speed --adapt``: what adaptation costs as the support set grows (K = 5, 10, 25, 50).

The support set is the bundled nuclei train images and their 8 flips / 90-degree rotations (64 distinct images;
timings do not depend on which images they are, only on how many). Each configuration runs in a fresh process
(CPU), so its peak resident memory is its own: the support set is encoded once (timed), then ``--steps`` optimizer
steps of joint TransferFSS + DistillFSS run as ``adapt`` runs them; the first step is reported on its own (it
builds the episodes) and the rest as a median.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass

import torch

from .adapt import adapt
from .backbones import build_backbone
from .config import AdaptConfig, ModelConfig
from .data import load_split, load_support_tensors
from .errors import UserError
from .speed import _peak_rss_mb, device_name, measure_isolated
from .symmetry import dihedral
from .teacher import encode_support

DATASET = "nuclei"


@dataclass(frozen=True)
class AdaptSpeedJob:
    shots: int
    trainable: str
    max_shots: int
    steps: int
    model_cfg: ModelConfig
    device: str
    threads: int
    precision: str = "fp32"

    def describe(self) -> str:
        cap = self.max_shots or "all"
        return (
            f"adapt ({self.model_cfg.backbone}, {self.model_cfg.image_size} px, K = {self.shots}, set "
            f"{self.trainable}, shots per episode {cap}, {self.threads} threads, {self.precision})"
        )


def scaling_support(shots: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``shots`` images of the bundled nuclei train split and their symmetries (identity first), name-sorted."""
    from .demo import demo_root

    split = load_split(demo_root() / DATASET, "train")
    images, labels, _ = load_support_tensors(split, [s.stem for s in split.samples], size)
    if shots > 8 * len(images):
        raise UserError(f"speed --adapt: at most {8 * len(images)} shots (the nuclei images and their 8 symmetries)")
    views = [(dihedral(images, k), dihedral(labels, k)) for k in range(8)]
    return torch.cat([v[0] for v in views])[:shots].contiguous(), torch.cat([v[1] for v in views])[:shots].contiguous()


def measure_adapt(job: AdaptSpeedJob) -> dict:
    torch.set_num_threads(job.threads)
    dev = torch.device(job.device)
    cfg = job.model_cfg
    images, labels = (t.to(dev) for t in scaling_support(job.shots, cfg.image_size))
    backbone = build_backbone(cfg.backbone, cfg.image_size, "random").to(dev)  # timings do not depend on weights
    t0 = time.perf_counter()
    with torch.no_grad():
        support = encode_support(backbone, images, labels, 1)
    encode_s = time.perf_counter() - t0
    acfg = AdaptConfig(
        student="paper",
        iterations=job.steps,
        trainable=job.trainable,  # type: ignore[arg-type]
        max_shots=job.max_shots,
        precision=job.precision,  # type: ignore[arg-type]
    )
    result = adapt(backbone, images, labels, cfg, acfg, progress=False, support=support)
    stamps = [0.0] + [r["seconds"] for r in result.log]
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    later = steps[1:] or steps
    return {
        "shots": job.shots,
        "trainable": job.trainable,
        "max_shots": job.max_shots,
        "steps": job.steps,
        "encode_s": round(encode_s, 3),
        "first_step_s": round(steps[0], 3),
        "step_s_median": round(statistics.median(later), 3),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _peak_rss_mb(), 1),
    }


def _adapt_child(job: AdaptSpeedJob, queue: mp.Queue) -> None:
    queue.put(measure_adapt(job))


def run_adapt_speed(
    model_cfg: ModelConfig,
    shots: list[int],
    trainable: list[str],
    max_shots: list[int],
    steps: int = 4,
    device: str = "cpu",
    threads: int | None = None,
    timeout_s: float = 600.0,
    progress=None,
    precision: str = "fp32",
) -> dict:
    threads = threads or torch.get_num_threads()
    rows = []
    for t in trainable:
        for cap in max_shots:
            for k in shots:
                job = AdaptSpeedJob(k, t, cap, steps, model_cfg, device, threads, precision)
                row = measure_isolated(job, timeout_s, target=_adapt_child)
                rows.append(row)
                if progress:
                    progress(
                        f"set {t} cap {cap or 'all':>3} K {k:3d}: encode {row['encode_s']:6.1f} s, step "
                        f"{row['step_s_median']:6.2f} s, {row['peak_memory_mb']:7.0f} MB"
                    )
    return {
        "device": device_name(device),
        "threads": threads,
        "precision": precision,
        "model": model_cfg.to_dict(),
        "support": f"bundled {DATASET} train images and their symmetries",
        "rows": rows,
    }


def adapt_table(result: dict) -> str:
    m = result["model"]
    lines = [
        f"Adaptation cost (joint TransferFSS + DistillFSS) on {result['device']}, {result['threads']} threads, "
        f"{m['image_size']} px, backbone {m['backbone']}, precision {result.get('precision', 'fp32')}: support "
        "encoding once, then seconds per optimizer step (median after the first), peak resident memory of the process.",
        "",
        "| trainable | shots per episode | K | encode s | first step s | step s (median) | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['trainable']} | {r['max_shots'] or 'all'} | {r['shots']} | {r['encode_s']:.1f} | "
            f"{r['first_step_s']:.2f} | {r['step_s_median']:.2f} | {r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"
