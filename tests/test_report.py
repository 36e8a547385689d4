"""docs/results.md and the README's results table are generated from the committed result files."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillfss import estimate, report

ROOT = Path(__file__).resolve().parents[1]


def test_committed_results_are_what_the_report_generates(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    assert (ROOT / "docs/results.md").read_text() == report.build()  # `make results` gives no diff
    readme = (ROOT / "README.md").read_text()
    assert report.readme_block(readme) == readme
    assert len(readme.splitlines()) <= 300


def test_every_headline_dataset_and_removed_option_is_in_the_report(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    text = report.build()
    headline = report._load(Path("docs/results/headline.json"))
    for dataset in {r["dataset"] for r in headline["rows"]}:
        assert dataset in text.split("## Measured and removed")[0]
    assert all(what in text for *_, what in report.REMOVED)


def test_the_paper_ablations_pair_each_variant_with_the_row_it_changes(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    section = "\n".join(report.ablations())
    pairs = [(f"{s}_{v}", s) for s in ("transferfss", "distillfss") for v in ("random", "setB", "setC")]
    for variant, changed in [*pairs, ("distillfss_two_stage", "distillfss"), ("distillfss_nodistill", "distillfss")]:
        assert f"| {variant} | {changed} |" in section
    datasets = {r["dataset"] for r in report._load(Path("docs/results/ablations.json"))["rows"]}
    assert datasets == {"aerial_buildings", "lung_ct", "nuclei", "nuclei_sizes"}  # every bundled set, lung CT too


def test_readme_block_needs_its_markers() -> None:
    with pytest.raises(SystemExit, match="markers"):
        report.readme_block("# a README without the results markers\n")


def test_estimate_calibration_scores_the_estimate_against_the_test_miou(monkeypatch) -> None:
    def run(dataset: str, test: float, est: float | None, low: float, high: float, copies: bool = False) -> dict:
        estimate = {"miou": est, "low": low, "high": high, "near_copies": copies}
        return {"dataset": dataset, "method": "distillfss_fast", "shots": 5, "miou": test, "estimate": estimate}

    rows = [
        run("a", 50.0, 54.0, 40.0, 60.0),  # error +4, inside the bootstrap interval
        run("a", 60.0, 52.0, 45.0, 58.0),  # error -8, outside it: inside once widened by a gap of 5 (8 < 1.96 x 5)
        run("b", 0.0, 30.0, 0.0, 50.0, copies=True),  # error +30, inside (the interval reaches 0)
        run("b", 10.0, None, 0.0, 100.0),  # no estimate (one image): not scored, but counted as withheld
        run("c", 5.0, None, 0.0, 100.0, copies=True),  # one group of near copies: no estimate
        {"dataset": "a", "method": "linear_probe", "shots": 5, "miou": 1.0, "estimate": None},
    ]
    monkeypatch.setattr(estimate, "GAP_SD", 0.0)  # the recorded (bootstrap) interval as it is
    (line, blank) = report.estimate_calibration({"rows": rows})
    assert "3 runs with an estimate; in 2 more `adapt` gave none" in line
    assert "mean absolute error 14.0 points" in line and "mean error (estimate - test) +8.7" in line
    assert "inside `adapt`'s interval in 67 %" in line
    assert (
        "a 6.0, b 30.0 (near copies in 1 of 2, no estimate in 1), c (near copies in 1 of 1, no estimate in 1)" in line
    )
    assert blank == ""
    monkeypatch.setattr(estimate, "GAP_SD", 5.0)
    assert "inside `adapt`'s interval in 100 %" in report.estimate_calibration({"rows": rows})[0]
    assert report.estimate_calibration({"rows": rows[3:]}) == []  # no estimate anywhere: no lines


def test_the_shipped_gap_is_the_one_the_committed_runs_measure(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    runs = report.calibration_runs()
    assert len(runs) >= 10 and all(r["estimate"]["miou"] is not None and r["k"] >= 2 for r in runs)
    assert round(report.gap_sd(runs), 1) == estimate.GAP_SD  # rerun a benchmark: update GAP_SD with `make results`


def test_the_interval_holds_the_bootstrap_interval_and_the_gap() -> None:
    low, high = estimate.predictive_interval(50.0, 45.0, 52.0, gap_sd=5.0)
    assert low == pytest.approx(50 - (5**2 + 9.8**2) ** 0.5) and high == pytest.approx(50 + (2**2 + 9.8**2) ** 0.5)
    assert estimate.predictive_interval(50.0, 45.0, 52.0, gap_sd=0.0) == (45.0, 52.0)
    # two held-out images that both scored 0: the bootstrap says [0, 0], the interval does not
    assert estimate.predictive_interval(0.0, 0.0, 0.0) == (0.0, pytest.approx(estimate.Z * estimate.GAP_SD))
    assert estimate.predictive_interval(99.0, 98.0, 100.0)[1] == 100.0


def test_shot_guidance_pairs_each_advice_with_what_the_next_image_did() -> None:
    def r(order: str, k: int, miou: float, advice: str, start: str = "warm") -> dict:
        return {"dataset": "a", "draw": 0, "seed": 0, "order": order, "start": start, "k": k, "miou": miou,
                "estimate": {"advice": advice}}  # fmt: skip

    rows = [
        r("start", 1, 10.0, "no estimate from one labelled image: label a second", start="scratch"),
        r("random", 2, 20.0, "...; label a third image to see whether more labels help"),
        r("suggested", 2, 14.0, "...; label a third image to see whether more labels help"),
        r("random", 3, 21.0, "...; labelling more is unlikely to help much (+0.1 ...)"),
        r("suggested", 3, 18.0, "...; labelling more is likely to help (+5.0 ...)"),
        r("random", 4, 22.0, "...; whether labelling more helps is unclear (...)"),  # no K = 5: not paired
        r("random", 5, 40.0, "...", start="scratch"),  # a model from scratch is not a step of the loop
    ]
    (line, _) = report.shot_guidance(rows)
    assert "one image, no estimate: +7.0 ± 4.2 (n = 2)" in line  # K = 1 starts both orders: +10 and +4
    assert "no trend yet (two images): +2.5 ± 2.1 (n = 2)" in line
    assert "unlikely to help much: +1.0 ± 0.0 (n = 1)" in line
    assert "; likely to help:" not in line  # the K = 3 'likely' step has no K = 4 in its order
    assert "unclear" not in line
    assert report.shot_guidance([]) == []


def _variant_rows(mious: list[float], precision: str = "fp32", seconds: float = 10.0) -> list[dict]:
    return [
        {"dataset": "lung_ct", "shots": 5, "draw": 0, "method": "distillfss_fast", "seed": seed, "miou": m}
        | {"adapt": {"precision": precision}, "adapt_seconds": seconds + seed}
        for seed, m in enumerate(mious)
    ]


def test_bf16_rows_pair_with_the_headlines_fp32_runs_and_other_precisions_are_refused(tmp_path, monkeypatch) -> None:
    import json

    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    made = {"command": "distillfss benchmark --precision bf16", "commit": "abc", "date": "2026-12-05", "machine": "m"}
    head = {
        "provenance": {**made, "command": "distillfss benchmark --draws 3"},
        "rows": _variant_rows([50, 52, 54], "fp32", 20),
    }
    (results / "headline.json").write_text(json.dumps(head))
    monkeypatch.setattr(report, "DOCS", tmp_path / "docs")
    assert report.precision() == []  # no bf16 run committed: no section
    bf16 = results / "precision_bf16.json"
    bf16.write_text(json.dumps({"provenance": made, "rows": _variant_rows([51, 53, 55], "bf16")}))
    section = "\n".join(report.precision())
    assert "| distillfss_fast | 53.0 | 52.0 | +1.0 [+1.0, +1.0] | 3 | better | 11 | 21 |" in section
    assert "The fp32 run (headline.json): `distillfss benchmark --draws 3` at commit abc" in section
    bf16.write_text(json.dumps({"provenance": made, "rows": _variant_rows([51, 53, 55], "fp32")}))
    with pytest.raises(SystemExit, match="not the bf16 run"):
        report.precision()
    unpaired = [{**r, "dataset": "other"} for r in _variant_rows([51], "bf16")]
    bf16.write_text(json.dumps({"provenance": made, "rows": unpaired}))
    with pytest.raises(SystemExit, match="no distillfss_fast run shares a support set"):
        report.precision()


def test_lung_ct_enlarged_pairs_with_the_same_draws_at_the_default_scale(tmp_path, monkeypatch) -> None:
    import json

    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    monkeypatch.setattr(report, "DOCS", tmp_path / "docs")
    made = {"command": "distillfss benchmark --scale 2", "commit": "abc", "date": "2026-12-05", "machine": "m"}
    enlarged = results / "lung_scale_2.json"
    enlarged.write_text(
        json.dumps({"provenance": made, "config": {"scale": "2"}, "rows": _variant_rows([9, 12, 15], seconds=300)})
    )
    assert report.lung_scale() == []  # no reference run: no section
    reference = {"provenance": {**made, "command": "distillfss benchmark --scale auto"}, "config": {"scale": "auto"}}
    (results / "lung_scale_auto.json").write_text(json.dumps({**reference, "rows": _variant_rows([0, 0, 0])}))
    section = "\n".join(report.lung_scale())
    assert "| distillfss_fast | 12.0 | 0.0 | +12.0 [+9.0, +15.0] | 3 | better | 301 | 11 |" in section
    assert "`distillfss benchmark --scale auto` at commit abc" in section  # both runs' commands are named
    enlarged.write_text(json.dumps({"provenance": made, "config": {"scale": "auto"}, "rows": _variant_rows([1])}))
    with pytest.raises(SystemExit, match="not the scale 2 run"):
        report.lung_scale()
