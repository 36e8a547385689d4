"""docs/results.md and the README's results table are generated from the committed result files."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillfss import report

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


def test_readme_block_needs_its_markers() -> None:
    with pytest.raises(SystemExit, match="markers"):
        report.readme_block("# a README without the results markers\n")
