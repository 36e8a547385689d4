"""Experiment (not part of the package): does a fast student with stored class prototypes generalise better?

The fast student maps each pixel's features to the teacher's coarse maps with a small learned function; from one or
a few support images that function does not carry to other images where the teacher's matching does (README, "Why
the fast student fails on aerial buildings at K = 1"). Here each layer group's coarse map also gets a matching
term that needs no support at inference: ``gain * (cos(f, p_c) - cos(f, p_background))``, with one prototype per
class and per layer group, initialised by masked average pooling of the support features (as the prototype
baseline) and trained with the rest of the student (the prototypes are parameters: the cost does not grow with K).

For each support draw of DATASET at each K (the benchmark's nested sets) and SEED: the teacher adapted alone (the
default stage), then the default fast student and the prototype student distilled from it with the same seed, bank
and schedule; scored like the benchmark (ground truth at 384 x 384, one confusion matrix over the test split).

    PYTHONPATH=src python experiments/prototype_student.py DATASET SHOTS DRAWS SEEDS
    e.g. PYTHONPATH=src python experiments/prototype_student.py aerial_buildings 1,5 0,1,2 0

Prints one JSON line per (K, draw, seed).
"""

from __future__ import annotations

import importlib
import json
import sys
import time

import torch
import torch.nn.functional as F
from one_shot_student import scores, setup, support_set
from torch import Tensor, nn

from distillfss.adapt import VIEWS, adapt, seeded
from distillfss.backbones import Pyramid
from distillfss.config import AdaptConfig
from distillfss.data.folder import IGNORE
from distillfss.model_io import load_teacher_weights
from distillfss.predictor import Predictor
from distillfss.student import FastStudent, build_fast_student
from distillfss.teacher import ModelOutput, _skip8

adapt_mod = importlib.import_module("distillfss.adapt")


class PrototypeStudent(FastStudent):
    """A fast student whose per-group coarse maps add a prototype-matching term (see the module docstring)."""

    def __init__(self, fast: FastStudent, prototypes: list[Tensor]) -> None:
        super().__init__(fast.backbone, fast.heads, fast.decoder, fast.image_size)
        self.prototypes = nn.ParameterList(nn.Parameter(p.clone()) for p in prototypes)  # per group (C+1, D)
        self.gains = nn.Parameter(torch.full((len(prototypes), fast.num_classes), 2.0))

    def forward_features(self, query: Pyramid) -> ModelOutput:
        coarse = []
        for g, f in zip(self.groups, query.layers):
            sim = torch.einsum("bdhw,cd->bchw", F.normalize(f.float(), dim=1), F.normalize(self.prototypes[g], dim=1))
            coarse.append(self.heads[g](f) + self.gains[g].view(1, -1, 1, 1) * (sim[:, 1:] - sim[:, :1]))
        stacks = [torch.cat([c for c, st in zip(coarse, self.strides) if st == s], dim=1) for s in (8, 16, 32)]
        logits = self.decoder(*stacks, _skip8(query, self.strides), query.skip4, self.image_size)
        return ModelOutput(logits, None, coarse)


def group_prototypes(pyramid: Pyramid, labels: Tensor, groups: tuple[int, ...], n_out: int) -> list[Tensor]:
    """Masked average pooling per layer group over its layers: (C+1, D) per group, classes in label order."""
    sums: dict[int, Tensor] = {}
    counts: dict[int, Tensor] = {}
    for g, f in zip(groups, pyramid.layers):
        y = F.interpolate(labels[:, None].float(), size=f.shape[-2:], mode="nearest")[:, 0].long()
        onehot = torch.stack([(y == c) & (y != IGNORE) for c in range(n_out)], dim=1).float()  # (K, C+1, h, w)
        sums[g] = sums.get(g, 0) + torch.einsum("kchw,kdhw->cd", onehot, F.normalize(f.float(), dim=1))
        counts[g] = counts.get(g, 0) + onehot.sum(dim=(0, 2, 3)).unsqueeze(1)
    return [F.normalize(sums[g] / counts[g].clamp_min(1), dim=1) for g in sorted(sums)]


def distill(teacher, support, images, labels, cfg: AdaptConfig, prototypes: bool) -> FastStudent:
    """adapt._distill_fast with the student swapped (same seed, bank and steps)."""
    with seeded(cfg.seed, images.device):
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        views = VIEWS[cfg.fast_views]
        bank = adapt_mod._view_bank(teacher, support, images, labels, views, None, views, 0, gen, 1)
        model = build_fast_student(teacher.backbone, support.flags.shape[1], labels.shape[-1])
        if prototypes:
            protos = group_prototypes(support.pyramid, labels, model.groups, support.flags.shape[1] + 1)
            model = PrototypeStudent(model, protos)
        params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
        adapt_mod._fit_on_bank(
            model, params, bank, labels, cfg, cfg.fast_iterations, "fast", True, gen, False, lambda row: None
        )
    return model.eval()


def main(name: str, shots: list[int], draws: list[int], seeds: list[int]) -> None:
    train, mcfg, backbone, folder, pairs = setup(name)
    for k in shots:
        for draw in draws:
            images, labels, support = support_set(train, k, draw, backbone, mcfg)
            for seed in seeds:
                start = load_teacher_weights(folder, backbone, mcfg)
                cfg = AdaptConfig(method="transfer", seed=seed)
                teacher = adapt(backbone, images, labels, mcfg, cfg, teacher=start, support=support, progress=False)
                row: dict = {"dataset": name, "shots": k, "draw": draw, "seed": seed}
                fcfg = AdaptConfig(student="fast", seed=seed)
                for label, protos in (("fast_student", False), ("prototype_student", True)):
                    t0 = time.perf_counter()
                    student = distill(teacher.teacher, support, images, labels, fcfg, protos)
                    row[label] = scores(Predictor(student, mcfg.image_size), pairs)
                    row[label]["seconds"] = round(time.perf_counter() - t0, 1)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *[[int(x) for x in a.split(",")] for a in sys.argv[2:5]])
