"""``python -m distillfss.report`` (``make results``): ``docs/results.md`` from the committed result files.

Nothing here is typed in by hand: every number is computed from a JSON file under ``docs/results/`` that records the
command, commit, machine and date that made it.

* ``headline.json`` (``benchmark`` output): the product's table -- every bundled dataset, every method, mean ± std
  over seeds, and the paired differences of the default student against the others (mean over every dataset of the
  run, weak ones included).
* ``ablations.json`` (``benchmark`` output): the paper's ablation rows beside the rows they change.
* ``precision_bf16.json``, ``lung_scale_2.json`` (``benchmark`` outputs): one change (bf16; lung CT enlarged) against
  a run without it (``headline.json``; ``lung_scale_auto.json``), paired by support set and seed.
* ``measured/*.json``: earlier benchmark runs of options that were measured and removed (``REMOVED``): the option's
  row against the row without it, paired, with the run's machine.
* ``speed/*.json`` (``speed`` output): time per image and memory of the student, teacher and backbone; with
  ``--adapt``, seconds per training step.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from .benchmark import _paired, table
from .outputs import write_text_atomic
from .stats import paired_comparison

DOCS = Path("docs")

# Options measured as not helping (or only trading cost), then removed: (file under docs/results/measured, the row
# with the option, the row without it, what the option was). The rows are named as the run named them.
REMOVED: tuple[tuple[str, str, str, str], ...] = (
    ("ablation_fixes_k5.json", "transferfss_old_shots", "transferfss", "training step before fix: every other shot serves every class"),
    ("ablation_fixes_k5.json", "transferfss_old_self", "transferfss", "training step before fix: the query's own tokens in the softmax"),
    ("ablation_fixes_k5.json", "distillfss_old_target", "distillfss", "training step before fix: paper student on the teacher's relabelled target"),
    ("ablation_fixes_k5.json", "distillfss_old_mse", "distillfss", "training step before fix: distillation MSE per (episode, class) pair"),
    ("benchmark_k5_coarsedrop.json", "distillfss_coarsedrop", "distillfss", "`--coarse-dropout 0.3`"),
    ("benchmark_k5_teacher_stage.json", "distillfss_fast", "distillfss_fast_teacheronly", "`--fast-teacher-stage joint` (teacher trained beside the paper student)"),
    ("benchmark_k5_fast_crops.json", "distillfss_fast_crops", "distillfss_fast", "`--fast-crops 4`"),
    ("benchmark_k5_fast_cosine.json", "distillfss_fast_cosine", "distillfss_fast", "`--fast-schedule cosine`"),
    ("benchmark_k5_fast_400.json", "distillfss_fast_400", "distillfss_fast", "400 fast-student steps instead of 200"),
    ("benchmark_k5_amd_levers.json", "distillfss_fast_labelmean", "distillfss_fast", "`--label-views mean`"),
    ("benchmark_k5_amd_levers.json", "distillfss_fast_ema", "distillfss_fast", "`--fast-ema 0.98`"),
    ("benchmark_k5_amd_tta.json", "distillfss_fast_tta", "distillfss_fast", "`--tta flips` on the student"),
    ("benchmark_k1_one_shot_grid.json", "distillfss_fast_grid", "distillfss_fast", "`--one-shot-grid` at K = 1"),
    ("benchmark_k5_probe_labels.json", "distillfss_fast_probelabels", "distillfss_fast", "teacher+probe labels against the teacher's alone, K = 5 (kept, the only labels now)"),
    ("benchmark_k12_probe_labels.json", "distillfss_fast_probelabels", "distillfss_fast", "teacher+probe labels against the teacher's alone, K = 1, 2"),
    ("benchmark_k5_synth_teacher.json", "distillfss_fast_synthteacher", "distillfss_fast", "a teacher meta-trained on selfsup+synthetic episodes (not shipped)"),
)  # fmt: skip


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read a result file ({e})") from None


def _provenance(d: dict) -> str:
    """The command, commit, date and machine that made a result file, and those of each run that resumed it."""
    made = d["provenance"]
    text = f"`{made['command']}` at commit {made['commit']}, {made['date'][:10]}, on {made['machine']}"
    for more in made.get("resumed", []):
        text += f"; resumed by `{more['command']}` at commit {more['commit']}"
        text += "" if more["machine"] == made["machine"] else f" on {more['machine']}"
    return text


def headline(d: dict) -> list[str]:
    rows = d["rows"]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    return [
        "## Every bundled dataset, the default settings",
        "",
        f"Made by {_provenance(d)}. Datasets: {', '.join(datasets)}. `distillfss_fast` is the model "
        "`distillfss adapt` writes (same code, same seed); `transferfss` is its adapted teacher; `distillfss` the "
        "paper's student. The `mean` column and every paired difference cover every dataset of the run, lung CT "
        "included. With 3-16 test images per set, a difference whose interval contains 0 is not distinguishable "
        "from noise.",
        "",
        table(d),
        *estimate_calibration(d),
    ]


def ablations() -> list[str]:
    """The paper's ablations (``ablations.json``, a ``benchmark`` run of its rows)."""
    d = _load(DOCS / "results" / "ablations.json")
    head = {_key(r): r["miou"] for r in _load(DOCS / "results" / "headline.json")["rows"]}
    shared = [(r["miou"], head[_key(r)]) for r in d["rows"] if _key(r) in head]
    same = sum(a == b for a, b in shared)
    return [
        "## The paper's ablations",
        "",
        f"Made by {_provenance(d)}. The rows `distillfss benchmark` keeps for the paper's ablation study, each an "
        "`AdaptConfig` change of the default run: `*_random` a randomly initialised starting teacher instead of the "
        "shipped meta-trained one (`teacher_random`: that teacher before adaptation); `*_setB` / `*_setC` the "
        "trainable sets B (all but the backbone) and C (set A + attention) instead of A; `distillfss_two_stage` the "
        "paper student trained after the teacher instead of beside it; `distillfss_nodistill` without the "
        "distillation loss. Each variant is paired with the row it changes. The headline's configuration at two of "
        f"its seeds: of the {len(shared)} runs both made (same dataset, method and seed), {same} have the same mIoU; "
        "with one seed fewer, the intervals here are not the headline's.",
        "",
        table(d),
    ]


def precision() -> list[str]:
    """Adapting in bf16 (``precision_bf16.json``, a ``benchmark --precision bf16`` run on the headline's support
    sets and seeds) against the headline's fp32 rows, paired; none without the file."""
    return variant(
        "Adapting in bf16 on a CPU",
        "precision_bf16.json",
        "headline.json",
        "bf16",
        "fp32",
        lambda d: all(r["adapt"]["precision"] == "bf16" for r in d["rows"]),
        "the headline's first support draw and its seeds, adapted with `--precision bf16` (the decoder and heads "
        "autocast to bfloat16), each row paired with the headline's fp32 run. Seconds per training step at each precision: "
        "`speed/adapt_cpu_*.json` under *Speed* (this CPU has AVX512-BF16; CPUs without fast bf16 kernels were not "
        "measured here and can be slower).",
    )


def lung_scale() -> list[str]:
    """Lung CT enlarged (``lung_scale_2.json``, ``benchmark --scale 2``) against the default scale
    (``lung_scale_auto.json``, the same support draws and seeds), paired; none without the files."""
    return variant(
        "Small structures: lung CT enlarged",
        "lung_scale_2.json",
        "lung_scale_auto.json",
        "scale 2",
        "auto",
        lambda d: d["config"]["scale"] == "2" and {r["dataset"] for r in d["rows"]} == {"lung_ct"},
        "three support draws of lung CT (nodules of 0.06-2 % of a 512 px slice) x 3 seeds at `--scale 2` (the "
        "slices enlarged to 1024 px, segmented in 256 px windows), each run paired with the same draw and seed at "
        "the default scale (`auto`: 0.5, a slice resized to one 256 px window). Seconds to adapt: mean over the runs "
        "(a seed that reuses an earlier seed's teacher stage counts that stage's seconds).",
    )


def variant(
    title: str,
    name: str,
    reference: str,
    tag: str,
    ref_tag: str,
    check: Callable[[dict], bool],  # the file is the variant it claims to be
    blurb: str,
) -> list[str]:
    """A ``benchmark`` run of one change (``name`` under docs/results) against a run without it (``reference``),
    row by row, paired by dataset, K, draw and seed; none without the files."""
    path, ref_path = DOCS / "results" / name, DOCS / "results" / reference
    if not (path.exists() and ref_path.exists()):
        return []
    d, ref = _load(path), _load(ref_path)
    if not check(d):
        raise SystemExit(f"{path}: not the {tag} run it should be (its configuration or rows say otherwise)")
    rows = ref["rows"] + [{**r, "method": f"{r['method']}@{tag}"} for r in d["rows"]]
    lines = [
        f"## {title}",
        "",
        f"Made by {_provenance(d)}: {blurb} The {ref_tag} run ({reference}): {_provenance(ref)}.",
        "",
        f"| row | {tag} mIoU | {ref_tag} mIoU | {tag} - {ref_tag} [95 % interval] | runs | verdict | {tag}: adapt s "
        f"| {ref_tag}: adapt s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in d["rows"]):
        xs, ys, groups = _paired(rows, f"{method}@{tag}", method)
        if not xs:
            raise SystemExit(f"{path}: no {method} run shares a support set and seed with {ref_path.name}'s")
        c = paired_comparison(xs, ys, groups)
        secs = [sum(s) / len(s) for s in _paired(rows, f"{method}@{tag}", method, field="adapt_seconds")[:2]]
        lines.append(
            f"| {method} | {sum(xs) / len(xs):.1f} | {sum(ys) / len(ys):.1f} | {c.mean:+.1f} [{c.low:+.1f}, "
            f"{c.high:+.1f}] | {c.n} | {c.verdict} | {secs[0]:.0f} | {secs[1]:.0f} |"
        )
    return [*lines, ""]


def _key(row: dict) -> tuple:
    return row["dataset"], row["shots"], row.get("draw", 0), row["method"], row["seed"]


def estimate_calibration(d: dict, method: str = "distillfss_fast") -> list[str]:
    """``adapt``'s estimate (from the support set alone) against the test mIoU of ``method``'s model, over every
    run of a benchmark that recorded it (none: no lines)."""
    import numpy as np

    recorded = [r for r in d["rows"] if r["method"] == method and r.get("estimate")]
    runs = [r for r in recorded if r["estimate"]["miou"] is not None]
    if not runs:
        return []
    mae, bias, corr, inside = _calibration(runs)
    per = []
    for name in dict.fromkeys(r["dataset"] for r in recorded):
        mine = [r for r in runs if r["dataset"] == name]
        none = sum(r["estimate"]["miou"] is None for r in recorded if r["dataset"] == name)
        copies = sum(bool(r["estimate"].get("near_copies")) for r in recorded if r["dataset"] == name)
        text = f"{name} {np.mean([abs(r['estimate']['miou'] - r['miou']) for r in mine]):.1f}" if mine else name
        notes = [f"near copies in {copies} of {len(mine) + none}"] if copies else []
        notes += [f"no estimate in {none}"] if none else []
        per.append(text + (f" ({', '.join(notes)})" if notes else ""))
    shots = sorted({r["shots"] for r in runs})
    withheld = len(recorded) - len(runs)
    return [
        f"The estimate `adapt` reported in these runs against the test mIoU of the same `{method}` model "
        f"(K = {', '.join(map(str, shots))}, {len(runs)} runs with an estimate"
        + (f"; in {withheld} more `adapt` gave none" if withheld else "")
        + f"): mean absolute error {mae:.1f} points, mean error (estimate - test) {bias:+.1f}, correlation "
        f"{corr:.2f}, test mIoU inside `adapt`'s interval in {inside:.0f} % of the runs (today's interval, made from "
        'the recorded bootstrap interval: "The estimate\'s interval" in docs/results.md). By dataset (mean absolute '
        "error): "
        f"{', '.join(per)}.",
        "",
    ]


def _calibration(runs: list[dict], gap_sd: float | None = None) -> tuple[float, float, float, float]:
    """Runs with an estimate (``r["estimate"]``) and a test mIoU (``r["miou"]``) -> mean absolute error, mean error
    (estimate - test), correlation (nan when undefined) and the percentage of test mIoUs inside the interval
    (``_interval`` with ``gap_sd``, default the shipped ``GAP_SD``)."""
    import numpy as np

    e = np.array([r["estimate"]["miou"] for r in runs])
    t = np.array([r["miou"] for r in runs])
    inside = 100 * np.mean([_inside(r, gap_sd) for r in runs])
    corr = float(np.corrcoef(e, t)[0, 1]) if len(runs) > 2 and e.std() > 0 and t.std() > 0 else float("nan")
    return float(np.abs(e - t).mean()), float((e - t).mean()), corr, float(inside)


def _sample(estimate: dict) -> tuple[float, float]:
    """A recorded estimate's support-set (bootstrap) interval; runs recorded before the interval had its gap term
    stored it as ``low``, ``high``."""
    return estimate.get("sample_low", estimate["low"]), estimate.get("sample_high", estimate["high"])


def _interval(estimate: dict, gap_sd: float | None = None) -> tuple[float, float]:
    """The interval ``adapt`` makes today from a recorded estimate."""
    from .estimate import GAP_SD, predictive_interval

    return predictive_interval(estimate["miou"], *_sample(estimate), GAP_SD if gap_sd is None else gap_sd)


def _inside(run: dict, gap_sd: float | None = None) -> bool:
    low, high = _interval(run["estimate"], gap_sd)
    return low <= run["miou"] <= high


def calibration_runs() -> list[dict]:
    """Every committed run with an estimate, K >= 2: the headline's default-student rows and the loop's models, each
    as {dataset, k, miou, estimate}."""
    runs = [
        {"dataset": r["dataset"], "k": r["shots"], "miou": r["miou"], "estimate": r["estimate"]}
        for r in _load(DOCS / "results" / "headline.json")["rows"]
        if r["method"] == "distillfss_fast" and r.get("estimate")
    ]
    path = DOCS / "results" / "loop.json"
    if path.is_file():
        runs += [{k: r[k] for k in ("dataset", "k", "miou", "estimate")} for r in _load(path)["rows"]]
    return [r for r in runs if r["estimate"]["miou"] is not None]


def gap_sd(runs: list[dict]) -> float:
    """The root mean square of (test mIoU - estimate) over ``runs``: what ``estimate.GAP_SD`` is set to."""
    import numpy as np

    return float(np.sqrt(np.mean([(r["miou"] - r["estimate"]["miou"]) ** 2 for r in runs])))


def estimate_interval() -> list[str]:
    """How the estimate's interval gets its gap term, and how often the interval held the test mIoU: over the runs
    the gap was measured on, and for each dataset with the gap measured on the other datasets only (a new domain)."""
    from .estimate import GAP_SD, Z

    runs = calibration_runs()
    if not runs:
        return []
    measured = gap_sd(runs)
    names = sorted({r["dataset"] for r in runs})
    per, held = [], 0.0
    for name in names:
        mine = [r for r in runs if r["dataset"] == name]
        others = gap_sd([r for r in runs if r["dataset"] != name])
        inside = _calibration(mine, others)[3]
        held += inside * len(mine) / len(runs)
        per.append(f"{name} {inside:.0f} % of {len(mine)} (gap {others:.1f})")
    sample = _calibration(runs, 0.0)[3]  # no gap: the bootstrap interval alone
    ks = ", ".join(map(str, sorted({r["k"] for r in runs})))
    return [
        "## The estimate's interval",
        "",
        f"Over the {len(runs)} models of the headline and loop runs with an estimate (K = {ks}), the test mIoU lay "
        f"{measured:.1f} points from the estimate (root mean square; `adapt` uses {GAP_SD:.1f}). The support set's "
        f"bootstrap interval alone held the test mIoU in {sample:.0f} % of them: it knows the support images' spread, "
        "not how a probe's leave-one-out score differs from a student's on new images. `adapt`'s interval adds that "
        f"gap (each side: root of the sum of the squares of the bootstrap half-width and {Z} x the gap) and held the "
        f"test mIoU in {_calibration(runs)[3]:.0f} % of the runs. On a domain the gap was not measured on (each "
        f"dataset with the gap measured on the others): {held:.0f} % overall; {', '.join(per)}.",
        "",
    ]


def removed() -> list[str]:
    lines = [
        "## Measured and removed",
        "",
        "Options that were measured, found not distinguishable from the default (or only trading cost), and removed "
        "from the code (git keeps it). Each line: the row with the option minus the row without it, paired over the "
        "run's datasets x draws x seeds, from the committed file of that run.",
        "",
        "| option | difference [95 % interval] | runs | verdict | file | machine |",
        "|---|---|---|---|---|---|",
    ]
    for name, with_option, without, what in REMOVED:
        d = _load(DOCS / "results" / "measured" / name)
        xs, ys, groups = _paired(d["rows"], with_option, without)
        c = paired_comparison(xs, ys, groups)
        machine = next((r["machine"] for r in d["rows"] if r.get("machine")), "not recorded")
        lines.append(
            f"| {what} | {c.mean:+.1f} [{c.low:+.1f}, {c.high:+.1f}] | {c.n} | {c.verdict} | "
            f"`measured/{name}` | {machine} |"
        )
    return lines


def speed() -> list[str]:
    from .adapt_speed import adapt_table
    from .speed import table as speed_table

    lines = ["## Speed", ""]
    for path in sorted((DOCS / "results" / "speed").glob("*.json")):
        d = _load(path)
        made = d.get("provenance")
        where = _provenance(d) if made else f"{d['device']} (an earlier run; command and commit not recorded)"
        lines += [f"`{path.relative_to(DOCS)}`: {where}.", ""]
        lines += [adapt_table(d) if "support" in d else speed_table(d), ""]  # speed --adapt's files name their support
    return lines


def large_images() -> list[str]:
    """The pixel-scale measurements (``benchmarks/large_images.py``: files ``large_images*.json``), if any."""
    from .stats import mean_std

    lines: list[str] = []
    for path in sorted((DOCS / "results").glob("large_images*.json")):
        d = _load(path)
        lines += [
            "## Large images and the pixel scale" if not lines else "",
            "",
            f"`{path.relative_to(DOCS)}`: made by {_provenance(d)}; {len(d['seeds'])} seeds, K = {d['shots']}, "
            "paired by seed.",
            "",
            "| what | a: mIoU | b: mIoU | a - b [95 % interval] | verdict | a: s / megapixel | b: s / megapixel |",
            "|---|---|---|---|---|---|---|",
        ]
        extra = []
        for part in ("mosaic", "lung", "nuclei_sizes"):
            if part not in d:
                continue
            rows = d[part]["rows"]
            comparisons = d[part].get("comparisons") or [d[part]["comparison"]]
            for c in comparisons:
                spm = {m: [r["seconds_per_megapixel"] for r in rows if r["method"] == m] for m in (c["a"], c["b"])}
                (ma, sa), (mb, sb) = c["a_mean_std"], c["b_mean_std"]
                diff = f"{c['difference']:+.1f} [{c['interval'][0]:+.1f}, {c['interval'][1]:+.1f}]"
                verdict = c["verdict"]
                if sa == sb == 0:  # e.g. a teacher that does not depend on the seed: one run, repeated
                    diff, verdict = f"{c['difference']:+.1f}", "the same at every seed: no interval"
                lines.append(
                    f"| {part}: {c['a']} vs {c['b']} | {ma:.1f} ± {sa:.1f} | {mb:.1f} ± {sb:.1f} | {diff} | {verdict} | "
                    f"{sum(spm[c['a']]) / len(spm[c['a']]):.2f} | {sum(spm[c['b']]) / len(spm[c['b']]):.2f} |"
                )
            for cls in ("small_nucleus",) if part == "nuclei_sizes" else ():
                for m in dict.fromkeys(r["method"] for r in rows):
                    mean, std = mean_std([r["per_class"][cls] for r in rows if r["method"] == m])
                    extra.append(f"{m}: {cls} IoU {mean:.1f} ± {std:.1f}")
        if extra:
            lines += ["", "; ".join(extra) + "."]
    return [*lines, ""] if lines else []


def throughput() -> list[str]:
    """``predict``'s engines in images per second (``benchmarks/predict_throughput.py``), one table per device."""
    paths = sorted((DOCS / "results").glob("predict_throughput*.json"))
    if not paths:
        return []
    lines = [
        "## Prediction throughput",
        "",
        "Images per second of 256 x 256 px (one window each), default fast student, by windows per forward pass "
        "(`predict --batch`).",
        "",
    ]
    for path in paths:
        d = _load(path)
        batches = sorted({r["batch"] for r in d["rows"]})
        where = f"{d['threads']} CPU threads" if d["device"] == "cpu" else d["device"]
        lines += [
            f"Made by {_provenance(d)}; {where}.",
            "",
            "| engine | " + " | ".join(f"batch {b}" for b in batches) + " |",
            "|---|" + "---|" * len(batches),
        ]
        for engine in dict.fromkeys(r["engine"] for r in d["rows"]):
            rate = {r["batch"]: r["images_per_second"] for r in d["rows"] if r["engine"] == engine}
            lines.append(f"| {engine} | " + " | ".join(f"{rate[b]:.1f}" for b in batches) + " |")
        lines.append("")
    return lines


def large_image_memory() -> list[str]:
    """Peak memory of ``predict`` on one very large image (``benchmarks/memory_large_image.py``), if measured."""
    path = DOCS / "results" / "memory_large_image.json"
    if not path.is_file():
        return []
    d = _load(path)
    side = d["side"]
    return [
        "## One very large image",
        "",
        f"Made by {_provenance(d)}. `distillfss predict` on one {side:,} x {side:,} px 8-bit PNG with the default "
        f"student at pixel scale 1: peak resident memory {d['peak_rss_mb'] / 1024:.2f} GiB, {d['seconds']:.0f} s "
        f"({d['seconds_per_megapixel']:.2f} s per megapixel, reading and writing included); labels written at "
        f"{d['labels_size'][0]:,} x {d['labels_size'][1]:,} px.",
        "",
    ]


def loop() -> list[str]:
    """The interactive loop with a simulated user (``benchmarks/loop.py``: ``loop.json``), if measured: suggested
    against random order, warm start against scratch, and the estimate against the test mIoU."""
    import numpy as np

    from .stats import mean_std

    path = DOCS / "results" / "loop.json"
    if not path.is_file():
        return []
    d = _load(path)
    rows = d["rows"]
    chains = sorted({(r["dataset"], r["draw"], r["seed"]) for r in rows})
    key = lambda r: (r["dataset"], r["draw"], r["seed"])  # noqa: E731
    at = {(key(r), r["order"], r["start"], r["k"]): r for r in rows}
    sched = d["schedule"]
    names = sorted({c[0] for c in chains})
    lines = [
        "## The interactive loop: suggested order, warm start, the estimate",
        "",
        f"Made by {_provenance(d)}. A simulated user on {len(chains)} (dataset, draw, seed) chains "
        f"({', '.join(names)}): one labelled train image, then four more one at a time (ground-truth masks stand in "
        "for the user's), in the draw's random order or in `suggest`'s order; K = 1 adapted from the shipped teacher, "
        f"every later K warm-started from the model before it ({sched['warm']['iterations']} teacher + "
        f"{sched['warm']['fast_iterations']} student steps; from scratch {sched['scratch']['iterations']} + "
        f"{sched['scratch']['fast_iterations']}, the demo's schedule). Test mIoU (%), mean ± std over the chains.",
        "",
        "| order | " + " | ".join(f"K = {k}" for k in range(1, 6)) + " |",
        "|---|" + "---|" * 5,
    ]
    for order in ("random", "suggested"):
        cells = []
        for k in range(1, 6):
            vals = [at[(c, "start" if k == 1 else order, "scratch" if k == 1 else "warm", k)]["miou"] for c in chains]
            cells.append("{:.1f} ± {:.1f}".format(*mean_std(vals)))
        lines.append(f"| {order} | " + " | ".join(cells) + " |")
    sug = [at[(c, "suggested", "warm", 5)]["miou"] for c in chains]
    rnd = [at[(c, "random", "warm", 5)]["miou"] for c in chains]
    scr = [at[(c, "random", "scratch", 5)] for c in chains]
    warm_rows = [at[(c, "random", "warm", 5)] for c in chains]
    draws = [c[:2] for c in chains]  # the seeds of one (dataset, draw) share its images: resampled together
    cmp_s = paired_comparison(sug, rnd, draws)
    cmp_w = paired_comparison([r["miou"] for r in warm_rows], [r["miou"] for r in scr], draws)
    lines += [
        "",
        f"Suggested minus random order at K = 5: {cmp_s.mean:+.1f} [{cmp_s.low:+.1f}, {cmp_s.high:+.1f}] mIoU points "
        f"over {cmp_s.n} paired chains ({len(set(draws))} support draws; hierarchical bootstrap: draws, then seeds "
        f"within them): {cmp_s.verdict}.",
        "",
        f"Warm start (K = 4 model + the fifth image) minus adapting K = 5 from scratch: {cmp_w.mean:+.1f} "
        f"[{cmp_w.low:+.1f}, {cmp_w.high:+.1f}] mIoU points over {cmp_w.n} paired chains: {cmp_w.verdict} (its "
        "time: the next section).",
        "",
        "The estimate `adapt` reports (each support image predicted by a probe fitted without it and its near copies) "
        "against the test mIoU of the same model, random order (K = 5 also from scratch):",
        "",
        "| K | models | with an estimate | mean abs. error | mean error (estimate - test) | correlation | test "
        "mIoU inside the interval |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = {
        "1": [at[(c, "start", "scratch", 1)] for c in chains],
        "2": [at[(c, "random", "warm", 2)] for c in chains],
        "5": [*warm_rows, *scr],
    }
    for k, models in groups.items():
        est = [r for r in models if r["estimate"]["miou"] is not None]
        if not est:
            lines.append(f"| {k} | {len(models)} | 0 (interval 0-100: no estimate from one image) | | | | |")
            continue
        mae, bias, corr, inside = _calibration(est)
        lines.append(f"| {k} | {len(models)} | {len(est)} | {mae:.1f} | {bias:+.1f} | {corr:.2f} | {inside:.0f} % |")
    per = []
    for name in names:
        mine = [r for r in rows if r["dataset"] == name and r["k"] in (2, 5) and r["order"] != "suggested"]
        est = [r for r in mine if r["estimate"]["miou"] is not None]
        none = f"no estimate in {len(mine) - len(est)} of {len(mine)}" if len(est) < len(mine) else ""
        if est:
            err = np.mean([abs(r["estimate"]["miou"] - r["miou"]) for r in est])
            per.append(f"{name} {err:.1f}" + (f" ({none})" if none else ""))
        elif none:
            per.append(f"{name} ({none})")
    lines += ["", "Mean absolute error of the estimate by dataset (K = 2 and 5): " + ", ".join(per) + ".", ""]
    return lines + shot_guidance(rows)


GUIDANCE = (
    ("unlikely to help", "unlikely to help much"),
    ("likely to help", "likely to help"),
    ("unclear", "unclear"),
    ("label a third", "no trend yet (two images)"),
    ("label a second", "one image, no estimate"),
    ("no estimate", "no estimate"),
)


def shot_guidance(rows: list[dict]) -> list[str]:
    """What ``adapt`` advised at K (its line: labelling more likely / unlikely to help) against what the next labelled
    image did to the test mIoU, over the loop's warm-started steps K -> K + 1 (both orders)."""
    from .stats import mean_std

    warm = {(r["dataset"], r["draw"], r["seed"], r["order"], r["k"]): r for r in rows if r["start"] == "warm"}
    changes: dict[str, list[float]] = {}
    for r in (r for r in rows if r["start"] == "warm" or r["order"] == "start"):
        orders = ("random", "suggested") if r["order"] == "start" else (r["order"],)  # K = 1 starts both orders
        what = next(label for key, label in GUIDANCE if key in r["estimate"]["advice"])
        for order in orders:
            nxt = warm.get((r["dataset"], r["draw"], r["seed"], order, r["k"] + 1))
            if nxt is not None:
                changes.setdefault(what, []).append(nxt["miou"] - r["miou"])
    if not changes:
        return []
    cells = []
    for _, label in GUIDANCE:
        if label in changes:
            m, sd = mean_std(changes[label])
            cells.append(f"{label}: {m:+.1f} ± {sd:.1f} (n = {len(changes[label])})")
    return [
        "What `adapt` advised about labelling more, against the change of the test mIoU when the next image was "
        "labelled (warm-started steps K -> K + 1 of both orders; mean ± std): " + "; ".join(cells) + ".",
        "",
    ]


def preview_time() -> list[str]:
    """Seconds from saving a mask to the app's preview (``benchmarks/preview_time.py``), if measured."""
    path = DOCS / "results" / "preview_time.json"
    if not path.is_file():
        return []
    d = _load(path)
    from .stats import mean_std

    ks = sorted({r["k"] for r in d["rows"]})
    cells = []
    for k in ks:
        vals = [r["seconds"] for r in d["rows"] if r["k"] == k]
        cells.append("{:.1f} ± {:.1f}".format(*mean_std(vals)))
    adapt = {r["start"]: r["seconds"] for r in d["adapt"]}
    return [
        "## Waiting times of the loop",
        "",
        f"Made by {_provenance(d)}. Seconds from saving the K-th mask to the preview of the workspace "
        f"({d['images']} images of {d['dataset']}, {d['size']} px: the unlabeled ones, and each labelled one from a "
        f"probe fitted without it; the app's save and preview functions); mean ± std over {d['repeats']} repeats.",
        "",
        "| " + " | ".join(f"K = {k}" for k in ks) + " |",
        "|" + "---|" * len(ks),
        "| " + " | ".join(cells) + " |",
        "",
        f"Adapt again at K = 5 ({d['dataset']}, default steps, one seed): {adapt['warm']:.0f} s warm-started from the "
        f"K = 4 model against {adapt['scratch']:.0f} s from the shipped teacher.",
        "",
    ]


def build() -> str:
    parts = [
        "# Results",
        "",
        "Generated by `make results` (`python -m distillfss.report`) from the files under `docs/results/`; do not "
        "edit by hand.",
        "",
        *headline(_load(DOCS / "results" / "headline.json")),
        *ablations(),
        *precision(),
        *lung_scale(),
        *removed(),
        "",
        *loop(),
        *estimate_interval(),
        *preview_time(),
        *large_images(),
        *throughput(),
        *large_image_memory(),
        *speed(),
    ]
    return "\n".join(parts).rstrip() + "\n"


START, END = "<!-- results:start -->", "<!-- results:end -->"


def readme_block(readme: str) -> str:
    """``readme`` with the headline table (and where it came from) between the results markers."""
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md: the markers {START} and {END} are missing")
    block = "\n".join(headline(_load(DOCS / "results" / "headline.json"))[2:]).rstrip()
    # the README keeps the default student's comparisons; docs/results.md has them all
    lines = [line for line in block.splitlines() if not _other_comparison(line)]
    block = "\n".join(lines) + "\n\nThe other rows' paired differences: [docs/results.md](docs/results.md)."
    head, rest = readme.split(START, 1)
    return f"{head}{START}\n{block}\n{END}{rest.split(END, 1)[1]}"


def _other_comparison(line: str) -> bool:
    """A row of the paired-differences table whose method is not the default student."""
    cells = [c.strip() for c in line.strip("|").split("|")]
    return (
        len(cells) == 5
        and cells[0] not in ("method", "distillfss_fast")
        and cells[4]
        in (
            "better",
            "worse",
            "not distinguishable",
        )
    )


def stamp(path: Path, commit: str, command: str) -> None:
    """Record in a result file the command that made it, the commit it ran at, the machine and the date (run it
    right after the command, on the same machine)."""
    from .outputs import provenance, write_json_atomic

    d = _load(path)
    d["provenance"] = provenance(command, commit=commit)
    if not d["provenance"]["commit"]:
        raise SystemExit(f"{commit}: not a commit of this repository")
    write_json_atomic(path, d)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stamp"]:  # python -m distillfss.report stamp FILE COMMIT COMMAND...
        stamp(Path(argv[1]), argv[2], " ".join(argv[3:]))
        return 0
    text = build()
    write_text_atomic(DOCS / "results.md", text)
    readme = Path("README.md")
    write_text_atomic(readme, readme_block(readme.read_text()))
    print(f"wrote {DOCS / 'results.md'} ({len(text.splitlines())} lines) and the table in README.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
