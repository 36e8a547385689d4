"""A tiny meta-training run shared by the in-process tests and the torchrun worker."""

from __future__ import annotations

from pathlib import Path

from distillfss.backbones import build_backbone
from distillfss.config import MetaConfig, ModelConfig
from distillfss.data.selfsup import SelfSupSource, load_source_images
from distillfss.meta import MetaResult, meta_train

MODEL = ModelConfig(backbone="efficientnet_lite0", image_size=64)
# SGD (linear in the gradient) for the DDP comparison: Adam's first steps amplify rounding-level gradient
# differences on near-zero gradients to ~lr.
DDP_SETTINGS = {"optimizer": "sgd", "lr": 0.1}


def tiny_run(out: Path, steps: int = 4, save_every: int = 2, on_step=None, **overrides) -> MetaResult:
    source = SelfSupSource(load_source_images(("chelsea", "coffee", "astronaut")), size=64, views=3, seed=0)
    cfg = MetaConfig(steps=steps, batch=4, val_every=2, val_episodes=4, precision="fp32", **overrides)
    backbone = build_backbone(MODEL.backbone, MODEL.image_size)
    return meta_train(source, backbone, MODEL, cfg, out, progress=False, save_every=save_every, on_step=on_step)


def own_state(result: MetaResult) -> dict:
    return {k: v.clone() for k, v in result.teacher.state_dict().items() if not k.startswith("backbone.")}
