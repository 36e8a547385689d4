"""``distillfss speed``: time per query and peak memory, teacher vs student vs the bare backbone.

Random inputs of the model's real size (batch 1, K support images each holding every class, as the paper's
speed script). Each measurement: warm-up iterations, then the median / min / max of N timed iterations.

* CUDA: events + synchronize; peak memory = ``torch.cuda.max_memory_allocated`` of the timed loop.
* CPU: ``time.perf_counter``; peak memory = the peak resident set of a fresh child process that builds the model
  and runs only this measurement (so one configuration's memory never leaks into another's).

Rows: ``backbone`` (the floor of any support-free model), ``student``, ``teacher`` with the support set encoded
inside the timed call (``support_encoding: true``) and with it encoded once beforehand (``false``).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from queue import Empty
from typing import Any

import torch

from .backbones import build_backbone
from .config import ModelConfig
from .errors import UserError
from .student import build_fast_student, build_student
from .teacher import build_teacher, encode_support


@dataclass(frozen=True)
class SpeedRow:
    # "backbone" | "student" | "student_fast" | "onnx" / "onnx-int8" (the student on onnxruntime, fp32 / int8) |
    # "onnx-fast" / "onnx-fast-int8" (the fast student on onnxruntime) | "teacher"
    model: str
    ways: int
    shots: int
    support_encoding: bool  # teacher only: support features computed inside the timed call
    ms_median: float
    ms_min: float
    ms_max: float
    peak_memory_mb: float
    # after the timing above, the model and a bare backbone called alternately in the same process (None for the
    # backbone itself and the onnxruntime models): the backbone's median there, and the model's median over it --
    # a ratio immune to the machine's speed drifting between measurements
    backbone_ms: float | None = None
    backbone_ratio: float | None = None


@dataclass(frozen=True)
class SpeedJob:
    model: str
    ways: int
    shots: int
    support_encoding: bool
    model_cfg: ModelConfig
    device: str
    warmup: int
    iters: int
    threads: int
    backbone_weights: str | None = "random"  # timings do not depend on the weights' values
    precision: str = "fp32"  # "bf16": autocast the whole forward
    channels_last: bool = True  # the layout the backbone is built in and predict feeds (False: contiguous)
    compile: bool = False  # torch.compile the student / backbone (opt-in; the warm-up absorbs compilation)
    chunk: int = 0  # teacher: the paper's voting over chunks of this many shots (0 = all shots at once)

    def describe(self) -> str:
        enc = ", support encoding included" if self.support_encoding else ""
        return (
            f"{self.model} ({self.model_cfg.backbone}, {self.model_cfg.image_size} px, {self.ways} way, "
            f"{self.shots} shot{enc}, {self.precision}, {self.threads} threads)"
        )


def _runner(job: SpeedJob) -> Callable[[], object]:
    """Build the model for a job (from a private random state seeded 0) and return the zero-argument call that is
    timed."""
    from .transfer import seeded

    with seeded(0, job.device):
        return _build_runner(job)


def _build_runner(job: SpeedJob) -> Callable[[], object]:
    dev = torch.device(job.device)
    cfg = job.model_cfg
    s = cfg.image_size
    fmt = torch.channels_last if job.channels_last else torch.contiguous_format
    backbone = build_backbone(cfg.backbone, s, job.backbone_weights).to(dev, memory_format=fmt)
    query = torch.rand(1, 3, s, s, device=dev).to(memory_format=fmt)
    if job.model == "backbone":
        return _wrap(job, backbone, lambda m: m(query))
    if job.model in ONNX_MODELS:
        return _onnx_runner(job, backbone, query)
    if job.model == "student_fast":
        fast = build_fast_student(backbone, job.ways, s).to(dev).eval()
        return _wrap(job, fast, lambda m: m(query).logits)
    teacher = build_teacher(backbone, ModelConfig(**{**cfg.to_dict(), "num_classes": job.ways})).to(dev).eval()
    if job.model == "student":
        student = build_student(backbone, teacher.decoder, job.ways).to(dev, memory_format=fmt).eval()
        return _wrap(job, student, lambda m: m(query).logits)
    images = torch.rand(job.shots, 3, s, s, device=dev)
    labels = torch.randint(0, job.ways + 1, (job.shots, s, s), device=dev)
    labels[:, 0, : job.ways + 1] = torch.arange(job.ways + 1, device=dev)  # every shot holds every class
    if job.chunk:
        if job.support_encoding:
            return _wrap(
                job,
                teacher,
                lambda m: m.forward_voting(
                    backbone(query), encode_support(backbone, images, labels, job.ways), job.chunk
                ),
            )
        with torch.inference_mode():
            support = encode_support(backbone, images, labels, job.ways)
        return _wrap(job, teacher, lambda m: m.forward_voting(backbone(query), support, job.chunk))
    if job.support_encoding:
        return _wrap(job, teacher, lambda m: m(query, encode_support(backbone, images, labels, job.ways)).logits)
    with torch.inference_mode():
        support = encode_support(backbone, images, labels, job.ways)
        keys = teacher.keys(support)
    return _wrap(job, teacher, lambda m: m.forward_features(backbone(query), support, keys=keys).logits)


ONNX_MODELS = ("onnx", "onnx-int8", "onnx-fast", "onnx-fast-int8")


def _onnx_runner(job: SpeedJob, backbone, query: torch.Tensor) -> Callable[[], object]:
    """The student exported to ONNX and run by onnxruntime on the CPU (the deployment path without PyTorch);
    ``onnx-int8``, ``onnx-fast-int8``: quantized to int8 (calibrated on random images: the timing does not depend on
    the ranges)."""
    import tempfile

    from .export import OnnxPredictor, export_onnx, quantize_int8

    cfg = job.model_cfg
    if job.model.startswith("onnx-fast"):
        student: torch.nn.Module = build_fast_student(backbone, job.ways, cfg.image_size).eval()
    else:
        teacher = build_teacher(backbone, ModelConfig(**{**cfg.to_dict(), "num_classes": job.ways}))
        student = build_student(backbone, teacher.decoder, job.ways).eval()
    with tempfile.TemporaryDirectory() as folder:  # the session holds the graph: the files go at once
        path = Path(folder) / "student.onnx"
        export_onnx(student.cpu(), cfg.image_size, tuple(f"c{i}" for i in range(job.ways + 1)), path)
        if job.model.endswith("int8"):
            calibration = torch.rand(4, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
            quantize_int8(path, path.with_name("int8.onnx"), calibration.numpy())
            path = path.with_name("int8.onnx")
        predictor = OnnxPredictor(path, threads=job.threads)
    x = query.cpu().numpy()
    return lambda: predictor.logits(x)


def _wrap(job: SpeedJob, model: torch.nn.Module, call: Callable[[torch.nn.Module], object]) -> Callable[[], object]:
    """Apply the job's inference options around ``call(model)``."""
    if job.compile:
        model = torch.compile(model)
    autocast = torch.autocast(torch.device(job.device).type, dtype=torch.bfloat16, enabled=job.precision == "bf16")

    def fn() -> object:
        with autocast:
            return call(model)

    return fn


def measure(job: SpeedJob) -> SpeedRow:
    """Run one measurement in this process."""
    torch.set_num_threads(job.threads)
    fn = _runner(job)
    cuda = job.device.startswith("cuda")
    times = _time(fn, job.warmup, job.iters, cuda)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()  # before the backbone below
    ratio = backbone_ms = None
    if job.model != "backbone" and job.model not in ONNX_MODELS:
        # then the model and a bare backbone alternately, call by call: both see the same machine state, so their
        # ratio holds even when the machine's speed drifts (on a shared 2-core CPU it moves by 30 % between runs).
        # Not for onnxruntime: its idle threads keep spinning after a call and slowed the next PyTorch call ~2x.
        pair = _interleaved([fn, _runner(replace(job, model="backbone"))], job.warmup, job.iters, cuda)
        model_ms, backbone_ms = (statistics.median(t) for t in pair)
        ratio, backbone_ms = round(model_ms / backbone_ms, 3), round(backbone_ms, 2)
    return SpeedRow(
        job.model,
        job.ways,
        job.shots,
        job.support_encoding,
        round(statistics.median(times), 2),
        round(min(times), 2),
        round(max(times), 2),
        round(peak, 1),
        backbone_ms,
        ratio,
    )


def _time(fn: Callable[[], object], warmup: int, iters: int, cuda: bool) -> list[float]:
    """Milliseconds per call of ``fn`` over ``iters`` calls after ``warmup`` untimed ones (on CUDA the peak
    memory counter is reset after the warm-up)."""
    return _interleaved([fn], warmup, iters, cuda)[0]


def _interleaved(fns: list[Callable[[], object]], warmup: int, iters: int, cuda: bool) -> list[list[float]]:
    """Milliseconds per call of each of ``fns``, called in turn ``iters`` times after ``warmup`` untimed rounds."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns:
                fn()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # the timed iterations' peak
        for _ in range(iters):
            for fn, out in zip(fns, times):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    torch.cuda.synchronize()
                    out.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    out.append((time.perf_counter() - t0) * 1000)
    return times


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: reset by exec, so a spawned child reports only its own)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; includes the parent's


def _child(job: SpeedJob, queue: mp.Queue) -> None:
    queue.put(measure(job))


class MeasurementError(UserError):
    """A measurement process died (e.g. out of memory) or ran past its time limit."""


def measure_isolated(job: Any, timeout_s: float = 600.0, target: Callable[[Any, mp.Queue], None] = _child) -> Any:
    """CPU: one fresh process per measurement, so its peak RSS is this measurement's own. A process that dies
    without a result (killed for memory, crashed) or runs past ``timeout_s`` is a MeasurementError naming the
    configuration (``job.describe()``); it never hangs the run. ``target(job, queue)`` puts the result."""
    if job.device.startswith("cuda"):
        return measure(job) if target is _child else _in_process(job, target)
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(job, queue))
    proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                row = queue.get(timeout=0.5)
                break
            except Empty:
                if not proc.is_alive():
                    raise MeasurementError(
                        f"speed: the measurement of {job.describe()} died without a result (exit code "
                        f"{proc.exitcode}; out of memory?)"
                    ) from None
                if time.monotonic() > deadline:
                    raise MeasurementError(
                        f"speed: the measurement of {job.describe()} gave no result within {timeout_s:.0f} s; stopped "
                        "(raise --timeout for slow configurations)"
                    ) from None
    finally:
        if proc.is_alive() and proc.exitcode is None:
            proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return row


def _in_process(job: Any, target: Callable[[Any, mp.Queue], None]) -> Any:
    queue: mp.Queue = mp.get_context("spawn").Queue()
    target(job, queue)
    return queue.get()


def run_speed(
    model_cfg: ModelConfig,
    ways: list[int],
    shots: list[int],
    device: str = "cpu",
    warmup: int = 2,
    iters: int = 10,
    threads: int | None = None,
    models: tuple[str, ...] = ("backbone", "student", "teacher"),
    isolate: bool = True,
    progress: Callable[[str], None] | None = None,
    precision: str = "fp32",
    channels_last: bool = True,
    compile: bool = False,
    chunk: int = 0,
    onnx: bool = False,
    timeout_s: float = 600.0,
) -> dict:
    threads = threads or torch.get_num_threads()
    opts = {"precision": precision, "channels_last": channels_last, "compile": compile, "chunk": chunk}

    def job(model: str, w: int, k: int, enc: bool) -> SpeedJob:
        return SpeedJob(model, w, k, enc, model_cfg, device, warmup, iters, threads, **opts)

    jobs = [job("backbone", 0, 0, False)] if "backbone" in models else []
    for w in ways:
        for k in shots:
            for m in ("student", "student_fast", *ONNX_MODELS):
                if m in models:
                    jobs.append(job(m, w, k, False))
            if "teacher" in models:
                jobs += [job("teacher", w, k, True), job("teacher", w, k, False)]
    rows = []
    for j in jobs:
        row = measure_isolated(j, timeout_s) if isolate else measure(j)
        rows.append(asdict(row))
        if progress:
            progress(
                f"{row.model:8s} ways {row.ways} shots {row.shots:3d} enc {int(row.support_encoding)}: "
                f"{row.ms_median:9.1f} ms  {row.peak_memory_mb:8.0f} MB"
            )
    return {
        "device": device_name(device),
        "threads": threads,
        "image_size": model_cfg.image_size,
        "backbone": model_cfg.backbone,
        "warmup": warmup,
        "iterations": iters,
        **opts,
        "rows": rows,
    }


def device_name(device: str) -> str:
    """'cpu (<CPU model>)' or 'cuda:N (<GPU name>)', as results record the machine."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else _cpu_name()
    return f"{device} ({name})"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _options(result: dict) -> str:
    opts = []
    if result.get("channels_last") is False:
        opts.append("contiguous memory layout")
    if result.get("compile"):
        opts.append("torch.compile")
    if result.get("chunk"):
        opts.append(f"teacher voting over chunks of {result['chunk']} shots")
    return "".join(f", {o}" for o in opts)


def table(result: dict) -> str:
    """Markdown shaped like the paper's Table 2: rows = model, columns = (ways, shots), ms per query."""
    rows = result["rows"]
    combos = sorted({(r["ways"], r["shots"]) for r in rows if r["model"] != "backbone"})
    head = "| model | " + " | ".join(f"{w}-way {k}-shot" for w, k in combos) + " |"
    lines = [
        f"Time per query (median ms) and peak memory (MB) on {result['device']}, {result['threads']} threads, "
        f"{result['image_size']} px, backbone {result['backbone']}, precision {result.get('precision', 'fp32')}"
        f"{_options(result)}.",
        "",
        head,
        "|---|" + "---|" * len(combos),
    ]
    kinds = [
        ("student", False, "paper student (`student: paper`)"),
        ("student_fast", False, "fast student (the default)"),
        ("onnx", False, "student, onnxruntime"),
        ("onnx-int8", False, "student, onnxruntime int8"),
        ("onnx-fast", False, "fast student, onnxruntime"),
        ("onnx-fast-int8", False, "fast student, onnxruntime int8"),
        ("teacher", False, "teacher (support cached)"),
        ("teacher", True, "teacher (support encoded per query)"),
    ]
    for model, enc, label in kinds:
        cells = []
        for w, k in combos:
            r = next(
                (
                    r
                    for r in rows
                    if r["model"] == model and r["ways"] == w and r["shots"] == k and r["support_encoding"] == enc
                ),
                None,
            )
            cells.append(f"{r['ms_median']:.1f} ms / {r['peak_memory_mb']:.0f} MB" if r else "-")
        if any(c != "-" for c in cells):  # a model the run did not measure has no row
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    bb = next((r for r in rows if r["model"] == "backbone"), None)
    if bb:
        lines += ["", f"Bare backbone forward (the floor): {bb['ms_median']:.1f} ms, {bb['peak_memory_mb']:.0f} MB."]
        lines += _ratios(rows, bb["ms_median"])
    return "\n".join(lines) + "\n"


def _ratios(rows: list[dict], backbone_ms: float) -> list[str]:
    """Per model: its median time over the backbone's (the row's ``backbone_ratio``, measured call by call in the
    same process, where it has one; else over ``backbone_ms``), per ways (the mean over shots), its spread over
    shots, and its largest ways over 1 way. The teacher's rows are those with its support cached."""
    out = []
    for model in ("student", "student_fast", *ONNX_MODELS, "teacher"):
        by_ways: dict[int, list[float]] = {}
        for r in rows:
            if r["model"] == model and not r["support_encoding"]:
                by_ways.setdefault(r["ways"], []).append(r.get("backbone_ratio") or r["ms_median"] / backbone_ms)
        if not by_ways:
            continue
        means = {w: sum(v) / len(v) for w, v in sorted(by_ways.items())}
        parts = [f"{w}-way {m:.2f}x" for w, m in means.items()]
        spread = max((max(v) - min(v)) / min(v) for v in by_ways.values())
        text = f"- {model}: time over the backbone's {', '.join(parts)}; largest spread over shots {spread:.0%}"
        if len(means) > 1 and min(means) == 1:
            text += f"; {max(means)}-way over 1-way {means[max(means)] / means[1]:.2f}x"
        out.append(text)
    head = (
        "Ratios (each row's median over the backbone's, the two called alternately in one process; means over shots):"
    )
    return ["", head, *out] if out else []
