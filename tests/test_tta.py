"""Test-time augmentation: the class probabilities of an image's flips, mapped back and averaged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_dataset
from torch import nn

from distillfss.cli import main
from distillfss.predictor import Predictor
from distillfss.symmetry import VIEWS, dihedral, undo_dihedral


class Pointwise(nn.Module):
    """Logits from each pixel's own colour: equivariant under every symmetry, so TTA must change nothing."""

    def forward(self, x):
        return torch.stack([torch.zeros_like(x[:, 0]), 6 * (x[:, 0] - x[:, 1])], dim=1)


class LeftHalf(nn.Module):
    """Class 1 on the left half of whatever it is shown, whatever the pixels: the least equivariant model."""

    def forward(self, x):
        s = x.shape[-1]
        right = (torch.arange(s) >= s // 2).float().expand(x.shape[0], s, s)
        return torch.stack([4 * right, 4 * (1 - right)], dim=1)


@pytest.mark.parametrize("tta", list(VIEWS))
def test_tta_of_an_equivariant_model_is_the_model(tta) -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    keep = x.clone()
    plain = Predictor(Pointwise(), 16).logits(x).softmax(dim=1)
    augmented = Predictor(Pointwise(), 16, tta=tta).logits(x).softmax(dim=1)  # log-probabilities: the same
    torch.testing.assert_close(augmented, plain)
    assert torch.equal(x, keep)  # the caller's images are not changed


def test_tta_averages_the_views_mapped_back() -> None:
    x = torch.rand(1, 3, 8, 8)
    p = Predictor(LeftHalf(), 8, tta="hflip").logits(x).exp()
    # left half predicted on the image and (mapped back) the right half on its mirror: every pixel is 50/50
    torch.testing.assert_close(p, torch.full_like(p, 0.5))
    for tta in ("flips", "dihedral"):  # also the transposed views: their left half is the image's top half
        p = Predictor(LeftHalf(), 8, tta=tta).logits(x).exp()
        torch.testing.assert_close(p, torch.full_like(p, 0.5))
    mapped = undo_dihedral(LeftHalf()(dihedral(x, 4)).softmax(dim=1), 4)  # one transposed view, mapped back
    assert mapped[0, 1, 0, -1] > 0.9 and mapped[0, 1, -1, 0] < 0.1  # class 1 on the top half


def test_an_unknown_tta_is_refused() -> None:
    with pytest.raises(ValueError, match="tta must be one of none, hflip, flips, dihedral"):
        Predictor(Pointwise(), 16, tta="rot45")
    with pytest.raises(ValueError, match="tta must be one of"):
        Predictor(Pointwise(), 16).with_tta("rot45")


def test_with_tta_shares_the_model_and_leaves_the_original_alone() -> None:
    x = torch.rand(1, 3, 8, 8)
    plain = Predictor(LeftHalf(), 8)
    twin = plain.with_tta("hflip")
    assert plain.tta == "none" and twin.tta == "hflip" and twin.model is plain.model
    torch.testing.assert_close(twin.logits(x), Predictor(LeftHalf(), 8, tta="hflip").logits(x))
    assert plain.logits(x).softmax(dim=1)[0, 1, 0, 0] > 0.9  # still the plain model's answer


FAST = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--probe-size", "64", "--iterations", "1"]
FAST += ["--fast-iterations", "2"]


def test_benchmark_tta_rows_evaluate_their_plain_rows_model(tmp_path) -> None:
    data = write_dataset(tmp_path / "toy", n_train=5, n_test=2)
    flags = ["--data", str(data), "--shots", "2", *FAST]

    def rows(name: str, methods: str) -> tuple[dict[str, dict], str]:
        assert main(["benchmark", *flags, "--methods", methods, "--out", str(tmp_path / name)]) == 0
        found = {r["method"]: r for r in json.loads((tmp_path / name / "results.json").read_text())["rows"]}
        return found, (tmp_path / name / "table.md").read_text()

    plain, _ = rows("plain", "distillfss_fast,linear_probe")
    both, text = rows("both", "distillfss_fast,distillfss_fast_tta,linear_probe,linear_probe_tta")
    alone, _ = rows("alone", "distillfss_fast_tta,linear_probe_tta")
    for m in ("distillfss_fast", "linear_probe"):
        assert both[m]["miou"] == plain[m]["miou"] and both[m]["tta"] == "none"  # a _tta row changes no other row
        t = both[f"{m}_tta"]
        assert t["tta"] == "flips" and alone[f"{m}_tta"]["miou"] == t["miou"]  # with or without its plain row
        for key in ("adapt", "baseline_settings", "seed", "image_size", "teacher_init", "adapt_seconds"):
            assert t[key] == both[m][key], key
    assert both["linear_probe_tta"]["seed"] is None and both["distillfss_fast_tta"]["seed"] == 0
    assert "| distillfss_fast_tta | linear_probe_tta |" in text and "| distillfss_fast_tta | distillfss_fast |" in text
