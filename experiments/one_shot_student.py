"""Experiment (not part of the package): why the fast student fails where its teacher does not, at small K.

For each support draw of DATASET at K shots (the benchmark's nested sets) and seed 0: the starting teacher, the
teacher adapted alone (TransferFSS, the default stage before the fast student) and the fast student distilled from
it after each of STEPS distillation steps (a separate run per count, at the constant rate: the first N steps of a
longer run), scored like the benchmark (ground truth at 384 x 384, one confusion matrix over the test split):
foreground IoU, precision and recall.

    PYTHONPATH=src python experiments/one_shot_student.py DATASET K DRAWS [STEPS]
    e.g. PYTHONPATH=src python experiments/one_shot_student.py aerial_buildings 1 0,1,2 10,25,50,100,200

Prints one JSON line per draw.
"""

from __future__ import annotations

import json
import sys

import torch

from distillfss.adapt import adapt, distill_fast
from distillfss.backbones import build_backbone
from distillfss.benchmark import resolve_dataset
from distillfss.config import AdaptConfig, model_config
from distillfss.data import class_sets, label_tensor, load_pair, load_support_tensors
from distillfss.data.folder import IGNORE, load_split
from distillfss.model_io import load_teacher_weights, resolve_teacher
from distillfss.predictor import Predictor
from distillfss.sampling import sample_support
from distillfss.teacher import encode_support


def scores(predictor: Predictor, pairs: list) -> dict:
    """Foreground IoU, precision and recall (percent) over every test image (binary sets)."""
    tp = fp = fn = 0
    for image, mask in pairs:
        pred = predictor.predict(image, size=mask.shape)
        valid = mask != IGNORE
        tp += int(((pred == 1) & (mask == 1) & valid).sum())
        fp += int(((pred == 1) & (mask == 0) & valid).sum())
        fn += int(((pred == 0) & (mask == 1) & valid).sum())
    pct = lambda a, b: round(100 * a / max(b, 1), 1)  # noqa: E731
    return {"iou": pct(tp, tp + fp + fn), "precision": pct(tp, tp + fp), "recall": pct(tp, tp + fn)}


def test_pairs(test) -> list:
    """(image, ground truth at 384 x 384) for every test image, as the benchmark scores them."""
    pairs = []
    for sample in test.samples:
        image, mask = load_pair(sample, test.num_classes)
        pairs.append((image, label_tensor(mask, 384).to(torch.uint8).numpy()))
    return pairs


def setup(name: str) -> tuple:
    """A bundled or converted dataset's train split, the default model config and backbone, the shipped teacher's
    folder and the scored test pairs (deterministic algorithms on, as the CLI)."""
    torch.use_deterministic_algorithms(True)
    _, root = resolve_dataset(name)
    train, test = load_split(root, "train"), load_split(root, "test")
    mcfg = model_config("efficientnet_lite2", train.num_classes)
    backbone = build_backbone("efficientnet_lite2", mcfg.image_size)
    folder, _ = resolve_teacher("auto", mcfg)
    return train, mcfg, backbone, folder, test_pairs(test)


def support_set(train, shots: int, draw: int, backbone, mcfg) -> tuple:
    """The benchmark's support draw at K = ``shots`` -> (images, labels, their encoding)."""
    stems = sample_support([s.stem for s in train.samples], shots, class_sets(train), draw)
    images, labels = load_support_tensors(train, stems, mcfg.image_size)
    return images, labels, encode_support(backbone, images, labels, mcfg.num_classes)


def main(name: str, shots: int, draws: list[int], steps: list[int]) -> None:
    train, mcfg, backbone, folder, pairs = setup(name)
    for draw in draws:
        images, labels, support = support_set(train, shots, draw, backbone, mcfg)
        start = load_teacher_weights(folder, backbone, mcfg)
        row: dict = {"dataset": name, "shots": shots, "draw": draw, "seed": 0}
        row["support_foreground_pct"] = round(100 * float((labels == 1).float().mean()), 2)
        row["teacher_before"] = scores(Predictor(start, mcfg.image_size, support), pairs)
        cfg = AdaptConfig(method="transfer", seed=0)
        teacher = adapt(backbone, images, labels, mcfg, cfg, teacher=start, support=support, progress=False).teacher
        row["teacher_adapted"] = scores(Predictor(teacher, mcfg.image_size, support), pairs)
        for n in steps:
            fcfg = AdaptConfig(student="fast", seed=0, fast_iterations=n)
            fast, _ = distill_fast(teacher, support, images, labels, fcfg, progress=False)
            row[f"fast_student_{n}_steps"] = scores(Predictor(fast.eval(), mcfg.image_size), pairs)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(
        sys.argv[1],
        int(sys.argv[2]),
        [int(x) for x in sys.argv[3].split(",")],
        [int(x) for x in (sys.argv[4] if len(sys.argv) > 4 else "200").split(",")],
    )
