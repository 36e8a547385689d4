"""Experiment (not part of the package): the fast student at a larger working size than its 256-px teacher.

The teacher is adapted alone at 256 px as ``adapt`` does; it labels the bank of support views at 256 px as usual;
its probabilities and coarse masks are then upsampled (bilinear) to the student's size, and a fast student working
at that size learns from the same views encoded at that size, with the true masks loaded at that size. Evaluated
like the benchmark (ground truth at 384 x 384). At size 256 it reproduces the benchmark's ``distillfss_fast`` rows.

    PYTHONPATH=src python experiments/fast_student_size.py DATASET SIZE DRAWS SEEDS
    e.g. PYTHONPATH=src python experiments/fast_student_size.py aerial_buildings 384 0,1,2 0

Prints one JSON line per run (mIoU, adaptation seconds, ms per image).
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from distillfss.adapt import (
    VIEWS,
    ViewBank,
    _encode_views,
    _fit_on_bank,
    _view_bank,
    adapt,
    dihedral,
    distill_fast,
    seeded,
)
from distillfss.backbones import build_backbone
from distillfss.benchmark import resolve_dataset
from distillfss.config import AdaptConfig, model_config
from distillfss.data import class_sets, load_support_tensors
from distillfss.data.folder import load_split
from distillfss.evaluate import evaluate_predictor
from distillfss.model_io import load_teacher_weights, resolve_teacher
from distillfss.predictor import Predictor
from distillfss.sampling import sample_support
from distillfss.student import build_fast_student
from distillfss.teacher import encode_support


def main(name: str, size: int, draws: list[int], seeds: list[int]) -> None:
    torch.use_deterministic_algorithms(True)
    _, root = resolve_dataset(name)
    train, test = load_split(root, "train"), load_split(root, "test")
    mcfg = model_config("efficientnet_lite2", train.num_classes)
    backbone = build_backbone("efficientnet_lite2", mcfg.image_size)  # EfficientNet runs at any size
    folder, _ = resolve_teacher("auto", mcfg)
    for draw in draws:
        stems = sample_support([s.stem for s in train.samples], 5, class_sets(train), draw)
        images, labels = load_support_tensors(train, stems, mcfg.image_size)
        images_s, labels_s = load_support_tensors(train, stems, size)
        support = encode_support(backbone, images, labels, mcfg.num_classes)
        for seed in seeds:
            t0 = time.perf_counter()
            start = load_teacher_weights(folder, backbone, mcfg)
            cfg = AdaptConfig(method="transfer", seed=seed)
            teacher = adapt(backbone, images, labels, mcfg, cfg, teacher=start, support=support, progress=False).teacher
            fcfg = AdaptConfig(student="fast", seed=seed)
            if size == mcfg.image_size:
                fast, _ = distill_fast(teacher, support, images, labels, fcfg, progress=False)
            else:
                with seeded(seed):  # as distill_fast
                    gen = torch.Generator().manual_seed(seed + 2)
                    views = VIEWS[fcfg.fast_views]
                    bank = _view_bank(teacher, support, images, labels, views, None, views, 0, gen)
                    up = dict(mode="bilinear", align_corners=False)
                    bank = ViewBank(
                        _encode_views(backbone, images_s, views),
                        bank.source,
                        torch.cat([dihedral(labels_s, k) for k in views]),
                        [
                            F.interpolate(c, size=(size // s, size // s), **up)
                            for c, s in zip(bank.coarse, teacher.strides)
                        ],
                        F.interpolate(bank.soft.float(), size=(size, size), **up).half(),
                        bank.present,
                    )
                    fast = build_fast_student(backbone, mcfg.num_classes, size)
                    params = [p for n, p in fast.named_parameters() if not n.startswith("backbone.")]
                    steps = fcfg.fast_iterations
                    _fit_on_bank(fast, params, bank, labels_s, fcfg, steps, "fast", True, gen, False, lambda r: None)
            seconds = time.perf_counter() - t0
            ev = evaluate_predictor(Predictor(fast.eval(), size), test, progress=False, eval_size=384)
            row = {"dataset": name, "size": size, "draw": draw, "seed": seed, "miou": ev.miou}
            row.update(adapt_seconds=round(seconds, 1), ms_per_image=round(ev.seconds_per_image * 1000, 1))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(
        sys.argv[1],
        int(sys.argv[2]),
        [int(x) for x in sys.argv[3].split(",")],
        [int(x) for x in sys.argv[4].split(",")],
    )
