"""Student refinement on augmented support views and unlabeled images labelled by the adapted teacher (issue 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_dataset

from distillfss.adapt import adapt
from distillfss.backbones import Pyramid
from distillfss.cli import main
from distillfss.config import AdaptConfig, ModelConfig
from distillfss.data import DataError, load_unlabeled
from distillfss.refine import refine
from distillfss.symmetry import VIEWS, dihedral
from distillfss.teacher import ModelOutput, Teacher, encode_support
from distillfss.views import encode_views, teacher_labels

S = 64
MCFG = ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2)
FAST = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--iterations", "2"]


def _support(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, S, S, generator=g)
    labels = torch.zeros(n, S, S, dtype=torch.long)
    for i in range(n):
        labels[i, 8 + 4 * i : 30 + 4 * i, 10:34] = 1
    return images, labels


def test_dihedral_views_are_the_eight_distinct_symmetries() -> None:
    x = torch.arange(16.0).view(1, 4, 4)
    views = [dihedral(x, k) for k in VIEWS["dihedral"]]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert torch.equal(dihedral(x, 0), x)
    assert torch.equal(dihedral(x, 3), torch.rot90(x, 2, dims=(-2, -1)))
    assert VIEWS["flips"] == (0, 1, 2, 3) and VIEWS["none"] == (0,)


class _ConstantTeacher(Teacher):
    """A teacher that calls every pixel foreground with probability sigmoid(4) and every coarse mask 0.7."""

    def forward_features(self, query, support, shot_valid=None, keys=None) -> ModelOutput:
        self.calls.append(query.skip4.shape[0])
        b, n_cls = query.skip4.shape[0], support.flags.shape[1]
        logits = torch.zeros(b, n_cls + 1, S, S)
        logits[:, 1:] = 4.0
        coarse = [torch.full((b, n_cls, *t.shape[-2:]), 0.7) for t in query.layers]
        return ModelOutput(logits, torch.zeros(b, n_cls, 2, S, S), coarse)


def _constant_teacher(lite0_64) -> _ConstantTeacher:
    from distillfss.teacher import build_teacher

    base = build_teacher(lite0_64, MCFG)
    t = _ConstantTeacher(base.backbone, base.attention, base.decoder)
    t.calls = []
    return t


def test_pseudo_labels_come_from_the_adapted_teacher(lite0_64) -> None:
    images, labels = _support()
    support = encode_support(lite0_64, images, labels, 1)
    teacher = _constant_teacher(lite0_64)
    bank = lite0_64(torch.rand(5, 3, S, S))
    source = torch.tensor([0, 1, -1, -1, -1])
    coarse, soft, present = teacher_labels(teacher, support, bank, source)
    assert teacher.calls == [5]
    expected = torch.sigmoid(torch.tensor(4.0)).half()  # softmax over (0, 4)
    assert torch.allclose(soft[:, 1].float(), expected.float(), atol=1e-3)
    assert all(torch.all(c == 0.7) for c in coarse)
    assert present.all()  # every class has a shot: the support views keep the other two images


@pytest.mark.slow
def test_refined_student_learns_the_teachers_labels_on_unlabeled_images(lite0_64) -> None:
    """With only unlabeled views in the bank's soft part and a teacher that says 'foreground everywhere', the
    refined student predicts more foreground on unlabeled images than the student it started from."""
    images, labels = _support()
    support = encode_support(lite0_64, images, labels, 1)
    cfg = AdaptConfig(student="paper", iterations=2, seed=0)
    result = adapt(lite0_64, images, labels, MCFG, cfg, progress=False, support=support)
    teacher = _constant_teacher(lite0_64)
    teacher.load_state_dict(result.teacher.state_dict())
    unlabeled = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(1))
    rcfg = AdaptConfig(student="paper", refine_iterations=30, views="none", view_batch=4, lr=3e-3, seed=0)
    before = {k: v.clone() for k, v in result.student.state_dict().items()}
    log: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    refined = refine(teacher, result.student, support, images, labels, rcfg, unlabeled, gen, False, log.append)
    assert teacher.calls == [3 + 4]  # the support views and every unlabeled view, labelled once
    assert all(torch.equal(v, result.student.state_dict()[k]) for k, v in before.items())  # caller's untouched
    assert refined is not result.student and refined.decoder is not result.teacher.decoder
    with torch.no_grad():
        fg_before = (result.student(unlabeled).logits.argmax(1) == 1).float().mean()
        fg_after = (refined(unlabeled).logits.argmax(1) == 1).float().mean()
    assert fg_after > fg_before + 0.2
    assert "soft" in log[-1] and log[-1]["step"] == 30


@pytest.mark.slow
def test_refinement_is_reproducible_from_the_seed(lite0_64) -> None:
    images, labels = _support()
    cfg = AdaptConfig(student="paper", iterations=2, refine_iterations=3, seed=4)
    unlabeled = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    a = adapt(lite0_64, images, labels, MCFG, cfg, progress=False, unlabeled=unlabeled)
    torch.manual_seed(123)  # the process's random state must not matter
    b = adapt(lite0_64, images, labels, MCFG, cfg, progress=False, unlabeled=unlabeled)
    assert all(torch.equal(x, y) for x, y in zip(a.student.state_dict().values(), b.student.state_dict().values()))
    assert [r["stage"] for r in a.log].count("refine") == 3


def _no_masks(folder: Path) -> None:
    """Replace every mask of a dataset with garbage: the unlabeled path must not read them."""
    for m in folder.rglob("masks/*.png"):
        m.write_bytes(b"not a png")


def test_unlabeled_loading_reads_images_only_and_skips_the_support(tmp_path) -> None:
    data = write_dataset(tmp_path / "d", n_train=6, n_test=2)
    _no_masks(data)
    support = [data / "train/images/img00.png", data / "train/images/img03.png"]
    x, names = load_unlabeled(data, 32, 64, exclude=support)
    assert names == ["img01.png", "img02.png", "img04.png", "img05.png"]  # train/images only: never the test split
    assert x.shape == (4, 3, 32, 32)
    _, spread = load_unlabeled(data, 32, 2, exclude=support)
    assert spread == ["img01.png", "img05.png"]  # an evenly spread, name-sorted subset


def test_adapt_with_unlabeled_images(tmp_path) -> None:
    data = write_dataset(tmp_path / "d", n_train=4, n_test=1)
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        (pool / f"u{i}.png").write_bytes((data / "test/images/img00.png").read_bytes())
    out = tmp_path / "m"
    args = ["adapt", "--support", str(data), "--shots", "2", "--out", str(out), "--unlabeled", str(pool)]
    (tmp_path / "c.json").write_text('{"student": "paper", "refine_iterations": 2}')
    assert main([*args, "--config", str(tmp_path / "c.json"), *FAST]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["unlabeled"]["images"] == ["u0.png", "u1.png", "u2.png"]
    assert config["adapt"]["refine_iterations"] == 2
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["joint", "joint", "refine", "refine"]


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        ("bad_image", 2, "bad.png: not a readable image"),
        ("empty", 2, "no unlabeled images"),
        ("ok", 0, "refine_iterations >= 1"),
    ],
)
def test_bad_unlabeled_input_is_one_line_and_writes_nothing(tmp_path, capsys, setup, extra, message) -> None:
    data = write_dataset(tmp_path / "d", n_train=3, n_test=1)
    pool = tmp_path / "pool"
    pool.mkdir()
    if setup != "empty":
        (pool / "good.png").write_bytes((data / "test/images/img00.png").read_bytes())
    if setup == "bad_image":
        (pool / "bad.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "m"
    args = ["adapt", "--support", str(data), "--shots", "2", "--out", str(out), "--unlabeled", str(pool)]
    (tmp_path / "c.json").write_text(f'{{"student": "paper", "refine_iterations": {extra}}}')
    assert main([*args, "--config", str(tmp_path / "c.json"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_load_unlabeled_refuses_a_folder_without_images(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no unlabeled images"):
        load_unlabeled(tmp_path / "empty", 32, 4)


def test_bank_pyramid_is_view_major(lite0_64) -> None:

    x = torch.rand(2, 3, S, S)
    bank = encode_views(lite0_64, x, (0, 1))
    assert isinstance(bank, Pyramid) and bank.skip4.shape[0] == 4
    with torch.no_grad():
        flipped = lite0_64(dihedral(x, 1).contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(bank.skip4[2:], flipped.skip4)
