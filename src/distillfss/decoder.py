"""The multi-scale decoder shared by the teacher and the student (DCAMA's mix-maps decoder, query-only skips).

Input: per stride (8, 16, 32) the stacked per-layer coarse masks of one class, plus the query's last stride-8 and
stride-4 backbone maps. Output: 2 logits (background, foreground) at the working resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_gn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.GroupNorm(4, cout), nn.ReLU(inplace=True)]


def _mapper(cin: int, kernels: tuple[int, int, int]) -> nn.Sequential:
    """ConvMapper: n_layers -> 16 -> 64 -> 128 channels, GroupNorm(4) + ReLU after each conv."""
    widths = (cin, 16, 64, 128)
    return nn.Sequential(*[m for i, k in enumerate(kernels) for m in _conv_gn_relu(widths[i], widths[i + 1], k)])


def _merge() -> nn.Sequential:
    """ConvMerge: three 3x3 128 -> 128 convs with GroupNorm(4) + ReLU."""
    return nn.Sequential(*[m for _ in range(3) for m in _conv_gn_relu(128, 128, 3)])


def _mixer(cin: int, mid: int, cout: int, final_relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, mid, 3, padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(mid, cout, 3, padding=1))
    if final_relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _up(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class Decoder(nn.Module):
    """Module names follow the original code (conv1-5, mixer1-3) so trainable sets A/B/C read the same.

    conv1/conv2/conv3 = ConvMappers at strides 32/16/8; conv4/conv5 = ConvMerge; mixer1-3 = mixers, the last conv
    being the 2-logit classifier.
    """

    def __init__(self, layers_per_stride: tuple[int, int, int], skip8_channels: int, skip4_channels: int) -> None:
        """layers_per_stride: number of backbone layers at strides (8, 16, 32)."""
        super().__init__()
        n8, n16, n32 = layers_per_stride
        self.conv1 = _mapper(n32, (3, 3, 3))
        self.conv2 = _mapper(n16, (5, 3, 3))
        self.conv3 = _mapper(n8, (5, 5, 3))
        self.conv4 = _merge()
        self.conv5 = _merge()
        self.mixer1 = _mixer(128 + skip8_channels + skip4_channels, 128, 64)
        self.mixer2 = _mixer(64, 64, 16)
        self.mixer3 = _mixer(16, 16, 2, final_relu=False)

    def forward(self, c8: Tensor, c16: Tensor, c32: Tensor, skip8: Tensor, skip4: Tensor) -> Tensor:
        """Decode stacked coarse masks.

        Args:
            c8, c16, c32: coarse masks (N, n_layers, h, w) at strides 8, 16, 32; N = batch x classes.
            skip8, skip4: query maps (N, C, h, w) at strides 8 and 4 (repeated per class by the caller).

        Returns:
            logits (N, 2, 4*h4, 4*w4): background, foreground at the working resolution.
        """
        x = self.conv1(c32)
        x = self.conv4(_up(x, c16.shape[-2:]) + self.conv2(c16))
        x = self.conv5(_up(x, c8.shape[-2:]) + self.conv3(c8))  # (N, 128, S/8, S/8)
        x = torch.cat([x, skip8], dim=1)
        h4, w4 = skip4.shape[-2:]
        x = torch.cat([_up(x, (h4, w4)), skip4], dim=1)  # (N, 128+C8+C4, S/4, S/4)
        x = self.mixer1(x)
        x = self.mixer2(_up(x, (2 * h4, 2 * w4)))
        return self.mixer3(_up(x, (4 * h4, 4 * w4)))  # (N, 2, S, S)


NEG = -1e4  # logit for a class that cannot be predicted (finite, so losses and half precision stay defined)


def merge_one_vs_all(logits: Tensor, present: Tensor) -> Tensor:
    """Merge per-class binary logits into multi-class logits (DistillFSS's rule).

    Per pixel the class with the largest foreground logit wins, and the background logit is taken from that
    class's own binary head. Classes with no shots are never predicted.

    Args:
        logits: (B, C, 2, H, W) per-class [bg, fg] logits.
        present: (B, C) bool, the classes that had support shots.

    Returns:
        (B, C+1, H, W) logits [bg, fg_1..fg_C].
    """
    bg, fg = logits[:, :, 0], logits[:, :, 1]  # (B, C, H, W) each
    mask = present[:, :, None, None]
    fg = torch.where(mask, fg, torch.full_like(fg, NEG))
    winner = fg.argmax(dim=1, keepdim=True)  # (B, 1, H, W)
    bg = bg.gather(1, winner)
    bg = torch.where(mask.any(dim=1, keepdim=True), bg, torch.zeros_like(bg))  # no class at all: background
    return torch.cat([bg, fg], dim=1)


def decode_classes(
    decoder: Decoder, coarse: list[Tensor], skip4: Tensor, skip8: Tensor, strides: tuple[int, ...]
) -> Tensor:
    """Run the decoder once with the classes folded into the batch.

    Args:
        coarse: per backbone layer, (B, C, h_l, w_l) coarse masks of every class.
        skip4, skip8: the query's skip maps (B, C4, S/4, S/4) and (B, C8, S/8, S/8).
        strides: the stride of each layer in ``coarse``.

    Returns:
        (B, C, 2, S, S) per-class [bg, fg] logits.
    """
    b, n_cls = coarse[0].shape[:2]
    stacks = []
    for s in (8, 16, 32):
        x = torch.stack([c for c, st in zip(coarse, strides) if st == s], dim=2)  # (B, C, n_s, h, w)
        stacks.append(x.flatten(0, 1))  # (B*C, n_s, h, w)

    def per_class(t: Tensor) -> Tensor:
        return t.unsqueeze(1).expand(-1, n_cls, -1, -1, -1).flatten(0, 1)  # (B*C, ch, h, w)

    logits = decoder(*stacks, per_class(skip8), per_class(skip4))  # (B*C, 2, S, S)
    return logits.view(b, n_cls, 2, *logits.shape[-2:])
