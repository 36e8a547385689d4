"""The DistillFSS students: ConvDist heads replace the attention; the query alone goes in.

``Student`` (the paper's): per class and per layer group, a ConvDist block (3x3 conv C->C, ReLU, 1x1 conv C->1)
predicts the teacher's coarse mask of every layer in that group from the query's own features. All classes run as
one operation: the first conv of every class reads the same input, so it is one conv C -> C_cls*C, and the 1x1
convs are one grouped conv. The classes then go through the shared decoder in one batch, each at full resolution.

``FastStudent`` (``student: fast``, the default): one pass for all classes. A trunk per layer group (1x1 conv C ->
FAST_WIDTH, ReLU) is shared by the classes, with a 1x1 head per class: pointwise, as the teacher's coarse map at a query
token is a function of that token's feature (and position) alone (cross-attention). The per-stride coarse maps of all
classes are stacked as channels into a slim decoder of its own (FAST_WIDTH channels): 3x3 convs merge the strides and
the stride-8 skip at stride 8, and at stride 4 a 1x1 conv takes in the stride-4 skip before one 3x3 conv and the
classifier, which emits the C+1 merged logits, upsampled bilinearly. Its cost barely depends on the number of classes
(about 0.21 GFLOP beside EfficientNet-Lite2's 1.44 at 256 px).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import FrozenBackbone, Pyramid
from .decoder import Decoder, decode_classes, merge_one_vs_all
from .teacher import ModelOutput, _skip8, layers_per_stride, skip8_channels


class ConvDist(nn.Module):
    """The ConvDist blocks of all classes for one layer group: (B, C, h, w) -> (B, C_cls, h, w)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(channels, num_classes * channels, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(num_classes * channels, num_classes, 1, groups=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.act(self.conv1(x)))


class Student(nn.Module):
    def __init__(self, backbone: FrozenBackbone, heads: nn.ModuleList, decoder: Decoder) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads  # one ConvDist per layer group
        self.decoder = decoder
        self.groups = tuple(li.group for li in backbone.layer_info)
        self.strides = tuple(li.stride for li in backbone.layer_info)

    @property
    def num_classes(self) -> int:
        return self.heads[0].num_classes

    def forward_features(self, query: Pyramid) -> ModelOutput:
        coarse = [self.heads[g](f) for g, f in zip(self.groups, query.layers)]  # (B, C_cls, h, w) each
        class_logits = decode_classes(self.decoder, coarse, query.skip4, _skip8(query, self.strides), self.strides)
        present = class_logits.new_ones(class_logits.shape[:2], dtype=bool)  # every class was distilled
        return ModelOutput(merge_one_vs_all(class_logits, present), class_logits, coarse)

    def forward(self, images: Tensor) -> ModelOutput:
        """images: (B, 3, S, S) in [0, 1] -> merged logits (B, C+1, S, S). No support input."""
        return self.forward_features(self.backbone(images))


FAST_WIDTH = 32  # channels of the fast student's trunk and decoder
# The fast student's layer layout, saved with it: version 1 (3x3 trunks, every skip mixed at stride 4, 0.62 GFLOP
# at 256 px) is no longer built.
FAST_VERSION = 2


def _conv(cin: int, cout: int, k: int, norm: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=k // 2)]
    if norm:
        layers.append(nn.GroupNorm(4, cout))
    return [*layers, nn.ReLU(inplace=True)]


class FastDist(nn.Module):
    """One layer group's trunk (1x1 conv C -> width, ReLU), shared by the classes, and a 1x1 head per class:
    (B, C, h, w) -> (B, C_cls, h, w)."""

    def __init__(self, channels: int, num_classes: int, width: int = FAST_WIDTH) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*_conv(channels, width, 1, norm=False))
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


class FastDecoder(nn.Module):
    """Classes as channels: per stride the coarse maps of every (layer, class) pair -> C+1 logits at stride 4."""

    def __init__(
        self,
        layers_per_stride: tuple[int, int, int],
        num_classes: int,
        skip8_channels: int,
        skip4_channels: int,
        width: int = FAST_WIDTH,
    ) -> None:
        super().__init__()
        n8, n16, n32 = (n * num_classes for n in layers_per_stride)
        self.map32 = nn.Sequential(*_conv(n32, 16, 3), *_conv(16, width, 3))
        self.map16 = nn.Sequential(*_conv(n16, 16, 5), *_conv(16, width, 3))
        self.map8 = nn.Sequential(*_conv(n8, 16, 5), *_conv(16, width, 3))
        self.merge16 = nn.Sequential(*_conv(width, width, 3))
        self.merge8 = nn.Sequential(*_conv(width, width, 3))
        self.fuse8 = nn.Sequential(*_conv(width + skip8_channels, width, 3))
        self.mixer = nn.Sequential(*_conv(width + skip4_channels, width, 1), *_conv(width, width, 3))
        self.classifier = nn.Conv2d(width, num_classes + 1, 1)

    def forward(self, c8: Tensor, c16: Tensor, c32: Tensor, skip8: Tensor, skip4: Tensor, size: int) -> Tensor:
        """c8, c16, c32: (B, n_layers*C, h, w) stacked coarse maps; skips: the query's maps -> (B, C+1, S, S)."""
        x = self.map32(c32)
        x = self.merge16(F.interpolate(x, size=c16.shape[-2:], mode="bilinear") + self.map16(c16))
        x = self.merge8(F.interpolate(x, size=c8.shape[-2:], mode="bilinear") + self.map8(c8))
        x = self.fuse8(torch.cat([x, skip8], dim=1))
        x = torch.cat([F.interpolate(x, size=skip4.shape[-2:], mode="bilinear"), skip4], dim=1)
        logits = self.classifier(self.mixer(x))  # (B, C+1, S/4, S/4)
        return F.interpolate(logits, size=(size, size), mode="bilinear")


class FastStudent(nn.Module):
    def __init__(self, backbone: FrozenBackbone, heads: nn.ModuleList, decoder: FastDecoder, image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads  # one FastDist per layer group
        self.decoder = decoder
        self.image_size = image_size
        self.groups = tuple(li.group for li in backbone.layer_info)
        self.strides = tuple(li.stride for li in backbone.layer_info)

    @property
    def num_classes(self) -> int:
        return self.heads[0].head.out_channels

    def forward_features(self, query: Pyramid) -> ModelOutput:
        coarse = [self.heads[g](f) for g, f in zip(self.groups, query.layers)]  # (B, C_cls, h, w) each
        stacks = [torch.cat([c for c, st in zip(coarse, self.strides) if st == s], dim=1) for s in (8, 16, 32)]
        logits = self.decoder(*stacks, _skip8(query, self.strides), query.skip4, self.image_size)
        return ModelOutput(logits, None, coarse)

    def forward(self, images: Tensor) -> ModelOutput:
        """images: (B, 3, S, S) in [0, 1] -> merged logits (B, C+1, S, S). No support input."""
        return self.forward_features(self.backbone(images))


STUDENT_KINDS = ("paper", "fast")


def build_fast_student(backbone: FrozenBackbone, num_classes: int, image_size: int) -> FastStudent:
    """A fresh fast student (its decoder is its own, not the teacher's)."""
    group_dims = {li.group: li.channels for li in backbone.layer_info}
    heads = nn.ModuleList(FastDist(group_dims[g], num_classes) for g in sorted(group_dims))
    decoder = FastDecoder(layers_per_stride(backbone), num_classes, skip8_channels(backbone), backbone.skip4_channels)
    # channels_last as the teacher's decoder; the shared backbone is left as it is
    fmt = torch.channels_last
    return FastStudent(backbone, heads.to(memory_format=fmt), decoder.to(memory_format=fmt), image_size)


def build_student(backbone: FrozenBackbone, decoder: Decoder, num_classes: int) -> Student:
    """The decoder is the teacher's own module (shared, not copied), as in the original."""
    group_dims = {li.group: li.channels for li in backbone.layer_info}
    heads = nn.ModuleList(ConvDist(group_dims[g], num_classes) for g in sorted(group_dims))
    return Student(backbone, heads.to(memory_format=torch.channels_last), decoder)  # as the teacher's decoder
