from __future__ import annotations

import json

import pytest
from conftest import write_dataset

from distillfss.benchmark import resolve_dataset, table
from distillfss.cli import main
from distillfss.data import DataError

FAST = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--probe-size", "64", "--iterations", "1"]


def test_benchmark_runs_resumes_and_tabulates(tmp_path) -> None:
    data = write_dataset(tmp_path / "toy", n_train=5, n_test=2)
    out = tmp_path / "bench"
    args = ["benchmark", "--data", str(data), "--shots", "1,2,9", "--out", str(out), *FAST]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    cells = {(r["dataset"], r["shots"]) for r in results["rows"]}
    assert cells == {("toy", 1), ("toy", 2)}  # K=9 exceeds the pool and is skipped
    assert len(results["rows"]) == 2 * 5
    one, two = (set(next(r for r in results["rows"] if r["shots"] == k)["support"]) for k in (1, 2))
    assert one <= two  # nested support sets
    assert all(r["adapt"]["seed"] == 0 for r in results["rows"] if r["adapt"])
    text = (out / "table.md").read_text()
    assert "toy K=1" in text and "| distillfss |" in text and (out / "miou_vs_shots.png").is_file()

    # Resume: a finished cell is not run again (its row, timings included, stays as it was).
    before = (out / "results.json").read_text()
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(before)["rows"]

    # Another configuration in the same folder is refused.
    assert main([*args, "--seed", "1"]) == 2


def test_benchmark_names_unimplemented_paper_datasets(tmp_path, capsys) -> None:
    assert main(["benchmark", "--data", "kvasir", "--out", str(tmp_path / "b")]) == 2
    assert "distillfss data convert kvasir" in capsys.readouterr().err


def test_table_marks_missing_cells() -> None:
    rows = [
        {"dataset": "a", "shots": 1, "method": "m", "miou": 10.0},
        {"dataset": "a", "shots": 5, "method": "m", "miou": 20.0},
        {"dataset": "a", "shots": 5, "method": "n", "miou": 30.0},
    ]
    text = table({"rows": rows})
    assert "| m | 10.0 | 20.0 | 15.0 |" in text and "| n | - | 30.0 | 30.0 |" in text


@pytest.mark.parametrize("bad", ["--methods", "--shots"])
def test_benchmark_bad_flags(tmp_path, capsys, bad) -> None:
    value = "bogus" if bad == "--methods" else "x"
    args = ["benchmark", "--data", "nuclei", "--out", str(tmp_path / "b"), bad, value]
    assert main(args) == 2
    assert bad in capsys.readouterr().err


def test_per_class_shots_give_k_images_of_each_class(tmp_path) -> None:
    data = write_dataset(tmp_path / "multi", n_train=9, n_test=2, num_classes=3)
    out = tmp_path / "bench_pc"
    args = ["benchmark", "--data", str(data), "--shots", "1", "--per-class", "--methods", "prototype"]
    assert main([*args, "--out", str(out), *FAST]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["shots"] == 1 and row["shots_per_class"] and len(row["support"]) == 3


def test_paper_names_resolve_to_converted_copies(tmp_path) -> None:
    write_dataset(tmp_path / "industrial_fold2")
    assert resolve_dataset("industrial", tmp_path) == ("industrial_fold2", tmp_path / "industrial_fold2")
    with pytest.raises(DataError, match="data convert kvasir"):
        resolve_dataset("kvasir", tmp_path)


def test_ablations_are_rows_of_one_table(tmp_path) -> None:
    data = write_dataset(tmp_path / "toy", n_train=3, n_test=1)
    methods = "distillfss,distillfss_setB,distillfss_nodistill,transferfss_two_stage"
    args = ["benchmark", "--data", str(data), "--shots", "2", "--out", str(tmp_path / "b"), "--methods", methods]
    assert main([*args, *FAST]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "b/results.json").read_text())["rows"]}
    assert rows["distillfss"]["adapt"]["trainable"] == "A" and rows["distillfss_setB"]["adapt"]["trainable"] == "B"
    assert rows["distillfss_nodistill"]["adapt"]["distill_weight"] == 0.0
    assert rows["transferfss_two_stage"]["adapt"]["mode"] == "two_stage"
    assert "| distillfss_setB |" in (tmp_path / "b/table.md").read_text()


def test_table_says_when_a_method_loses_to_a_baseline() -> None:
    rows = [
        {"dataset": "a", "shots": 1, "method": m, "miou": v}
        for m, v in (("transferfss", 50.0), ("distillfss", 40.0), ("linear_probe", 45.0), ("prototype", 30.0))
    ]
    text = table({"rows": rows})
    assert (
        "- transferfss beats linear_probe and prototype on the mean (+5.0 vs linear_probe, +20.0 vs prototype)" in text
    )
    assert "- distillfss does NOT beat linear_probe on the mean (-5.0 vs linear_probe, +10.0 vs prototype)" in text
