"""The DCAMA teacher: frozen backbone + per-group mask attention + the shared decoder, one-vs-all over classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MaskAttention
from .backbones import FrozenBackbone, Pyramid
from .config import ModelConfig
from .decoder import NEG, Decoder, decode_classes, merge_one_vs_all


@dataclass
class EncodedSupport:
    """A support set after the (frozen) backbone: computed once, reused for every query and training step.

    Attributes:
        pyramid: backbone features of the K support images.
        masks: per backbone layer, the class masks at that layer's resolution, (C, K*h*w) in [0, 1]
            (bilinear, align_corners=True, so borders are soft), shot-major token order.
        flags: (K, C) bool, whether shot k contains class c.
    """

    pyramid: Pyramid
    masks: list[Tensor]
    flags: Tensor

    @property
    def shots(self) -> int:
        return self.flags.shape[0]

    def subset(self, shots: Tensor) -> EncodedSupport:
        """The same support restricted to the shots at indices ``shots`` (1-D long), in that order."""
        p = self.pyramid
        pyramid = Pyramid(p.skip4[shots], tuple(t[shots] for t in p.layers))
        masks = [m.view(m.shape[0], self.shots, -1)[:, shots].flatten(1) for m in self.masks]  # (C, k*h*w)
        return EncodedSupport(pyramid, masks, self.flags[shots])

    def token_valid(self, shot_valid: Tensor, layer: int) -> Tensor:
        """(B, C, K) per-shot validity -> (B, C, K*h*w) per-token validity for one layer."""
        hw = self.masks[layer].shape[1] // self.shots
        return shot_valid.float().repeat_interleave(hw, dim=2)


def encode_support(backbone: FrozenBackbone, images: Tensor, labels: Tensor, num_classes: int) -> EncodedSupport:
    """images: (K, 3, S, S) in [0, 1]; labels: (K, S, S) long, 0 = bg, 1..C = class, 255 = ignore."""
    pyramid = backbone(images)
    return encode_masks(pyramid, labels, num_classes)


def encode_masks(pyramid: Pyramid, labels: Tensor, num_classes: int) -> EncodedSupport:
    classes = torch.arange(1, num_classes + 1, device=labels.device)
    onehot = (labels.unsqueeze(1) == classes.view(1, -1, 1, 1)).float()  # (K, C, S, S); ignore (255) -> 0
    flags = onehot.flatten(2).amax(dim=2) > 0  # (K, C)
    masks, cache = [], {}
    for layer in pyramid.layers:
        size = tuple(layer.shape[-2:])
        if size not in cache:
            m = F.interpolate(onehot, size=size, mode="bilinear", align_corners=True)  # (K, C, h, w)
            cache[size] = m.transpose(0, 1).flatten(1)  # (C, K*h*w)
        masks.append(cache[size])
    return EncodedSupport(pyramid, masks, flags)


class ModelOutput(NamedTuple):
    logits: Tensor  # (B, C+1, S, S) merged logits [bg, fg_1..fg_C]
    class_logits: Tensor | None  # (B, C, 2, S, S) per-class binary logits (None: the fast student has none)
    coarse: list[Tensor]  # per backbone layer, (B, C, h, w) coarse masks


class Teacher(nn.Module):
    def __init__(self, backbone: FrozenBackbone, attention: nn.ModuleList, decoder: Decoder) -> None:
        super().__init__()
        self.backbone = backbone
        self.attention = attention  # one MaskAttention per layer group (DCAMA_blocks in the original)
        self.decoder = decoder
        self.groups = tuple(li.group for li in backbone.layer_info)
        self.strides = tuple(li.stride for li in backbone.layer_info)

    def keys(self, support: EncodedSupport) -> list[Tensor]:
        """Projected support keys per layer, (heads, K*h*w, d_k) each."""
        return [self.attention[g].keys(f) for g, f in zip(self.groups, support.pyramid.layers)]

    def forward_features(
        self,
        query: Pyramid,
        support: EncodedSupport,
        shot_valid: Tensor | None = None,
        keys: list[Tensor] | None = None,
    ) -> ModelOutput:
        """Teacher on precomputed query features.

        Args:
            query: backbone features of B query images.
            support: the encoded support set (K shots, C classes).
            shot_valid: (B, C, K) bool, which shots each query uses for each class (default: every shot that
                contains the class). Leave-one-out training episodes exclude the query's own image here.
            keys: cached :meth:`keys` (inference); recomputed when None (training).
        """
        b = query.skip4.shape[0]
        if shot_valid is None:
            shot_valid = support.flags.T.unsqueeze(0).expand(b, -1, -1)  # (B, C, K)
        else:
            shot_valid = shot_valid & support.flags.T.unsqueeze(0)
        if keys is None:
            keys = self.keys(support)
        coarse = []
        for i, (g, q) in enumerate(zip(self.groups, query.layers)):
            valid = support.token_valid(shot_valid, i)  # (B, C, K*h*w)
            coarse.append(self.attention[g](q, keys[i], support.masks[i], valid))  # (B, C, h, w)
        return self.decode(coarse, query, shot_valid.any(dim=2))

    def forward_voting(self, query: Pyramid, support: EncodedSupport, chunk: int = 10) -> Tensor:
        """The original's "voting": each class's shots split into consecutive chunks of at most ``chunk``; each
        chunk runs on its own (attending only to its shots), and per pixel and class the chunk with the largest
        foreground logit wins, its background logit coming along. Returns merged logits (B, C+1, S, S)."""
        b, n_cls = query.skip4.shape[0], support.flags.shape[1]
        per_class = [support.flags[:, c].nonzero().flatten() for c in range(n_cls)]
        n_chunks = max(1, max(-(-len(s) // chunk) for s in per_class))
        best: Tensor | None = None
        present = torch.zeros(b, n_cls, dtype=torch.bool, device=query.skip4.device)
        for j in range(n_chunks):
            members = [s[j * chunk : (j + 1) * chunk] for s in per_class]
            union = torch.unique(torch.cat(members))
            if union.numel() == 0:
                continue
            sub = support.subset(union)
            valid = torch.stack([torch.isin(union, m) for m in members])  # (C, k)
            out = self.forward_features(query, sub, valid.unsqueeze(0).expand(b, -1, -1))
            got = valid.any(dim=1).unsqueeze(0).expand(b, -1)  # (B, C)
            assert out.class_logits is not None  # a teacher always has per-class logits
            logits = out.class_logits.masked_fill(~got[:, :, None, None, None], NEG)  # (B, C, 2, S, S)
            if best is None:
                best = logits
            else:
                wins = (logits[:, :, 1:2] > best[:, :, 1:2]).expand_as(logits)
                best = torch.where(wins, logits, best)
            present |= got
        assert best is not None
        return merge_one_vs_all(best, present)

    def decode(self, coarse: list[Tensor], query: Pyramid, present: Tensor) -> ModelOutput:
        """Coarse masks (per layer, (B, C, h, w)) -> outputs; ``present`` (B, C): classes that had shots."""
        class_logits = decode_classes(self.decoder, coarse, query.skip4, _skip8(query, self.strides), self.strides)
        return ModelOutput(merge_one_vs_all(class_logits, present), class_logits, coarse)

    def forward(self, images: Tensor, support: EncodedSupport) -> ModelOutput:
        """images: (B, 3, S, S) in [0, 1] -> merged logits (B, C+1, S, S)."""
        return self.forward_features(self.backbone(images), support)


def _skip8(p: Pyramid, strides: tuple[int, ...]) -> Tensor:
    last8 = max(i for i, s in enumerate(strides) if s == 8)
    return p.layers[last8]


def layers_per_stride(backbone: FrozenBackbone) -> tuple[int, int, int]:
    strides = [li.stride for li in backbone.layer_info]
    return (strides.count(8), strides.count(16), strides.count(32))


def skip8_channels(backbone: FrozenBackbone) -> int:
    """Channels of the stride-8 skip map (the last stride-8 layer) the decoders read."""
    return max((li for li in backbone.layer_info if li.stride == 8), key=lambda li: li.group).channels


def build_decoder(backbone: FrozenBackbone) -> Decoder:
    return Decoder(layers_per_stride(backbone), skip8_channels(backbone), backbone.skip4_channels)


def build_teacher(backbone: FrozenBackbone, cfg: ModelConfig) -> Teacher:
    group_dims: dict[int, tuple[int, int]] = {li.group: (li.channels, li.stride) for li in backbone.layer_info}
    attention = nn.ModuleList(
        MaskAttention(
            dim,
            cfg.heads_stride8 if stride == 8 else cfg.heads,
            pe_dropout=cfg.pe_dropout,
            attn_dropout=cfg.attn_dropout,
        )
        for _, (dim, stride) in sorted(group_dims.items())
    )
    # channels_last chosen once, at construction: faster oneDNN convolutions, and no later in-place conversion
    # whose effect on rounding would depend on what ran before.
    return Teacher(backbone, attention, build_decoder(backbone).to(memory_format=torch.channels_last))
