from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_CONFIG

from distillfss.cli import main
from distillfss.config import ModelConfig
from distillfss.speed import SpeedJob, measure, table

onnxruntime = pytest.importorskip("onnxruntime")

CFG = ModelConfig(backbone="efficientnet_lite0", image_size=64, heads=2)
SMALL_ADAPT = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--config", str(SMALL_CONFIG)]


@pytest.mark.parametrize(
    "model,enc",
    [("backbone", False), ("student", False), ("student_fast", False), ("teacher", True), ("teacher", False)],
)
def test_speed_measurement_reports_sane_numbers(model: str, enc: bool) -> None:
    row = measure(SpeedJob(model, 2, 3, enc, CFG, "cpu", warmup=1, iters=2, threads=2))
    assert 0 < row.ms_min <= row.ms_median <= row.ms_max
    assert row.peak_memory_mb > 0
    assert row.model == model and row.support_encoding == enc
    if model == "backbone":
        assert row.backbone_ms is None and row.backbone_ratio is None
    else:  # timed call by call beside a bare backbone in the same process
        assert row.backbone_ms > 0 and row.backbone_ratio > 0


def test_speed_table_has_every_combination() -> None:
    rows = [
        {"model": "student", "ways": w, "shots": k, "support_encoding": False, "ms_median": 1.0, "peak_memory_mb": 2.0}
        for w in (1, 3)
        for k in (1, 5)
    ]
    text = table({"rows": rows, "device": "cpu", "threads": 2, "image_size": 64, "backbone": "x"})
    assert "3-way 5-shot" in text and text.count("1.0 ms") == 4


def test_speed_table_gives_each_student_over_the_backbone_and_over_one_way() -> None:
    def row(model: str, ways: int, shots: int, ms: float) -> dict:
        return {"model": model, "ways": ways, "shots": shots, "support_encoding": False, "ms_median": ms,
                "peak_memory_mb": 1.0}  # fmt: skip

    rows = [row("backbone", 0, 0, 10.0), row("student_fast", 1, 1, 12.0), row("student_fast", 1, 5, 13.0)]
    rows += [row("student_fast", 5, 1, 14.0), row("student_fast", 5, 5, 14.0), row("student", 1, 1, 30.0)]
    text = table({"rows": rows, "device": "cpu", "threads": 2, "image_size": 64, "backbone": "x"})
    assert "| fast student (the default) | 12.0 ms" in text
    assert "onnxruntime" not in text and "teacher" not in text  # models the run did not measure have no row
    assert "- student_fast: time over the backbone's 1-way 1.25x, 5-way 1.40x; largest spread over shots 8%" in text
    assert "5-way over 1-way 1.12x" in text
    assert "- student: time over the backbone's 1-way 3.00x; largest spread over shots 0%" in text
    # a row's own ratio (measured beside a backbone in its process) is used, not the run's backbone row
    rows = [row("backbone", 0, 0, 10.0), {**row("student_fast", 1, 1, 12.0), "backbone_ratio": 1.5}]
    rows += [
        {**row("teacher", 1, 1, 40.0), "backbone_ratio": 2.0},
        {**row("teacher", 1, 1, 90.0), "support_encoding": True},
    ]
    text = table({"rows": rows, "device": "cpu", "threads": 2, "image_size": 64, "backbone": "x"})
    assert "- student_fast: time over the backbone's 1-way 1.50x" in text
    assert "- teacher: time over the backbone's 1-way 2.00x" in text  # the support-cached row only


@pytest.mark.slow  # a few seconds; CI runs the slow tests (.ci/run)
def test_export_onnx_matches_pytorch_and_predicts(tmp_path, binary_dataset) -> None:
    model = tmp_path / "m"
    fast = [*SMALL_ADAPT, "--iterations", "1", "--shots", "2"]
    assert main(["adapt", "--support", str(binary_dataset), "--out", str(model), *fast]) == 0
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", "--model", str(model), "--out", str(onnx_file)]) == 0

    from distillfss.export import OnnxPredictor
    from distillfss.model_io import load_model

    loaded, ort_pred = load_model(model), OnnxPredictor(onnx_file)
    assert ort_pred.classes == loaded.classes and ort_pred.image_size == 64
    for x in (torch.rand(3, 3, 64, 64), torch.zeros(1, 3, 64, 64)):  # dynamic batch, random and constant input
        ref = loaded.predictor.logits(x).numpy()
        assert np.abs(ort_pred.logits(x.numpy()) - ref).max() <= 1e-3
    from distillfss.data import load_image

    real = load_image(binary_dataset / "test/images/img00.png")
    x = torch.from_numpy(real).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
    assert np.abs(ort_pred.logits(x.numpy()) - loaded.predictor.logits(x).numpy()).max() <= 1e-3

    out = tmp_path / "pred"
    images = str(binary_dataset / "test/images")
    assert main(["predict", "--model", str(onnx_file), "--engine", "onnx", "--images", images, "--out", str(out)]) == 0
    assert (out / "img00.png").is_file()
    assert main(["export", "--model", str(model), "--out", str(onnx_file)]) == 2  # refuses to overwrite

    scores = {}  # evaluate scores the ONNX graph as it scores the model it came from (same logits within 1e-3)
    for engine, path in (("torch", model), ("onnx", onnx_file)):
        report = tmp_path / f"{engine}.json"
        args = ["evaluate", "--model", str(path), "--engine", engine, "--data", str(binary_dataset)]
        assert main([*args, "--json", str(report), "--eval-size", "48"]) == 0
        scores[engine] = json.loads(report.read_text())
    assert scores["onnx"]["miou"] == pytest.approx(scores["torch"]["miou"], abs=0.5)
    assert scores["onnx"]["vote_chunk"] is None and scores["onnx"]["n_images"] == scores["torch"]["n_images"]
    assert main(["evaluate", "--model", str(model), "--engine", "onnx", "--data", str(binary_dataset)]) == 2


@pytest.mark.parametrize("model", ["onnx", "onnx-fast"])
def test_speed_measures_onnx_students(model: str) -> None:
    onnx_row = measure(SpeedJob(model, 2, 1, False, CFG, "cpu", warmup=1, iters=2, threads=2))
    assert onnx_row.model == model and onnx_row.ms_median > 0


def test_speed_measures_voting() -> None:
    vote = measure(SpeedJob("teacher", 1, 3, False, CFG, "cpu", warmup=1, iters=2, threads=2, chunk=2))
    assert vote.ms_median > 0


def _dies(job, queue) -> None:  # a measurement process killed before it reports (as the OOM killer would)
    import os

    os._exit(9)


def _hangs(job, queue) -> None:
    import time

    time.sleep(60)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "timeout", "message"), [(_dies, 120, "died without a result (exit code 9"), (_hangs, 2, "within 2 s")]
)
def test_a_dead_or_stuck_measurement_is_an_error_naming_it(target, timeout, message) -> None:
    from distillfss.speed import MeasurementError, measure_isolated

    job = SpeedJob("student", 3, 5, False, ModelConfig(backbone="efficientnet_lite0", image_size=64), "cpu", 0, 1, 1)
    with pytest.raises(MeasurementError, match="student \\(efficientnet_lite0, 64 px, 3 way, 5 shot") as e:
        measure_isolated(job, timeout_s=timeout, target=target)
    assert message in str(e.value)


@pytest.mark.slow
def test_int8_export_is_quantized_checked_and_refused_when_it_loses_accuracy(
    tmp_path, binary_dataset, multiclass_dataset, monkeypatch, capsys
) -> None:
    import onnx

    from distillfss import commands
    from distillfss.export import OnnxPredictor

    cwd, cwd2 = tmp_path / "cwd", tmp_path / "cwd2"  # onnxruntime's tools can write scratch files into the cwd
    cwd.mkdir()
    cwd2.mkdir()
    monkeypatch.chdir(cwd)
    model = tmp_path / "m"
    fast = [*SMALL_ADAPT, "--iterations", "2", "--shots", "3"]
    relative = os.path.relpath(binary_dataset, cwd)  # the model records it resolved: export works from anywhere
    assert main(["adapt", "--support", relative, "--out", str(model), *fast]) == 0
    monkeypatch.chdir(cwd2)
    out = tmp_path / "m8.onnx"
    monkeypatch.setattr(commands, "MAX_INT8_DROP", -100.0)  # no plan can pass: refused, nothing written
    capsys.readouterr()
    assert main(["export", "--model", str(model), "--out", str(out), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: not written: every int8 plan loses more than -100.0 mIoU points" in err and "(best: '" in err
    assert list(tmp_path.glob("*.onnx*")) == [] and not list(tmp_path.glob(".m8*"))
    monkeypatch.setattr(commands, "MAX_INT8_DROP", 100.0)
    assert main(["export", "--model", str(model), "--out", str(out), "--quantize", "int8"]) == 0  # its support set
    graph = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["precision"] == "int8" and meta["image_size"] == "64" and "distillfss_version" in meta
    assert meta["int8_plan"] == "every operator int8"  # any loss passes: the fully quantized graph, the first plan
    pred = OnnxPredictor(out)
    assert pred.classes == ("background", "class1") and pred.logits(
        np.random.default_rng(0).random((2, 3, 64, 64))
    ).shape == (
        2,
        2,
        64,
        64,
    )
    bad = ["export", "--model", str(model), "--out", str(tmp_path / "x.onnx"), "--quantize", "int8"]
    assert main([*bad, "--calibration", str(multiclass_dataset)]) == 2  # other classes: a clear error
    assert not (tmp_path / "x.onnx").exists()
    assert list(cwd.iterdir()) == list(cwd2.iterdir()) == []  # nothing written outside --out


@pytest.mark.slow
@pytest.mark.parametrize("model", ["onnx-int8", "onnx-fast-int8"])
def test_speed_measures_int8_onnx(model: str) -> None:
    row = measure(SpeedJob(model, 1, 1, False, CFG, "cpu", warmup=1, iters=2, threads=2))
    assert row.model == model and row.ms_median > 0
    assert row.backbone_ratio is None  # onnxruntime's spinning threads would slow an interleaved PyTorch backbone


@pytest.mark.slow
def test_int8_plans_go_from_the_most_quantized_graph_and_the_first_within_the_bound_is_written(
    tmp_path, lite0_64, monkeypatch
) -> None:
    """The fully quantized graph first, then ones that keep more of the stem-side convolutions in float32: the
    first plan whose mIoU stays within the bound is written, its plan and float32 nodes in the metadata; when no
    plan passes, nothing is written and the error names the best one."""
    import json

    import onnx

    from distillfss import export
    from distillfss.student import build_fast_student

    student = build_fast_student(lite0_64, 1, 64)
    fp32 = tmp_path / "m.onnx"
    export.export_onnx(student, 64, ("background", "x"), fp32)
    images = np.random.default_rng(0).random((2, 3, 64, 64)).astype(np.float32)
    labels = np.zeros((2, 64, 64), np.int64)
    seen: list[str] = []

    def fake_miou(path, *_):  # fp32 scores 80; a quantized graph scores 70 until 3 stem convolutions stay fp32
        if Path(path) == fp32:
            return 80.0
        graph = onnx.load(str(path)).graph
        quantized = {n.input[1] for n in graph.node if n.op_type == "Conv"} & {
            n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"
        }
        convs = [n for n in graph.node if n.op_type == "Conv"]
        fp32_stem = next(i for i, n in enumerate(convs) if n.input[1] in quantized)
        seen.append(fp32_stem)
        return 79.5 if fp32_stem >= 3 else 70.0

    monkeypatch.setattr(export, "onnx_miou", fake_miou)
    out = tmp_path / "m8.onnx"
    report = export.quantize_int8_checked(fp32, out, images, labels, ("background", "x"), 1.0)
    assert seen == [0, 1, 2, 3]  # every operator int8, then 1, 2, 3 stem convolutions left in float32
    assert report["plan"] == "every operator int8 but the first 3 convolutions" and report["int8"] == 79.5
    assert [t["miou"] for t in report["tried"]] == [70.0, 70.0, 70.0, 79.5]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["int8_plan"] == report["plan"] and len(json.loads(meta["int8_fp32_nodes"])) == 3
    assert json.loads(meta["int8_check"]) == {"fp32_miou": 80.0, "int8_miou": 79.5, "images": 2}
    assert meta["classes"] == '["background", "x"]'  # the fp32 graph's metadata carried over

    out2 = tmp_path / "never.onnx"
    out2.write_bytes(b"a file the user had")
    with pytest.raises(export.Int8Refused, match="every int8 plan loses more than 0.1 .* the best, 'every operator"):
        export.quantize_int8_checked(fp32, out2, images, labels, ("background", "x"), 0.1)
    assert out2.read_bytes() == b"a file the user had"  # refused: untouched
