"""The per-fix table of the adaptation step (README, "Each fix on its own") from benchmark results.

Reads the ``results.json`` of benchmark runs that hold ``transferfss`` / ``distillfss`` and any of their
``_old_<fix>`` rows (one fix of the training step undone, ``config.LEGACY_STEPS``) and writes, per fix, dataset and
method, the mean ± std with the fix and without it, and the change the fix made (fixed − old) with a 95 % paired
bootstrap interval over the runs both have (grouped by dataset, K and support draw).

    PYTHONPATH=src python experiments/fix_ablation_table.py OUT.md RESULTS.json [RESULTS.json ...]

Also writes OUT with ``.json``: every row, each with the file it came from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from distillfss.stats import mean_std, paired_comparison

FIXES = {
    "_old_shots": "1. class c attends only to shots that contain c",
    "_old_self": "2. the query's own tokens out of the softmax",
    "_old_target": "3. the student's focal loss on full labels",
    "_old_mse": "4. MSE per episode, then episodes",
}


def main(out: Path, paths: list[Path]) -> None:
    rows = []
    for p in paths:
        for r in json.loads(p.read_text())["rows"]:
            rows.append({**r, "source": str(p)})
    key = {(r["method"], r["dataset"], r["shots"], r["draw"], r["seed"]): r["miou"] for r in rows}
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    lines = [
        "| fix (row undone) | method | dataset | with the fix | without it | change [95 % interval] | runs | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for suffix, fix in FIXES.items():
        for method in ("transferfss", "distillfss"):
            old_name = f"{method}{suffix}"
            for dataset in [*datasets, "all"]:
                pairs = [
                    (key[(method, *k[1:])], v, k[1:4])
                    for k, v in key.items()
                    if k[0] == old_name and (dataset == "all" or k[1] == dataset) and (method, *k[1:]) in key
                ]
                if not pairs:
                    continue
                new, old, groups = zip(*pairs)
                c = paired_comparison(new, old, groups)
                (mn, sn), (mo, so) = mean_std(new), mean_std(old)
                interval = f"{c.mean:+.1f} [{c.low:+.1f}, {c.high:+.1f}]" if c.n > 1 else f"{c.mean:+.1f}"
                lines.append(
                    f"| {fix} (`{suffix}`) | {method} | {dataset} | {mn:.1f} ± {sn:.1f} | {mo:.1f} ± {so:.1f} "
                    f"| {interval} | {c.n} | {c.verdict} |"
                )
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
