"""Export a student as a standalone ONNX graph (dynamic batch) and run it with onnxruntime.

The graph takes RGB images in [0, 1] of shape (B, 3, S, S) (the backbone's normalisation is inside it) and returns
merged logits (B, C+1, S, S); the working size, class names, input convention and distillfss version travel in the
ONNX metadata, so ``predict --engine onnx`` needs nothing else.

``quantize_int8`` turns such a graph into an int8 one with onnxruntime's static quantization (QDQ format, int8
per-channel weights, uint8 activations calibrated by min-max on images of the domain); ``quantize_int8_checked``
tries plans from the fully quantized graph to ones that keep the stem-side convolutions (or every non-convolution
operator) in float32, and keeps the first whose mIoU on labelled images of the domain stays within a bound of fp32.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .model_io import ModelError
from .outputs import MARK
from .predictor import evaluating
from .student import FastStudent, Student
from .tiling import segment_stream


class _Logits(nn.Module):
    def __init__(self, student: Student | FastStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images).logits


MAX_ONNX_DIFF = 1e-3  # largest |ONNX - PyTorch| logit difference an export may have


def export_onnx(
    student: Student | FastStudent,
    image_size: int,
    classes: tuple[str, ...],
    out: Path,
    opset: int = 17,
    name: Path | str | None = None,
    scale: float | None = None,
) -> float:
    """Write ``out`` and check it: the max abs difference between ONNX and PyTorch logits on a fixed random batch
    (returned) must stay within ``MAX_ONNX_DIFF``, else a ModelError naming ``name`` (default ``out``). The student
    is used in eval mode and left as it was. ``scale``: the model's pixel scale, recorded for ``OnnxPredictor``."""
    dummy = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with evaluating(student):
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
        with torch.inference_mode():
            ref = _Logits(student)(dummy).numpy()
    meta = {"image_size": str(image_size), "classes": json.dumps(list(classes)), "scale": json.dumps(scale)}
    _set_metadata(out, {**meta, "precision": "fp32"})
    diff = float(np.abs(OnnxPredictor(out).logits(dummy.numpy()) - ref).max())
    if not diff <= MAX_ONNX_DIFF:
        raise ModelError(
            f"{name or out}: ONNX logits differ from PyTorch by {diff:.2e} (> {MAX_ONNX_DIFF}); not written"
        )
    return diff


def onnx_path(path: str | Path) -> Path:
    """An ONNX graph's file name (``export --out``, ``export_onnx``): it must end in .onnx (``predict --engine onnx``
    and onnxruntime's users expect it; a bare name would be written as a file where a folder may be meant)."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ModelError(f"{path}: an ONNX graph's file name ends in .onnx (e.g. {path.with_suffix('.onnx').name})")
    return path


def mark_onnx(path: Path, command: str) -> None:
    """Record the command that wrote ``path`` in its metadata (``outputs.MARK``): only it may replace the file."""
    _set_metadata(path, {MARK: command})


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


def quantize_int8(
    fp32: Path,
    out: Path,
    calibration: np.ndarray,
    fp32_nodes: Sequence[str] = (),
    op_types: Sequence[str] | None = None,
) -> None:
    """Static int8 quantization of an exported student: ``calibration`` (N, 3, S, S) float32 images in [0, 1] of
    the target domain set the activation ranges. ``fp32_nodes``: node names (of the pre-processed graph, see
    ``conv_nodes``) left in float32; ``op_types``: quantize only these operator types (None: every type
    onnxruntime can). The metadata is carried over, with ``precision: int8``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        _preprocess(fp32, pre)
        _quantize(pre, out, calibration, fp32_nodes, op_types)
    _set_metadata(out, {**_metadata(fp32), "precision": "int8"})


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _preprocess(fp32: Path, pre: Path) -> None:
    """Fold batch norms into convolutions and infer shapes (ONNX shape inference: the symbolic one stops at the
    dynamic batch axis)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)


def _quantize(
    pre: Path, out: Path, calibration: np.ndarray, fp32_nodes: Sequence[str], op_types: Sequence[str] | None
) -> None:
    """QDQ format, int8 per-channel weights, uint8 activations calibrated by min-max on ``calibration``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration.astype(np.float32))

        def get_next(self) -> dict | None:
            x = next(self.items, None)
            return None if x is None else {"images": x[None]}

    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(fp32_nodes),
        op_types_to_quantize=list(op_types) if op_types is not None else None,
    )


def conv_nodes(pre: Path) -> list[str]:
    """Names of the convolutions of a (pre-processed) graph in execution order: the stem first."""
    import onnx

    return [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]


# (description, how many of the first convolutions stay float32, operator types to quantize): the order in which
# ``quantize_int8_checked`` tries them, from the most quantized graph (fastest) to the least. The stem-side
# convolutions see raw pixels and early activations with wide ranges; they are the usual source of the loss.
INT8_PLANS: tuple[tuple[str, int, tuple[str, ...] | None], ...] = (
    ("every operator int8", 0, None),
    *((f"every operator int8 but the first {n} convolutions", n, None) for n in (1, 2, 3, 5, 8)),
    ("convolutions int8", 0, ("Conv",)),
    *((f"convolutions int8 but the first {n}", n, ("Conv",)) for n in (3, 5, 8)),
)


def quantize_int8_checked(
    fp32: Path,
    out: Path,
    images: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...],
    max_drop: float,
    on_try: Callable[[dict], None] | None = None,
) -> dict:
    """Quantize ``fp32`` to int8 so that it loses at most ``max_drop`` mIoU points against fp32 on ``images`` /
    ``labels`` (which also calibrate it): the plans of ``INT8_PLANS`` are tried in order and the first that passes
    is written to ``out``, its choice in the metadata (``int8_plan``, ``int8_fp32_nodes``, ``int8_check``).
    -> the report {fp32, int8, plan, fp32_nodes, tried: [{plan, miou}, ...]}. Raises ``Int8Refused`` (``out`` not
    touched) when no plan keeps the accuracy. ``on_try`` sees each try as it ends."""
    import shutil
    import tempfile

    ref = onnx_miou(fp32, images, labels, classes)
    tried: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        pre, candidate = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        _preprocess(fp32, pre)
        convs = conv_nodes(pre)
        for plan, n_fp32, op_types in INT8_PLANS:
            if n_fp32 > len(convs):
                continue
            kept = convs[:n_fp32]
            _quantize(pre, candidate, images, kept, op_types)
            miou = onnx_miou(candidate, images, labels, classes)
            tried.append({"plan": plan, "miou": round(miou, 2)})
            if on_try:
                on_try({"fp32": round(ref, 2), **tried[-1]})
            if miou >= ref - max_drop:
                report = {"fp32": round(ref, 2), "int8": round(miou, 2), "plan": plan, "fp32_nodes": kept}
                meta = {"precision": "int8", "int8_plan": plan, "int8_fp32_nodes": json.dumps(kept)}
                check = {"fp32_miou": report["fp32"], "int8_miou": report["int8"], "images": len(images)}
                _set_metadata(candidate, {**_metadata(fp32), **meta, "int8_check": json.dumps(check)})
                shutil.move(candidate, out)
                return {**report, "tried": tried}
    raise Int8Refused(fp32, ref, max_drop, tried)


class Int8Refused(ModelError):
    """No int8 plan kept the accuracy: ``tried`` lists each plan's mIoU against ``fp32_miou``."""

    def __init__(self, path: Path, fp32_miou: float, max_drop: float, tried: list[dict]) -> None:
        self.fp32_miou, self.tried = fp32_miou, tried
        best = max(tried, key=lambda t: t["miou"])
        super().__init__(
            f"{path}: every int8 plan loses more than {max_drop} mIoU points against fp32 ({fp32_miou:.2f}) on the "
            f"calibration images; the best, {best['plan']!r}, scored {best['miou']:.2f}"
        )


def onnx_miou(path: Path, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], batch: int = 4) -> float:
    """Foreground mIoU (%) of an ONNX student on (N, 3, S, S) images against (N, S, S) labels at the working size."""
    from .metrics import IoUMeter

    predictor, meter = OnnxPredictor(path), IoUMeter(classes)
    for i in range(0, len(images), batch):
        pred = predictor.logits(images[i : i + batch]).argmax(1)
        meter.update(torch.from_numpy(pred), torch.from_numpy(labels[i : i + batch]))
    return meter.compute().miou


def onnx_ms_per_image(path: Path, images: np.ndarray, repeats: int = 5) -> float:
    """Median milliseconds of one onnxruntime call on the first image of ``images`` (after one warm-up call)."""
    import time

    predictor, x = OnnxPredictor(path), images[:1].astype(np.float32)
    predictor.logits(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.logits(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


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
        self.scale = json.loads(meta.get("scale", "null"))  # the model's pixel scale (None: fit; older exports)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 in [0, 1] -> (B, C+1, S, S)."""
        return self.session.run(["logits"], {"images": images.astype(np.float32)})[0]

    def predict(self, image: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        return self.predict_batch([image], [size])[0]

    def predict_batch(
        self, images: list[np.ndarray], sizes: list[tuple[int, int] | None] | None = None, batch: int = 8
    ) -> list[np.ndarray]:
        """As :meth:`distillfss.predictor.Predictor.predict_batch`, on onnxruntime."""
        return list(self.stream(images, sizes, batch))

    def stream(self, images, sizes=None, batch: int = 8):  # noqa: ANN001, ANN201 - as Predictor.stream
        """As :meth:`distillfss.predictor.Predictor.stream`, on onnxruntime."""
        return segment_stream(
            images, self.image_size, self.scale, lambda x: torch.from_numpy(self.logits(x.numpy())), batch, sizes
        )
