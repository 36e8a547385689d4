"""The DistillFSS student: ConvDist heads replace the attention; the query alone goes in.

Per class and per layer group, a ConvDist block (3x3 conv C->C, ReLU, 1x1 conv C->1) predicts the teacher's
coarse mask of every layer in that group from the query's own features. All classes run as one operation: the
first conv of every class reads the same input, so it is one conv C -> C_cls*C, and the 1x1 convs are one grouped
conv. The classes then go through the shared decoder in one batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbones import FrozenBackbone, Pyramid
from .decoder import Decoder, decode_classes, merge_one_vs_all
from .teacher import ModelOutput, _skip8


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


def build_student(backbone: FrozenBackbone, decoder: Decoder, num_classes: int) -> Student:
    """The decoder is the teacher's own module (shared, not copied), as in the original."""
    group_dims = {li.group: li.channels for li in backbone.layer_info}
    heads = nn.ModuleList(ConvDist(group_dims[g], num_classes) for g in sorted(group_dims))
    return Student(backbone, heads.to(memory_format=torch.channels_last), decoder)  # as the teacher's decoder
