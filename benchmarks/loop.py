"""The interactive loop with a simulated user (issue: label, see, correct, adapt again).

    python benchmarks/loop.py --out docs/results/loop.json [--data all] [--draws 0,1,2] [--seeds 0]

Run again with the same --out, it resumes: finished chains are kept.

For every bundled dataset, support draw and seed, a user who starts from one labelled train image (the draw's first)
and adds four more, one at a time, the ground-truth masks standing in for the user's:

* ``random``: in the draw's order (the nested support sets the benchmark draws);
* ``suggested``: each time the top image of ``FewShotSegmenter.suggest`` over the train images not yet labelled.

K = 1 is adapted from the shipped teacher; every later K warm-starts from the model before it
(``fit(..., warm_start=True)``, what ``adapt --from`` runs). At K = 5 the random order's images are also adapted
from scratch. Every model is scored on the test split (foreground mIoU, dataset-level confusion) and records the
estimate ``adapt`` reports beside it. The schedule is the demo's (20 teacher and 100 student steps from scratch;
a warm start a third of each, as ``warm_config`` makes it), so that the run fits in an hour on two CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from distillfss import FewShotSegmenter
from distillfss.config import warm_config
from distillfss.data import class_sets, load_split
from distillfss.demo import DEMO_ADAPT, demo_datasets, demo_root
from distillfss.evaluate import evaluate_predictor
from distillfss.outputs import provenance, write_json_atomic
from distillfss.sampling import sample_support

STEPS = 5  # labelled images at the end of the loop
SCRATCH = {"iterations": DEMO_ADAPT.iterations, "fast_iterations": DEMO_ADAPT.fast_iterations}
WARM = {k: getattr(warm_config(DEMO_ADAPT), k) for k in SCRATCH}


def draw_order(train, draw: int) -> list[str]:
    """The train stems in the order the draw's nested support sets add them."""
    stems, sets = [s.stem for s in train.samples], class_sets(train)
    order: list[str] = []
    for k in range(1, STEPS + 1):
        order += [s for s in sample_support(stems, k, sets, draw) if s not in order]
    return order


def fitted(seg: FewShotSegmenter | None, stems: list[str], train, classes, seed: int) -> tuple[FewShotSegmenter, float]:
    """A copy of ``seg`` warm-started on ``stems`` (or, ``seg`` None, a new one adapted from the shipped teacher)."""
    by = {s.stem: s for s in train.samples}
    images, masks = [by[s].image for s in stems], [by[s].mask for s in stems]
    t0 = time.perf_counter()
    if seg is None:
        seg = FewShotSegmenter(seed=seed, **SCRATCH).fit(images, masks, classes=list(classes[1:]))
    else:
        seg = copy.deepcopy(seg)
        seg.adapt_options = {**seg.adapt_options, **WARM}
        seg.fit(images, masks, classes=list(classes[1:]), warm_start=True)
    return seg, time.perf_counter() - t0


def row(seg: FewShotSegmenter, test, **fields) -> dict:
    ev = evaluate_predictor(seg._predictor("student"), test, progress=False)
    out = {**fields, "k": len(fields["support"]), "miou": ev.miou, "estimate": seg.estimate}
    print({k: out[k] for k in ("dataset", "draw", "seed", "order", "k", "miou")}, seg.estimate["miou"], flush=True)
    return out


def chain(name: str, draw: int, seed: int) -> list[dict]:
    train, test = load_split(demo_root() / name, "train"), load_split(demo_root() / name, "test")
    classes = train.classes
    order = draw_order(train, draw)
    base = {"dataset": name, "draw": draw, "seed": seed}
    first, seconds = fitted(None, order[:1], train, classes, seed)
    rows = [row(first, test, **base, order="start", start="scratch", support=order[:1], adapt_seconds=seconds)]
    by = {s.stem: s for s in train.samples}
    for how in ("random", "suggested"):
        seg, support = first, order[:1]
        for _ in range(1, STEPS):
            t0 = time.perf_counter()
            if how == "random":
                nxt = order[len(support)]
            else:
                pool = [s.stem for s in train.samples if s.stem not in support]
                ranking = seg.suggest([by[s].image for s in pool])
                nxt = pool[ranking[0][0]]
            pick_s = time.perf_counter() - t0
            support = [*support, nxt]
            seg, seconds = fitted(seg, support, train, classes, seed)
            fields = {"order": how, "start": "warm", "support": support, "adapt_seconds": seconds}
            rows.append(row(seg, test, **base, **fields, suggest_seconds=pick_s))
    scratch, seconds = fitted(None, order[:STEPS], train, classes, seed)
    rows.append(
        row(scratch, test, **base, order="random", start="scratch", support=order[:STEPS], adapt_seconds=seconds)
    )
    return rows


def _key(r: dict) -> tuple[str, int, int]:
    return r["dataset"], r["draw"], r["seed"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default="all")
    p.add_argument("--draws", default="0,1,2")
    p.add_argument("--seeds", default="0")
    args = p.parse_args()
    names = demo_datasets() if args.data == "all" else args.data.split(",")
    draws = [int(d) for d in args.draws.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(2)
    result: dict = {
        "provenance": provenance("python benchmarks/loop.py " + " ".join(sys.argv[1:])),
        "schedule": {"scratch": SCRATCH, "warm": WARM, "adapt": dataclasses.asdict(DEMO_ADAPT)},
        "rows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.is_file():  # resume: the chains a stopped run finished are kept, with the provenance they had
        earlier = json.loads(args.out.read_text())
        if earlier.get("schedule") != result["schedule"]:
            raise SystemExit(f"{args.out}: made with another schedule; give another --out")
        resumed = {**result["provenance"], "chains_before": len({_key(r) for r in earlier["rows"]})}
        result = {**earlier, "provenance": {**earlier["provenance"]}}
        result["provenance"]["resumed"] = [*earlier["provenance"].get("resumed", []), resumed]
    done = {_key(r) for r in result["rows"]}
    for name in names:
        for draw in draws:
            for seed in seeds:
                if (name, draw, seed) in done:
                    continue
                result["rows"] += chain(name, draw, seed)
                write_json_atomic(args.out, result)  # a stopped run keeps its finished chains
    return 0


if __name__ == "__main__":
    sys.exit(main())
