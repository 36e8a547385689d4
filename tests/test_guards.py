"""Every write goes through one guard, and every entry point behaves alike (issue: the remaining ways to lose a file).

* A sandbox run of every subcommand, the API's writing methods and the app's workspace: nothing outside each
  declared output changes (every other file hashed before and after).
* One test per former hole (each failed before the output module covered it).
* A bad-input and bad-path sweep over all subcommands, the API and the app: a one-line error, nothing changed.
* Determinism, the caller's random state and the caller's modules as properties of the library calls.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ADAPT, write_dataset
from PIL import Image

from distillfss.cli import main
from distillfss.errors import UserError

TINY_MODEL = ["--backbone", "efficientnet_lite0", "--image-size", "64"]
TINY_SPEED = ["--ways", "1", "--shots", "1", "--iters", "1", "--warmup", "0", "--models", "backbone", *TINY_MODEL]
API_OPTIONS = {"backbone": "efficientnet_lite0", "image_size": 64, "iterations": 1, "fast_iterations": 2}


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links as their target's name) -> its sha256."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def inside(rel: str, outputs: tuple[str, ...]) -> bool:
    return any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in outputs)


def write_kvasir(src: Path, n: int = 5) -> Path:
    for i in range(n):
        for sub, value in (("images", 90), ("masks", 0)):
            (src / sub).mkdir(parents=True, exist_ok=True)
            a = np.full((24, 24, 3), value, np.uint8)
            if sub == "masks":
                a[0:8, 8:16] = 255
            Image.fromarray(a).save(src / sub / f"k{i}.jpg")
    return src


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A user's folder: a dataset, a model adapt wrote, predictions, notes, a foreign folder, odd files."""
    root = tmp_path_factory.mktemp("sandbox")
    write_dataset(root / "data", n_train=4, n_test=2)
    write_dataset(root / "three", n_train=4, n_test=2, num_classes=3)
    assert (
        main(["adapt", "--support", str(root / "data"), "--out", str(root / "model"), "--shots", "2", *TINY_ADAPT]) == 0
    )
    images = root / "data" / "test" / "images"
    assert main(["predict", "--model", str(root / "model"), "--images", str(images), "--out", str(root / "pred")]) == 0
    import shutil

    shutil.copytree(root / "model", root / "model_copy")
    (root / "notes.txt").write_text("my notes")
    (root / "notes.json").write_text('{"mine": true}\n')
    (root / "user.onnx").write_bytes(b"not yours")
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("years of work")
    (root / "bad.yaml").write_text("no_such_field: 1\n")
    write_kvasir(root / "kvasir")
    return root


def run_guarded(root: Path, outputs: tuple[str, ...], action) -> None:  # noqa: ANN001 - a zero-argument call
    before = snapshot(root)
    action()
    after = snapshot(root)
    stray = sorted(c for c in changed(before, after) if not inside(c, outputs))
    assert not stray, f"changed outside {outputs}: {stray}"
    assert all(any(inside(k, (o,)) for k in after) for o in outputs), f"{outputs} not all written"


@pytest.mark.slow  # about 30 s: CI runs it (.ci/run); the per-hole tests and the sweep below are in make test
def test_every_entry_point_writes_only_its_declared_output(sandbox, tmp_path, monkeypatch) -> None:
    """Each subcommand, the API's writers and the app's workspace in one sandbox (the working directory too)."""
    from test_sources import write_pascal

    root = tmp_path / "box"
    import shutil

    shutil.copytree(sandbox, root, symlinks=True)
    write_pascal(root / "VOC")
    monkeypatch.chdir(root)
    data, model, test_images = "data", "model", "data/test/images"

    def cli(*argv: str) -> None:
        assert main(list(argv)) == 0, argv

    run_guarded(root, ("m1",), lambda: cli("adapt", "--support", data, "--out", "m1", "--shots", "2", *TINY_ADAPT))
    run_guarded(
        root, ("p1",), lambda: cli("predict", "--model", model, "--images", test_images, "--out", "p1", "--overlay")
    )
    run_guarded(
        root,
        ("ev.json",),
        lambda: cli("evaluate", "--model", model, "--data", data, "--json", "ev.json", "--per-image"),
    )
    warm = ("adapt", "--support", data, "--out", "m2", "--shots", "3", "--from", "m1", "--iterations", "1")
    run_guarded(root, ("m2",), lambda: cli(*warm, "--config", str(TINY_ADAPT[-1])))
    run_guarded(root, (), lambda: cli("suggest", "--model", model, "--images", test_images))
    run_guarded(
        root, ("sg.json",), lambda: cli("suggest", "--model", model, "--images", test_images, "--json", "sg.json")
    )
    run_guarded(root, ("m.onnx",), lambda: cli("export", "--model", model, "--out", "m.onnx"))
    run_guarded(root, ("m.onnx",), lambda: cli("export", "--model", model, "--out", "m.onnx", "--overwrite"))
    run_guarded(
        root,
        ("p2",),
        lambda: cli("predict", "--engine", "onnx", "--model", "m.onnx", "--images", test_images, "--out", "p2"),
    )
    run_guarded(root, (), lambda: cli("speed", *TINY_SPEED))  # no --json: prints only, writes nothing
    run_guarded(root, ("sp.json",), lambda: cli("speed", *TINY_SPEED, "--json", "sp.json"))
    bench = ["benchmark", "--data", data, "--shots", "1", "--methods", "prototype,distillfss_fast", "--probe-size", "0"]
    bench += [*TINY_ADAPT, "--out", "bench"]
    run_guarded(root, ("bench",), lambda: cli(*bench))
    run_guarded(root, ("bench",), lambda: cli(*bench, "--overwrite", "--methods", "prototype"))
    meta = ["meta-train", "--source", "pascal", "--data", "VOC", "--out", "meta", *TINY_MODEL]
    meta += ["--steps", "1", "--batch", "2", "--val-every", "1", "--val-episodes", "2"]
    run_guarded(root, ("meta",), lambda: cli(*meta, "--overwrite"))  # new folder: --overwrite removes nothing
    run_guarded(root, ("kv",), lambda: cli("data", "convert", "kvasir", "kvasir", "kv"))
    demo = ["demo", "--datasets", "nuclei", "--seeds", "0", "--shots", "2", "--out", "demo", *TINY_ADAPT]
    run_guarded(root, ("demo",), lambda: cli(*demo))

    from distillfss import FewShotSegmenter

    train = sorted((root / data / "train" / "images").iterdir())[:2]
    masks = [root / data / "train" / "masks" / p.name for p in train]
    seg = FewShotSegmenter(**API_OPTIONS)
    run_guarded(root, (), lambda: seg.fit(train, masks))
    run_guarded(root, ("api_model",), lambda: seg.save(root / "api_model"))
    run_guarded(root, ("api.onnx",), lambda: seg.export_onnx(root / "api.onnx"))
    run_guarded(root, ("api.onnx",), lambda: seg.export_onnx(root / "api.onnx", overwrite=True))
    run_guarded(root, (), lambda: seg.fit([*train, train[0]], [*masks, masks[0]], warm_start=True))
    run_guarded(root, (), lambda: seg.suggest(train))
    reloaded = FewShotSegmenter.load(root / "api_model")
    run_guarded(root, (), lambda: reloaded.fit(train, masks, warm_start=True))

    pytest.importorskip("gradio")
    from distillfss.app import Workspace

    def app_session() -> None:
        ws = Workspace(root / "ws", [root / model])
        ws.add(train)
        ws.save_mask(train[0].stem, np.asarray(Image.open(masks[0])))
        ws.save_mask(train[0].stem, np.asarray(Image.open(masks[0])))  # corrected: the app's own mask, replaced
        ws.zip_folder("models/labels.zip", ws.root / "masks")

    run_guarded(root, ("ws",), app_session)


# -- one test per former hole -------------------------------------------------------------------------------------


def test_evaluate_json_never_replaces_an_input_or_a_file_it_did_not_write(sandbox, capsys) -> None:
    before = snapshot(sandbox)
    base = ["evaluate", "--model", str(sandbox / "model"), "--data", str(sandbox / "data")]
    assert main([*base, "--json", str(sandbox / "data" / "dataset.json"), "--overwrite"]) == 2
    assert "input" in capsys.readouterr().err
    assert main([*base, "--json", str(sandbox / "notes.json"), "--overwrite"]) == 2
    assert "was not written by `distillfss evaluate`" in capsys.readouterr().err
    assert snapshot(sandbox) == before


@pytest.mark.slow  # a few seconds; CI runs the slow tests (.ci/run)
def test_speed_writes_nothing_by_default_and_never_replaces_a_file_it_did_not_write(
    sandbox, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "speed.md").write_text("my table")
    (tmp_path / "speed.json").write_text("{}")
    before = snapshot(tmp_path)
    assert main(["speed", *TINY_SPEED]) == 0
    assert main(["speed", *TINY_SPEED, "--json", "speed.json", "--overwrite"]) == 2
    assert snapshot(tmp_path) == before


def test_export_cannot_destroy_the_model_it_reads_and_the_api_checks_the_graph(sandbox, tmp_path, monkeypatch) -> None:
    before = snapshot(sandbox)
    model = sandbox / "model"
    assert main(["export", "--model", str(model), "--out", str(model / "model.safetensors"), "--overwrite"]) == 2
    assert main(["export", "--model", str(model), "--out", str(sandbox / "user.onnx"), "--overwrite"]) == 2
    assert snapshot(sandbox) == before

    from distillfss import FewShotSegmenter
    from distillfss.export import OnnxPredictor
    from distillfss.model_io import ModelError

    seg = FewShotSegmenter.load(model)
    real = OnnxPredictor.logits
    monkeypatch.setattr(OnnxPredictor, "logits", lambda self, x: real(self, x) + 1.0)  # a graph that drifted
    with pytest.raises(ModelError, match="differ from PyTorch"):
        seg.export_onnx(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left
    with pytest.raises(UserError, match="input"):
        seg.save(model / "again")  # inside the folder it was loaded from


def test_meta_train_overwrite_never_deletes_a_model_adapt_wrote(sandbox, capsys) -> None:
    before = snapshot(sandbox)
    argv = ["meta-train", "--source", "synthetic", "--out", str(sandbox / "model"), "--overwrite", *TINY_MODEL]
    assert main(argv) == 2
    assert "was written by `distillfss adapt`" in capsys.readouterr().err
    assert snapshot(sandbox) == before


def test_a_folder_is_replaced_only_by_the_command_that_wrote_it(sandbox, capsys) -> None:
    before = snapshot(sandbox)
    images = sandbox / "data" / "test" / "images"
    other = ["predict", "--model", str(sandbox / "model"), "--images", str(images)]
    assert main([*other, "--out", str(sandbox / "m2"), "--overwrite"]) == 0  # its own folder: fine
    manifest = json.loads((sandbox / "m2" / ".distillfss-written.json").read_text())
    assert manifest["command"] == "distillfss predict"
    # a model folder that adapt wrote is not predict's to replace
    assert (
        main(["adapt", "--support", str(sandbox / "data"), "--out", str(sandbox / "m2"), "--overwrite", *TINY_ADAPT])
        == 2
    )
    assert "was written by `distillfss predict`" in capsys.readouterr().err
    import shutil

    shutil.rmtree(sandbox / "m2")
    assert snapshot(sandbox) == before


def test_the_starting_teacher_is_an_input(sandbox, capsys) -> None:
    before = snapshot(sandbox)
    teacher = sandbox / "model"
    argv = ["adapt", "--support", str(sandbox / "data"), "--teacher", str(teacher), "--out", str(teacher / "x")]
    assert main([*argv, *TINY_ADAPT]) == 2
    assert "input" in capsys.readouterr().err
    assert snapshot(sandbox) == before


def test_benchmark_overwrite_refuses_a_folder_it_did_not_write(sandbox, capsys) -> None:
    before = snapshot(sandbox)
    argv = ["benchmark", "--data", str(sandbox / "data"), "--shots", "1", "--methods", "prototype", "--overwrite"]
    assert main([*argv, "--out", str(sandbox / "mine")]) == 2
    assert "was not written by distillfss" in capsys.readouterr().err
    assert main([*argv, "--out", str(sandbox / "model")]) == 2
    assert "was written by `distillfss adapt`" in capsys.readouterr().err
    assert snapshot(sandbox) == before


def test_app_workspace_refuses_foreign_folders_and_never_replaces_a_mask_it_did_not_write(sandbox, tmp_path) -> None:
    pytest.importorskip("gradio")
    from distillfss.app import Workspace
    from distillfss.outputs import OutputError

    with pytest.raises(OutputError, match="not written by distillfss"):
        Workspace(sandbox / "mine")
    with pytest.raises(OutputError, match="input"):
        Workspace(sandbox / "model" / "ws", [sandbox / "model"])
    ws = Workspace(tmp_path / "ws")
    image = sorted((sandbox / "data" / "train" / "images").iterdir())[0]
    (stem,) = ws.add([image])
    mask = np.asarray(Image.open(sandbox / "data" / "train" / "masks" / image.name))
    (ws.root / "masks" / f"{stem}.png").write_bytes(b"a mask the user copied in")
    with pytest.raises(OutputError, match="was not written by distillfss"):
        ws.save_mask(stem, mask)
    assert (ws.root / "masks" / f"{stem}.png").read_bytes() == b"a mask the user copied in"
    # two runs in the same second get two folders; two images with one stem get two names
    runs = [ws.new_run() for _ in range(2)]
    ws.folder.path(f"{runs[0]}/labels/a.png").write_bytes(b"1")
    assert ws.new_run() != runs[0]
    assert ws.folder.unique(f"{runs[0]}/labels/a.png") == f"{runs[0]}/labels/a-2.png"
    assert Workspace(tmp_path / "ws").images == ws.images  # the app's own workspace reopens


# -- same behaviour whatever the entry point ----------------------------------------------------------------------


def _support(sandbox: Path) -> tuple[list[Path], list[Path]]:
    train = sorted((sandbox / "data" / "train" / "images").iterdir())[:2]
    return train, [sandbox / "data" / "train" / "masks" / p.name for p in train]


def test_api_adaptation_is_deterministic_and_leaves_the_callers_state_alone(sandbox) -> None:
    from distillfss import FewShotSegmenter

    images, masks = _support(sandbox)
    seen = []
    rng = torch.random.get_rng_state()
    assert not torch.are_deterministic_algorithms_enabled()
    a = FewShotSegmenter(**API_OPTIONS).fit(
        images, masks, on_step=lambda row: seen.append(torch.are_deterministic_algorithms_enabled())
    )
    assert seen and all(seen)  # deterministic kernels inside the library call ...
    assert not torch.are_deterministic_algorithms_enabled()  # ... and the caller's setting restored after
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random state untouched
    torch.rand(5)  # whatever the caller draws in between changes nothing
    b = FewShotSegmenter(**API_OPTIONS).fit(images, masks)
    assert all(torch.equal(x, y) for x, y in zip(a.student.state_dict().values(), b.student.state_dict().values()))


def test_cli_adaptation_restores_the_determinism_setting_and_keeps_a_callers_own(sandbox, tmp_path) -> None:
    assert (
        main(["adapt", "--support", str(sandbox / "data"), "--out", str(tmp_path / "m"), "--shots", "2", *TINY_ADAPT])
        == 0
    )
    assert not torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # a caller that wants it everywhere keeps it
    try:
        from distillfss import FewShotSegmenter

        FewShotSegmenter(**API_OPTIONS).fit(*_support(sandbox))
        assert (
            torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        )
    finally:
        torch.use_deterministic_algorithms(False)


def test_adapt_never_moves_or_changes_the_callers_backbone_and_teacher(lite0_64, monkeypatch) -> None:
    from distillfss.adapt import adapt
    from distillfss.config import AdaptConfig, model_config
    from distillfss.teacher import build_teacher

    mcfg = model_config("efficientnet_lite0", 1, "fast", 64)
    teacher = build_teacher(lite0_64, mcfg).train()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [m.training for m in teacher.modules()]

    def moved(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("adapt moved the caller's backbone")

    monkeypatch.setattr(lite0_64, "_apply", moved)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 10:30, 10:30] = 1
    rng = torch.random.get_rng_state()
    adapt(lite0_64, images, labels, mcfg, AdaptConfig(iterations=1, fast_iterations=2), teacher=teacher, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in state.items())
    assert [m.training for m in teacher.modules()] == flags


def test_predictor_and_export_leave_the_models_mode_and_the_random_state_alone(lite0_64, tmp_path) -> None:
    from distillfss.export import export_onnx
    from distillfss.predictor import Predictor
    from distillfss.student import build_fast_student

    student = build_fast_student(lite0_64, 1, 64).train()
    flags = [m.training for m in student.modules()]
    rng = torch.random.get_rng_state()
    Predictor(student, 64).predict(np.zeros((30, 40, 3), np.float32))
    export_onnx(student, 64, ("background", "x"), tmp_path / "s.onnx")
    assert [m.training for m in student.modules()] == flags
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_meta_training_and_speed_leave_the_random_state_alone(tmp_path) -> None:
    from meta_helpers import MODEL, tiny_run

    from distillfss.speed import SpeedJob, _runner

    rng = torch.random.get_rng_state()
    tiny_run(tmp_path / "t", steps=1, save_every=1)
    _runner(SpeedJob("student_fast", 1, 1, False, MODEL, "cpu", warmup=0, iters=1, threads=2))
    assert torch.equal(torch.random.get_rng_state(), rng)


# -- the sweep: every case a one-line error, nothing changed --------------------------------------------------------

S = "{S}"  # the sandbox, filled in per case
ADAPT = ["adapt", "--support", f"{S}/data", "--shots", "2", *TINY_ADAPT]
PREDICT = ["predict", "--model", f"{S}/model", "--images", f"{S}/data/test/images"]
EVALUATE = ["evaluate", "--model", f"{S}/model", "--data", f"{S}/data"]
EXPORT = ["export", "--model", f"{S}/model"]
BENCH = ["benchmark", "--data", f"{S}/data", "--shots", "1", "--methods", "prototype"]
SUGGEST = ["suggest", "--model", f"{S}/model", "--images", f"{S}/data/test/images"]
CLI_CASES = {
    "adapt: missing support folder": (["adapt", "--support", f"{S}/nope", "--out", f"{S}/o"], "nope"),
    "adapt: out inside the support set": ([*ADAPT, "--out", f"{S}/data/m"], "input"),
    "adapt: out inside the starting teacher": ([*ADAPT, "--teacher", f"{S}/model", "--out", f"{S}/model/x"], "input"),
    "adapt: out is a file": ([*ADAPT, "--out", f"{S}/notes.txt"], "not a folder"),
    "adapt: out is the user's folder": ([*ADAPT, "--out", f"{S}/mine", "--overwrite"], "no .distillfss-written"),
    "adapt: out written by predict": ([*ADAPT, "--out", f"{S}/pred", "--overwrite"], "distillfss predict"),
    "adapt: out is not empty": ([*ADAPT, "--out", f"{S}/model"], "not empty"),
    "adapt: more shots than images": ([*ADAPT, "--out", f"{S}/o", "--shots", "99"], "99 shots"),
    "adapt: unknown config field": ([*ADAPT, "--out", f"{S}/o", "--config", f"{S}/bad.yaml"], "bad.yaml"),
    "adapt: missing teacher folder": ([*ADAPT, "--out", f"{S}/o", "--teacher", f"{S}/noteacher"], "noteacher"),
    "adapt: no CUDA here": ([*ADAPT, "--out", f"{S}/o", "--device", "cuda"], "CUDA"),
    "predict: missing model": (
        ["predict", "--model", f"{S}/nomodel", "--images", f"{S}/data/test/images", "--out", f"{S}/o"],
        "nomodel",
    ),
    "predict: missing images": (
        ["predict", "--model", f"{S}/model", "--images", f"{S}/noimg", "--out", f"{S}/o"],
        "noimg",
    ),
    "predict: into its input images": ([*PREDICT, "--out", f"{S}/data/test/images", "--overwrite"], "input"),
    "predict: over the model adapt wrote": ([*PREDICT, "--out", f"{S}/model", "--overwrite"], "input"),
    "predict: over another model adapt wrote": (
        [*PREDICT, "--out", f"{S}/model_copy", "--overwrite"],
        "distillfss adapt",
    ),
    "predict: batch 0": ([*PREDICT, "--out", f"{S}/o", "--batch", "0"], "--batch"),
    "predict: onnx engine on a folder": ([*PREDICT, "--out", f"{S}/o", "--engine", "onnx"], "onnx"),
    "evaluate: json over the dataset's file": ([*EVALUATE, "--json", f"{S}/data/dataset.json", "--overwrite"], "input"),
    "evaluate: json over a file that exists": ([*EVALUATE, "--json", f"{S}/notes.json"], "exists"),
    "evaluate: json over the user's json": ([*EVALUATE, "--json", f"{S}/notes.json", "--overwrite"], "not written"),
    "evaluate: json is a folder": ([*EVALUATE, "--json", f"{S}/mine"], "is a folder"),
    "evaluate: other classes": (["evaluate", "--model", f"{S}/model", "--data", f"{S}/three"], "classes"),
    "evaluate: negative eval size": ([*EVALUATE, "--eval-size", "-1"], "--eval-size"),
    "evaluate: missing split": ([*EVALUATE, "--split", "nosplit"], "nosplit"),
    "export: over the model it reads": ([*EXPORT, "--out", f"{S}/model/model.safetensors", "--overwrite"], "input"),
    "export: over the user's onnx": ([*EXPORT, "--out", f"{S}/user.onnx", "--overwrite"], "not written"),
    "export: a folder that is no model": ([*EXPORT, "--out", f"{S}/o.onnx", "--model", f"{S}/pred"], "pred"),
    "export: missing calibration": (
        [*EXPORT, "--out", f"{S}/o.onnx", "--quantize", "int8", "--calibration", f"{S}/nocal"],
        "nocal",
    ),
    "speed: json over the user's json": (
        ["speed", *TINY_SPEED, "--json", f"{S}/notes.json", "--overwrite"],
        "not written",
    ),
    "speed: zero ways": (["speed", "--ways", "0"], "--ways"),
    "speed: unknown model": (["speed", "--models", "nosuch"], "nosuch"),
    "benchmark: the user's folder": ([*BENCH, "--out", f"{S}/mine", "--overwrite"], "not written by distillfss"),
    "benchmark: a model folder": ([*BENCH, "--out", f"{S}/model"], "distillfss adapt"),
    "benchmark: inside the data": ([*BENCH, "--out", f"{S}/data/b"], "input"),
    "benchmark: unknown method": ([*BENCH[:-1], "nosuch", "--out", f"{S}/o"], "nosuch"),
    "meta-train: over a model adapt wrote": (
        ["meta-train", "--source", "synthetic", "--out", f"{S}/model", "--overwrite"],
        "distillfss adapt",
    ),
    "meta-train: pascal without data": (["meta-train", "--source", "pascal", "--out", f"{S}/o"], "--data"),
    "data convert: missing source": (["data", "convert", "kvasir", f"{S}/nosrc", f"{S}/o"], "nosrc"),
    "data convert: over a dataset it did not write": (
        ["data", "convert", "kvasir", f"{S}/kvasir", f"{S}/data", "--overwrite"],
        "no .distillfss-written",
    ),
    "data convert: into its source": (["data", "convert", "kvasir", f"{S}/kvasir", f"{S}/kvasir/out"], "input"),
    "adapt --from: a folder that is no model": ([*ADAPT, "--out", f"{S}/o", "--from", f"{S}/pred"], "pred"),
    "adapt --from: with --teacher": (
        [*ADAPT, "--out", f"{S}/o", "--from", f"{S}/model", "--teacher", "random"],
        "--from",
    ),
    "adapt --from: other classes": (
        ["adapt", "--support", f"{S}/three", "--shots", "2", "--out", f"{S}/o", "--from", f"{S}/model"],
        "classes",
    ),
    "adapt --from: out inside the earlier model": ([*ADAPT, "--from", f"{S}/model", "--out", f"{S}/model/x"], "input"),
    "adapt --from: another image size": (
        [*ADAPT, "--out", f"{S}/o", "--from", f"{S}/model", "--image-size", "96"],
        "leave out --image-size 96",
    ),
    "suggest: missing model": (["suggest", "--model", f"{S}/nomodel", "--images", f"{S}/data/test/images"], "nomodel"),
    "suggest: no images": (["suggest", "--model", f"{S}/model", "--images", f"{S}/mine"], "no images"),
    "suggest: negative top": ([*SUGGEST, "--top", "-1"], "--top"),
    "export: a name that is no .onnx": ([*EXPORT, "--out", f"{S}/graph"], "ends in .onnx"),
    "app: a model folder that is not there": (
        ["app", "--workspace", f"{S}/ws", "--model", f"{S}/none", "--port", "0"],
        "none",
    ),
    "app: a bad image size": (["app", "--workspace", f"{S}/ws", "--image-size", "50", "--port", "0"], "image size"),
    "predict: negative voting chunk": ([*PREDICT, "--out", f"{S}/o", "--vote-chunk", "-1"], "--vote-chunk"),
    "evaluate: negative voting chunk": ([*EVALUATE, "--vote-chunk", "-1"], "--vote-chunk"),
    "suggest: json over the user's json": ([*SUGGEST, "--json", f"{S}/notes.json", "--overwrite"], "not written"),
    "suggest: json inside the model": ([*SUGGEST, "--json", f"{S}/model/s.json"], "input"),
    "demo: unknown dataset": (["demo", "--datasets", "nosuch", "--out", f"{S}/o"], "nosuch"),
    "demo: over a model adapt wrote": (["demo", "--out", f"{S}/model", "--overwrite"], "distillfss adapt"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_bad_input_sweep_cli(case, sandbox, capsys) -> None:
    argv, expected = CLI_CASES[case]
    argv = [a.replace(S, str(sandbox)) for a in argv]
    before = snapshot(sandbox)
    assert main(argv) == 2, case
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert expected in errors[0], errors[0]
    assert snapshot(sandbox) == before


def test_bad_input_sweep_api_and_app(sandbox) -> None:
    """The API's and the app's writers refuse what the CLI refuses, with one-line errors, changing nothing."""
    from distillfss import FewShotSegmenter

    before = snapshot(sandbox)
    loaded = FewShotSegmenter.load(sandbox / "model")
    cases = {
        "save over the folder it was loaded from": lambda: loaded.save(sandbox / "model", overwrite=True),
        "save over predictions": lambda: loaded.save(sandbox / "pred", overwrite=True),
        "save into the user's folder": lambda: loaded.save(sandbox / "mine", overwrite=True),
        "export over the user's onnx": lambda: loaded.export_onnx(sandbox / "user.onnx", overwrite=True),
        "export over a file, no overwrite": lambda: loaded.export_onnx(sandbox / "notes.txt"),
        "export to a name that is no .onnx": lambda: loaded.export_onnx(sandbox / "graph"),
        "fit with a mask of another size": lambda: FewShotSegmenter(**API_OPTIONS).fit(
            [np.zeros((20, 20, 3), np.uint8)], [np.zeros((10, 10), np.uint8)]
        ),
        "fit with a missing image": lambda: FewShotSegmenter(**API_OPTIONS).fit(
            [sandbox / "none.png"], [sandbox / "none.png"]
        ),
        "load a folder that is no model": lambda: FewShotSegmenter.load(sandbox / "pred"),
        "warm start before any fit": lambda: FewShotSegmenter(**API_OPTIONS).fit(
            [np.zeros((20, 20, 3), np.uint8)], [np.ones((20, 20), np.uint8)], warm_start=True
        ),
        "warm start with other classes": lambda: FewShotSegmenter.load(sandbox / "model").fit(
            [np.zeros((20, 20, 3), np.uint8)], [np.ones((20, 20), np.uint8)], classes=["other"], warm_start=True
        ),
        "suggest before any fit": lambda: FewShotSegmenter(**API_OPTIONS).suggest([np.zeros((20, 20, 3), np.uint8)]),
    }
    try:
        from distillfss.app import Workspace

        cases["app: a workspace in the user's folder"] = lambda: Workspace(sandbox / "mine")
        cases["app: a workspace inside the model it opens"] = lambda: Workspace(
            sandbox / "model" / "w", [sandbox / "model"]
        )
        cases["app: the home folder"] = lambda: Workspace(Path.home())
    except ImportError:
        pass
    for name, call in cases.items():
        with pytest.raises(UserError) as e:
            call()
        assert "\n" not in str(e.value), name
    assert snapshot(sandbox) == before
