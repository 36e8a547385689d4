"""Inputs are checked as a whole and named in the error: starting teachers, benchmark datasets."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import write_dataset

from distillfss.cli import main
from distillfss.config import ModelConfig
from distillfss.model_io import ModelError, load_teacher_weights, save_teacher_checkpoint
from distillfss.teacher import build_teacher


@pytest.mark.parametrize(
    "change", [{"image_size": 96}, {"heads": 4}, {"heads_stride8": 2}, {"pe_dropout": 0.5}, {"backbone": "resnet50"}]
)
def test_a_starting_teacher_of_another_architecture_is_refused_by_field(tmp_path, lite0_64, change) -> None:
    cfg = ModelConfig(backbone="efficientnet_lite0", image_size=64, heads=2, num_classes=1)
    save_teacher_checkpoint(tmp_path, build_teacher(lite0_64, cfg), cfg, {})
    field = next(iter(change))
    with pytest.raises(ModelError, match=f"{field} = "):
        load_teacher_weights(tmp_path, lite0_64, dataclasses.replace(cfg, **change))
    loaded = load_teacher_weights(tmp_path, lite0_64, dataclasses.replace(cfg, num_classes=3))  # classes may differ
    assert loaded.decoder is not None


def test_benchmark_refuses_two_datasets_with_one_name(tmp_path, capsys) -> None:
    a = write_dataset(tmp_path / "a" / "data")
    b = write_dataset(tmp_path / "b" / "data")
    assert main(["benchmark", "--data", f"{a},{b}", "--out", str(tmp_path / "bench")]) == 2
    err = capsys.readouterr().err
    assert "two datasets are named data" in err and str(a) in err and not (tmp_path / "bench").exists()
