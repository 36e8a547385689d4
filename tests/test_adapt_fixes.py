"""The adaptation step trains as the model infers, and gives the same answer for the same input (issue 9)."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.testing import assert_close

from distillfss.adapt import _episodes, adapt, teacher_targets
from distillfss.attention import MaskAttention, reference_mask_attention
from distillfss.config import AdaptConfig, ModelConfig
from distillfss.errors import UserError
from distillfss.losses import coarse_mse
from distillfss.predictor import Predictor
from distillfss.teacher import build_teacher, encode_support

S = 64
adapt_mod = importlib.import_module("distillfss.adapt")  # the package exports a function of that name


def _cfg(num_classes: int) -> ModelConfig:
    return ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2, num_classes=num_classes)


def _two_class_support() -> tuple[torch.Tensor, torch.Tensor]:
    """Three images: class 1 in all of them, class 2 in image 0 only."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, S, S, generator=g)
    labels = torch.zeros(3, S, S, dtype=torch.long)
    labels[:, 8:24, 8:24] = 1
    labels[0, 40:56, 40:56] = 2
    return images, labels


def _focal_targets(monkeypatch, backbone, images, labels, cfg: AdaptConfig) -> list[torch.Tensor]:
    """The target of every focal loss one two-class adaptation computes, in order."""
    seen: list[torch.Tensor] = []
    real = adapt_mod.focal_loss

    def spy(logits, target, *args, **kwargs):
        seen.append(target.clone())
        return real(logits, target, *args, **kwargs)

    monkeypatch.setattr(adapt_mod, "focal_loss", spy)
    adapt(backbone, images, labels, _cfg(2), cfg, progress=False)
    return seen


def test_self_match_far_beyond_every_allowed_match_is_excluded_exactly() -> None:
    """A query that is support shot 0 itself, with a self-match leading by far more than 40 nats, excluded from its
    own keys: the result equals a plain softmax over the allowed shots only."""
    torch.manual_seed(0)
    block = MaskAttention(dim=8, heads=1)
    support = torch.randn(3, 8, 4, 4) * 0.3
    support[0] = torch.randn(8, 4, 4) * 10.0  # large features: the self-match score grows with their norm
    query = support[:1].clone()  # the query is shot 0
    masks = torch.rand(2, 3 * 16)  # 2 classes
    valid = torch.ones(1, 2, 3 * 16)
    valid[:, :, :16] = 0  # shot 0 (the query itself) is nobody's shot
    valid[0, 1, 16:32] = 0  # class 2 may use shot 2 only

    keys = block.keys(support)
    q = block._tokens(query, block.q_proj)  # (1, heads, 16, d)
    scores = (q @ keys.transpose(1, 2))[0, 0] / math.sqrt(8)  # (16, 48)
    lead = scores[:, :16].amax(1) - scores[:, 16:].amax(1)
    assert lead.min() > 40  # every query token: the self-match leads by more than 40 nats

    fused = block(query, keys, masks, valid)
    ref = reference_mask_attention(block, query, support, masks, valid.bool())
    assert_close(fused, ref, atol=1e-5, rtol=1e-4)


def test_episodes_use_only_the_shots_that_contain_each_class() -> None:
    flags = torch.tensor([[True, True], [True, False], [True, False]])  # (K, C): class 2 in image 0 only
    valid, queries = _episodes(AdaptConfig(), flags, torch.Generator())
    assert valid.shape == (3, 2, 3) and queries.tolist() == [0, 1, 2]
    assert not valid[torch.arange(3), :, torch.arange(3)].any()  # never its own shot
    assert valid[:, 1].sum() == 2 and valid[1, 1, 0] and valid[2, 1, 0]  # class 2: only image 0, when not the query
    assert valid[:, 0].sum() == 6  # class 1: every other image
    paired, _ = _episodes(AdaptConfig(episodes="paired"), flags, torch.Generator().manual_seed(1))
    assert not (paired & ~flags.T.unsqueeze(0)).any()


def test_teacher_target_hides_classes_without_shots_and_the_student_sees_full_labels(lite0_64, monkeypatch) -> None:
    images, labels = _two_class_support()
    valid, queries = _episodes(AdaptConfig(), torch.tensor([[True, True], [True, False], [True, False]]), None)
    target, present = teacher_targets(labels[queries], valid)
    assert present.tolist() == [[True, False], [True, True], [True, True]]
    assert (target[0] == 2).sum() == 0 and (target[0] == 1).sum() == (labels[0] == 1).sum()  # class 2 -> background
    assert torch.equal(target[1:], labels[1:])

    # one step: the teacher's focal, then the student's
    teacher_t, student_t = _focal_targets(monkeypatch, lite0_64, images, labels, AdaptConfig(iterations=1))
    assert torch.equal(teacher_t, target)
    assert torch.equal(student_t, labels)  # the student is trained on the full labels, class 2 included


def test_adapt_changes_nothing_the_caller_passed_and_no_global_random_state(lite0_64) -> None:
    images, labels = _two_class_support()
    torch.manual_seed(123)
    teacher = build_teacher(lite0_64, _cfg(2))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    formats = {n: p.is_contiguous(memory_format=torch.channels_last) for n, p in teacher.named_parameters()}
    images_before, labels_before = images.clone(), labels.clone()
    rng = torch.get_rng_state()
    result = adapt(
        lite0_64, images, labels, _cfg(2), AdaptConfig(iterations=2, trainable="B"), teacher=teacher, progress=False
    )
    assert torch.equal(torch.get_rng_state(), rng)  # seeding is private to the run
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert formats == {n: p.is_contiguous(memory_format=torch.channels_last) for n, p in teacher.named_parameters()}
    assert torch.equal(images, images_before) and torch.equal(labels, labels_before)
    # Predicting leaves the model (and the shared backbone) exactly as it was.
    state = {k: v.clone() for k, v in result.student.state_dict().items()}
    Predictor(result.student, S).logits(torch.rand(1, 3, S, S))
    assert all(torch.equal(v, state[k]) for k, v in result.student.state_dict().items())


def test_same_seed_same_weights_whatever_ran_before(lite0_64) -> None:
    images, labels = _two_class_support()
    cfg = AdaptConfig(iterations=2, trainable="B", seed=4)
    first = adapt(lite0_64, images, labels, _cfg(2), cfg, progress=False)
    torch.rand(100)  # the process's random state moves on
    adapt(lite0_64, images, labels, _cfg(2), AdaptConfig(iterations=1, seed=9), progress=False)
    again = adapt(lite0_64, images, labels, _cfg(2), cfg, progress=False)
    for (n, a), b in zip(first.student.state_dict().items(), again.student.state_dict().values()):
        assert torch.equal(a, b), n


_FRESH = textwrap.dedent(
    """
    import hashlib, sys, torch
    from distillfss.adapt import adapt
    from distillfss.backbones import build_backbone
    from distillfss.config import AdaptConfig, ModelConfig
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 64, generator=g)
    labels = (torch.rand(3, 8, 8, generator=g) > 0.6).long().repeat_interleave(8, 1).repeat_interleave(8, 2)
    bb = build_backbone("efficientnet_lite0", 64)
    cfg = ModelConfig(backbone="efficientnet_lite0", image_size=64, heads=2, num_classes=1)
    r = adapt(bb, images, labels, cfg, AdaptConfig(iterations=3, trainable="B", seed=int(sys.argv[1])), progress=False)
    h = hashlib.sha256()
    for t in [*r.teacher.state_dict().values(), *r.student.state_dict().values()]:
        h.update(t.detach().contiguous().numpy().tobytes())
    print(h.hexdigest())
    """
)


def test_two_fresh_processes_give_identical_weights() -> None:
    digests = [
        subprocess.run([sys.executable, "-c", _FRESH, "0"], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert digests[0] == digests[1] and len(digests[0].strip()) == 64


def test_predictor_votes_when_a_class_has_more_shots_than_the_chunk(lite0_64) -> None:
    torch.manual_seed(0)
    teacher = build_teacher(lite0_64, _cfg(1)).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, S, S, generator=g)
    labels = (torch.rand(4, S // 8, S // 8, generator=g) > 0.5).long().repeat_interleave(8, 1).repeat_interleave(8, 2)
    support = encode_support(lite0_64, images, labels, 1)
    x = torch.rand(2, 3, S, S)
    with torch.no_grad():
        feats = lite0_64(x)
        voted = teacher.forward_voting(feats, support, chunk=2)
        plain = teacher.forward_features(feats, support).logits
    assert not torch.allclose(voted, plain, atol=1e-4)  # the two differ here, so the check below means something
    assert Predictor(teacher, S, support, vote_chunk=2).voting
    assert_close(Predictor(teacher, S, support, vote_chunk=2).logits(x), voted, atol=1e-5, rtol=1e-5)
    assert_close(Predictor(teacher, S, support, vote_chunk=0).logits(x), plain, atol=1e-5, rtol=1e-5)
    assert not Predictor(teacher, S, support, vote_chunk=10).voting  # 4 shots fit one chunk


def test_coarse_dropout_zeroes_whole_episode_classes_in_new_tensors_and_only_when_asked(lite0_64, monkeypatch) -> None:
    """The regulariser zeroes an (episode, class)'s coarse masks at every layer at once, never touches its input,
    and p = 0 leaves the training path exactly as it was (the decoder sees the attention's masks)."""
    g = torch.Generator().manual_seed(0)
    coarse = [torch.rand(400, 3, 8, 8, generator=g) + 0.1, torch.rand(400, 3, 4, 4, generator=g) + 0.1]
    before = [c.clone() for c in coarse]
    assert adapt_mod.coarse_dropout(coarse, 0.0, g) is coarse
    out = adapt_mod.coarse_dropout(coarse, 0.3, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(coarse, before))  # the input is unchanged
    dropped = [(o.flatten(2) == 0).all(dim=2) for o in out]  # (B, C) per layer
    kept = [torch.equal(o[~d], c[~d]) for o, c, d in zip(out, coarse, dropped)]
    assert torch.equal(dropped[0], dropped[1]) and all(kept)  # one draw for all layers; the rest untouched
    assert 0.25 < dropped[0].float().mean().item() < 0.35

    seen: list[list[torch.Tensor]] = []
    real = adapt_mod.Teacher.decode

    def spy(self, coarse, query, present):
        seen.append([c.detach().clone() for c in coarse])
        return real(self, coarse, query, present)

    monkeypatch.setattr(adapt_mod.Teacher, "decode", spy)
    images, labels = _two_class_support()
    for p in (0.0, 0.9):
        seen.clear()
        adapt(lite0_64, images, labels, _cfg(2), AdaptConfig(iterations=3, coarse_dropout=p), progress=False)
        # class 1 has shots in every episode (class 2's masks are zero where it has none, dropout or not)
        zeroed = torch.stack([(c[0][:, 0].flatten(1) == 0).all(dim=1) for c in seen])  # (steps, episodes)
        assert zeroed.any() if p else not zeroed.any(), p


@pytest.mark.parametrize("symmetry", [0, 3, 6])
def test_one_support_image_attends_outside_each_positions_own_cell(symmetry: int) -> None:
    """K = 1 with a grid: every query position's coarse mask is a plain softmax over the image's tokens outside its
    own cell, so it is no look-up of its own mask; for a view of the image (a symmetry of it), a position's cell is
    that of the image position it shows."""
    g = torch.Generator().manual_seed(0)
    block = MaskAttention(dim=8, heads=2)
    feats = torch.randn(1, 8, 6, 6, generator=g) * 3.0
    view = adapt_mod.dihedral(feats, symmetry)
    masks = (torch.rand(2, 36, generator=g) > 0.5).float()  # 2 classes over the image's 36 tokens
    valid = torch.ones(1, 2, 36)
    valid[0, 1, :3] = 0  # class 2 may not use three tokens (a class's own restriction is kept)
    out = adapt_mod._own_cell_excluded(block, view, block.keys(feats), masks, valid, 2, symmetry)

    key_cells = adapt_mod.grid_cells(6, 6, 2)
    assert (
        key_cells.flatten().tolist()[:6] == [0, 0, 0, 1, 1, 1]
        and key_cells.flatten().tolist()[-6:] == [2] * 3 + [3] * 3
    )
    cells = adapt_mod.dihedral(key_cells, symmetry).flatten()  # the image cell each view position shows
    ref = torch.zeros(1, 2, 36)
    for c in range(4):
        allowed = valid * (key_cells.flatten() != c).float()
        plain = reference_mask_attention(block, view, feats, masks, allowed.bool()).flatten(2)
        ref[..., cells == c] = plain[..., cells == c]
    assert_close(out.flatten(2), ref, atol=1e-5, rtol=1e-4)
    whole = block(view, block.keys(feats), masks, valid).flatten(2)  # the image as its own shot
    assert (whole - out.flatten(2)).abs().amax() > 0.1


def test_the_grid_applies_to_one_support_image_only(lite0_64, monkeypatch) -> None:
    """In the teacher's training and in the labels of the fast student's bank (each support view with its
    symmetry), at K = 1 only; never with grid 1."""
    calls: list[tuple[int, int]] = []
    real = adapt_mod._own_cell_excluded

    def spy(block, q, keys, masks, valid, grid, symmetry=0):
        calls.append((grid, symmetry))
        return real(block, q, keys, masks, valid, grid, symmetry)

    monkeypatch.setattr(adapt_mod, "_own_cell_excluded", spy)
    images, labels = _two_class_support()
    for k, grid, used in ((1, 2, True), (1, 1, False), (2, 2, False)):
        calls.clear()
        cfg = AdaptConfig(student="fast", iterations=2, fast_iterations=1, fast_views="flips", one_shot_grid=grid)
        adapt(lite0_64, images[:k], labels[:k], _cfg(2), cfg, progress=False)
        assert bool(calls) == used and all(g == grid for g, _ in calls), (k, grid)
        if used:  # training (the image itself) and the bank's four flips of it
            assert {sym for _, sym in calls} == {0, 1, 2, 3}


# The per-fix ablation (config.LEGACY_STEPS): each switch brings back its step's old behaviour, and on a support
# set where every image holds every class the class-related ones cannot change anything (the bundled sets).


def test_legacy_self_in_softmax_brings_back_the_underflow_the_fix_removed() -> None:
    torch.manual_seed(0)
    block = MaskAttention(dim=8, heads=1)
    support = torch.randn(3, 8, 4, 4) * 0.3
    support[0] = torch.randn(8, 4, 4) * 10.0  # the query's self-match leads by > 40 nats (test above)
    query, masks = support[:1].clone(), torch.rand(1, 3 * 16)
    valid = torch.ones(1, 1, 3 * 16)
    valid[:, :, :16] = 0  # the query's own image is nobody's shot
    keys = block.keys(support)
    ref = reference_mask_attention(block, query, support, masks, valid.bool())
    assert_close(block(query, keys, masks, valid), ref, atol=1e-5, rtol=1e-4)
    old = block(query, keys, masks, valid, exclude_unusable=False)
    assert (old - ref).abs().max() > 0.05  # the ratio alone: numerator and denominator underflow together


def test_legacy_shots_without_class_gives_every_class_every_other_image() -> None:
    flags = torch.tensor([[True, True], [True, False], [True, False]])
    old, _ = _episodes(AdaptConfig(legacy=("shots_without_class",)), flags, torch.Generator())
    assert torch.equal(old, (~torch.eye(3, dtype=torch.bool)).unsqueeze(1).expand(-1, 2, -1))


def test_legacy_mse_per_pair_weights_episodes_by_their_class_count() -> None:
    t = [torch.zeros(2, 2, 1, 1)]
    s = [torch.tensor([[[[1.0]], [[1.0]]], [[[3.0]], [[0.0]]]])]  # episode 0: both classes err 1; episode 1: 9
    present = torch.tensor([[True, True], [True, False]])
    assert coarse_mse(t, s, (8,), present).item() == pytest.approx((1 + 9) / 2)  # per episode, then episodes
    assert coarse_mse(t, s, (8,), present, per_pair=True).item() == pytest.approx((1 + 1 + 9) / 3)
    everywhere = torch.ones(2, 2, dtype=torch.bool)
    assert coarse_mse(t, s, (8,), everywhere) == coarse_mse(t, s, (8,), everywhere, per_pair=True)


def test_legacy_student_target_is_the_teachers_relabelled_target(lite0_64, monkeypatch) -> None:
    images, labels = _two_class_support()  # class 2 in image 0 only: hidden from episode 0's teacher target
    cfg = AdaptConfig(iterations=1, legacy=("student_relabelled",))
    teacher_t, student_t = _focal_targets(monkeypatch, lite0_64, images, labels, cfg)
    assert torch.equal(student_t, teacher_t) and not torch.equal(student_t, labels)


def test_class_fixes_change_nothing_when_every_support_image_holds_every_class(lite0_64) -> None:
    """The bundled sets: every train image holds every class, so only the self-match fix can move their numbers."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, S, S, generator=g)
    labels = torch.zeros(3, S, S, dtype=torch.long)
    labels[:, 8:24, 8:24] = 1
    labels[:, 40:56, 40:56] = 2

    def weights(*legacy: str) -> list[torch.Tensor]:
        r = adapt(lite0_64, images, labels, _cfg(2), AdaptConfig(iterations=2, legacy=legacy), progress=False)
        return [*r.teacher.state_dict().values(), *r.student.state_dict().values()]

    base = weights()
    for step in ("shots_without_class", "student_relabelled", "mse_per_pair"):
        assert all(torch.equal(a, b) for a, b in zip(base, weights(step))), step
    assert not all(torch.equal(a, b) for a, b in zip(base, weights("self_in_softmax")))


def test_unknown_legacy_step_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="legacy: unknown step.*nope.*shots_without_class"):
        AdaptConfig(legacy=("nope",))
    assert AdaptConfig.from_dict(AdaptConfig(legacy=("mse_per_pair",)).to_dict()).legacy == ("mse_per_pair",)
