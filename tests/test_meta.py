"""Meta-training: loss, resume after an interruption, DDP on 2 CPU processes, the checkpoint as a start for adapt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("skimage")

from meta_helpers import DDP_SETTINGS, MODEL, own_state, tiny_run  # noqa: E402

from distillfss.backbones import build_backbone  # noqa: E402
from distillfss.cli import main  # noqa: E402
from distillfss.config import MetaConfig  # noqa: E402
from distillfss.meta import meta_loss  # noqa: E402
from distillfss.model_io import ModelError, load_model, load_teacher_weights  # noqa: E402
from distillfss.teacher import build_teacher  # noqa: E402


class Interrupt(Exception):
    pass


def test_meta_loss_is_the_papers_mix() -> None:
    target = torch.tensor([[[0, 1], [1, 255]]])
    logits = torch.zeros(1, 2, 2, 2)
    coarse = [torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 2, 2), 0.5)]
    loss, ce, bce = meta_loss(logits, coarse, target, MetaConfig())
    ln2 = torch.log(torch.tensor(2.0))
    assert torch.allclose(ce, ln2) and torch.allclose(bce, ln2)  # the ignored pixel counts in neither
    assert torch.allclose(loss, 2.5 * ln2)


@pytest.mark.slow  # CI runs it (.ci/run); left out of make test for its time
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    full = tiny_run(tmp_path / "full", steps=6)

    def stop_at_5(row: dict) -> None:
        if row["step"] == 5:
            raise Interrupt  # dies after step 5's log row; the last saved state is step 4

    with pytest.raises(Interrupt):
        tiny_run(tmp_path / "cut", steps=6, on_step=stop_at_5)
    with open(tmp_path / "cut/train_log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a kill in the middle of writing a line
    resumed = tiny_run(tmp_path / "cut", steps=6)
    assert [r["step"] for r in resumed.log] == [5, 6]
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut/train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the orphan row 5 was replaced, not duplicated
    a, b = own_state(full), own_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.best_step == full.best_step and resumed.best_miou == pytest.approx(full.best_miou)
    again = tiny_run(tmp_path / "cut", steps=6)  # a finished run does no more steps
    assert again.log == []


def test_resume_refuses_other_settings_and_foreign_folders(tmp_path: Path) -> None:
    tiny_run(tmp_path / "run", steps=2)
    with pytest.raises(ModelError, match=r"other settings \(lr\)"):
        tiny_run(tmp_path / "run", steps=2, lr=5e-4)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="was not written by distillfss"):
        tiny_run(tmp_path / "other", steps=2)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_checkpoint_starts_adaptation_but_is_not_a_predictor(tmp_path: Path, lite0_64) -> None:
    result = tiny_run(tmp_path / "ckpt", steps=2)
    config = json.loads((tmp_path / "ckpt/config.json").read_text())
    assert config["kind"] == "teacher" and config["support"] is False and config["meta_train"]["steps"] == 2
    assert config["source"]["name"] == "selfsup" and "val_miou" in config
    card = (tmp_path / "ckpt/MODEL_CARD.md").read_text()
    assert "distillfss meta-train --source selfsup --out OUT --steps 2" in card and "chelsea" in card
    import subprocess

    import skimage
    import torch

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    prov = config["provenance"]  # what made the run, in the config and the card
    assert prov["torch"] == torch.__version__ and prov["scikit_image"] == skimage.__version__
    assert head.returncode != 0 or prov["code_commit"].startswith(head.stdout.strip())
    assert f"scikit-image {skimage.__version__}" in card and f"torch {torch.__version__}" in card
    three = MODEL.__class__(**{**MODEL.to_dict(), "num_classes": 3})
    teacher = load_teacher_weights(tmp_path / "ckpt", lite0_64, three)
    best = own_state(result) if result.best_step == 2 else None
    if best is not None:
        assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in best.items())
    with pytest.raises(ModelError, match="without a support set"):
        load_model(tmp_path / "ckpt", backbone=lite0_64)
    wrong = MODEL.__class__(**{**MODEL.to_dict(), "backbone": "efficientnet_lite2"})
    with pytest.raises(ModelError, match="backbone = 'efficientnet_lite0'"):
        load_teacher_weights(tmp_path / "ckpt", lite0_64, wrong)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    single = tiny_run(tmp_path / "single", **DDP_SETTINGS)
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    proc = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP keeps the replicas identical
    ref = own_state(single)
    assert all(torch.allclose(r0[k], ref[k], rtol=1e-4, atol=5e-5) for k in ref)  # rounding-level
    torch.manual_seed(0)
    init = build_teacher(build_backbone(MODEL.backbone, MODEL.image_size), MODEL).state_dict()
    assert max((ref[k] - init[k]).abs().max().item() for k in ref) > 1e-2  # the runs did train
    loss0 = json.loads((tmp_path / "loss0.json").read_text())
    assert loss0 == json.loads((tmp_path / "loss1.json").read_text())
    assert loss0 == pytest.approx([r["loss"] for r in single.log], rel=1e-3)
    assert (tmp_path / "ckpt/model.safetensors").is_file()  # rank 0 wrote the checkpoint


def test_cli_meta_train_errors(tmp_path: Path, capsys) -> None:
    assert main(["meta-train", "--source", "pascal", "--out", str(tmp_path / "o")]) == 2
    assert "--source pascal needs --data" in capsys.readouterr().err
    (tmp_path / "voc").mkdir()
    assert (
        main(["meta-train", "--source", "pascal", "--data", str(tmp_path / "voc"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "no JPEGImages" in capsys.readouterr().err
    assert main(["meta-train", "--source", "pascal", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_meta_train_on_a_pascal_replica(tmp_path: Path) -> None:
    from test_sources import write_pascal

    write_pascal(tmp_path / "VOC")
    args = [
        "meta-train",
        "--source",
        "pascal",
        "--data",
        str(tmp_path / "VOC"),
        "--out",
        str(tmp_path / "t"),
        "--backbone",
        "efficientnet_lite0",
        "--image-size",
        "64",
        "--steps",
        "2",
        "--batch",
        "2",
        "--val-every",
        "1",
        "--val-episodes",
        "3",
    ]
    assert main(args) == 0
    config = json.loads((tmp_path / "t/config.json").read_text())
    assert config["source"]["val_classes"] == [1, 2, 3, 4, 5] and config["source"]["fold"] == 0
    rows = [json.loads(line) for line in (tmp_path / "t/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("val_miou" in r for r in rows)


@pytest.mark.slow  # CI runs it (.ci/run); left out of make test for its time
def test_benchmark_from_a_meta_trained_teacher_against_a_random_one(tmp_path: Path) -> None:
    from conftest import write_dataset

    tiny_run(tmp_path / "ckpt", steps=2)
    data = write_dataset(tmp_path / "toy", n_train=3, n_test=1)
    methods = "teacher,transferfss,distillfss,teacher_random,distillfss_random"
    args = [
        "benchmark",
        "--data",
        str(data),
        "--shots",
        "2",
        "--out",
        str(tmp_path / "b"),
        "--teacher",
        str(tmp_path / "ckpt"),
        "--methods",
        methods,
        "--backbone",
        "efficientnet_lite0",
        "--image-size",
        "64",
        "--iterations",
        "3",
    ]
    assert main(args) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "b/results.json").read_text())["rows"]}
    assert rows["teacher"]["teacher_init"] == str(tmp_path / "ckpt")
    assert rows["distillfss_random"]["teacher_init"] == rows["teacher_random"]["teacher_init"] == "random"
    assert 1 <= rows["distillfss"]["plateau_step"] <= 3 and rows["distillfss_random"]["plateau_seconds"] >= 0
    assert rows["teacher"]["plateau_step"] is None
    assert list((tmp_path / "b").glob("train_log_toy_2shot_draw0_seed0_*random.jsonl"))  # the random start's log
