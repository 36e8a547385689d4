"""Seconds the interactive loop makes its user wait (issue: label, see, correct, adapt again).

    python benchmarks/loop_time.py --out docs/results/preview_time.json [--repeats 3]

* Save -> preview: an app workspace with the nuclei train and test images (16); the K-th mask is saved with the
  app's ``Workspace.save_mask`` and the preview computed with the app's ``preview_panels`` (what the Save button
  runs), K = 1..5, in a fresh app each repeat (so the first save also pays for reading the images).
* Adapt again: K = 5 of nuclei adapted from scratch (the defaults: 60 teacher + 200 student steps) against a warm
  start from the K = 4 model (a third of each), wall seconds, one seed.

Run it alone: it times wall seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distillfss import FewShotSegmenter
from distillfss.app import Workspace, preview_panels
from distillfss.data import class_sets, load_split
from distillfss.demo import demo_root
from distillfss.outputs import provenance, write_json_atomic
from distillfss.preview import Preview
from distillfss.sampling import sample_support

DATASET = "nuclei"


def preview_rows(repeats: int) -> tuple[list[dict], int]:
    train, test = load_split(demo_root() / DATASET, "train"), load_split(demo_root() / DATASET, "test")
    order = sample_support([s.stem for s in train.samples], 5, class_sets(train))
    by = {s.stem: s for s in train.samples}
    rows = []
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            ws = Workspace(Path(tmp) / "ws")
            ws.add([s.image for s in (*train.samples, *test.samples)])
            preview = Preview.build("efficientnet_lite2", 256)
            for k, stem in enumerate(order, 1):
                mask = np.asarray(Image.open(by[stem].mask))
                t0 = time.perf_counter()
                ws.save_mask(stem, mask)
                panels = preview_panels(ws, preview, ["nucleus"])
                rows.append({"k": k, "repeat": repeat, "seconds": time.perf_counter() - t0, "shown": len(panels)})
                print(rows[-1], flush=True)
            n_images = len(ws.images)
    return rows, n_images


def adapt_rows() -> list[dict]:
    train = load_split(demo_root() / DATASET, "train")
    stems = sample_support([s.stem for s in train.samples], 5, class_sets(train))
    by = {s.stem: s for s in train.samples}
    images, masks = [by[s].image for s in stems], [by[s].mask for s in stems]
    four = FewShotSegmenter().fit(images[:4], masks[:4])
    t0 = time.perf_counter()
    four.fit(images, masks, warm_start=True)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    FewShotSegmenter().fit(images, masks)
    scratch = time.perf_counter() - t0
    return [{"start": "warm", "k": 5, "seconds": warm}, {"start": "scratch", "k": 5, "seconds": scratch}]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    rows, n_images = preview_rows(args.repeats)
    result = {
        "provenance": provenance("python benchmarks/loop_time.py " + " ".join(sys.argv[1:])),
        "dataset": DATASET,
        "images": n_images,
        "size": 256,
        "repeats": args.repeats,
        "rows": rows,
        "adapt": adapt_rows(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
