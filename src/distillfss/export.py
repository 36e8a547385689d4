"""Export a student as a standalone ONNX graph (dynamic batch) and run it with onnxruntime.

The graph takes RGB images in [0, 1] of shape (B, 3, S, S) and returns merged logits (B, C+1, S, S); the working
size and class names travel in the ONNX metadata, so ``predict --engine onnx`` needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.tensors import image_tensor
from .model_io import ModelError
from .student import Student


class _Logits(nn.Module):
    def __init__(self, student: Student) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images).logits


def export_onnx(student: Student, image_size: int, classes: tuple[str, ...], out: Path, opset: int = 17) -> float:
    """Write ``out`` and return the max abs difference between ONNX and PyTorch logits on a random batch."""
    import onnx

    student = student.eval()
    dummy = torch.rand(2, 3, image_size, image_size)
    torch.onnx.export(
        _Logits(student),
        (dummy,),
        str(out),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    model = onnx.load(str(out))
    for k, v in {"image_size": str(image_size), "classes": json.dumps(list(classes))}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(out))
    onnx.checker.check_model(str(out))
    with torch.inference_mode():
        ref = _Logits(student)(dummy).numpy()
    return float(np.abs(OnnxPredictor(out).logits(dummy.numpy()) - ref).max())


class OnnxPredictor:
    """Same ``predict`` as :class:`distillfss.predictor.Predictor`, on onnxruntime (no PyTorch model needed)."""

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelError(f"{path}: not a loadable ONNX model ({e})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "image_size" not in meta:
            raise ModelError(f"{path}: not exported by distillfss (no image_size in its metadata)")
        self.image_size = int(meta["image_size"])
        self.classes = tuple(json.loads(meta["classes"]))

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 in [0, 1] -> (B, C+1, S, S)."""
        return self.session.run(["logits"], {"images": images.astype(np.float32)})[0]

    def predict(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        x = image_tensor(image, self.image_size).unsqueeze(0).numpy()
        logits = torch.from_numpy(self.logits(x))
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits.argmax(1)[0].to(torch.uint8).numpy()
