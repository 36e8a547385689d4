from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from distillfss.adapt import adapt
from distillfss.attention import MaskAttention, reference_mask_attention
from distillfss.config import AdaptConfig, ModelConfig
from distillfss.decoder import NEG, merge_one_vs_all
from distillfss.student import ConvDist, build_student
from distillfss.teacher import build_teacher, encode_support
from distillfss.transfer import TRAINABLE_SETS, trainable_parameters

S = 64


def _support(k: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(k, 3, S, S, generator=g)
    labels = torch.randint(0, num_classes + 1, (k, S // 8, S // 8), generator=g)
    labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)  # blocky masks
    return images, labels


def _teacher(bb, num_classes: int, heads: int = 2):
    torch.manual_seed(0)
    cfg = ModelConfig(
        backbone="efficientnet_lite0", image_size=S, heads=heads, heads_stride8=1, num_classes=num_classes
    )
    return build_teacher(bb, cfg).eval()


@pytest.mark.parametrize("k,num_classes", [(1, 1), (3, 1), (4, 3)])
def test_teacher_shapes(lite0_64, k: int, num_classes: int) -> None:
    teacher = _teacher(lite0_64, num_classes)
    images, labels = _support(k, num_classes)
    support = encode_support(lite0_64, images, labels, num_classes)
    out = teacher(torch.rand(2, 3, S, S), support)
    assert out.logits.shape == (2, num_classes + 1, S, S)
    assert out.class_logits.shape == (2, num_classes, 2, S, S)
    for c, li in zip(out.coarse, lite0_64.layer_info):
        assert c.shape == (2, num_classes, S // li.stride, S // li.stride)
        assert c.min() >= 0 and c.max() <= 1 + 1e-5


def test_fused_attention_equals_naive_reference() -> None:
    torch.manual_seed(0)
    block = MaskAttention(dim=16, heads=4)
    torch.nn.init.normal_(block.q_proj.weight, std=0.3)
    query, support = torch.randn(3, 16, 4, 5), torch.randn(2, 16, 4, 5)
    n_tok = 2 * 4 * 5
    masks = torch.rand(3, n_tok)  # 3 classes
    valid = torch.rand(3, 3, n_tok) > 0.4
    valid[0, 1] = False  # a class with no shot for one query
    fused = block(query, block.keys(support), masks, valid.float())
    ref = reference_mask_attention(block, query, support, masks, valid)
    assert_close(fused, ref, atol=1e-5, rtol=1e-4)
    assert (fused[0, 1] == 0).all()


def test_k_identical_shots_equal_one_shot(lite0_64) -> None:
    teacher = _teacher(lite0_64, 2)
    images, labels = _support(1, 2)
    query = torch.rand(2, 3, S, S)
    one = teacher(query, encode_support(lite0_64, images, labels, 2))
    many = teacher(query, encode_support(lite0_64, images.repeat(4, 1, 1, 1), labels.repeat(4, 1, 1), 2))
    assert_close(many.logits, one.logits, atol=1e-4, rtol=1e-4)


def test_shot_order_does_not_matter(lite0_64) -> None:
    teacher = _teacher(lite0_64, 2)
    images, labels = _support(4, 2)
    query = torch.rand(1, 3, S, S)
    a = teacher(query, encode_support(lite0_64, images, labels, 2))
    perm = torch.tensor([2, 0, 3, 1])
    b = teacher(query, encode_support(lite0_64, images[perm], labels[perm], 2))
    assert_close(a.logits, b.logits, atol=5e-4, rtol=1e-4)  # float32 sums in another order


def test_class_without_shots_is_never_predicted(lite0_64) -> None:
    teacher = _teacher(lite0_64, 3)
    images, labels = _support(3, 3)
    labels[labels == 2] = 0  # class 2 has no shot
    out = teacher(torch.rand(2, 3, S, S), encode_support(lite0_64, images, labels, 3))
    assert (out.logits.argmax(1) != 2).all()
    assert (out.logits[:, 2] == NEG).all()


def test_merge_rule_hand_computed() -> None:
    # one pixel, two classes: class 2 has the larger fg logit, so bg comes from class 2's head
    logits = torch.tensor([[[1.0, 2.0], [0.5, 3.0]]]).view(1, 2, 2, 1, 1)  # (B, C, [bg, fg], 1, 1)
    merged = merge_one_vs_all(logits, torch.tensor([[True, True]]))
    assert merged.flatten().tolist() == [0.5, 2.0, 3.0]
    merged = merge_one_vs_all(logits, torch.tensor([[True, False]]))  # class 2 absent
    assert merged.flatten().tolist() == [1.0, 2.0, NEG]


def test_batched_convdist_equals_per_class_blocks() -> None:
    torch.manual_seed(0)
    heads = ConvDist(channels=8, num_classes=3)
    x = torch.randn(2, 8, 5, 5)
    out = heads(x)
    for c in range(3):
        conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        conv1.weight.data = heads.conv1.weight[c * 8 : (c + 1) * 8]
        conv1.bias.data = heads.conv1.bias[c * 8 : (c + 1) * 8]
        conv2 = torch.nn.Conv2d(8, 1, 1)
        conv2.weight.data = heads.conv2.weight[c : c + 1]
        conv2.bias.data = heads.conv2.bias[c : c + 1]
        assert_close(out[:, c : c + 1], conv2(torch.relu(conv1(x))))


def test_student_needs_no_support(lite0_64) -> None:
    teacher = _teacher(lite0_64, 2)
    student = build_student(lite0_64, teacher.decoder, 2).eval()
    out = student(torch.rand(3, 3, S, S))
    assert out.logits.shape == (3, 3, S, S)
    assert student.decoder is teacher.decoder  # shared, not copied


@pytest.mark.parametrize("which", sorted(TRAINABLE_SETS))
def test_training_step_touches_only_trainable_parts(lite0_64, which: str) -> None:
    images, labels = _support(3, 2)
    cfg = ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2, num_classes=2)
    backbone_before = {k: v.clone() for k, v in lite0_64.state_dict().items()}
    teacher = build_teacher(lite0_64, cfg)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    result = adapt(
        lite0_64,
        images,
        labels,
        cfg,
        AdaptConfig(student="paper", iterations=1, trainable=which),
        teacher=teacher,
        progress=False,
    )
    trained = result.teacher
    assert trained is not teacher and trained.backbone is lite0_64  # a copy, sharing the frozen backbone
    hot = {id(p) for p in trainable_parameters(trained, which)}
    for n, p in trained.named_parameters():
        if id(p) in hot:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert torch.equal(p, before[n]), n
    for p in result.student.heads.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the caller's teacher is untouched: same values, no gradients
    for n, p in teacher.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n
    assert all(torch.equal(backbone_before[k], v) for k, v in lite0_64.state_dict().items())


def test_adaptation_is_reproducible(lite0_64) -> None:
    images, labels = _support(3, 1)
    cfg = ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2, num_classes=1)
    runs = [
        adapt(lite0_64, images, labels, cfg, AdaptConfig(student="paper", iterations=2, seed=3), progress=False)
        for _ in range(2)
    ]
    assert [r["loss"] for r in runs[0].log] == [r["loss"] for r in runs[1].log]
    x = torch.rand(1, 3, S, S)
    assert_close(runs[0].student(x).logits, runs[1].student(x).logits)


@pytest.mark.parametrize("mode,episodes", [("two_stage", "leave_one_out"), ("joint", "paired")])
def test_modes_and_episode_builders_train(lite0_64, mode: str, episodes: str) -> None:
    images, labels = _support(4, 2)
    cfg = ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2, num_classes=2)
    acfg = AdaptConfig(student="paper", iterations=2, mode=mode, episodes=episodes, trainable="B")
    result = adapt(lite0_64, images, labels, cfg, acfg, progress=False)
    stages = [r["stage"] for r in result.log]
    assert stages == (["teacher"] * 2 + ["student"] * 2 if mode == "two_stage" else ["joint"] * 2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.log)


def test_configs_round_trip_and_ignore_unknown_keys() -> None:
    m = ModelConfig(image_size=96, heads=4, num_classes=3)
    a = AdaptConfig(student="paper", iterations=7, mode="two_stage", seed=5)
    assert ModelConfig.from_dict({**m.to_dict(), "future_field": 1}) == m
    assert AdaptConfig.from_dict(a.to_dict()) == a


@pytest.mark.parametrize("method", ["distill", "transfer"])
def test_save_load_gives_identical_predictions(tmp_path, lite0_64, method: str) -> None:
    from distillfss.model_io import load_model, save_model

    images, labels = _support(3, 2)
    cfg = ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2, num_classes=2)
    result = adapt(
        lite0_64, images, labels, cfg, AdaptConfig(student="paper", iterations=2, method=method), progress=False
    )
    model = result.student if method == "distill" else result.teacher
    save_model(tmp_path, model, cfg, ("background", "a", "b"), {}, support=(images, labels))
    loaded = load_model(tmp_path, backbone=lite0_64)
    x = torch.rand(2, 3, S, S)
    with torch.no_grad():
        before = (
            model(x).logits if method == "distill" else model(x, encode_support(lite0_64, images, labels, 2)).logits
        )
    assert_close(loaded.predictor.logits(x), before, atol=1e-5, rtol=1e-5)


def test_bf16_inference_agrees_with_fp32(lite0_64) -> None:
    from distillfss.predictor import Predictor

    images, labels = _support(3, 1)
    cfg = ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2, num_classes=1)
    student = adapt(lite0_64, images, labels, cfg, AdaptConfig(student="paper", iterations=3), progress=False).student
    x = torch.rand(2, 3, S, S)
    fp32 = Predictor(student, S).logits(x)
    fast = Predictor(student, S, precision="bf16").logits(x)
    assert fast.dtype == torch.float32
    assert_close(fast, fp32, atol=0.1 * fp32.abs().max().item(), rtol=0.05)


def test_voting_with_one_chunk_equals_the_plain_teacher(lite0_64) -> None:
    teacher = _teacher(lite0_64, 2)
    images, labels = _support(4, 2)
    support = encode_support(lite0_64, images, labels, 2)
    query = lite0_64(torch.rand(2, 3, S, S))
    with torch.no_grad():
        plain = teacher.forward_features(query, support).logits
        voted = teacher.forward_voting(query, support, chunk=10)
        assert_close(voted, plain, atol=1e-5, rtol=1e-5)
        # Chunks of one shot: each class's foreground logit is the max over its single-shot runs.
        one = teacher.forward_voting(query, support, chunk=1)
        singles = [
            teacher.forward_features(query, support.subset(torch.tensor([k]))).class_logits[:, :, 1]
            for k in range(4)
            if support.flags[k].any()
        ]
    fg_max = torch.stack(singles).amax(0)  # (B, C, S, S) (NEG where a class is absent from a shot)
    assert_close(one[:, 1:], fg_max.clamp_min(-1e4), atol=1e-4, rtol=1e-4)


def test_one_shot_adaptation_learns_from_its_single_image(lite0_64) -> None:
    images, labels = _support(1, 1)
    cfg = ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2, num_classes=1)
    result = adapt(lite0_64, images, labels, cfg, AdaptConfig(student="paper", iterations=3), progress=False)
    assert all(r["focal_teacher"] > 0 for r in result.log)  # the image is not reduced to all-background
