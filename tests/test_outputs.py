"""No command loses a user's file: unsafe --out refused, --overwrite removes only what distillfss wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_ADAPT, write_dataset

from distillfss.cli import main
from distillfss.outputs import MANIFEST, OutputError, check_output, output_folder
from distillfss.outputs import write_json_atomic as write_json


@pytest.fixture(scope="module")
def multiclass_dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "multi", n_train=4, n_test=2, num_classes=2)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, multiclass_dataset):
    out = tmp_path_factory.mktemp("models") / "model"
    fast = TINY_ADAPT
    assert main(["adapt", "--support", str(multiclass_dataset), "--out", str(out), "--shots", "3", *fast]) == 0
    return out


def _write(folder: Path, files: dict[str, str], inputs=()) -> None:
    with output_folder(folder, overwrite=True, inputs=inputs, command="test") as tmp:
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)


def test_overwrite_replaces_only_what_a_previous_run_wrote(tmp_path) -> None:
    out = tmp_path / "out"
    _write(out, {"a.png": "1", "sub/b.png": "1", "stale.png": "1"})
    assert json.loads((out / MANIFEST).read_text())["files"] == ["a.png", "stale.png", "sub/b.png"]
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "mine.txt").write_text("mine too")
    _write(out, {"a.png": "2", "sub/b.png": "2"})
    assert (out / "a.png").read_text() == "2" and (out / "sub/b.png").read_text() == "2"
    assert not (out / "stale.png").exists()  # the previous run's file, not written this time
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub/mine.txt").read_text() == "mine too"


def test_a_new_file_never_replaces_a_users_file(tmp_path) -> None:
    out = tmp_path / "out"
    _write(out, {"a.png": "1"})
    (out / "b.png").write_text("mine")
    with pytest.raises(OutputError, match="b.png: was not written by distillfss"):
        _write(out, {"a.png": "2", "b.png": "2"})
    assert (out / "b.png").read_text() == "mine" and (out / "a.png").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_a_folder_distillfss_did_not_write_is_refused_even_with_overwrite(tmp_path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="no .distillfss-written.json"):
        check_output(out, overwrite=True, command="test")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_failure_leaves_the_previous_output_as_it_was(tmp_path) -> None:
    out = tmp_path / "out"
    _write(out, {"a.png": "1"})
    with pytest.raises(RuntimeError), output_folder(out, overwrite=True, command="test") as tmp:
        (tmp / "a.png").write_text("half")
        raise RuntimeError("killed")
    assert (out / "a.png").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_unsafe_outputs_are_refused(tmp_path, monkeypatch) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    for out in (images, images / "masks", tmp_path):
        with pytest.raises(OutputError, match="input"):
            check_output(out, overwrite=True, inputs=[images], command="test")
    monkeypatch.chdir(images)
    with pytest.raises(OutputError, match="working directory"):
        check_output(Path("."), overwrite=True, command="test")
    with pytest.raises(OutputError, match="working directory"):
        check_output(Path(".."), overwrite=True, command="test")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(OutputError, match="home directory"):
        check_output(tmp_path / "home", overwrite=True, command="test")
    with pytest.raises(OutputError, match="filesystem root"):
        check_output(Path("/"), overwrite=True, command="test")
    check_output(images / ".." / "elsewhere", overwrite=False, command="test")  # beside the input: fine


def test_predict_into_its_own_image_folder_is_refused_and_deletes_nothing(
    student_dir, multiclass_dataset, capsys
) -> None:
    images = multiclass_dataset / "test" / "images"
    before = sorted(p.name for p in images.iterdir())
    args = ["predict", "--model", str(student_dir), "--images", str(images), "--out", str(images), "--overwrite"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "input" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in images.iterdir()) == before


def test_predict_overwrite_keeps_the_users_other_files(student_dir, multiclass_dataset, tmp_path) -> None:
    images = multiclass_dataset / "test" / "images"
    out = tmp_path / "masks"
    assert main(["predict", "--model", str(student_dir), "--images", str(images), "--out", str(out)]) == 0
    (out / "README.txt").write_text("my notes")
    assert (
        main(["predict", "--model", str(student_dir), "--images", str(images), "--out", str(out), "--overwrite"]) == 0
    )
    assert (out / "README.txt").read_text() == "my notes"
    assert {p.stem for p in images.iterdir()} <= {p.stem for p in out.glob("*.png")}


def test_predict_resumes_only_what_the_same_model_and_settings_began(
    student_dir, multiclass_dataset, tmp_path, capsys
) -> None:
    import shutil

    images = multiclass_dataset / "test" / "images"
    out = tmp_path / "masks"
    other = tmp_path / "other_model"
    shutil.copytree(student_dir, other)
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # another model (its last weight changed)
    assert main(["predict", "--model", str(student_dir), "--images", str(images), "--out", str(out)]) == 0
    labels = {p.name: p.read_bytes() for p in out.glob("*.png")}
    capsys.readouterr()
    # was: "wrote 0 label maps", every label silently kept from the first model
    for change in (["--model", str(other)], ["--model", str(student_dir), "--precision", "bf16"]):
        assert main(["predict", *change, "--images", str(images), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "holds labels predicted with another" in err and "--overwrite" in err
        assert {p.name: p.read_bytes() for p in out.glob("*.png")} == labels  # nothing touched
    moved = tmp_path / "moved_model"
    shutil.copytree(student_dir, moved)  # the same model elsewhere: resumes (nothing left to do)
    assert main(["predict", "--model", str(moved), "--images", str(images), "--out", str(out)]) == 0
    assert main(["predict", "--model", str(other), "--images", str(images), "--out", str(out), "--overwrite"]) == 0
    record = json.loads((out / ".distillfss-predict.json").read_text())
    assert record["model"] == str(other.resolve())


def test_json_results_are_replaced_atomically(tmp_path) -> None:
    path = tmp_path / "results.json"
    write_json(path, {"rows": [1]})
    write_json(path, {"rows": [1, 2]})
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_predict_names_unreadable_files_at_the_end_and_predicts_the_rest(
    student_dir, multiclass_dataset, tmp_path, capsys
) -> None:
    import shutil

    images = tmp_path / "imgs"
    shutil.copytree(multiclass_dataset / "test" / "images", images)
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(student_dir), "--images", str(images), "--out", str(out)]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("distillfss predict: error:")]
    assert len(errors) == 1 and "1 of 3 images could not be read" in errors[0] and "broken.png" in errors[0]
    assert sorted(p.name for p in out.glob("*.png")) == ["img00.png", "img01.png"]


@pytest.mark.parametrize(
    ("command", "how"), [("distillfss evaluate", "--overwrite"), ("FewShotSegmenter.export_onnx", "overwrite=True")]
)
def test_a_refusal_names_the_callers_way_to_overwrite(tmp_path, command, how) -> None:
    """The CLI's refusals name its flag, the Python API's its argument; the file is left as it was."""
    from distillfss.outputs import check_output_file

    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=f"pass {how} to replace it"):
        check_output_file(mine, False, command=command)
    with pytest.raises(OutputError, match=f"{how} replaces only that command's own output"):
        check_output_file(mine, True, command=command)
    with pytest.raises(OutputError, match=f"pass {how} to replace it"):
        check_output(tmp_path / "folder", False, command=command)
    assert mine.read_text() == "{}" and (tmp_path / "folder" / "thesis.tex").read_text() == "years of work"
