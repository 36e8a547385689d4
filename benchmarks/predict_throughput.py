"""Images per second of ``predict``'s engines (the default fast student, 256 px, one window per image).

    python benchmarks/predict_throughput.py --out docs/results/predict_throughput.json [--device cpu]

PyTorch (fp32) and onnxruntime (fp32, int8) at 1, 8 and 32 windows per forward pass, on 64 images of 256 x 256 (the
student's weights do not change its cost: built from seed 0, int8 calibrated on random images). The median of three
passes over the images; the first pass after loading is a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distillfss.backbones import build_backbone
from distillfss.export import OnnxPredictor, export_onnx, quantize_int8
from distillfss.outputs import provenance, write_json_atomic
from distillfss.predictor import Predictor
from distillfss.student import build_fast_student


def rate(predictor, images: list[np.ndarray], batch: int) -> float:  # noqa: ANN001 - Predictor or OnnxPredictor
    predictor.predict_batch(images[:batch], batch=batch)  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        predictor.predict_batch(images, batch=batch)
        times.append(time.perf_counter() - t0)
    return len(images) / statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(2) if args.device == "cpu" else None
    rng = np.random.default_rng(0)
    images = [(rng.uniform(0, 255, (256, 256, 3))).astype(np.uint8) for _ in range(args.images)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = build_backbone("efficientnet_lite2", 256).to(args.device)
        student = build_fast_student(backbone, 1, 256).to(args.device).eval()
    rows = []
    engines = {"torch": Predictor(student, 256)}
    if args.device == "cpu":
        with tempfile.TemporaryDirectory() as tmp:  # the sessions hold the graphs: the files go at once
            folder = Path(tmp)
            export_onnx(student, 256, ("background", "x"), folder / "fp32.onnx")
            calibration = np.random.default_rng(1).uniform(0, 1, (8, 3, 256, 256)).astype(np.float32)
            quantize_int8(folder / "fp32.onnx", folder / "int8.onnx", calibration)
            engines["onnx_fp32"] = OnnxPredictor(folder / "fp32.onnx", threads=2)
            engines["onnx_int8"] = OnnxPredictor(folder / "int8.onnx", threads=2)
    for name, predictor in engines.items():
        for batch in (1, 8, 32):
            rows.append({"engine": name, "batch": batch, "images_per_second": round(rate(predictor, images, batch), 2)})
            print(rows[-1], flush=True)
    result = {
        "provenance": provenance("python benchmarks/predict_throughput.py " + " ".join(sys.argv[1:]), args.device),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
