"""The interactive loop: the accuracy estimate, warm starts (adapt --from), suggest and the live preview."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ADAPT, write_dataset
from PIL import Image

from distillfss import estimate
from distillfss.baselines import QUICK
from distillfss.cli import main
from distillfss.config import AdaptConfig, warm_config
from distillfss.data import load_split
from distillfss.data.folder import load_mask
from distillfss.demo import demo_root
from distillfss.estimate import copy_groups, estimate_accuracy, held_out_counts
from distillfss.fast import fit_label_probes
from distillfss.preview import Preview, disagreement
from distillfss.sampling import sample_support
from distillfss.teacher import encode_support


def _squares(n: int, noise: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n <= 4 64 px images with one bright square each at its own place, labelled by it (or, ``noise``, by random
    pixels)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 64, 64, generator=gen) * 0.2
    y = torch.zeros(n, 64, 64, dtype=torch.long)
    for i in range(n):
        r, c = 4 + 12 * i, 44 - 12 * i
        x[i, :, r : r + 16, c : c + 16] = 0.9
        y[i, r : r + 16, c : c + 16] = 1
    if noise:
        y = (torch.rand(n, 64, 64, generator=gen) < 0.1).long()
    return x, y


def _estimate(lite0_64, x, y, seed=0):  # noqa: ANN001, ANN202
    support = encode_support(lite0_64, x, y, 1)
    return estimate_accuracy(support, y, fit_label_probes(lite0_64, support, y, settings=QUICK), seed)


def test_the_estimate_follows_how_learnable_the_labels_are_and_its_interval_holds_it(lite0_64) -> None:
    clear = _estimate(lite0_64, *_squares(4))
    x, y = _squares(4, noise=True)
    noise = _estimate(lite0_64, x, y)
    for e in (clear, noise):
        assert 0 <= e.low <= e.sample_low <= e.miou <= e.sample_high <= e.high <= 100 and e.images == 4
        assert e.high - e.low >= estimate.Z * estimate.GAP_SD  # the support set's spread and the gap to a test set
        assert e.gain is not None and e.gain_low <= e.gain <= e.gain_high
        assert "estimated mIoU on new images" in e.advice
    assert clear.miou > 60 and noise.miou < 30, (clear, noise)
    assert _estimate(lite0_64, *_squares(4)) == clear  # seeded: the same support gives the same estimate
    x, y = _squares(4)
    support = encode_support(lite0_64, x, y, 1)
    probes = fit_label_probes(lite0_64, support, y, settings=QUICK)
    counts = held_out_counts(support, y, probes)  # what a benchmark's seeds share
    assert estimate_accuracy(support, y, probes, 1, counts) == estimate_accuracy(support, y, probes, 1)


def test_one_support_image_gives_no_estimate_and_an_interval_that_says_so(lite0_64) -> None:
    e = _estimate(lite0_64, *_squares(1))
    assert e.miou is None and (e.low, e.high) == (0.0, 100.0) and e.gain is None
    assert "label a second" in e.advice
    two = _estimate(lite0_64, *_squares(2))  # two images: an estimate, but no trend yet
    assert two.miou is not None and two.gain is None and "third" in two.advice


@pytest.mark.parametrize(
    ("name", "one_scan"), [("lung_ct", True), ("nuclei", False), ("nuclei_sizes", False), ("aerial_buildings", False)]
)
def test_support_slices_of_one_scan_are_grouped_as_near_copies(name: str, one_scan: bool) -> None:
    split = load_split(demo_root() / name, "train")
    stems = sample_support([s.stem for s in split.samples], 5)
    masks = [load_mask(s.mask, split.num_classes) for s in split.samples if s.stem in stems]
    groups = copy_groups(torch.as_tensor(np.stack(masks)).long())
    assert groups == ([(0, 1, 2, 3, 4)] if one_scan else [(i,) for i in range(5)])


def test_masks_overlapping_only_as_chance_allows_are_not_copies() -> None:
    gen = torch.Generator().manual_seed(0)
    big = (torch.rand(4, 64, 64, generator=gen) < 0.6).long()  # IoU about 0.43 between any two: chance at 60 %
    assert copy_groups(big) == [(0,), (1,), (2,), (3,)]
    empty = torch.zeros(3, 64, 64, dtype=torch.long)
    empty[0, :8, :8] = 1
    assert copy_groups(empty) == [(0,), (1,), (2,)]


def _copies(places: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image per entry, with the square of ``_squares`` number ``places[i]`` and a little noise of its own."""
    x, y = _squares(max(places) + 1)
    x = x[places] + 0.01 * torch.rand(len(places), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return x, y[places]


def test_near_copies_are_held_out_together_and_one_group_gives_no_estimate(lite0_64) -> None:
    one = _estimate(lite0_64, *_copies([0, 0, 0, 0]))  # one structure at one place, four times
    assert one.near_copies and one.miou is None and (one.low, one.high) == (0.0, 100.0) and one.gain is None
    assert "no estimate" in one.advice
    two = _estimate(lite0_64, *_copies([0, 0, 3, 3]))
    assert copy_groups(_copies([0, 0, 3, 3])[1]) == [(0, 1), (2, 3)]
    assert two.near_copies and two.miou is not None and two.images == 4
    assert "4 images in 2 independent groups" in two.advice
    assert two.gain is not None  # each group held out leaves two images to drop one from
    apart = _estimate(lite0_64, *_squares(4))
    assert not apart.near_copies and "groups" not in apart.advice


def test_the_windows_of_one_image_are_held_out_together_and_counted_as_one_image(lite0_64) -> None:
    x, y = _squares(4)
    support = encode_support(lite0_64, x, y, 1)
    probes = fit_label_probes(lite0_64, support, y, settings=QUICK)
    pairs = held_out_counts(support, y, probes, torch.tensor([0, 0, 1, 1]))  # two images, two windows each
    assert pairs.groups == [(0, 1), (2, 3)] and (pairs.images, pairs.windows) == (2, 4)
    e = estimate_accuracy(support, y, probes, 0, pairs)
    assert e.images == 2 and e.miou is not None and e.gain is None and not e.near_copies
    assert "(from 2 held-out support images, 4 windows)" in e.advice and "third" in e.advice
    # each window predicted without its image's other window: not the per-window estimate
    assert pairs.held is not None and not torch.equal(pairs.held[0], held_out_counts(support, y, probes).held[0])
    one = estimate_accuracy(support, y, probes, 0, held_out_counts(support, y, probes, torch.zeros(4).long()))
    assert one.miou is None and one.images == 1 and "label a second" in one.advice
    with pytest.raises(ValueError, match="one entry per support window"):
        held_out_counts(support, y, probes, torch.tensor([0, 1]))


def test_adapt_holds_out_a_large_support_images_windows_together(tmp_path: Path) -> None:
    """Three 96 x 64 px images at scale 1 with 64 px windows: six windows, an estimate from three images."""
    data = write_dataset(tmp_path / "data", n_train=3, n_test=1, size=(96, 64))
    out = tmp_path / "m"
    assert main(["adapt", "--support", str(data), "--shots", "3", "--scale", "1", "--out", str(out), *TINY_ADAPT]) == 0
    est = json.loads((out / "config.json").read_text())["estimate"]
    assert est["images"] == 3 and "3 held-out support images, 6 windows" in est["advice"], est


def test_a_warm_start_runs_a_third_of_the_steps_unless_the_user_set_them() -> None:
    cfg = AdaptConfig()
    assert (warm_config(cfg).iterations, warm_config(cfg).fast_iterations) == (20, 67)
    kept = warm_config(AdaptConfig(iterations=9, fast_iterations=10), given=["iterations"])
    assert (kept.iterations, kept.fast_iterations) == (9, 4)


def test_disagreement_is_0_for_equal_maps_and_100_for_disjoint_ones() -> None:
    a = np.zeros((8, 8), np.uint8)
    b = a.copy()
    a[:4], b[4:] = 1, 1
    assert disagreement(a, a, 1) == 0.0 and disagreement(a, b, 1) == 100.0
    assert disagreement(np.zeros_like(a), np.zeros_like(a), 2) == 0.0  # no foreground either side: agreement


@pytest.fixture(scope="module")
def adapted(tmp_path_factory) -> tuple[Path, Path, str]:
    """A dataset (5 train, 5 test images), a model adapt wrote on 3 of them, and what adapt printed."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("loop")
    data = write_dataset(root / "data", n_train=5, n_test=5)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["adapt", "--support", str(data), "--shots", "3", "--out", str(root / "m3"), *TINY_ADAPT]) == 0
    return data, root / "m3", printed.getvalue()


def test_adapt_from_continues_the_earlier_model_and_leaves_it_alone(adapted, tmp_path) -> None:
    data, first, printed = adapted
    config = json.loads((first / "config.json").read_text())
    assert (first / "teacher.safetensors").is_file()
    assert set(config["estimate"]) >= {"miou", "low", "high", "gain", "advice"}
    assert config["estimate"]["advice"] in printed  # the CLI prints it
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    out = tmp_path / "m4"
    argv = ["adapt", "--support", str(data), "--shots", "4", "--from", str(first), "--out", str(out)]
    assert main([*argv, "--config", TINY_ADAPT[-1]]) == 0
    warm = json.loads((out / "config.json").read_text())
    assert warm["teacher_init"].startswith("warm start from")
    assert warm["model"] == config["model"] and warm["classes"] == config["classes"]
    assert warm["adapt"]["iterations"] == -(-AdaptConfig.iterations // 3)  # not given: a third
    assert warm["adapt"]["fast_iterations"] == 2  # given in the config file: kept
    assert warm["probe"]["cv"].startswith("fixed") and warm["support"]["shots"] == 4
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    # the warm start starts from the earlier student: with one step of a zero learning rate it is that student
    same = tmp_path / "same"
    (tmp_path / "lr0.yaml").write_text("fast_iterations: 1\nlr: 0.0\n")
    assert main([*argv[:-1], str(same), "--iterations", "1", "--config", str(tmp_path / "lr0.yaml")]) == 0
    from safetensors.torch import load_file

    a, b = load_file(str(first / "model.safetensors")), load_file(str(same / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapt_from_a_folder_without_its_teacher_is_refused_by_name(adapted, tmp_path, capsys) -> None:
    data, first, _ = adapted
    old = tmp_path / "old"
    shutil.copytree(first, old)
    (old / "teacher.safetensors").unlink()  # a folder an earlier version wrote
    capsys.readouterr()
    assert main(["adapt", "--support", str(data), "--from", str(old), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "teacher.safetensors" in err and str(old) in err and not (tmp_path / "o").exists()


def test_suggest_ranks_every_image_once_highest_score_first(adapted, tmp_path, capsys) -> None:
    data, model, _ = adapted
    images = data / "test" / "images"
    assert (
        main(
            [
                "suggest",
                "--model",
                str(model),
                "--images",
                str(images),
                "--top",
                "2",
                "--json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    ranking = json.loads((tmp_path / "s.json").read_text())["ranking"]
    assert sorted(Path(r["image"]).name for r in ranking) == sorted(p.name for p in images.iterdir())
    scores = [r["score"] for r in ranking]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 100 for s in scores)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert len(printed) == 2 and ranking[0]["image"] in printed[0]


def test_suggest_ranks_the_readable_images_and_names_an_unreadable_one(adapted, tmp_path, capsys) -> None:
    data, model, _ = adapted
    images = tmp_path / "images"
    shutil.copytree(data / "test" / "images", images)
    (images / "broken.png").write_bytes(b"not a png")
    capsys.readouterr()
    args = ["suggest", "--model", str(model), "--images", str(images), "--json", str(tmp_path / "s.json")]
    assert main(args) == 2
    out, err = capsys.readouterr()
    report = json.loads((tmp_path / "s.json").read_text())
    assert len(report["ranking"]) == 5 and "broken.png" not in out
    assert "broken.png: not a readable image" in report["unreadable"][0]
    assert "1 of 6 images could not be read" in err and "broken.png" in err


def test_preview_predicts_the_others_and_each_labelled_image_without_its_own_mask(tmp_path, lite0_64) -> None:
    data = write_dataset(tmp_path / "data", n_train=4, n_test=1)
    images = sorted((data / "train" / "images").iterdir())
    masks = {p.stem: data / "train" / "masks" / p.name for p in images}
    before = {p: p.read_bytes() for p in (*images, *masks.values())}
    preview = Preview(lite0_64, 64)
    one = preview.run({images[0].stem: (images[0], masks[images[0].stem])}, {p.stem: p for p in images[1:]}, 1)
    assert sorted(one) == sorted(p.stem for p in images[1:])  # a single labelled image is not predicted
    labelled = {p.stem: (p, masks[p.stem]) for p in images[:2]}
    out = preview.run(labelled, {p.stem: p for p in images[2:]}, 1)
    assert sorted(out) == sorted(p.stem for p in images)
    for p in images:
        assert out[p.stem].shape == np.asarray(Image.open(p)).shape[:2] and out[p.stem].dtype == np.uint8
    # a labelled image's preview does not use its own mask: blanking that mask leaves its preview unchanged
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros_like(np.asarray(Image.open(masks[images[0].stem])))).save(blank)
    again = preview.run({images[0].stem: (images[0], blank), images[1].stem: labelled[images[1].stem]}, {}, 1)
    assert np.array_equal(again[images[0].stem], out[images[0].stem])
    assert {p: p.read_bytes() for p in before} == before


def test_api_estimate_and_warm_start_through_a_saved_folder(tmp_path) -> None:
    from distillfss import FewShotSegmenter

    data = write_dataset(tmp_path / "data", n_train=4, n_test=1)
    images = sorted((data / "train" / "images").iterdir())
    masks = [data / "train" / "masks" / p.name for p in images]
    options = {"backbone": "efficientnet_lite0", "image_size": 64, "iterations": 1, "fast_iterations": 2}
    seg = FewShotSegmenter(**options).fit(images[:1], masks[:1])
    assert seg.estimate is not None and seg.estimate["miou"] is None  # one image: no estimate
    seg.save(tmp_path / "m")
    again = FewShotSegmenter.load(tmp_path / "m").fit(images[:2], masks[:2], warm_start=True)
    assert again.meta["support"]["shots"] == 2 and again.estimate["images"] == 2
    assert again.predict(images[0]).shape == np.asarray(Image.open(images[0])).shape[:2]
