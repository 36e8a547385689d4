from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SMALL_CONFIG, TINY_ADAPT, write_dataset

from distillfss.benchmark import resolve_dataset, table
from distillfss.cli import main
from distillfss.data import DataError
from distillfss.demo import demo_root
from distillfss.outputs import machine

FAST = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--probe-size", "64", "--iterations", "1"]
FAST += ["--config", str(SMALL_CONFIG)]


@pytest.mark.slow
def test_benchmark_runs_resumes_and_tabulates(tmp_path) -> None:
    data = write_dataset(tmp_path / "toy", n_train=5, n_test=2)
    out = tmp_path / "bench"
    args = ["benchmark", "--data", str(data), "--shots", "1,2,9", "--out", str(out), *FAST]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    cells = {(r["dataset"], r["shots"]) for r in results["rows"]}
    assert cells == {("toy", 1), ("toy", 2)}  # K=9 exceeds the pool and is skipped
    assert len(results["rows"]) == 2 * 8  # the default methods at K = 1 and 2
    assert {"distillfss_fast", "distillfss_fast_unlabeled"} <= {r["method"] for r in results["rows"]}
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


def test_results_record_the_command_line_commit_machine_and_each_resume(tmp_path, monkeypatch) -> None:
    import subprocess

    import distillfss

    data = write_dataset(tmp_path / "toy", n_train=3, n_test=1)
    out = tmp_path / "bench"
    args = ["benchmark", "--data", str(data), "--shots", "1", "--methods", "prototype", "--out", str(out), *FAST]
    monkeypatch.chdir(tmp_path)  # the commit is the package's checkout's, not the working directory's
    assert main(args) == 0
    made = json.loads((out / "results.json").read_text())["provenance"]
    here = Path(distillfss.__file__).parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
    assert made["command"] == shlex.join(["distillfss", *args]) and made["commit"] == head.stdout.strip()
    assert made["machine"] == machine("cpu") and made["date"] and "resumed" not in made
    assert main(args) == 0  # nothing left to run: a resume all the same
    again = json.loads((out / "results.json").read_text())["provenance"]
    assert {k: v for k, v in again.items() if k != "resumed"} == made and len(again["resumed"]) == 1


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
    methods = "distillfss,distillfss_setB,distillfss_nodistill,distillfss_two_stage"
    args = ["benchmark", "--data", str(data), "--shots", "2", "--out", str(tmp_path / "b"), "--methods", methods]
    assert main([*args, *FAST]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "b/results.json").read_text())["rows"]}
    assert rows["distillfss"]["adapt"]["trainable"] == "A" and rows["distillfss_setB"]["adapt"]["trainable"] == "B"
    assert rows["distillfss_nodistill"]["adapt"]["distill_weight"] == 0.0
    assert rows["distillfss_two_stage"]["adapt"]["mode"] == "two_stage"
    assert all(rows[m]["adapt"]["student"] == "paper" for m in rows)  # the paper's ablations are of its student
    assert "| distillfss_setB |" in (tmp_path / "b/table.md").read_text()


def test_table_compares_methods_with_paired_intervals() -> None:
    rows = []
    for d in ("a", "b"):
        for draw in (0, 1):
            base = 40.0 + 10 * draw + (5 if d == "b" else 0)
            rows.append({"dataset": d, "shots": 5, "draw": draw, "seed": None, "method": "linear_probe", "miou": base})
            for seed, noise in ((0, -0.5), (1, 0.0), (2, 0.5)):
                rows += [
                    {
                        "dataset": d,
                        "shots": 5,
                        "draw": draw,
                        "seed": seed,
                        "method": "distillfss",
                        "miou": base + 5 + noise,
                    },
                    {
                        "dataset": d,
                        "shots": 5,
                        "draw": draw,
                        "seed": seed,
                        "method": "transferfss",
                        "miou": base + 3 * noise,
                    },
                ]
    text = table({"rows": rows, "config": {"seeds": [0, 1, 2], "draws": 2}})
    assert "| linear_probe | 45.0 ± 7.1 | 50.0 ± 7.1 | 47.5 |" in text  # one run per draw
    line = next(x for x in text.splitlines() if x.startswith("| distillfss | linear_probe |"))
    assert "+5.0 [" in line and line.endswith("| 12 | better |")  # paired over 2 datasets x 2 draws x 3 seeds
    line = next(x for x in text.splitlines() if x.startswith("| transferfss | linear_probe |"))
    assert line.endswith("| not distinguishable |")
    line = next(x for x in text.splitlines() if x.startswith("| distillfss | transferfss |"))
    assert line.endswith("| better |")


def test_variants_are_compared_with_their_own_plain_method_only() -> None:
    from distillfss.benchmark import comparisons

    methods = (
        "distillfss",
        "distillfss_unlabeled",
        "distillfss_fast",
        "distillfss_fast_unlabeled",
        "distillfss_setB",
    )
    rows = [
        {"dataset": "d", "shots": 5, "draw": draw, "seed": 0, "method": m, "miou": 50.0 + i + draw}
        for draw in range(2)
        for i, m in enumerate(methods)
    ]
    pairs = {tuple(line.split(" | ")[:2]) for line in comparisons(rows) if line.startswith("| distillfss")}
    assert pairs == {
        ("| distillfss_unlabeled", "distillfss"),
        ("| distillfss_fast", "distillfss"),
        ("| distillfss_fast_unlabeled", "distillfss"),
        ("| distillfss_fast_unlabeled", "distillfss_fast"),
        ("| distillfss_setB", "distillfss"),
    }


def test_paired_comparison_needs_two_runs_and_is_reproducible() -> None:
    from distillfss.stats import paired_comparison

    assert paired_comparison([50.0], [40.0]).verdict == "no interval (n < 2)"
    a, b = [50.0, 41.0, 47.0, 39.0], [45.0, 44.0, 43.0, 42.0]
    assert paired_comparison(a, b) == paired_comparison(a, b)
    assert paired_comparison(a, b).verdict == "not distinguishable"
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([1.0], [1.0, 2.0])
    # Three seeds that share a support set repeat one difference: they are one piece of evidence, not three.
    diffs = [3.0, 3.0, 3.0, -1.0, -1.0, -1.0, 2.0, 2.0, 2.0, 0.5, 0.5, 0.5]
    groups = [g for g in range(4) for _ in range(3)]
    flat = paired_comparison(diffs, [0.0] * 12)
    nested = paired_comparison(diffs, [0.0] * 12, groups)
    assert nested.mean == flat.mean and nested.high - nested.low > flat.high - flat.low


@pytest.mark.slow  # CI runs it (.ci/run); left out of make test for its time
def test_benchmark_seeds_and_draws(tmp_path) -> None:
    data = write_dataset(tmp_path / "toy", n_train=6, n_test=2)
    out = tmp_path / "bench"
    methods = "transferfss,distillfss,linear_probe"
    args = ["benchmark", "--data", str(data), "--shots", "2", "--seeds", "0,1", "--draws", "2", "--methods", methods]
    assert main([*args, "--out", str(out), *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    runs = sorted((r["method"], r["draw"], r["seed"]) for r in rows)
    assert runs == sorted(
        [(m, d, s) for m in ("transferfss", "distillfss") for d in (0, 1) for s in (0, 1)]
        + [("linear_probe", d, None) for d in (0, 1)]
    )
    supports = {r["draw"]: tuple(r["support"]) for r in rows}
    assert supports[0] != supports[1]  # two different support sets
    assert all(r["adapt"]["seed"] == r["seed"] for r in rows if r["adapt"])
    assert results["config"]["data"] == {"toy": str(data.resolve())} and results["config"]["threads"] >= 1
    assert all("torch " + torch.__version__ in r["machine"] for r in rows)  # numbers hold on one machine
    text = (out / "table.md").read_text()
    assert "±" in text and "| distillfss | linear_probe |" in text and "| 4 |" in text
    assert main(["benchmark", "--data", str(data), "--draws", "0", "--out", str(tmp_path / "x"), *FAST]) == 2


@pytest.mark.slow
def test_a_cell_gives_the_same_rows_alone_and_after_another_cell(tmp_path) -> None:
    import torch

    from distillfss.config import AdaptConfig, ModelConfig
    from distillfss.data import load_split
    from distillfss.protocol import BackboneCache, Cell, run_cell

    def cell(root, k):
        train, test = load_split(root, "train"), load_split(root, "test")
        mcfg = ModelConfig(backbone="efficientnet_lite0", image_size=64, heads=2, num_classes=train.num_classes)
        methods = ("teacher_random", "transferfss_random", "distillfss_random", "linear_probe")
        return Cell(root.name, train, test, k, mcfg, AdaptConfig(iterations=2, trainable="B"), 64, methods)

    def numbers(rows):
        timing = ("adapt_seconds", "ms_per_image", "plateau_seconds", "plateau_seconds_segmentation")
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    a = write_dataset(tmp_path / "a", n_train=4, n_test=2)
    b = write_dataset(tmp_path / "b", n_train=5, n_test=2, num_classes=2, seed=3)
    alone, _ = run_cell(cell(a, 3), BackboneCache("efficientnet_lite0", None, torch.device("cpu")))
    shared = BackboneCache("efficientnet_lite0", None, torch.device("cpu"))
    run_cell(cell(b, 4), shared)
    torch.rand(10)
    after, _ = run_cell(cell(a, 3), shared)
    assert numbers(after) == numbers(alone)


@pytest.mark.slow  # CI runs it (.ci/run); left out of make test for its time
def test_refined_rows_use_the_train_pool_outside_the_support(tmp_path) -> None:
    data = write_dataset(tmp_path / "toy", n_train=5, n_test=1)
    methods = "distillfss,distillfss_unlabeled,linear_probe,prototype"
    args = ["benchmark", "--data", str(data), "--shots", "2", "--out", str(tmp_path / "b"), "--methods", methods]
    assert main([*args, *FAST]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "b/results.json").read_text())["rows"]}
    assert rows["distillfss_unlabeled"]["unlabeled_images"] == 3  # 5 train images - 2 support, never the test one
    assert rows["distillfss"]["adapt"]["refine_iterations"] == 0  # the paper's student is not refined
    assert rows["distillfss_unlabeled"]["adapt"]["refine_iterations"] == 30  # the default with unlabeled images
    assert rows["distillfss_unlabeled"]["adapt_seconds"] >= rows["distillfss"]["adapt_seconds"]
    assert set(rows["linear_probe"]["baseline_settings"]) >= {"l2", "levels", "balanced", "cv"}
    assert rows["linear_probe"]["baseline_settings"]["cv"] == "leave-one-image-out"
    assert rows["prototype"]["baseline_settings"]["levels"] in ("all", "fine", "coarse")


@pytest.mark.slow  # about 12 s: CI runs it (.ci/run)
def test_a_benchmark_killed_mid_cell_and_resumed_matches_an_uninterrupted_run(tmp_path, monkeypatch) -> None:
    import distillfss.benchmark as bench
    from distillfss.protocol import run_seeds

    data = write_dataset(tmp_path / "toy", n_train=4, n_test=1)
    args = ["benchmark", "--data", str(data), "--shots", "1,2", "--seeds", "0,1", "--methods", "distillfss", *FAST]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    calls = []

    def killed_in_second_cell(cell, seeds, backbones, log_to=None):
        calls.append(cell.shots)
        if len(calls) == 2:  # the second cell dies after writing part of its training log
            run_seeds(cell, seeds[:1], backbones, log_to=log_to)
            raise KeyboardInterrupt
        return run_seeds(cell, seeds, backbones, log_to=log_to)

    monkeypatch.setattr(bench, "run_seeds", killed_in_second_cell)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "resumed")])
    monkeypatch.undo()
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 0

    timing = ("adapt_seconds", "ms_per_image", "plateau_seconds", "plateau_seconds_segmentation")

    def numbers(folder):
        rows = json.loads((tmp_path / folder / "results.json").read_text())["rows"]
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    assert numbers("resumed") == numbers("whole")
    for log in (tmp_path / "resumed").glob("train_log_*.jsonl"):  # a restarted cell's logs start over
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
        assert steps == sorted(steps) and len(steps) == len(set(steps)), log.name


@pytest.mark.slow  # CI runs it (.ci/run); left out of make test for its time
def test_library_benchmark_matches_the_cli_and_has_fast_student_rows(tmp_path) -> None:
    """benchmark is a library function on a typed config; the CLI only parses flags into it (same numbers)."""
    from distillfss.benchmark import BenchmarkConfig, run_benchmark
    from distillfss.config import AdaptConfig

    data = write_dataset(tmp_path / "toy", n_train=5, n_test=1)
    methods = ("distillfss", "distillfss_fast", "distillfss_fast_unlabeled")
    flags = ["--methods", ",".join(methods), *FAST]
    assert main(["benchmark", "--data", str(data), "--shots", "2", "--out", str(tmp_path / "cli"), *flags]) == 0
    cfg = BenchmarkConfig(
        data=(str(data),),
        out=tmp_path / "lib",
        shots=(2,),
        methods=methods,
        adapt=AdaptConfig(iterations=1, fast_iterations=2),
        backbone="efficientnet_lite0",
        image_size=64,
        probe_size=64,
    )
    lib = {r["method"]: r for r in run_benchmark(cfg)["rows"]}
    cli = {r["method"]: r for r in json.loads((tmp_path / "cli/results.json").read_text())["rows"]}
    assert {m: r["miou"] for m, r in lib.items()} == {m: r["miou"] for m, r in cli.items()}
    assert lib["distillfss_fast"]["adapt"]["student"] == "fast" and lib["distillfss"]["adapt"]["student"] == "paper"
    assert (
        lib["distillfss_fast_unlabeled"]["unlabeled_images"] == 3 and lib["distillfss_fast"]["unlabeled_images"] is None
    )


def test_a_benchmark_row_is_the_model_adapt_ships(tmp_path) -> None:
    """One pipeline: the distillfss_fast row at seed s has the weights `distillfss adapt --seed s` saves and
    FewShotSegmenter.fit gives on the same support set; transferfss is its teacher (one adaptation). From a saved
    starting teacher the second seed reuses the first one's adapted teacher and bank: the weights are the same."""
    from safetensors.torch import load_file

    from distillfss import FewShotSegmenter
    from distillfss.config import AdaptConfig, model_config
    from distillfss.data import load_split
    from distillfss.model_io import own_state, save_teacher_checkpoint
    from distillfss.protocol import BackboneCache, Cell, run_seeds
    from distillfss.teacher import build_teacher
    from distillfss.transfer import seeded

    data = write_dataset(tmp_path / "toy", n_train=5, n_test=1)
    acfg = AdaptConfig(iterations=1, fast_iterations=2)
    mcfg = model_config("efficientnet_lite0", 1, image_size=64)
    backbones = BackboneCache("efficientnet_lite0", None, torch.device("cpu"))
    (tmp_path / "start").mkdir()
    with seeded(3):
        save_teacher_checkpoint(tmp_path / "start", build_teacher(backbones.get(64), mcfg), mcfg, {})
    small = [*TINY_ADAPT, "--teacher", str(tmp_path / "start")]
    assert (
        main(["adapt", "--support", str(data), "--shots", "3", "--seed", "2", "--out", str(tmp_path / "m"), *small])
        == 0
    )
    saved = {k.removeprefix("model."): v for k, v in load_file(tmp_path / "m" / "model.safetensors").items()}
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    stems = config["support"]["stems"]

    train, test = load_split(data, "train"), load_split(data, "test")
    methods = ("transferfss", "distillfss_fast")
    cell = Cell("toy", train, test, 3, mcfg, acfg, 64, methods, teacher=tmp_path / "start")
    rows, predictors = run_seeds(cell, [2], backbones)
    alone = {r["method"]: r["miou"] for r in rows}
    assert rows[0]["support"] == stems and rows[1]["adapt"] == {**acfg.to_dict(), "seed": 2}
    bench = own_state(predictors["distillfss_fast"].model)
    assert set(bench) == set(saved) and all(torch.equal(bench[k], saved[k]) for k in saved)
    assert rows[1]["estimate"] == config["estimate"]  # the estimate's counts, shared by the seeds: the same
    logs: dict[str, Path] = {}
    rows, _ = run_seeds(cell, [1, 2], backbones, log_to=lambda tag: logs.setdefault(tag, tmp_path / f"{tag}.jsonl"))
    assert [r["seed"] for r in rows if r["method"] == "distillfss_fast"] == [1, 2]
    assert "reused" in logs["seed2_transferfss_distillfss_fast"].read_text()  # the second seed reused the stage
    assert {r["method"]: r["miou"] for r in rows if r["seed"] == 2} == alone

    seg = FewShotSegmenter(
        "efficientnet_lite0", image_size=64, iterations=1, fast_iterations=2, seed=2, teacher=str(tmp_path / "start")
    )
    seg.fit([data / "train/images" / f"{s}.png" for s in stems], [data / "train/masks" / f"{s}.png" for s in stems])
    api = own_state(seg.student)
    assert all(torch.equal(api[k], saved[k]) for k in saved)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"methods": ("distillfss_turbo",)}, "unknown"),
        ({"draws": 0}, "--draws"),
        ({"shots": ()}, "--shots"),
        ({"eval_size": -5}, "--eval-size"),  # crashed after the first adaptations
        ({"probe_size": 50}, "--probe-size: image size 50"),
        ({"image_size": 50}, "image size 50"),
    ],
)
def test_benchmark_config_rejects_bad_values(tmp_path, change, message) -> None:
    from distillfss.benchmark import BenchmarkConfig

    with pytest.raises(DataError, match=message):
        BenchmarkConfig(data=("nuclei",), out=tmp_path / "b", **change)


@pytest.mark.slow
def test_library_entry_points_do_not_import_the_cli() -> None:
    import subprocess
    import sys

    code = (
        "import sys, distillfss.benchmark, distillfss.demo, distillfss.app, distillfss.api; "
        "assert not {'distillfss.cli', 'distillfss.commands'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_folder_without_train_and_test_splits_is_not_benchmarked(tmp_path, capsys) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(demo_root() / "nuclei" / "train", plain)  # images/ + masks/: it would be scored on itself
    assert main(["benchmark", "--data", str(plain), "--out", str(tmp_path / "b"), "--methods", "prototype"]) == 2
    assert "no train/ or test/ split" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["demo", "--datasets", "nuclei,nuclei", "--out", str(tmp_path / "d")]) == 2
    assert "nuclei named twice" in capsys.readouterr().err and not (tmp_path / "d").exists()
