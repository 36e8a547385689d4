"""Export a student as a standalone ONNX graph (dynamic batch) and run it with onnxruntime.

The graph takes RGB images in [0, 1] of shape (B, 3, S, S) (the backbone's normalisation is inside it) and returns
merged logits (B, C+1, S, S); the working size, class names, input convention and distillfss version travel in the
ONNX metadata, so ``predict --engine onnx`` needs nothing else.

``quantize_int8`` turns such a graph into an int8 one with onnxruntime's static quantization (QDQ format, int8
per-channel weights, uint8 activations calibrated by min-max on images of the domain).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .data.tensors import image_tensor
from .model_io import ModelError
from .predictor import labels_at_sizes
from .student import FastStudent, Student


class _Logits(nn.Module):
    def __init__(self, student: Student | FastStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images).logits


def export_onnx(
    student: Student | FastStudent, image_size: int, classes: tuple[str, ...], out: Path, opset: int = 17
) -> float:
    """Write ``out`` and return the max abs difference between ONNX and PyTorch logits on a random batch."""

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
    _set_metadata(out, {"image_size": str(image_size), "classes": json.dumps(list(classes)), "precision": "fp32"})
    with torch.inference_mode():
        ref = _Logits(student)(dummy).numpy()
    return float(np.abs(OnnxPredictor(out).logits(dummy.numpy()) - ref).max())


def _set_metadata(path: Path, values: dict[str, str]) -> None:
    """Add or replace ONNX metadata entries (plus the input convention and the version) and check the model."""
    import onnx

    from . import __version__

    model = onnx.load(str(path))
    values = {
        "input": "RGB float32 in [0, 1], (B, 3, S, S); normalisation inside the graph",
        "distillfss_version": __version__,
        **values,
    }
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for k, v in [*kept, *values.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """Static int8 quantization of an exported student: ``calibration`` (N, 3, S, S) float32 images in [0, 1] of
    the target domain set the activation ranges. The metadata is carried over, with ``precision: int8``."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration.astype(np.float32))

        def get_next(self) -> dict | None:
            x = next(self.items, None)
            return None if x is None else {"images": x[None]}

    meta = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # folds batch norms into convolutions and infers shapes (ONNX shape inference: the symbolic one stops at the
        # dynamic batch axis)
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    _set_metadata(out, {**meta, "precision": "int8"})


def onnx_miou(path: Path, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], batch: int = 4) -> float:
    """Foreground mIoU (%) of an ONNX student on (N, 3, S, S) images against (N, S, S) labels at the working size."""
    from .metrics import IoUMeter

    predictor, meter = OnnxPredictor(path), IoUMeter(classes)
    for i in range(0, len(images), batch):
        pred = predictor.logits(images[i : i + batch]).argmax(1)
        meter.update(torch.from_numpy(pred), torch.from_numpy(labels[i : i + batch]))
    return meter.compute().miou


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
        return self.predict_batch([image])[0]

    def predict_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Several images of any sizes in one onnxruntime call -> their label maps, each at its own size."""
        x = torch.stack([image_tensor(im, self.image_size) for im in images]).numpy()
        return labels_at_sizes(torch.from_numpy(self.logits(x)), [im.shape[:2] for im in images])
