"""Adaptation cost linear in K: capped shots per episode, and attention dropout in bounded memory (issue 12)."""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch
from torch.testing import assert_close

from distillfss.adapt import adapt
from distillfss.attention import _sdpa, query_rows
from distillfss.config import AdaptConfig, ModelConfig
from distillfss.errors import UserError
from distillfss.teacher import build_teacher, encode_support
from distillfss.transfer import capped_shots, coarse_masks

S = 64
attention_mod = importlib.import_module("distillfss.attention")


def _support(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(k, 3, S, S, generator=g)
    labels = torch.zeros(k, S, S, dtype=torch.long)
    for i in range(k):
        labels[i, 4 * (i % 8) : 4 * (i % 8) + 20, 10:30] = 1
    labels[k - 1] = 0  # one shot without the class: it may serve no episode
    return images, labels


def test_capped_shots_are_distinct_others_and_seeded() -> None:
    picks = capped_shots(12, 5, torch.Generator().manual_seed(3))
    assert picks.shape == (12, 5)
    assert not (picks == torch.arange(12).view(-1, 1)).any()  # never the query itself
    assert all(len(set(row)) == 5 for row in picks.tolist())
    assert torch.equal(picks, capped_shots(12, 5, torch.Generator().manual_seed(3)))
    assert not torch.equal(picks, capped_shots(12, 5, torch.Generator().manual_seed(4)))


def test_gathered_episode_keys_equal_attention_over_the_whole_support_restricted_to_the_picks(lite0_64) -> None:
    """Per-episode keys (cost O(n)) give what the shared keys with every other shot masked out give (cost O(K))."""
    images, labels = _support(7)
    cfg = ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2, num_classes=1)
    teacher = build_teacher(lite0_64, cfg).eval()
    support = encode_support(lite0_64, images, labels, 1)
    picks = capped_shots(7, 3, torch.Generator().manual_seed(0))
    shot_valid = support.flags[picks].transpose(1, 2)  # (7, 1, 3)
    full = torch.zeros(7, 1, 7, dtype=torch.bool)
    full[torch.arange(7).view(-1, 1), :, picks] = shot_valid.transpose(1, 2)
    with torch.no_grad():
        gathered = coarse_masks(teacher, support, support.pyramid, shot_valid, picks)
        masked = coarse_masks(teacher, support, support.pyramid, full, None)
    for a, b in zip(gathered, masked):
        assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # a few seconds; CI runs the slow tests (.ci/run)
def test_adapt_with_capped_shots_is_deterministic_and_records_the_cap(lite0_64) -> None:
    images, labels = _support(6)
    cfg = ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2, num_classes=1)
    acfg = AdaptConfig(student="paper", iterations=2, max_shots=2, trainable="C")
    a = adapt(lite0_64, images, labels, cfg, acfg, progress=False)
    b = adapt(lite0_64, images, labels, cfg, acfg, progress=False)
    for (name, p), q in zip(a.student.state_dict().items(), b.student.state_dict().values()):
        assert torch.equal(p, q), name
    assert acfg.to_dict()["max_shots"] == 2
    uncapped = adapt(
        lite0_64, images, labels, cfg, AdaptConfig(student="paper", iterations=2, trainable="C"), progress=False
    )
    assert not torch.equal(a.teacher.decoder.mixer1[0].weight, uncapped.teacher.decoder.mixer1[0].weight)


@pytest.mark.parametrize(("field", "value"), [("max_shots", -1), ("iterations", 0), ("view_batch", 0)])
def test_bad_schedule_values_are_user_errors(field: str, value: int) -> None:
    with pytest.raises(UserError, match=field):
        AdaptConfig(**{field: value})


def test_attention_with_dropout_splits_queries_to_bound_memory_and_stays_exact(monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 50, 8, generator=g), torch.randn(2, 2, 70, 8, generator=g)
    values = torch.rand(2, 3, 70, generator=g)
    whole = _sdpa(q, k, values, dropout_p=1e-12)  # dropout that (almost surely) drops nothing: exactness
    monkeypatch.setattr(attention_mod, "SCORE_BYTES", 2 * 2 * 70 * 4 * 7)  # 7 query rows per call
    assert query_rows(q.shape, 70, 4) == 7
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        attention_mod.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw)
    )
    split = _sdpa(q, k, values, dropout_p=1e-12)
    assert calls == [7] * 7 + [1]
    assert_close(split, whole)


@pytest.mark.parametrize(("trainable", "attention_runs"), [("A", 1), ("C", 3)])
def test_capped_episodes_are_drawn_once_for_a_frozen_attention_and_each_step_for_a_trained_one(
    lite0_64, monkeypatch, trainable: str, attention_runs: int
) -> None:
    transfer_mod = importlib.import_module("distillfss.transfer")
    calls = []
    real = transfer_mod.coarse_masks
    monkeypatch.setattr(transfer_mod, "coarse_masks", lambda *a: calls.append(a[4]) or real(*a))
    images, labels = _support(6)
    cfg = ModelConfig(backbone="efficientnet_lite0", image_size=S, heads=2, num_classes=1)
    adapt(
        lite0_64,
        images,
        labels,
        cfg,
        AdaptConfig(student="paper", iterations=3, max_shots=2, trainable=trainable),
        progress=False,
    )
    assert len(calls) == attention_runs and all(c.shape == (6, 2) for c in calls)


@pytest.mark.slow
def test_speed_adapt_writes_a_table_of_step_times(tmp_path, capsys) -> None:
    from distillfss.cli import main

    out = tmp_path / "scaling.json"
    argv = ["speed", "--adapt", "--shots", "3,5", "--trainable", "A", "--steps", "2", "--max-shots", "2"]
    argv += ["--backbone", "efficientnet_lite0", "--image-size", "64", "--threads", "1", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shots"], r["max_shots"], r["trainable"]) for r in rows] == [(3, 2, "A"), (5, 2, "A")]
    assert all(r["step_s_median"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    assert "| A | 2 | 5 |" in capsys.readouterr().out  # the table is printed; only --json FILE is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scaling.json"]
    assert main([*argv[:-2], "--json", str(tmp_path / "bad.json"), "--trainable", "D"]) == 2


def test_speed_adapt_times_the_precision_asked_for_and_refuses_compile(monkeypatch, tmp_path) -> None:
    """--precision reaches the timed training steps (not silently fp32); --compile, inference only, is refused."""
    from distillfss import adapt_speed
    from distillfss.cli import main

    seen = []

    def fake_adapt(backbone, images, labels, model_cfg, cfg, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append(cfg.precision)
        raise RuntimeError("stop after the config is known")

    monkeypatch.setattr(adapt_speed, "adapt", fake_adapt)
    job = adapt_speed.AdaptSpeedJob(2, "A", 2, 1, ModelConfig(backbone="efficientnet_lite0", image_size=64), "cpu", 1)
    for precision in ("bf16", "fp32"):
        with pytest.raises(RuntimeError, match="stop after"):
            adapt_speed.measure_adapt(dataclasses.replace(job, precision=precision))
    assert seen == ["bf16", "fp32"]
    assert main(["speed", "--adapt", "--compile", "--shots", "2", "--json", str(tmp_path / "s.json")]) == 2
    assert not (tmp_path / "s.json").exists()
