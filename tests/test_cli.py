"""CLI smoke runs on tiny synthetic datasets, and the CLI's handling of bad input."""

from __future__ import annotations

import io
import json
import shutil
import sys

import numpy as np
import pytest
from conftest import SMALL_CONFIG, write_dataset
from PIL import Image

from distillfss.cli import main

FAST = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--iterations", "2", "--config", str(SMALL_CONFIG)]


@pytest.fixture(scope="module")
def multiclass_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "multi", n_train=6, n_test=3, num_classes=3)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, multiclass_dataset):
    out = tmp_path_factory.mktemp("models") / "model"
    assert main(["adapt", "--support", str(multiclass_dataset), "--out", str(out), "--shots", "4", *FAST]) == 0
    return out


def test_adapt_writes_a_self_describing_model(student_dir) -> None:
    config = json.loads((student_dir / "config.json").read_text())
    assert config["kind"] == "student"
    assert config["classes"] == ["background", "class1", "class2", "class3"]
    assert config["support"]["shots"] == 4 and config["adapt"]["seed"] == 0
    assert (student_dir / "model.safetensors").is_file()
    log = [json.loads(line) for line in (student_dir / "train_log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in log] == [
        ("teacher", 1),
        ("teacher", 2),
        ("fast", 1),
        ("fast", 2),
    ]
    assert config["student"] == "fast" and config["adapt"]["student"] == "fast"  # the default student


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bars_only_on_a_terminal(tmp_path, multiclass_dataset, capsys, monkeypatch, terminal) -> None:
    """Redirected to a file or a pipe (CI, logs), stderr gets no progress bars; a terminal gets them."""
    if terminal:
        monkeypatch.setattr(sys, "stderr", _Terminal())
    out = tmp_path / "model"
    assert main(["adapt", "--support", str(multiclass_dataset), "--out", str(out), "--shots", "2", *FAST]) == 0
    err = sys.stderr.getvalue() if terminal else capsys.readouterr().err
    assert ("adapt (teacher)" in err) == terminal and ("fast (student)" in err) == terminal


def test_evaluate_json(student_dir, multiclass_dataset, tmp_path) -> None:
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(student_dir), "--data", str(multiclass_dataset), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    keys = {"miou", "miou_with_background", "per_class", "n_images", "seconds_per_image"}
    assert set(r) == keys | {"vote_chunk", "eval_resolution", "support_images_scored", "written_by"}
    assert r["vote_chunk"] is None and r["eval_resolution"] == "original"  # a student has no support to vote over
    assert r["written_by"] == "distillfss evaluate"  # only evaluate --overwrite may replace this file
    args = ["evaluate", "--model", str(student_dir), "--data", str(multiclass_dataset), "--eval-size", "32"]
    assert main([*args, "--json", str(out)]) == 2  # exists: refused without --overwrite
    assert main([*args, "--json", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["eval_resolution"] == 32
    assert r["n_images"] == 3 and set(r["per_class"]) == {"background", "class1", "class2", "class3"}
    assert 0 <= r["miou"] <= 100


def test_predict_keeps_input_size_and_writes_overlays(student_dir, multiclass_dataset, tmp_path) -> None:
    out = tmp_path / "pred"
    images = multiclass_dataset / "test" / "images"
    assert main(["predict", "--model", str(student_dir), "--images", str(images), "--out", str(out), "--overlay"]) == 0
    labels = np.asarray(Image.open(out / "img00.png"))
    assert labels.shape == (40, 48) and labels.max() <= 3
    from distillfss.data import load_image
    from distillfss.viz import class_colour, overlay

    panel = np.asarray(Image.open(out / "img00_overlay.png"))
    img = load_image(images / "img00.png")
    assert np.array_equal(panel[14:54, :48], overlay(img, labels))  # the overlay under its title bar
    legend = panel[56:].reshape(-1, 3)  # below it: one swatch per class, in the class colours
    assert all((legend == class_colour(c)).all(axis=1).sum() >= 50 for c in (1, 2, 3))


def test_evaluate_per_image_matches_a_per_image_confusion_matrix(student_dir, multiclass_dataset, tmp_path) -> None:
    import torch

    from distillfss.data import load_pair, load_split
    from distillfss.metrics import IoUMeter
    from distillfss.model_io import load_model

    out = tmp_path / "eval.json"
    args = ["evaluate", "--model", str(student_dir), "--data", str(multiclass_dataset), "--per-image"]
    assert main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["per_image"]
    split = load_split(multiclass_dataset, "test")
    assert [r["image"] for r in rows] == [s.image.name for s in split.samples]
    predictor = load_model(student_dir).predictor
    for row, sample in zip(rows, split.samples):
        image, mask = load_pair(sample, split.num_classes)
        pred = predictor.predict(image)
        meter = IoUMeter(split.classes)
        meter.update(torch.from_numpy(pred), torch.from_numpy(mask))
        ref = meter.compute().per_class
        for c, name in enumerate(split.classes):
            defined = ((pred == c) | (mask == c)).any()
            assert (row[name] is None) == (not defined)
            if defined:
                assert abs(row[name] - ref[name]) < 1e-3


@pytest.mark.slow  # a few seconds; CI runs the slow tests (.ci/run)
def test_saved_student_predicts_like_the_trained_one(tmp_path, binary_dataset) -> None:
    from distillfss.model_io import load_model

    out = tmp_path / "m"
    assert main(["adapt", "--support", str(binary_dataset), "--out", str(out), "--shots", "3", *FAST]) == 0
    a, b = load_model(out), load_model(out)
    img = np.random.default_rng(0).uniform(size=(30, 50, 3)).astype(np.float32)
    x = a.predictor.logits(__import__("torch").rand(1, 3, 64, 64))
    assert np.array_equal(a.predictor.predict(img), b.predictor.predict(img))
    assert x.shape == (1, 2, 64, 64)


def test_transfer_saves_a_teacher_with_its_support(tmp_path, binary_dataset) -> None:
    out = tmp_path / "t"
    args = ["adapt", "--support", str(binary_dataset), "--out", str(out), "--shots", "2", "--method", "transfer"]
    assert main([*args, *FAST]) == 0
    assert json.loads((out / "config.json").read_text())["kind"] == "teacher"
    pred = tmp_path / "p"
    assert (
        main(
            [
                "predict",
                "--model",
                str(out),
                "--images",
                str(binary_dataset / "test/images/img00.png"),
                "--out",
                str(pred),
            ]
        )
        == 0
    )
    assert np.asarray(Image.open(pred / "img00.png")).shape == (40, 48)


def test_existing_output_is_refused_and_kept(tmp_path, binary_dataset, capsys) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["adapt", "--support", str(binary_dataset), "--out", str(out), "--shots", "2", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and str(out) in err and len(err.splitlines()) == 1
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: (d / "train/masks/img00.png").unlink(), "no mask"),
        (lambda d: (d / "train/images/img01.png").write_bytes(b"junk"), "not a readable image"),
        (
            lambda d: Image.fromarray(np.full((40, 48), 9, np.uint8)).save(d / "train/masks/img02.png"),
            "outside the classes",
        ),
    ],
)
def test_bad_support_is_one_line_and_writes_nothing(tmp_path, binary_dataset, capsys, mutate, message) -> None:
    mutate(binary_dataset)
    out = tmp_path / "never"
    assert main(["adapt", "--support", str(binary_dataset), "--out", str(out), "--shots", "4", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_too_many_shots(tmp_path, binary_dataset, capsys) -> None:
    assert main(["adapt", "--support", str(binary_dataset), "--out", str(tmp_path / "x"), "--shots", "9", *FAST]) == 2
    assert "only 4 images" in capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "imgs").mkdir()
    args = ["predict", "--model", str(tmp_path / "m"), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no images" in err or "not a model folder" in err


@pytest.mark.slow  # CI runs it (.ci/run); left out of make test for its time
def test_demo_smoke_writes_report_results_overlays_plot(tmp_path) -> None:
    from distillfss.demo import report as report_md

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--datasets", "nuclei", "--iterations", "1", "--image-size", "64"]
    assert main([*args, "--config", str(SMALL_CONFIG), "--backbone", "efficientnet_lite0", "--seeds", "0,1"]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = [(r["method"], r["seed"]) for r in results["rows"]]
    adapted = ("teacher", "transferfss", "distillfss_fast", "distillfss")
    # no shipped teacher for lite0: the teacher starts random, so it depends on the seed too
    first = [*((m, 0) for m in adapted), ("linear_probe", None), ("prototype", None)]
    assert runs == [*first, *((m, 1) for m in adapted)]
    assert results["seeds"] == [0, 1] and "torch" in results["machine"]
    fast = next(r for r in results["rows"] if r["method"] == "distillfss_fast")
    assert fast["adapt"]["fast_iterations"] == 2 and fast["adapt"]["student"] == "fast"
    for r in results["rows"]:
        keys = {"dataset", "method", "shots", "miou", "miou_with_background", "per_class", "adapt_seconds"}
        assert keys | {"ms_per_image"} <= set(r)
        assert r["dataset"] == "nuclei" and r["shots"] == 5 and 0 <= r["miou"] <= 100
    report = (out / "report.md").read_text()
    assert "| distillfss_fast | " in report and " ± " in report and "1 teacher steps" in report  # what it ran
    assert (out / "miou.png").is_file() and len(list((out / "overlays").glob("nuclei_*.png"))) == 3
    zeros = {**results, "rows": [{**r, "miou": 0.0 if r["teacher_init"] else 1.5} for r in results["rows"]]}
    assert "`nuclei`: every adapted method scores about 0" in report_md(zeros) and "every adapted" not in report


def test_demo_reports_the_median_seconds_per_step_of_each_stage(tmp_path) -> None:
    from distillfss.demo import step_seconds

    log = tmp_path / "train_log_a.jsonl"
    times = [("teacher", 1.0), ("teacher", 1.5), ("teacher", 2.5), ("fast", 9.0), ("fast", 9.1), ("fast", 9.3)]
    log.write_text(
        "".join(json.dumps({"step": i, "stage": st, "seconds": t}) + "\n" for i, (st, t) in enumerate(times))
    )
    other = tmp_path / "train_log_b.jsonl"
    other.write_text("".join(json.dumps({"step": i, "stage": "joint", "seconds": 2.0 * i}) + "\n" for i in range(4)))
    # another seed's reused teacher rows (their seconds counted where they ran) are not this run's steps
    reused = tmp_path / "train_log_c.jsonl"
    rows = [{"step": i, "stage": "teacher", "seconds": 50.0 * i, "reused": True} for i in range(4)]
    reused.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the first step of a stage (setup included) is not a step time; teacher 0.5, 1.0 -> 0.75
    assert step_seconds([log, other, reused]) == {"fast": 0.15, "joint": 2.0, "teacher": 0.75}


def test_demo_unknown_dataset(tmp_path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path / "d"), "--datasets", "nope"]) == 2
    assert "unknown demo dataset" in capsys.readouterr().err


@pytest.mark.slow  # CI runs it (.ci/run); left out of make test for its time
def test_plain_folder_support_uses_every_image(tmp_path, binary_dataset) -> None:
    plain = binary_dataset / "train"  # images/ + masks/, no split folders
    out = tmp_path / "plain_model"
    assert main(["adapt", "--support", str(plain), "--out", str(out), *FAST]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["support"]["shots"] == 4
    assert config["classes"] == ["background", "class1"]  # dataset.json one level up is found


@pytest.mark.slow  # a few seconds; CI runs the slow tests (.ci/run)
def test_adapt_can_start_from_a_saved_teacher(tmp_path, binary_dataset, multiclass_dataset) -> None:
    teacher = tmp_path / "teacher"
    base = ["adapt", "--shots", "2", *FAST]
    assert main([*base, "--support", str(binary_dataset), "--out", str(teacher), "--method", "transfer"]) == 0
    out = tmp_path / "from_teacher"
    # a binary teacher starts a 3-class adaptation: its attention and decoder do not depend on the classes
    assert main([*base, "--support", str(multiclass_dataset), "--out", str(out), "--teacher", str(teacher)]) == 0
    assert json.loads((out / "config.json").read_text())["kind"] == "student"


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", "--out", str(tmp_path / "d"), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, tmp_path, capsys) -> None:
    from distillfss import commands
    from distillfss.errors import UserError

    def user_problem(args):
        raise UserError(f"{tmp_path}/x.png: not an image")

    def bug(args):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(commands, "evaluate", user_problem)
    args = ["evaluate", "--model", str(tmp_path), "--data", str(tmp_path)]
    assert main(args) == 2
    assert capsys.readouterr().err == f"distillfss evaluate: error: {tmp_path}/x.png: not an image\n"
    monkeypatch.setattr(commands, "evaluate", bug)
    with pytest.raises(ValueError, match="internal invariant"):  # not swallowed as a user error: exit 1, traceback
        main(args)


def test_predict_in_batches_gives_what_one_at_a_time_gives_and_skips_unreadable(
    student_dir, multiclass_dataset, tmp_path
) -> None:
    images = tmp_path / "imgs"
    shutil.copytree(multiclass_dataset / "test" / "images", images)
    big = np.asarray(Image.open(images / "img00.png").resize((96, 70)))
    Image.fromarray(big).save(images / "img05_big.png")  # another size in the same batch
    (images / "img03_broken.png").write_bytes(b"not a png")
    outs = {}
    for batch in ("1", "2", "8"):
        out = tmp_path / f"pred{batch}"
        args = ["predict", "--model", str(student_dir), "--images", str(images), "--out", str(out), "--batch", batch]
        assert main(args) == 2  # the broken file is named, every other image predicted
        outs[batch] = {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}
    assert sorted(outs["1"]) == ["img00.png", "img01.png", "img02.png", "img05_big.png"]
    assert outs["1"]["img05_big.png"].shape == (70, 96)
    for batch in ("2", "8"):
        assert outs[batch].keys() == outs["1"].keys()
        assert all(np.array_equal(outs[batch][k], outs["1"][k]) for k in outs["1"])
    bad = [
        "predict",
        "--model",
        str(student_dir),
        "--images",
        str(images),
        "--out",
        str(tmp_path / "x"),
        "--batch",
        "0",
    ]
    assert main(bad) == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fast_iteratons: 3\n", "unknown field(s) fast_iteratons"),
        ("fast_iterations: many\n", "fast_iterations: expected int, got 'many'"),
        ("student: tiny\n", "student: expected one of fast, paper, got 'tiny'"),
        ("trainable: [A\n", "not JSON or YAML"),
        ("- 1\n- 2\n", "expected a mapping of AdaptConfig fields"),
        ("refine_iterations: 3\n", "refine_iterations: set(s) the paper student's training only"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_it_and_writes_nothing(tmp_path, binary_dataset, capsys, text, message):
    config = tmp_path / "adapt.yaml"
    config.write_text(text)
    out = tmp_path / "m"
    small = FAST[:-2]  # without its own --config
    assert main(["adapt", "--support", str(binary_dataset), "--out", str(out), "--config", str(config), *small]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert str(config) in err
    assert not out.exists()


@pytest.mark.slow  # a few seconds; CI runs the slow tests (.ci/run)
def test_flags_win_over_the_config_file_and_the_model_records_the_result(tmp_path, binary_dataset) -> None:
    config = tmp_path / "adapt.json"
    config.write_text('{"iterations": 5, "fast_iterations": 2, "trainable": "B"}')
    out = tmp_path / "m"
    small = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--iterations", "1", "--shots", "2"]
    assert main(["adapt", "--support", str(binary_dataset), "--out", str(out), "--config", str(config), *small]) == 0
    recorded = json.loads((out / "config.json").read_text())["adapt"]
    assert recorded["iterations"] == 1 and recorded["trainable"] == "B" and recorded["fast_iterations"] == 2


def test_the_product_contracts_adapt_flags_and_the_paper_student_through_the_config_file(tmp_path, binary_dataset):
    # design/product.md: adapt --support DIR --out MODEL [--shots K] [--method distill|transfer] [--teacher CKPT]
    # [--backbone NAME] [--iterations N] [--seed S] [--device D]
    config = tmp_path / "paper.yaml"
    config.write_text("student: paper\n")
    out = tmp_path / "m"
    flags = ["--shots", "2", "--method", "distill", "--teacher", "random", "--backbone", "efficientnet_lite0"]
    flags += ["--iterations", "1", "--seed", "3", "--device", "cpu", "--image-size", "64", "--config", str(config)]
    assert main(["adapt", "--support", str(binary_dataset), "--out", str(out), *flags]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["kind"] == "student" and saved["student"] == "paper"
    assert saved["adapt"]["method"] == "distill" and saved["adapt"]["seed"] == 3 and saved["teacher_init"] == "random"


def test_adapt_offers_at_most_twenty_options_and_the_rest_live_in_the_config_file() -> None:
    from distillfss.cli import build_parser

    adapt = next(
        a
        for a in build_parser()._subparsers._group_actions[0].choices.items()
        if a[0] == "adapt"  # type: ignore[union-attr]
    )[1]
    flags = [a for a in adapt._actions if a.option_strings and a.option_strings != ["-h", "--help"]]
    assert len(flags) <= 20, sorted(a.option_strings[0] for a in flags)


@pytest.mark.parametrize("command", ["adapt", "benchmark", "demo"])
def test_each_command_s_help_gives_its_own_default_schedule(command, capsys) -> None:
    from distillfss.config import DEMO_ADAPT, AdaptConfig

    with pytest.raises(SystemExit):
        main([command, "--help"])
    steps = (DEMO_ADAPT if command == "demo" else AdaptConfig()).iterations
    assert f"teacher optimizer steps (default {steps})" in " ".join(capsys.readouterr().out.split())


def test_verbose_turns_on_our_debug_lines_only(tmp_path) -> None:
    import logging

    assert main(["-v", "evaluate", "--model", str(tmp_path / "none"), "--data", str(tmp_path)]) == 2
    assert logging.getLogger("distillfss").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("PIL").getEffectiveLevel() > logging.DEBUG
    assert main(["evaluate", "--model", str(tmp_path / "none"), "--data", str(tmp_path)]) == 2
    assert logging.getLogger("distillfss").getEffectiveLevel() > logging.DEBUG


def test_a_dataset_with_fewer_train_images_than_the_default_shots_uses_them_all(tmp_path) -> None:
    data = write_dataset(tmp_path / "data", n_train=3, n_test=1)
    assert main(["adapt", "--support", str(data), "--out", str(tmp_path / "m"), *FAST]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["support"]["shots"] == 3
    assert main(["adapt", "--support", str(data), "--out", str(tmp_path / "m4"), "--shots", "4", *FAST]) == 2
    assert not (tmp_path / "m4").exists()  # asked for more than there are: refused


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image-size", "50"], "image size 50: a multiple of 32"),
        (["--image-size", "0"], "image size 0: a multiple of 32"),
        (["--image-size", "100000"], "from 64 to 1024 px"),
        (["--device", "tpu"], "--device tpu: expected cpu, cuda or cuda:N"),
        (["--device", "cuda:abc"], "--device cuda:abc: expected cpu, cuda or cuda:N"),
    ],
)
def test_a_bad_image_size_or_device_is_a_one_line_error(tmp_path, multiclass_dataset, capsys, flags, message) -> None:
    out = tmp_path / "m"
    assert main(["adapt", "--support", str(multiclass_dataset), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adapt", "--ways", "3"], "--ways: inference timing only; leave it out with --adapt"),
        (["--adapt", "--iters", "5", "--no-channels-last"], "--iters, --channels-last: inference timing only"),
        (["--adapt", "--compile"], "--compile: inference timing only"),
        (["--steps", "3"], "--steps: set what --adapt times; add --adapt or leave it out"),
        (["--trainable", "B", "--max-shots", "0"], "--trainable, --max-shots: set what --adapt times"),
    ],
)
def test_speed_refuses_the_other_modes_flags_instead_of_ignoring_them(tmp_path, capsys, argv, message) -> None:
    out = tmp_path / "s.json"
    assert main(["speed", *argv, "--json", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("flag, value", [("--iters", "0"), ("--warmup", "-1"), ("--threads", "0"), ("--timeout", "0")])
def test_speed_refuses_counts_that_cannot_measure(capsys, flag, value) -> None:
    assert main(["speed", flag, value]) == 2  # --iters 0 died in its child process as "out of memory?"
    assert f"{flag}: expected" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value",
    [("--steps", "0"), ("--lr", "-1"), ("--shots", "0"), ("--batch", "0"), ("--val-every", "0"), ("--save-every", "0")],
)
def test_meta_train_refuses_bad_numbers_before_it_starts(tmp_path, capsys, flag, value) -> None:
    out = tmp_path / "teacher"  # --steps 0 wrote a teacher; the others crashed with tracebacks
    assert main(["meta-train", "--source", "selfsup", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err
    assert "expected" in err and "Traceback" not in err and not out.exists()


def test_app_refuses_a_bad_or_busy_port_before_making_its_workspace(tmp_path, capsys) -> None:
    import socket

    pytest.importorskip("gradio")
    ws = tmp_path / "ws"
    assert main(["app", "--workspace", str(ws), "--port", "99999"]) == 2  # was an OverflowError traceback
    assert "--port: expected 0" in capsys.readouterr().err and not ws.exists()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["app", "--workspace", str(ws), "--port", str(port)]) == 2
    assert "in use" in capsys.readouterr().err and not ws.exists()


def test_evaluate_says_when_it_scores_the_models_own_support_images(
    student_dir, multiclass_dataset, capsys, caplog
) -> None:
    for split, own in (("test", 0), ("train", 4)):  # adapt drew 4 of the 6 train images
        caplog.clear()
        assert main(["evaluate", "--model", str(student_dir), "--data", str(multiclass_dataset), "--split", split]) == 0
        assert json.loads(capsys.readouterr().out)["support_images_scored"] == own
        assert ("not a test score" in caplog.text) == bool(own)
