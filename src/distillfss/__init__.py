"""distillfss: few-shot segmentation distilled into a fast, support-free student (DistillFSS).

Public API::

    from distillfss import FewShotSegmenter            # fit / predict / save / load / export_onnx (see api)
    from distillfss import build_backbone, build_teacher, build_student, adapt, Predictor, load_model
    from distillfss.benchmark import BenchmarkConfig, run_benchmark   # the CLI's benchmark and demo, typed
    from distillfss.demo import DemoConfig, run_demo
"""

from .adapt import AdaptResult, adapt
from .api import FewShotSegmenter
from .backbones import BACKBONES, FrozenBackbone, Pyramid, build_backbone
from .config import PRESETS, AdaptConfig, ModelConfig
from .model_io import load_model, save_model
from .predictor import Predictor
from .student import FastStudent, Student, build_fast_student, build_student
from .teacher import EncodedSupport, Teacher, build_teacher, encode_support

__version__ = "0.1.0"

__all__ = [
    "BACKBONES",
    "PRESETS",
    "AdaptConfig",
    "AdaptResult",
    "EncodedSupport",
    "FastStudent",
    "FewShotSegmenter",
    "FrozenBackbone",
    "ModelConfig",
    "Predictor",
    "Pyramid",
    "Student",
    "Teacher",
    "adapt",
    "build_backbone",
    "build_fast_student",
    "build_student",
    "build_teacher",
    "encode_support",
    "load_model",
    "save_model",
]
