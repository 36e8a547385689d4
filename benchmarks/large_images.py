"""Large images and the pixel scale, measured (issue: real images at real scale).

    python benchmarks/large_images.py --out docs/results/large_images.json [--seeds 0,1,2] [--parts mosaic,lung]

* ``mosaic``: a 2,048 x 2,048 aerial scene built from the bundled aerial test region (the 450 x 900 px bottom half of
  the source tile, its 8 test crops stitched back), mirrored to fill the square, with its building masks. A student
  adapted on 5 train crops (225 px; pixel scale 256/225, the crops' own) segments it (a) resized whole into one
  window, as every image was before, and (b) with sliding windows at the scale it was trained at. Same weights,
  paired by seed: mIoU and seconds per megapixel.
* ``nuclei_sizes``: the two-class nuclei set (128 px; ``auto`` is scale 2 there) at scales 2, 1 and 4, with the
  small-nucleus class's IoU beside the mIoU.
* ``lung``: lung CT (512 px slices, nodules of 0.06-2 % of the pixels) adapted and scored at the pixel scale of
  before ("fit": halved to 256) against native pixels (scale 1: 256 px windows) and enlarged (scale 2), K = 5;
  mIoU of the default student and of TransferFSS at each slice's full size, paired by seed.

Every adaptation is ``FewShotSegmenter.fit`` (the same library call as ``distillfss adapt``) with the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from distillfss import FewShotSegmenter
from distillfss.data import load_split
from distillfss.data.folder import load_image, load_mask
from distillfss.demo import demo_root
from distillfss.metrics import IoUMeter
from distillfss.outputs import provenance, write_json_atomic
from distillfss.predictor import Predictor
from distillfss.sampling import sample_support
from distillfss.stats import mean_std, paired_comparison


def mosaic(size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The aerial test region (stitched from its crops), mirrored to ``size`` x ``size``: image uint8, mask."""
    test = load_split(demo_root() / "aerial_buildings", "test")
    crops = {}
    for s in test.samples:  # stems cropRR_yYYY_xXXX
        y, x = int(s.stem.split("_y")[1].split("_")[0]), int(s.stem.split("_x")[1])
        crops[(y, x)] = (load_image(s.image, keep_uint8=True), load_mask(s.mask, 1))
    y0 = min(y for y, _ in crops)
    h = max(y for y, _ in crops) - y0 + 225
    w = max(x for _, x in crops) + 225
    image, mask = np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.uint8)
    for (y, x), (im, m) in crops.items():
        image[y - y0 : y - y0 + 225, x : x + 225], mask[y - y0 : y - y0 + 225, x : x + 225] = im, m
    reps = (size // h + 2, size // w + 2)
    big_i = np.pad(image, ((0, (reps[0] - 1) * h), (0, (reps[1] - 1) * w), (0, 0)), mode="symmetric")
    big_m = np.pad(mask, ((0, (reps[0] - 1) * h), (0, (reps[1] - 1) * w)), mode="symmetric")
    return big_i[:size, :size].copy(), big_m[:size, :size].copy()


def support(name: str, k: int) -> tuple[list[Path], list[Path], tuple[str, ...]]:
    train = load_split(demo_root() / name, "train")
    from distillfss.data import class_sets

    stems = sample_support([s.stem for s in train.samples], k, class_sets(train))
    by = {s.stem: s for s in train.samples}
    return [by[s].image for s in stems], [by[s].mask for s in stems], train.classes


def miou(predictor: Predictor, images: list[np.ndarray], masks: list[np.ndarray], classes) -> tuple[float, float, dict]:
    """(foreground mIoU in percent, seconds per megapixel, IoU per class) over the images."""
    meter, seconds, pixels = IoUMeter(classes), 0.0, 0
    for image, mask in zip(images, masks):
        t0 = time.perf_counter()
        (pred,) = predictor.predict_batch([image])
        seconds += time.perf_counter() - t0
        pixels += mask.size
        meter.update(torch.from_numpy(pred), torch.from_numpy(mask))
    result = meter.compute()
    return result.miou, seconds / (pixels / 1e6), result.per_class


def run_mosaic(seeds: list[int], k: int) -> dict:
    image, mask = mosaic()
    images, masks, classes = support("aerial_buildings", k)
    scale = 256 / 225  # the crops' own pixel scale at the 256 px working size
    rows = []
    for seed in seeds:
        seg = FewShotSegmenter(scale=scale, seed=seed).fit(images, masks, classes=list(classes[1:]))
        for name, s in (("resized_whole", None), ("sliding_windows", scale)):
            m, spm, _ = miou(Predictor(seg.student, 256, scale=s), [image], [mask], classes)
            rows.append({"part": "mosaic", "method": name, "seed": seed, "miou": m, "seconds_per_megapixel": spm})
            print(json.dumps(rows[-1]), flush=True)
    return _summary(rows, "sliding_windows", "resized_whole")


def run_scales(name: str, seeds: list[int], k: int, scales: list[str]) -> dict:
    """A bundled dataset adapted and scored at each pixel scale (the first is the reference), paired by seed."""
    images, masks, classes = support(name, k)
    test = load_split(demo_root() / name, "test")
    t_images = [load_image(s.image, keep_uint8=True) for s in test.samples]
    t_masks = [load_mask(s.mask, len(classes) - 1) for s in test.samples]
    rows = []
    for seed in seeds:
        for scale in scales:
            t0 = time.perf_counter()
            seg = FewShotSegmenter(scale=scale, seed=seed).fit(images, masks, classes=list(classes[1:]))
            adapt_s = time.perf_counter() - t0
            x, _ = seg._support  # the support windows the teacher attends to
            for model in ("student", "teacher"):
                m, spm, per_class = miou(seg._predictor(model), t_images, t_masks, classes)
                method = f"{'distillfss_fast' if model == 'student' else 'transferfss'}@{scale}"
                row = {"part": name, "method": method, "seed": seed, "miou": m, "seconds_per_megapixel": spm}
                rows.append(
                    {**row, "per_class": per_class, "adapt_seconds": round(adapt_s, 1), "support_windows": len(x)}
                )
                print(json.dumps(rows[-1]), flush=True)
    out = {"rows": rows, "comparisons": []}
    for model in ("distillfss_fast", "transferfss"):
        for scale in scales[1:]:
            out["comparisons"].append(_summary(rows, f"{model}@{scale}", f"{model}@{scales[0]}")["comparison"])
    return out


def _summary(rows: list[dict], a: str, b: str) -> dict:
    by = {(r["method"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    va, vb = [by[(a, s)]["miou"] for s in seeds], [by[(b, s)]["miou"] for s in seeds]
    c = paired_comparison(va, vb)
    return {
        "rows": rows,
        "comparison": {
            "a": a,
            "b": b,
            "a_mean_std": mean_std(va),
            "b_mean_std": mean_std(vb),
            "difference": c.mean,
            "interval": [c.low, c.high],
            "n": c.n,
            "verdict": c.verdict,
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--parts", default="mosaic,lung")
    p.add_argument("--lung-scales", default="fit,1,2")
    p.add_argument("--nuclei-scales", default="2,1,4")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(2)
    result: dict = {
        "provenance": provenance("python benchmarks/large_images.py " + " ".join(sys.argv[1:])),
        "seeds": seeds,
        "shots": args.shots,
    }
    parts = args.parts.split(",")
    if "mosaic" in parts:
        result["mosaic"] = run_mosaic(seeds, args.shots)
    if "lung" in parts:
        result["lung"] = run_scales("lung_ct", seeds, args.shots, args.lung_scales.split(","))
    if "nuclei_sizes" in parts:
        result["nuclei_sizes"] = run_scales("nuclei_sizes", seeds, args.shots, args.nuclei_scales.split(","))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
