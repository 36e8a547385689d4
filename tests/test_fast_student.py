"""The fast student (issue 12): one decoder pass for all classes, distilled from the adapted teacher."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_dataset
from test_refine import _constant_teacher, _support
from torch.utils.flop_counter import FlopCounterMode

from distillfss.adapt import adapt
from distillfss.baselines import LinearProbe
from distillfss.cli import main
from distillfss.config import AdaptConfig, ModelConfig
from distillfss.errors import UserError
from distillfss.fast import fit_label_probes, probe_labels
from distillfss.model_io import ModelError, load_model
from distillfss.student import FastStudent, build_fast_student, build_student
from distillfss.symmetry import VIEWS
from distillfss.teacher import build_teacher, encode_support
from distillfss.transfer import seeded, select
from distillfss.views import fit_on_bank, view_bank

S = 64
MCFG = ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2)
SMALL = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--iterations", "2"]


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def test_fast_student_runs_once_for_all_classes(lite0_64) -> None:
    """Merged logits for C classes from one pass whose cost barely grows with C (the paper's student grows ~C-fold)."""
    x = torch.rand(2, 3, S, S)
    backbone_flops = _flops(lite0_64, x)
    fast, paper = {}, {}
    for c in (1, 5):
        student = build_fast_student(lite0_64, c, S).eval()
        out = student(x)
        assert out.logits.shape == (2, c + 1, S, S)
        assert [t.shape[1] for t in out.coarse] == [c] * len(lite0_64.layer_info)  # per layer, one map per class
        fast[c] = _flops(student, x) - backbone_flops
        paper[c] = _flops(build_student(lite0_64, build_teacher(lite0_64, MCFG).decoder, c).eval(), x) - backbone_flops
    assert fast[5] < 1.1 * fast[1]
    assert paper[5] > 4 * paper[1]
    assert fast[1] < paper[1] / 4
    assert fast[5] < 0.25 * backbone_flops  # a pointwise trunk and one 3x3 conv at stride 4: near the backbone's cost


def test_fast_student_learns_the_teachers_soft_labels(lite0_64) -> None:
    """A fresh fast student trained on the bank of a teacher that calls everything foreground predicts more
    foreground on new images than it did untrained."""
    images, labels = _support()
    support = encode_support(lite0_64, images, labels, 1)
    teacher = _constant_teacher(lite0_64)
    unlabeled = torch.rand(6, 3, S, S, generator=torch.Generator().manual_seed(1))
    bank = view_bank(teacher, support, images, labels, (0,), unlabeled, (0, 1))
    assert len(bank.source) == 3 + 12 and int((bank.source < 0).sum()) == 12
    with seeded(0):  # its initialisation, whatever ran before in the process
        fast = build_fast_student(lite0_64, 1, S)
    probe = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(2))

    def foreground() -> float:
        with torch.no_grad():
            return float((fast.eval()(probe).logits.argmax(1) == 1).float().mean())

    before = foreground()
    params = [p for n, p in fast.named_parameters() if not n.startswith("backbone.")]
    cfg = AdaptConfig(lr=1e-2, view_batch=6)
    fit_on_bank(
        fast, params, bank, labels, cfg, 15, "fast", True, torch.Generator().manual_seed(0), False, lambda r: None
    )
    assert foreground() > max(before, 0.5)
    assert not any(p.requires_grad for p in fast.parameters())  # left frozen, in eval mode
    assert not fast.training


@pytest.mark.slow  # CI runs it (.ci/run); left out of make test for its time
def test_adapt_fast_is_repeatable_and_leaves_the_teacher_alone(lite0_64) -> None:
    images, labels = _support()
    cfg = AdaptConfig(iterations=2, student="fast", fast_iterations=3, seed=3)
    start = build_teacher(lite0_64, MCFG)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    a = adapt(lite0_64, images, labels, MCFG, cfg, teacher=start, progress=False)
    b = adapt(lite0_64, images, labels, MCFG, cfg, teacher=start, progress=False)
    assert isinstance(a.student, FastStudent)
    assert [r["stage"] for r in a.log] == ["teacher"] * 2 + ["fast"] * 3
    for (k, va), vb in zip(a.student.state_dict().items(), b.student.state_dict().values()):
        assert torch.equal(va, vb), k
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in before.items())
    # the label probes and the encoding passed in (as the benchmark shares them over seeds) change nothing
    support = encode_support(lite0_64, images, labels, 1)
    probes = fit_label_probes(lite0_64, support, labels)
    c = adapt(lite0_64, images, labels, MCFG, cfg, teacher=start, progress=False, support=support, probes=probes)
    for (k, va), vc in zip(a.student.state_dict().items(), c.student.state_dict().values()):
        assert torch.equal(va, vc), k
    assert {"l2", "levels", "balanced", "cv_miou"} <= set(a.log[2]["probe"]) and "probe" not in a.log[3]


def test_the_fast_students_teacher_is_exactly_transferfss(lite0_64) -> None:
    """The fast student's teacher trains alone (no paper student beside it): the same weights as a transfer run."""
    images, labels = _support()
    base = AdaptConfig(iterations=2, fast_iterations=3, seed=3)
    fast = adapt(lite0_64, images, labels, MCFG, base, progress=False)
    transfer = adapt(lite0_64, images, labels, MCFG, replace(base, method="transfer"), progress=False)
    assert [r["stage"] for r in fast.log] == ["teacher"] * 2 + ["fast"] * 3
    assert isinstance(fast.student, FastStudent) and transfer.student is None
    assert all("focal_student" not in r for r in fast.log[:2])
    state = fast.teacher.state_dict()
    for k, v in transfer.teacher.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_fast_and_refinement_do_not_mix() -> None:
    with pytest.raises(UserError, match="refine_iterations.*paper student"):
        AdaptConfig(student="fast", refine_iterations=5)
    with pytest.raises(UserError, match="fast_iterations"):
        AdaptConfig(fast_iterations=0)


@pytest.mark.slow  # a few seconds; CI runs the slow tests (.ci/run)
def test_cli_fast_student_saves_loads_predicts_and_exports(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d", n_train=5)
    unlabeled = data / "train" / "images"
    out = tmp_path / "m"
    cfg_file = tmp_path / "fast.yaml"
    cfg_file.write_text("fast_iterations: 3\n")
    rc = main(
        ["adapt", "--support", str(data), "--shots", "3", "--out", str(out)]
        + ["--unlabeled", str(unlabeled), "--config", str(cfg_file), *SMALL]
    )
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["student"] == "fast" and config["adapt"]["student"] == "fast" and config["student_version"] == 2
    assert len(config["unlabeled"]["images"]) == 2  # the train images outside the 3-image support set
    loaded = load_model(out)
    assert isinstance(loaded.model, FastStudent)
    x = torch.rand(2, 3, S, S)
    with torch.no_grad():
        assert torch.allclose(loaded.predictor.logits(x), loaded.model(x).logits, atol=1e-5)
    assert (
        main(["predict", "--model", str(out), "--images", str(data / "test" / "images"), "--out", str(tmp_path / "p")])
        == 0
    )
    assert len(list((tmp_path / "p").glob("*.png"))) == 2
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "m.onnx")]) == 0  # checked against PyTorch


def test_unknown_student_kind_is_a_clear_error(tmp_path: Path, lite0_64) -> None:
    from distillfss.model_io import save_model

    out = tmp_path / "m"
    out.mkdir()
    save_model(out, build_fast_student(lite0_64, 1, S), MCFG, ("background", "c"), {})
    config = json.loads((out / "config.json").read_text())
    config["student"] = "tiny"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"config\.json: unknown student 'tiny'"):
        load_model(out, backbone=lite0_64)
    for version in (None, 1):  # a folder of the first layout (no version field, or 1): refused, not misloaded
        if version is None:
            config.pop("student_version")
        else:
            config["student_version"] = version
        (out / "config.json").write_text(json.dumps({**config, "student": "fast"}))
        with pytest.raises(ModelError, match=r"config\.json: a fast student of layout version 1.*adapt it again"):
            load_model(out, backbone=lite0_64)


@pytest.mark.slow  # CI runs it (.ci/run); left out of make test for its time
def test_probe_labels_come_from_a_probe_that_never_saw_the_views_image(lite0_64) -> None:
    """The fast student's second labeller: the views of support image i are labelled by a probe fitted on the other
    support images (the settings the cross-validation chose kept), the unlabeled views by the probe fitted on all."""
    images, labels = _support()
    support = encode_support(lite0_64, images, labels, 1)
    unlabeled = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    views, m = VIEWS["hflip"], len(images)
    bank = view_bank(build_teacher(lite0_64, MCFG), support, images, labels, views, unlabeled, views)
    kept = labels.clone()
    probes = fit_label_probes(lite0_64, support, labels)
    soft, settings = probe_labels(probes, bank, (S, S)), probes.full.settings
    assert torch.equal(labels, kept)  # the caller's labels are left alone
    assert soft.shape == (len(bank.source), 2, S, S)
    assert torch.allclose(soft.sum(dim=1), torch.ones(()), atol=1e-5)
    assert settings["cv"] == "leave-one-image-out" and settings["grid_size"] > 1
    fixed = {k: settings[k] for k in ("l2", "levels", "balanced")}
    full = LinearProbe(lite0_64, 1, **fixed)
    full.fit_features(support.pyramid, labels)
    for i in range(m):
        others = torch.tensor([j for j in range(m) if j != i])
        probe = LinearProbe(lite0_64, 1, **fixed)
        probe.fit_features(select(support.pyramid, others), labels[others])
        own = (bank.source == i).nonzero().flatten()
        expected = probe.forward_features(select(bank.pyramid, own), (S, S)).softmax(dim=1)
        assert torch.allclose(soft[own], expected, atol=1e-5)
        assert not torch.allclose(soft[own], full.forward_features(select(bank.pyramid, own), (S, S)).softmax(1))
    unl = (bank.source < 0).nonzero().flatten()
    expected = full.forward_features(select(bank.pyramid, unl), (S, S)).softmax(dim=1)
    assert torch.allclose(soft[unl], expected, atol=1e-5)
    # one support image: no other to fit on, its views are labelled by the probe fitted on it
    one_support = encode_support(lite0_64, images[:1], labels[:1], 1)
    one = view_bank(build_teacher(lite0_64, MCFG), one_support, images[:1], labels[:1], views, None, views)
    probes1 = fit_label_probes(lite0_64, one_support, labels[:1])
    soft1 = probe_labels(probes1, one, (S, S))
    assert probes1.full.settings["cv"] == "leave-one-quadrant-out" and soft1.shape[0] == len(views)
