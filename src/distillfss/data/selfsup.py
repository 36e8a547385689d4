"""Self-supervised few-shot episodes from unlabeled natural images (an offline source domain for meta-training).

Pseudo-masks come from SLIC superpixels: an episode picks one superpixel of one image as its "class"; the support
and the query are two independently augmented views (crop, scale, flip, brightness/contrast) of that image, and
the same geometric transform is applied to the superpixel label map, so the pseudo-mask is known in both views.

Images: scikit-image's bundled photographs and textures, never the demo or any evaluation images. Licences as
stated in scikit-image's docstrings (``SOURCE_IMAGES``). Requires scikit-image (the ``dev`` extra).

Status: this is the episode source only; the ``meta-train`` command that consumes it is not implemented yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SOURCE_IMAGES: dict[str, str] = {
    "astronaut": "NASA, public domain",
    "camera": "CC0 (Lav Varshney)",
    "chelsea": "CC0 (Stefan van der Walt)",
    "clock": "public domain (Stefan van der Walt)",
    "coffee": "CC0 (Rachel Michetti)",
    "coins": "no known copyright restrictions",
    "rocket": "SpaceX, public domain",
    "hubble_deep_field": "NASA, public domain",
    "brick": "CC0 (CC0Textures)",
    "grass": "CC0 (CC0Textures)",
    "gravel": "CC0 (CC0Textures)",
}


@dataclass(frozen=True)
class Episode:
    support_image: Tensor  # (3, S, S) in [0, 1]
    support_mask: Tensor  # (S, S) long, 1 = the pseudo-class
    query_image: Tensor
    query_mask: Tensor
    source: str  # image name and superpixel id


def load_source_images(names: tuple[str, ...] = tuple(SOURCE_IMAGES)) -> dict[str, np.ndarray]:
    """name -> (H, W, 3) float32 RGB in [0, 1]."""
    import skimage.data

    out = {}
    for n in names:
        if n not in SOURCE_IMAGES:
            raise ValueError(f"{n!r} is not a registered source image ({', '.join(SOURCE_IMAGES)})")
        a = getattr(skimage.data, n)()
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        out[n] = a[..., :3].astype(np.float32) / 255.0
    return out


class SelfSupEpisodes:
    """Draws episodes; superpixels are computed once per image."""

    def __init__(
        self,
        images: dict[str, np.ndarray],
        size: int,
        n_segments: int = 24,
        min_fraction: float = 0.02,
        max_fraction: float = 0.4,
    ) -> None:
        from skimage.segmentation import slic

        self.size = size
        self.names = sorted(images)
        self.images = {n: torch.from_numpy(images[n]).permute(2, 0, 1).contiguous() for n in self.names}
        self.segments: dict[str, Tensor] = {}
        self.candidates: dict[str, list[int]] = {}
        for n in self.names:
            seg = slic(images[n], n_segments=n_segments, compactness=10, start_label=0)
            counts = np.bincount(seg.ravel())
            frac = counts / seg.size
            self.segments[n] = torch.from_numpy(seg.astype(np.int64))
            self.candidates[n] = [int(i) for i in np.nonzero((frac >= min_fraction) & (frac <= max_fraction))[0]]
        self.names = [n for n in self.names if self.candidates[n]]
        if not self.names:
            raise ValueError("no image has a superpixel of a usable size")

    def _view(self, name: str, seg_id: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        img, seg = self.images[name], self.segments[name]
        _, h, w = img.shape
        scale = 0.5 + 0.5 * torch.rand((), generator=gen).item()  # crop side as a fraction of the shorter side
        side = max(8, int(scale * min(h, w)))
        y = int(torch.randint(0, h - side + 1, (), generator=gen))
        x = int(torch.randint(0, w - side + 1, (), generator=gen))
        crop = img[:, y : y + side, x : x + side]
        mask = (seg[y : y + side, x : x + side] == seg_id).float()
        if torch.rand((), generator=gen).item() < 0.5:
            crop, mask = crop.flip(-1), mask.flip(-1)
        crop = F.interpolate(crop[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        mask = F.interpolate(mask[None, None], size=(self.size, self.size), mode="nearest")[0, 0].long()
        gain = 0.8 + 0.4 * torch.rand((), generator=gen).item()  # contrast
        bias = 0.1 * (torch.rand((), generator=gen).item() - 0.5)  # brightness
        crop = ((crop - 0.5) * gain + 0.5 + bias).clamp(0, 1)
        return crop, mask

    def sample(self, gen: torch.Generator, max_tries: int = 20) -> Episode:
        """One 1-shot episode whose pseudo-class covers at least 1 % of both views."""
        for _ in range(max_tries):
            name = self.names[int(torch.randint(len(self.names), (), generator=gen))]
            cands = self.candidates[name]
            seg_id = cands[int(torch.randint(len(cands), (), generator=gen))]
            s_img, s_mask = self._view(name, seg_id, gen)
            q_img, q_mask = self._view(name, seg_id, gen)
            if s_mask.float().mean() >= 0.01 and q_mask.float().mean() >= 0.01:
                return Episode(s_img, s_mask, q_img, q_mask, f"{name}#{seg_id}")
        raise RuntimeError(f"no episode with a visible pseudo-class in {max_tries} tries")
