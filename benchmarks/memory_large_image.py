"""Peak memory of ``distillfss predict`` on one 10,000 x 10,000 px image (the default student at pixel scale 1).

    python benchmarks/memory_large_image.py --out docs/results/memory_large_image.json [--side 10000]

A scratch folder (deleted after) gets: a student adapted on the bundled aerial crops at scale 1 with one teacher and
one student step (the weights do not change the cost), and a noise image of side x side px as an 8-bit PNG. Then
``distillfss predict`` runs in a child process; its peak resident memory (``ru_maxrss``), wall time, and the label
file's size are recorded.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from distillfss import FewShotSegmenter
from distillfss.data import class_sets, load_split
from distillfss.demo import demo_root
from distillfss.outputs import provenance, write_json_atomic
from distillfss.sampling import sample_support


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--side", type=int, default=10_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        train = load_split(demo_root() / "aerial_buildings", "train")
        stems = sample_support([s.stem for s in train.samples], 5, class_sets(train))
        by = {s.stem: s for s in train.samples}
        seg = FewShotSegmenter(scale=1, iterations=1, fast_iterations=1)
        seg.fit([by[s].image for s in stems], [by[s].mask for s in stems], classes=["building"])
        seg.save(scratch / "model")
        rng = np.random.default_rng(0)
        (scratch / "images").mkdir()
        rows = [rng.integers(0, 256, (1000, args.side, 3), dtype=np.uint8) for _ in range(args.side // 1000)]
        Image.fromarray(np.concatenate(rows)).save(scratch / "images" / "big.png", compress_level=1)
        del rows
        argv = [sys.executable, "-m", "distillfss", "predict", "--model", str(scratch / "model")]
        argv += ["--images", str(scratch / "images"), "--out", str(scratch / "labels")]
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        with Image.open(scratch / "labels" / "big.png") as labels:
            size = labels.size
    result = {
        "provenance": provenance("python benchmarks/memory_large_image.py " + " ".join(sys.argv[1:])),
        "side": args.side,
        "labels_size": list(size),
        "peak_rss_mb": round(peak_mb, 1),
        "seconds": round(seconds, 1),
        "seconds_per_megapixel": round(seconds / (args.side**2 / 1e6), 3),
    }
    print(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
