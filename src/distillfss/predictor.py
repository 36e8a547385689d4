"""Set once, predict many: a predictor holds the model (and, for a teacher, its encoded support) and segments
images of any size, returning labels at the image's own resolution."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .teacher import EncodedSupport, Teacher
from .tiling import segment_stream

VOTE_CHUNK = 10  # the paper's TransferFSS: shots per voting chunk at test time


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, each submodule's train/eval flag restored after: a caller's module
    is used, never changed."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


class Predictor:
    """Segments images with a student (no support) or a teacher (support encoded once, keys cached)."""

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        support: EncodedSupport | None = None,
        precision: str = "fp32",
        vote_chunk: int = VOTE_CHUNK,
        scale: float | None = None,
    ) -> None:
        """model: a Teacher (with ``support``), a Student, or any module mapping (B,3,S,S) to (B,C+1,S,S) logits.

        vote_chunk: a teacher whose classes have more than this many shots attends to them in chunks of at most
        ``vote_chunk`` and votes (the paper's TransferFSS, 10); 0 attends to all shots at once.
        scale: the model's pixel scale (``tiling``): None fits each image into one window; a number segments
        larger images with sliding windows.

        The model runs in eval mode and is left as it is (its train/eval flags are restored after each call; its
        memory format is chosen where it is built).
        """
        if isinstance(model, Teacher) and support is None:
            raise ValueError("a teacher needs its support set")
        if vote_chunk < 0:
            raise ValueError(f"vote_chunk must be >= 0, got {vote_chunk}")
        self.model = model
        self.image_size = image_size
        self.scale = scale
        self.precision = precision
        self.support = support
        self.vote_chunk = vote_chunk
        self.voting = support is not None and 0 < vote_chunk < int(support.flags.sum(dim=0).max())
        self._keys = None
        if isinstance(model, Teacher) and not self.voting:
            with evaluating(model), torch.inference_mode():
                self._keys = model.keys(support)

    @torch.inference_mode()
    def logits(self, images: Tensor) -> Tensor:
        """images: (B, 3, S, S) in [0, 1] -> merged logits (B, C+1, S, S), float32."""
        images = images.to(memory_format=torch.channels_last)  # the layout the backbone was built in
        bf16 = self.precision == "bf16"
        with evaluating(self.model), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            if isinstance(self.model, Teacher):
                feats = self.model.backbone(images)
                if self.voting:
                    out = self.model.forward_voting(feats, self.support, self.vote_chunk)
                else:
                    out = self.model.forward_features(feats, self.support, keys=self._keys).logits
            else:
                out = self.model(images)
        return (out if isinstance(out, Tensor) else out.logits).float()

    def predict(self, image: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """(H, W, 3) float RGB in [0, 1] -> (H, W) uint8 labels at the input's size (or at ``size`` = (h, w))."""
        return self.predict_batch([image], [size])[0]

    def predict_batch(
        self, images: list[np.ndarray], sizes: list[tuple[int, int] | None] | None = None, batch: int = 8
    ) -> list[np.ndarray]:
        """Images of any sizes (uint8 or float in [0, 1]) -> their label maps, each at its own size (or ``sizes``),
        from windows at the model's pixel scale, ``batch`` windows per forward pass."""
        return list(self.stream(images, sizes, batch))

    def stream(
        self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int] | None] | None = None, batch: int = 8
    ) -> Iterator[np.ndarray]:
        """As ``predict_batch``, yielding each image's labels as soon as they are ready (bounded memory)."""
        device = next(self.model.parameters()).device
        return segment_stream(images, self.image_size, self.scale, lambda x: self.logits(x.to(device)), batch, sizes)
