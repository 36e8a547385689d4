"""Experiment (not part of the package): the fast student distilled from the adapted teacher and the tuned linear
probe together.

The teacher is adapted alone (as ``adapt``); the linear probe is fitted on the same support set at 384 px with its
settings chosen by cross-validation (as the benchmark's ``linear_probe``). Scored on the test split (384 x 384):
the teacher, the probe, their mixture (class probabilities averaged), the default fast student, and a fast student
whose soft labels are the mixture's: on unlabeled views the full probe's probabilities, on support views a probe
fitted without that view's source image (the probe's settings kept), so no view is labelled by a model that saw
its mask -- as the teacher's labels of support views leave their source image out of the shots.

    PYTHONPATH=src python experiments/probe_labels.py DATASET DRAWS SEEDS UNLABELED(0|1)

Prints one JSON line per run.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillfss.adapt import VIEWS, ViewBank, _fit_on_bank, _view_bank, adapt, dihedral, distill_fast, seeded
from distillfss.backbones import build_backbone
from distillfss.baselines import LinearProbe
from distillfss.benchmark import resolve_dataset
from distillfss.config import AdaptConfig, model_config
from distillfss.data import class_sets, load_support_tensors, load_unlabeled
from distillfss.data.folder import load_split
from distillfss.evaluate import evaluate_predictor
from distillfss.model_io import load_teacher_weights, resolve_teacher
from distillfss.predictor import Predictor
from distillfss.sampling import sample_support
from distillfss.student import build_fast_student
from distillfss.teacher import encode_support

PROBE_SIZE = 384


class Mixture(nn.Module):
    """Images at the probe's size -> the log of the teacher's and the probe's class probabilities averaged."""

    def __init__(self, teacher: Predictor, probe: LinearProbe, size: int) -> None:
        super().__init__()
        self.teacher, self.probe, self.size = teacher, probe, size

    def forward(self, images: Tensor) -> Tensor:
        small = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        t = F.interpolate(self.teacher.logits(small), size=images.shape[-2:], mode="bilinear", align_corners=False)
        p = self.probe(images)
        return ((t.softmax(1) + p.softmax(1)) / 2).clamp_min(1e-12).log()


@torch.no_grad()
def probe_views(probe: LinearProbe, images: Tensor, views: tuple[int, ...], size: int) -> Tensor:
    """The probe's class probabilities on every (view, image) pair, view-major, at the student's ``size``."""
    out = []
    for k in views:
        p = probe(dihedral(images, k)).softmax(1)
        out.append(F.interpolate(p, size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(out)


def main(name: str, draws: list[int], seeds: list[int], use_unlabeled: bool) -> None:
    torch.use_deterministic_algorithms(True)
    _, root = resolve_dataset(name)
    train, test = load_split(root, "train"), load_split(root, "test")
    mcfg = model_config("efficientnet_lite2", train.num_classes)
    size = mcfg.image_size
    backbone = build_backbone("efficientnet_lite2", size)
    pb = build_backbone("efficientnet_lite2", PROBE_SIZE)
    folder, _ = resolve_teacher("auto", mcfg)
    for draw in draws:
        stems = sample_support([s.stem for s in train.samples], 5, class_sets(train), draw)
        images, labels = load_support_tensors(train, stems, size)
        p_images, p_labels = load_support_tensors(train, stems, PROBE_SIZE)
        support = encode_support(backbone, images, labels, mcfg.num_classes)
        unl = p_unl = None
        if use_unlabeled:
            files = [s.image for s in train.samples if s.stem in stems]
            img_dir = train.samples[0].image.parent
            unl = load_unlabeled(img_dir, size, 64, exclude=files)[0]
            p_unl = load_unlabeled(img_dir, PROBE_SIZE, 64, exclude=files)[0]
        probe = LinearProbe(pb, mcfg.num_classes)
        probe.fit(p_images, p_labels)
        fixed = {k: probe.settings[k] for k in ("l2", "levels", "balanced")}
        loo = []  # a probe without each support image, the settings kept
        for i in range(len(stems)):
            keep = [j for j in range(len(stems)) if j != i]
            pi = LinearProbe(pb, mcfg.num_classes, **fixed)
            pi.fit(p_images[keep], p_labels[keep])
            loo.append(pi)
        for seed in seeds:
            start = load_teacher_weights(folder, backbone, mcfg)
            teacher = adapt(
                backbone,
                images,
                labels,
                mcfg,
                AdaptConfig(method="transfer", seed=seed),
                teacher=start,
                support=support,
                progress=False,
            ).teacher
            tpred = Predictor(teacher, size, support)
            scores = {}
            scores["teacher"] = evaluate_predictor(tpred, test, progress=False, eval_size=384).miou
            scores["probe"] = evaluate_predictor(Predictor(probe, PROBE_SIZE), test, progress=False, eval_size=384).miou
            mix = Predictor(Mixture(tpred, probe, size), PROBE_SIZE)
            scores["mixture"] = evaluate_predictor(mix, test, progress=False, eval_size=384).miou
            fcfg = AdaptConfig(student="fast", seed=seed)
            t0 = time.perf_counter()
            fast, _ = distill_fast(teacher, support, images, labels, fcfg, unl, progress=False)
            scores["student"] = evaluate_predictor(Predictor(fast, size), test, progress=False, eval_size=384).miou
            base_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with seeded(seed):  # as distill_fast
                gen = torch.Generator().manual_seed(seed + 2)
                views = VIEWS[fcfg.fast_views]
                bank = _view_bank(teacher, support, images, labels, views, unl, views, 0, gen)
                m = len(stems)
                probs = [probe_views(loo[i], p_images[i : i + 1], views, size) for i in range(m)]  # (V, ...)
                sup = torch.stack(probs, 1).flatten(0, 1)  # view-major like the bank
                parts = [sup] + ([probe_views(probe, p_unl, views, size)] if unl is not None else [])
                p_soft = torch.cat(parts)
                soft = ((bank.soft.float() + p_soft) / 2).half()
                mixed = ViewBank(bank.pyramid, bank.source, bank.hard, bank.coarse, soft, bank.present)
                student = build_fast_student(backbone, mcfg.num_classes, size)
                params = [p for n, p in student.named_parameters() if not n.startswith("backbone.")]
                steps = fcfg.fast_iterations
                _fit_on_bank(student, params, mixed, labels, fcfg, steps, "fast", True, gen, False, lambda r: None)
            mix_s = time.perf_counter() - t0
            scores["student_mix"] = evaluate_predictor(
                Predictor(student, size), test, progress=False, eval_size=384
            ).miou
            row = {"dataset": name, "draw": draw, "seed": seed, "unlabeled": 0 if unl is None else len(unl)}
            row.update({k: round(v, 2) for k, v in scores.items()})
            row.update(student_s=round(base_s, 1), student_mix_s=round(mix_s, 1), probe_settings=probe.settings)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(
        sys.argv[1],
        [int(x) for x in sys.argv[2].split(",")],
        [int(x) for x in sys.argv[3].split(",")],
        sys.argv[4] == "1",
    )
