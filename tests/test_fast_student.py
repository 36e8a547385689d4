"""The fast student (issue 12): one decoder pass for all classes, distilled from the adapted teacher."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_dataset
from test_refine import _constant_teacher, _support
from torch.utils.flop_counter import FlopCounterMode

from distillfss.adapt import (
    VIEWS,
    _fit_on_bank,
    _select,
    _view_bank,
    adapt,
    dihedral,
    distill_fast,
    probe_labels,
    undo_dihedral,
    view_mean,
)
from distillfss.baselines import LinearProbe
from distillfss.cli import main
from distillfss.config import AdaptConfig, ModelConfig
from distillfss.errors import UserError
from distillfss.model_io import ModelError, load_model
from distillfss.student import FastStudent, build_fast_student, build_student
from distillfss.teacher import build_teacher, encode_support

S = 64
MCFG = ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2)
SMALL = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--iterations", "2", "--fast-iterations", "3"]


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
    bank = _view_bank(teacher, support, images, labels, (0,), unlabeled, (0, 1))
    assert len(bank.source) == 3 + 12 and int((bank.source < 0).sum()) == 12
    fast = build_fast_student(lite0_64, 1, S)
    probe = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(2))

    def foreground() -> float:
        with torch.no_grad():
            return float((fast.eval()(probe).logits.argmax(1) == 1).float().mean())

    before = foreground()
    params = [p for n, p in fast.named_parameters() if not n.startswith("backbone.")]
    cfg = AdaptConfig(lr=1e-2, view_batch=6)
    _fit_on_bank(
        fast, params, bank, labels, cfg, 15, "fast", True, torch.Generator().manual_seed(0), False, lambda r: None
    )
    assert foreground() > max(before, 0.5)
    assert not any(p.requires_grad for p in fast.parameters())  # left frozen, in eval mode
    assert not fast.training


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
    # distill_fast on the adapted teacher gives a student of the same kind and leaves the teacher's weights as they are
    teacher_state = {k: v.clone() for k, v in a.teacher.state_dict().items()}
    support = encode_support(lite0_64, images, labels, 1)
    fast, rows = distill_fast(a.teacher, support, images, labels, cfg, progress=False)
    assert isinstance(fast, FastStudent) and len(rows) == 3
    assert all(torch.equal(v, a.teacher.state_dict()[k]) for k, v in teacher_state.items())


def test_teacher_only_stage_is_transferfss_then_the_fast_student(lite0_64) -> None:
    """--fast-teacher-stage teacher (the default) trains the teacher alone (exactly a transfer adaptation, no paper
    student beside it), then distils the fast student; the joint stage gives another teacher (the paper student's
    loss reaches the shared decoder)."""
    images, labels = _support()
    base = AdaptConfig(iterations=2, student="fast", fast_iterations=3, seed=3)
    solo = adapt(lite0_64, images, labels, MCFG, base, progress=False)
    transfer = adapt(lite0_64, images, labels, MCFG, replace(base, method="transfer"), progress=False)
    joint = adapt(lite0_64, images, labels, MCFG, replace(base, fast_teacher_stage="joint"), progress=False)
    assert [r["stage"] for r in joint.log] == ["joint"] * 2 + ["fast"] * 3
    assert [r["stage"] for r in solo.log] == ["teacher"] * 2 + ["fast"] * 3
    assert isinstance(solo.student, FastStudent) and transfer.student is None
    assert all("focal_student" not in r for r in solo.log[:2])
    solo_state, joint_state = solo.teacher.state_dict(), joint.teacher.state_dict()
    for k, v in transfer.teacher.state_dict().items():
        assert torch.equal(v, solo_state[k]), k
    assert any(not torch.equal(v, joint_state[k]) for k, v in solo_state.items())
    with pytest.raises(SystemExit):  # argparse: an unknown stage
        main(["adapt", "--support", "x", "--out", "y", "--fast-teacher-stage", "student"])


def test_fast_and_refinement_do_not_mix() -> None:
    with pytest.raises(UserError, match="refine-iterations"):
        AdaptConfig(student="fast", refine_iterations=5)
    with pytest.raises(UserError, match="fast-iterations"):
        AdaptConfig(fast_iterations=0)


def test_cli_fast_student_saves_loads_predicts_and_exports(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d", n_train=5)
    unlabeled = data / "train" / "images"
    out = tmp_path / "m"
    rc = main(
        ["adapt", "--support", str(data), "--shots", "3", "--student", "fast", "--out", str(out)]
        + ["--unlabeled", str(unlabeled), *SMALL]
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


def test_random_crops_keep_image_and_label_aligned_and_are_seeded() -> None:
    """A crop of an image whose pixels encode their label stays consistent with its label crop; the symmetries are
    only those allowed; the same generator seed gives the same crops; the inputs are unchanged."""
    from distillfss.adapt import dihedral, random_crops

    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(2, S, S, dtype=torch.long)
    labels[0, :, : S // 2] = 1  # left half of image 0
    labels[1, : S // 3] = 1  # top third of image 1
    images = labels[:, None].float().expand(-1, 3, -1, -1).clone()
    before = images.clone(), labels.clone()
    ci, cl, src = random_crops(images, labels, 5, g, symmetries=(0, 1))
    assert ci.shape == (10, 3, S, S) and cl.shape == (10, S, S) and src.tolist() == [0] * 5 + [1] * 5
    assert torch.equal(images, before[0]) and torch.equal(labels, before[1])
    inside = (ci[:, 0] > 0.99) | (ci[:, 0] < 0.01)  # away from the bilinear edge the image equals its label
    assert torch.equal((ci[:, 0] > 0.5)[inside], (cl == 1)[inside])
    for c, s in zip(cl, src):  # image 1's label stays horizontal bands: a flip left-right allowed, no transpose
        if s == 1:
            assert torch.equal(c, c[:, :1].expand_as(c))
    again = random_crops(images, labels, 5, torch.Generator().manual_seed(0), symmetries=(0, 1))
    assert all(torch.equal(a, b) for a, b in zip((ci, cl, src), again))
    assert torch.equal(dihedral(labels, 0), labels)


def test_fast_crops_join_the_bank_as_support_views_with_their_source(lite0_64) -> None:
    images, labels = _support()
    teacher = build_teacher(lite0_64, MCFG)
    support = encode_support(lite0_64, images, labels, 1)
    plain = _view_bank(teacher, support, images, labels, (0, 1), None, (0,))
    bank = _view_bank(teacher, support, images, labels, (0, 1), None, (0,), 3, torch.Generator().manual_seed(0))
    m = len(images)
    assert len(bank.source) == len(plain.source) + 3 * m
    assert bank.source[2 * m :].tolist() == [i for i in range(m) for _ in range(3)]
    assert (bank.hard[2 * m :] >= 0).all()  # crops carry true labels
    cfg = AdaptConfig(iterations=2, student="fast", fast_iterations=2, fast_crops=2)
    a = adapt(lite0_64, images, labels, MCFG, cfg, progress=False)
    assert isinstance(a.student, FastStudent)
    with pytest.raises(UserError, match="fast-crops"):
        AdaptConfig(fast_crops=-1)


def test_fast_schedule_applies_to_the_fast_students_steps_only(lite0_64, monkeypatch) -> None:
    import importlib

    adapt_mod = importlib.import_module("distillfss.adapt")
    seen: set[tuple[str, int]] = set()
    real = adapt_mod.lr_factor

    def spy(schedule: str, steps: int, step: int) -> float:
        seen.add((schedule, steps))
        return real(schedule, steps, step)

    monkeypatch.setattr(adapt_mod, "lr_factor", spy)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, 10:30, 10:30] = 1
    model = ModelConfig(backbone="efficientnet_lite0", image_size=64, heads=2)
    cfg = AdaptConfig(student="fast", iterations=2, fast_iterations=3, fast_schedule="cosine")
    adapt_mod.adapt(lite0_64, images, labels, model, cfg, progress=False)
    assert seen == {("constant", 2), ("cosine", 3)}  # the teacher's 2 steps keep --schedule
    assert real("cosine", 200, 0) < 1.0 and real("cosine", 200, 199) < 0.01 < real("cosine", 200, 100)


def test_undo_dihedral_inverts_every_symmetry_and_view_mean_keeps_equivariant_labels() -> None:
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    for k in range(8):
        assert torch.equal(undo_dihedral(dihedral(x, k), k), x)
    views = VIEWS["dihedral"]
    consistent = torch.cat([dihedral(x, k) for k in views])  # labels that already agree across views
    assert torch.allclose(view_mean(consistent, views), consistent, atol=1e-6)
    noisy = consistent + torch.rand(consistent.shape, generator=torch.Generator().manual_seed(1))
    kept = noisy.clone()
    mean = view_mean(noisy, views)
    assert torch.equal(noisy, kept)  # the caller's tensor is left alone
    per_view = mean.unflatten(0, (len(views), -1))
    base = undo_dihedral(per_view[0], views[0])
    for j, k in enumerate(views):  # every view holds the same map, seen under its own symmetry
        assert torch.allclose(per_view[j], dihedral(base, k), atol=1e-6)
    assert not torch.allclose(mean, noisy)


def test_label_views_mean_makes_the_teachers_labels_agree_across_an_images_views(lite0_64) -> None:
    """With --label-views mean the soft labels and coarse masks of every view of an image (support or unlabeled)
    are one map under the view's symmetry; the hard labels and the crops' labels are untouched."""
    images, labels = _support()
    teacher = build_teacher(lite0_64, MCFG)
    support = encode_support(lite0_64, images, labels, 1)
    unlabeled = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    views, m = VIEWS["hflip"], len(images)
    args = (teacher, support, images, labels, views, unlabeled, views, 1)
    own = _view_bank(*args, torch.Generator().manual_seed(0))
    mean = _view_bank(*args, torch.Generator().manual_seed(0), 1, "mean")
    assert torch.equal(own.hard, mean.hard) and torch.equal(own.source, mean.source)
    crops = slice(len(views) * m, len(views) * m + m)
    assert torch.equal(own.soft[crops], mean.soft[crops])
    for start, n in ((0, m), (len(own.source) - len(views) * 2, 2)):
        block = slice(start, start + len(views) * n)
        for a, b in (
            (own.soft[block].float(), mean.soft[block].float()),
            (own.coarse[0][block], mean.coarse[0][block]),
        ):
            per_view = b.unflatten(0, (len(views), n))
            for j, k in enumerate(views):
                assert torch.allclose(undo_dihedral(per_view[j], k), per_view[0], atol=2e-3)
            assert not torch.allclose(a, b, atol=1e-3)  # a random teacher disagrees with itself across views
            assert torch.allclose(a.mean(), b.mean(), atol=1e-3)  # a mean of its labels, not new ones
    with pytest.raises(SystemExit):
        main(["adapt", "--label-views", "median", "--data", "x", "--out", "y"])


def test_fast_ema_ends_with_the_moving_average_of_the_steps_weights(lite0_64) -> None:
    """--fast-ema d: the student's weights after n steps are a_n, a_1 = w_1, a_t = d a_(t-1) + (1 - d) w_t, where
    w_t are the weights the same training (same seed) has after t steps without averaging."""
    images, labels = _support()
    support = encode_support(lite0_64, images, labels, 1)
    bank = _view_bank(build_teacher(lite0_64, MCFG), support, images, labels, (0, 1), None, (0,))
    start = build_fast_student(lite0_64, 1, S)

    def weights(steps: int, decay: float) -> list[torch.Tensor]:
        fast = copy.deepcopy(start)
        params = [p for n, p in fast.named_parameters() if not n.startswith("backbone.")]
        cfg = AdaptConfig(lr=1e-2, view_batch=2, fast_ema=decay)
        gen = torch.Generator().manual_seed(0)
        _fit_on_bank(fast, params, bank, labels, cfg, steps, "fast", True, gen, False, lambda r: None)
        return [p.detach().clone() for p in params]

    d = 0.6
    expected = weights(1, 0.0)
    for t in (2, 3):
        expected = [d * a + (1 - d) * w for a, w in zip(expected, weights(t, 0.0))]
    averaged = weights(3, d)
    assert all(torch.allclose(a, e, atol=1e-6) for a, e in zip(averaged, expected))
    assert not all(torch.allclose(a, w) for a, w in zip(averaged, weights(3, 0.0)))
    with pytest.raises(UserError, match="fast-ema"):
        AdaptConfig(fast_ema=1.0)


def test_fast_only_flags_with_the_paper_student_are_a_clear_error(tmp_path: Path, capsys) -> None:
    data = write_dataset(tmp_path / "d", n_train=3)
    out = tmp_path / "m"
    for flags in (
        ["--label-views", "mean"],
        ["--fast-ema", "0.9"],
        ["--fast-crops", "2", "--fast-ema", "0.9"],
        ["--fast-labels", "teacher"],
    ):
        argv = ["adapt", "--support", str(data), "--shots", "2", "--student", "paper", "--out", str(out), *flags]
        assert main(argv + SMALL) == 2
        err = capsys.readouterr().err
        assert flags[0] in err and "fast student only" in err
        assert not out.exists()  # nothing written


def test_probe_labels_come_from_a_probe_that_never_saw_the_views_image(lite0_64) -> None:
    """--fast-labels teacher+probe: the views of support image i are labelled by a probe fitted on the other support
    images (the settings the cross-validation chose kept), the unlabeled views by the probe fitted on them all."""
    images, labels = _support()
    support = encode_support(lite0_64, images, labels, 1)
    unlabeled = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    views, m = VIEWS["hflip"], len(images)
    bank = _view_bank(build_teacher(lite0_64, MCFG), support, images, labels, views, unlabeled, views)
    kept = labels.clone()
    soft, settings = probe_labels(lite0_64, bank, labels, views, 1)
    assert torch.equal(labels, kept)  # the caller's labels are left alone
    assert soft.shape == (len(bank.source), 2, S, S)
    assert torch.allclose(soft.sum(dim=1), torch.ones(()), atol=1e-5)
    assert settings["cv"] == "leave-one-image-out" and settings["grid_size"] > 1
    fixed = {k: settings[k] for k in ("l2", "levels", "balanced")}
    full = LinearProbe(lite0_64, 1, **fixed)
    full.fit_features(_select(bank.pyramid, slice(0, m)), labels)
    for i in range(m):
        others = torch.tensor([j for j in range(m) if j != i])
        probe = LinearProbe(lite0_64, 1, **fixed)
        probe.fit_features(_select(bank.pyramid, others), labels[others])
        own = (bank.source == i).nonzero().flatten()
        expected = probe.forward_features(_select(bank.pyramid, own), (S, S)).softmax(dim=1)
        assert torch.allclose(soft[own], expected, atol=1e-5)
        assert not torch.allclose(soft[own], full.forward_features(_select(bank.pyramid, own), (S, S)).softmax(1))
    unl = (bank.source < 0).nonzero().flatten()
    expected = full.forward_features(_select(bank.pyramid, unl), (S, S)).softmax(dim=1)
    assert torch.allclose(soft[unl], expected, atol=1e-5)
    # one support image: no other to fit on, its views are labelled by the probe fitted on it
    one = _view_bank(build_teacher(lite0_64, MCFG), support, images[:1], labels[:1], views, None, views)
    soft1, settings1 = probe_labels(lite0_64, one, labels[:1], views, 1)
    assert settings1["cv"] == "leave-one-quadrant-out" and soft1.shape[0] == len(views)


def test_fast_labels_teacher_and_probe_mix_the_soft_labels_and_record_the_probe(lite0_64) -> None:
    images, labels = _support()
    support = encode_support(lite0_64, images, labels, 1)
    teacher = build_teacher(lite0_64, MCFG)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = AdaptConfig(student="fast", fast_iterations=2, fast_labels="teacher+probe", seed=1)
    fast, rows = distill_fast(teacher, support, images, labels, cfg, progress=False)
    again, _ = distill_fast(teacher, support, images, labels, cfg, progress=False)
    plain, _ = distill_fast(teacher, support, images, labels, replace(cfg, fast_labels="teacher"), progress=False)
    assert [r["stage"] for r in rows] == ["fast", "fast"] and all("loss" in r for r in rows)  # step rows only
    assert {"l2", "levels", "balanced", "cv_miou"} <= set(rows[0]["probe"]) and "probe" not in rows[1]
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())  # the teacher is left alone
    weights = list(fast.state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(weights, again.state_dict().values()))  # repeatable
    assert not all(torch.equal(a, b) for a, b in zip(weights, plain.state_dict().values()))  # other labels
    with pytest.raises(SystemExit):
        main(["adapt", "--fast-labels", "probe", "--data", "x", "--out", "y"])
