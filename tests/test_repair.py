"""Image repair: masks, compositing, quality metrics, the three `repair` verbs and their mask errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from visionflow.cli import main
from visionflow.gan.masks import (box_masks, center_masks, coverage, random_masks, random_rectangle_masks,
                                  random_stroke_masks)
from visionflow.gan.repair import RepairConfig, RepairGenerator, biharmonic_repair, psnr_ssim, repair_images
from visionflow.api import recorded_split
from visionflow.api import repair as repair_api
from visionflow.api.repair import _training_sources, mean_scores
from visionflow.data.sources import open_data
from visionflow.errors import VisionflowError
from visionflow.runs import RunDir

from conftest import add_images, write_class_folder


# --- masks -------------------------------------------------------------------------------------------------

def test_center_masks_are_the_asked_square_in_the_middle():
    masks = center_masks(3, 28, 14)
    assert masks.shape == (3, 1, 28, 28)
    assert torch.allclose(coverage(masks), torch.full((3,), 14 * 14 / 28 ** 2))
    assert masks[0, 0, 7:21, 7:21].all() and masks[0, 0].sum() == 196


def test_box_masks_cover_exactly_the_box():
    masks = box_masks(10, torch.tensor([[2, 3, 4, 5]]))
    expected = torch.zeros(10, 10)
    expected[3:8, 2:6] = 1
    assert torch.equal(masks[0, 0], expected)


def test_random_rectangles_stay_within_their_side_range():
    masks = random_rectangle_masks(200, 32, torch.Generator().manual_seed(1), min_side=0.25, max_side=0.5)
    heights = masks[:, 0].amax(dim=2).sum(dim=1)
    widths = masks[:, 0].amax(dim=1).sum(dim=1)
    assert heights.min() >= 8 and heights.max() <= 16 and widths.min() >= 8 and widths.max() <= 16
    assert torch.allclose(coverage(masks), heights * widths / 32 ** 2)  # one solid rectangle each


def test_strokes_are_partial_irregular_holes():
    masks = random_stroke_masks(100, 32, torch.Generator().manual_seed(2))
    fraction = coverage(masks)
    assert (fraction > 0).all() and (fraction < 0.9).all()
    # not rectangles: the bounding box of a stroke mask holds pixels that are not hole
    rows, cols = masks[:, 0].amax(dim=2).sum(dim=1), masks[:, 0].amax(dim=1).sum(dim=1)
    assert (masks.flatten(1).sum(1) < rows * cols).float().mean() > 0.9


def test_random_masks_are_seeded_and_mix_the_kinds():
    first = random_masks(300, 28, torch.Generator().manual_seed(3), center_hole=14)
    again = random_masks(300, 28, torch.Generator().manual_seed(3), center_hole=14)
    other = random_masks(300, 28, torch.Generator().manual_seed(4), center_hole=14)
    assert torch.equal(first, again) and not torch.equal(first, other)
    centre = (first == center_masks(1, 28, 14)).flatten(1).all(dim=1).float().mean()
    assert 0.2 < centre < 0.5  # about a third are centre blocks, the rest rectangles and strokes
    assert set(first.unique().tolist()) == {0.0, 1.0}


# --- compositing and metrics ------------------------------------------------------------------------------

def test_repair_keeps_known_pixels_exactly():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    masks = random_masks(6, 32, torch.Generator().manual_seed(5))
    known = masks.expand_as(images) == 0
    for repaired in (repair_images(RepairGenerator(3, 8), images, masks), biharmonic_repair(images, masks)):
        assert torch.equal(repaired[known], images[known])
        assert not torch.equal(repaired, images)  # the hole was filled with something else


def test_psnr_ssim_identical_is_perfect_and_a_worse_fill_scores_lower():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (4, 1, 28, 28), dtype=np.uint8))
    psnr, ssim = psnr_ssim(images, images)
    assert np.isinf(psnr).all() and np.allclose(ssim, 1.0)
    masks = center_masks(4, 28, 14).bool()
    near, far = images.clone(), images.clone()
    near[masks] = (images[masks].int() + 10).clamp(0, 255).byte()
    far[masks] = 255 - images[masks]
    psnr_near, ssim_near = psnr_ssim(images, near)
    psnr_far, ssim_far = psnr_ssim(images, far)
    assert (psnr_near > psnr_far).all() and (ssim_near > ssim_far).all()


def test_mean_scores_stay_finite_when_a_repair_is_exact():
    scores = mean_scores(np.array([20.0, np.inf]), np.array([0.5, 1.0]))
    assert scores == {"psnr": 60.0, "ssim": 0.75, "perfect": 1}  # the exact repair counts as 100 dB


# --- the verbs ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repair") / "run"
    assert main(["repair", "train", "digits", "--out", str(out), "--epochs", "1", "--max-images", "300",
                 "--batch-size", "32", "--width", "8", "--quiet"]) == 0
    return out


def test_train_writes_a_resumable_run_and_resume_extends_it(digits_run):
    for name in ("config.json", "split.json", "best.safetensors", "last.safetensors", "checkpoint.pt", "metrics.csv"):
        assert (digits_run / name).exists()
    assert main(["repair", "train", "digits", "--out", str(digits_run), "--resume", "--epochs", "2", "--quiet"]) == 0
    rows = (digits_run / "metrics.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "1", "2"]
    assert json.loads((digits_run / "report.json").read_text())["epochs"] == 2


def test_resume_reads_the_data_given_and_names_the_flags_it_ignores(digits_run, tmp_path, caplog, capsys):
    run = shutil.copytree(digits_run, tmp_path / "copy")
    before = json.loads((run / "config.json").read_text())["train"]
    config = (run / "config.json").read_text()
    capsys.readouterr()
    assert main(["repair", "train", "./digits", "--out", str(run), "--resume", "--epochs", "2", "--width", "4",
                 "--hole-weight", "1", "--quiet"]) == 2  # DATA is read as given: ./digits is no folder here
    assert capsys.readouterr().err.splitlines() == [  # alone, not after the warning naming the flags ignored
        "visionflow: error: ./digits: no such file or folder (and not a built-in data set: digits)"]
    assert (run / "config.json").read_text() == config
    other = tmp_path / "other" / "a"
    other.mkdir(parents=True)
    for i in range(8):
        Image.new("L", (28, 28), color=i * 30).save(other / f"{i}.png")
    assert main(["repair", "train", str(other.parent), "--out", str(run), "--resume", "--epochs", "2"]) == 2
    assert "is not the data the run trained on (digits)" in capsys.readouterr().err  # its PSNRs would not compare
    assert main(["repair", "train", "digits", "--out", str(run), "--resume", "--epochs", "2", "--width", "4",
                 "--hole-weight", "1", "--quiet"]) == 0
    assert "ignored: --width, --hole-weight" in caplog.text
    after = json.loads((run / "config.json").read_text())["train"]
    assert after == {**before, "epochs": 2}  # the run's own settings


@pytest.mark.parametrize("max_images", [None, 24])
def test_resume_holds_out_what_the_run_held_out_when_images_were_added(tmp_path, caplog, max_images):
    data = write_class_folder(tmp_path / "data", per_class=10, size=12)
    out = tmp_path / "run"
    argv = ["repair", "train", str(data), "--out", str(out), "--quiet"]
    assert main([*argv, "--epochs", "1", "--image-size", "16", "--width", "4", "--batch-size", "8",
                 *([] if max_images is None else ["--max-images", str(max_images)])]) == 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["held_out"]) == 3
    add_images(data, 3, seed=1)  # a seeded split (and draw) of the new listing holds out others, trained on in epoch 1
    caplog.clear()
    assert main([*argv, "--resume", "--epochs", "2"]) == 0
    assert json.loads((out / "split.json").read_text()) == split
    assert "the images held out in split.json stay held out" in caplog.text
    if max_images is None:
        assert caplog.messages == [f"{data}: 9 more files to train on than when the run started; the images held "
                                   "out in split.json stay held out"]
    cfg = RepairConfig.from_dict(json.loads((out / "config.json").read_text())["train"])
    train, val, _ = _training_sources(cfg, open_data(str(data)), split)  # what the resume trained and validated on
    assert sorted(val.origin(i) for i in range(len(val))) == sorted(split["held_out"])
    assert not {train.origin(i) for i in range(len(train))} & set(split["held_out"])


def test_resume_with_max_images_trains_on_the_images_the_run_drew_whatever_files_come_and_go(tmp_path, caplog):
    data = write_class_folder(tmp_path / "data", per_class=10, size=12)
    out = tmp_path / "run"
    assert main(["repair", "train", str(data), "--out", str(out), "--epochs", "1", "--image-size", "16", "--width", "4",
                 "--batch-size", "8", "--max-images", "24", "--quiet"]) == 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["trained_on"]) == 21 and not set(split["trained_on"]) & set(split["held_out"])
    assert "training_items_per_class" not in split  # those of the whole data would say the sample's wrongly
    changed, moved = shutil.copytree(out, tmp_path / "changed"), shutil.copytree(data, tmp_path / "moved")
    drawn = [str(moved / os.path.relpath(path, data)) for path in split["trained_on"]]
    held_out = [str(moved / os.path.relpath(path, data)) for path in split["held_out"]]
    outside = sorted(set(map(str, moved.rglob("[0-9][0-9][0-9].png"))) - set(drawn + held_out))
    assert len(outside) == 6
    os.unlink(outside[0])  # one that the run did not draw
    add_images(moved, 3, seed=1)  # a seeded draw of the new listing picks other images
    caplog.clear()
    assert main(["repair", "train", str(moved), "--out", str(changed), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert caplog.messages == [f"{moved}: 8 more files than when the run started, not trained on (the run trains on "
                               "the 21 images --max-images drew); the images held out in split.json stay held out"]
    assert json.loads((changed / "split.json").read_text())["trained_on"] == drawn
    assert main(["repair", "train", str(data), "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    weights, unchanged = load_file(changed / "last.safetensors"), load_file(out / "last.safetensors")
    assert all(torch.equal(weights[name], unchanged[name]) for name in unchanged)  # trained on the same images


@pytest.mark.parametrize("split,change", [
    ({"held_out": ["square/000.png", "square/001.png", "square/gone.png"], "items": 6},
     "1 more file to train on than when the run started"),
    # counted class by class where split.json has the counts: the 4 training files now are 0 / 2 / 2
    *[({"held_out": ["square/000.png", "square/001.png", "square/gone.png"], "items": 6,
        "training_items_per_class": {"square": 0, "stripes_h": h, "stripes_v": v}}, f"{change} to train on than when "
       "the run started") for h, v, change in [(1, 3, "1 more file and 1 fewer"), (3, 2, "1 fewer file"),
                                               (1, 4, "1 more file and 2 fewer"), (0, 5, "2 more files and 3 fewer")]],
    ({"held_out": ["square/000.png", "square/001.png", "square/gone.png"], "items": 7,
      "trained_on": ["stripes_h/000.png", "stripes_h/001.png", "stripes_h/gone.png"]},
     "1 more file than when the run started, not trained on (the run trains on the 3 images --max-images drew), and 1 "
     "of the 3 images it trains on is gone (training on the other 2)"),
])
def test_what_changed_since_the_run_started_is_counted_and_said_in_the_singular_for_one(tmp_path, split, change):
    data = write_class_folder(tmp_path / "data", per_class=2, size=12)
    split = {name: [str(data / path) for path in value] if isinstance(value, list) else value
             for name, value in split.items()}
    train, val, changes = recorded_split(str(data), open_data(str(data)).train, split)
    assert (len(train), len(val)) == (4 if "trained_on" not in split else 2, 2)
    assert changes == (f"{data}: {change}, and 1 of the 3 held-out images is gone (validating on the other 2); the "
                       "images held out in split.json stay held out")


def test_resume_of_a_run_whose_split_json_lists_the_first_held_out_images_only_splits_as_the_run_did(tmp_path,
                                                                                                    monkeypatch):
    # split.json from before it recorded "items" lists the first VALIDATION_LIMIT (1000) held-out images; the others,
    # past them, were held out all the same by the seeded split that every resume made again. A limit of 1 here
    # stands for the 1000: the run holds out 3.
    monkeypatch.setattr(repair_api, "VALIDATION_LIMIT", 1)
    data = write_class_folder(tmp_path / "data", per_class=10, size=12)
    argv = ["repair", "train", str(data), "--image-size", "16", "--width", "4", "--batch-size", "8", "--quiet"]
    new = tmp_path / "new"
    assert main([*argv, "--out", str(new), "--epochs", "1"]) == 0
    old = shutil.copytree(new, tmp_path / "old")
    split = json.loads((new / "split.json").read_text())
    assert len(split["held_out"]) == 3
    (old / "split.json").write_text(json.dumps({"held_out": split["held_out"][:1]}))  # a strict prefix, as then
    for run in (new, old):
        assert main(["repair", "train", str(data), "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert json.loads((old / "split.json").read_text()) == split  # in full from then on
    weights, as_new = load_file(old / "last.safetensors"), load_file(new / "last.safetensors")
    assert all(torch.equal(weights[name], as_new[name]) for name in as_new)  # no held-out image trained on


def test_a_split_json_without_items_that_lists_fewer_than_the_limit_is_complete_and_kept(tmp_path):
    # from before "items": a list shorter than VALIDATION_LIMIT is every held-out image; a seeded split made again on
    # a listing with files added would hold out others and train on these
    data = write_class_folder(tmp_path / "data", per_class=10, size=12)
    cfg = RepairConfig(data=str(data), out=str(tmp_path / "run"), image_size=16)
    _, _, split = _training_sources(cfg, open_data(str(data)))
    add_images(data, 3, seed=1)
    train, held, kept = _training_sources(cfg, open_data(str(data)), {"held_out": split["held_out"]})
    trained_on = {train.origin(i) for i in range(len(train))}
    assert sorted(held.origin(i) for i in range(len(held))) == sorted(split["held_out"])
    assert kept["held_out"] == split["held_out"]
    assert not trained_on & set(split["held_out"]) and len(trained_on) == 30 + 9 - len(split["held_out"])


def test_max_images_records_a_sample_only_when_it_draws_one_and_a_sample_mostly_gone_is_refused(tmp_path):
    data = write_class_folder(tmp_path / "data", per_class=10, size=12)
    everything = RepairConfig(data=str(data), out=str(tmp_path / "a"), image_size=16, max_images=100)
    assert "trained_on" not in _training_sources(everything, open_data(str(data)))[2]  # all 30: nothing drawn
    sampled = RepairConfig(data=str(data), out=str(tmp_path / "b"), image_size=16, max_images=20)
    _, _, split = _training_sources(sampled, open_data(str(data)))
    assert len(split["trained_on"]) + len(split["held_out"]) == 20
    for path in split["trained_on"][1:]:
        os.remove(path)
    with pytest.raises(VisionflowError, match="1 of the images the run trains on is left"):
        _training_sources(sampled, open_data(str(data)), split)


def test_a_max_images_draw_made_again_that_leaves_too_few_to_train_on_is_one_line_without_the_warning(tmp_path,
                                                                                                     caplog):
    # a run from before split.json recorded "trained_on" draws its --max-images sample again, after recorded_split
    data = write_class_folder(tmp_path / "data", per_class=10, size=12)
    cfg = RepairConfig(data=str(data), out=str(tmp_path / "run"), image_size=16, max_images=1)
    split = {"held_out": [str(data / kind / "000.png") for kind in ("square", "stripes_h", "stripes_v")], "items": 30}
    add_images(data, 1, seed=1)  # a warning would count them, before the error
    with pytest.raises(VisionflowError, match="too few images to train on"):
        _training_sources(cfg, open_data(str(data)), split)
    assert caplog.messages == []


@pytest.mark.parametrize("verb", [["train"], ["gan", "train"]])
def test_another_verbs_resume_names_the_verb_that_resumes_a_repair_run(digits_run, capsys, verb):
    assert main([*verb, "digits", "--out", str(digits_run), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "an image-repair run, not a" in err and "(resume it with `visionflow repair train --resume`)" in err
    assert err.count("\n") == 1


def test_resume_refuses_fewer_epochs_and_infinite_values_are_refused_before_any_folder(digits_run, tmp_path, capsys):
    run = shutil.copytree(digits_run, tmp_path / "copy")
    assert main(["repair", "train", "digits", "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 0
    config = (run / "config.json").read_text()
    capsys.readouterr()
    assert main(["repair", "train", "digits", "--out", str(run), "--resume", "--epochs", "1"]) == 2
    assert "already finished 2 epochs" in capsys.readouterr().err
    assert (run / "config.json").read_text() == config  # left as it was
    for flag in ("--lr", "--hole-weight", "--adversarial-weight"):
        assert main(["repair", "train", "digits", "--out", str(tmp_path / "run"), flag, "inf"]) == 2
        assert "must be a finite number" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_evaluate_json_scores_model_and_biharmonic_on_the_asked_count(digits_run, tmp_path, capsys):
    assert main(["repair", "evaluate", str(digits_run), "digits", "--mask", "random", "--limit", "12", "--json",
                 "--examples", str(tmp_path / "examples.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 12
    # 8 examples, one row each: damaged | biharmonic | model | original, 28px tiles with 2px gaps
    assert Image.open(tmp_path / "examples.png").size == (4 * 30 + 2, 8 * 30 + 2)
    for name in ("model", "biharmonic"):
        assert 5 < result[name]["psnr"] < 60 and 0 < result[name]["ssim"] <= 1
    assert result["model"] != result["biharmonic"]


def _digit_png(path, size=28):
    image = np.zeros((size, size), dtype=np.uint8)
    image[6:22, 12:16] = 255
    Image.fromarray(image).save(path)
    return image


def test_run_writes_repaired_image_and_side_by_side(digits_run, tmp_path):
    original = _digit_png(tmp_path / "seven.png")
    assert main(["repair", "run", str(digits_run), str(tmp_path / "seven.png"), "--box", "8,8,12,12",
                 "--out", str(tmp_path / "out")]) == 0
    repaired = np.asarray(Image.open(tmp_path / "out" / "seven_repaired.png"))
    side = np.asarray(Image.open(tmp_path / "out" / "seven_side_by_side.png"))
    assert side.shape == (28, 56)
    known = np.ones((28, 28), dtype=bool)
    known[8:20, 8:20] = False
    assert np.array_equal(repaired[known], original[known])
    assert np.array_equal(side[:, 28:], repaired)


@pytest.mark.parametrize("mask_pixels, expected", [
    (np.zeros((28, 28), dtype=np.uint8), "empty"),                # no hole
    (np.full((28, 28), 255, dtype=np.uint8), "covers all"),       # nothing known
])
def test_bad_masks_are_one_line_errors(digits_run, tmp_path, capsys, mask_pixels, expected):
    _digit_png(tmp_path / "digit.png")
    Image.fromarray(mask_pixels).save(tmp_path / "mask.png")
    code = main(["repair", "run", str(digits_run), str(tmp_path / "digit.png"), "--mask", str(tmp_path / "mask.png"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1


def test_an_image_the_box_or_mask_does_not_fit_is_named_and_the_others_are_repaired(digits_run, tmp_path, capsys,
                                                                                        caplog):
    _digit_png(tmp_path / "big.png")
    _digit_png(tmp_path / "small.png", size=16)
    _digit_png(tmp_path / "tiny.png", size=6)
    argv = ["repair", "run", str(digits_run), str(tmp_path / "big.png"), str(tmp_path / "small.png"),
            str(tmp_path / "tiny.png")]
    mask = np.zeros((28, 28), dtype=np.uint8)
    mask[:6, :6] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for hole, out, misfit in ((["--box", "12,12,6,6"], "box", "pixels: --box 12,12,6,6 does not lie inside it"),
                              (["--mask", str(tmp_path / "mask.png")], "mask", "pixels, where --mask is 28x28")):
        caplog.clear()
        # as predict writes an error row and goes on, exit 0: the 16x16 and 6x6 images are named, the 28x28 one repaired
        assert main([*argv, *hole, "--out", str(tmp_path / out)]) == 0
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == ["000_big_repaired.png", "000_big_side_by_side.png"]
        printed = capsys.readouterr().out.splitlines()
        assert len(printed) == 1 and printed[0].startswith(f"{tmp_path / 'big.png'}: ")
        assert caplog.messages == [f"skipped {tmp_path / 'small.png'}: 16x16 {misfit}",
                                   f"skipped {tmp_path / 'tiny.png'}: 6x6 {misfit}"]
    assert main([*argv, "--box", "12,12,6,6", "--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"visionflow: error: {tmp_path / 'small.png'}: 16x16 pixels: --box 12,12,6,6 does not lie inside it"]
    caplog.clear()
    assert main([*argv, "--box", "0,0,6,6", "--out", str(tmp_path / "whole")]) == 0  # all of the 6x6 image: nothing known
    assert caplog.messages == [f"skipped {tmp_path / 'tiny.png'}: 6x6 pixels: --box 0,0,6,6 covers all of it, leaving "
                               "nothing to repair from"]


@pytest.mark.parametrize("box, expected", [
    (["--box", "-1,0,5,5"], "--box -1,0,5,5: x and y count pixels from the image's top-left corner: they are 0 or more"),
    (["--box=-1,0,5,5"], "--box -1,0,5,5: x and y count pixels from the image's top-left corner: they are 0 or more"),
    (["--box", "3,-2,5,5"], "--box 3,-2,5,5: x and y count pixels from the image's top-left corner: they are 0 or more"),
    (["--box", "3,2,0,5"], "--box 3,2,0,5: the width and height are 1 pixel or more"),
])
def test_a_box_that_fits_no_image_says_what_a_box_may_be(digits_run, tmp_path, capsys, box, expected):
    # '-1,0,5,5' after --box is its value, not an unknown option: the user is told that x and y are 0 or more
    _digit_png(tmp_path / "digit.png")
    code = main(["repair", "run", str(digits_run), str(tmp_path / "digit.png"), *box, "--out", str(tmp_path / "out")])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [f"visionflow: error: {expected}"]
    assert not (tmp_path / "out").exists()


def test_a_missing_or_unfinished_run_is_a_one_line_error_as_for_every_verb(tmp_path, capsys):
    _digit_png(tmp_path / "digit.png")

    def error(run_dir) -> str:
        code = main(["repair", "run", str(run_dir), str(tmp_path / "digit.png"), "--box", "8,8,12,12",
                     "--out", str(tmp_path / "out")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and not (tmp_path / "out").exists()
        return lines[0]

    assert error(tmp_path / "nope") == f"visionflow: error: {tmp_path / 'nope'}: no such run directory"
    run = tmp_path / "run"
    run.mkdir()
    assert error(run).endswith(": not a repair run (train one with `visionflow repair train`)")  # no config.json
    (run / "config.json").write_text(json.dumps({"version": 1, "task": "repair"}))
    assert error(run).endswith(": the run has no weights yet (training never finished an epoch)")


def test_weights_that_do_not_fit_the_runs_config_are_a_one_line_error(digits_run, tmp_path, capsys):
    run = shutil.copytree(digits_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["train"]["width"] = 16  # the weights are of width 8, as another run's could be
    (run / "config.json").write_text(json.dumps(config))
    for argv in (["run", str(run), str(tmp_path / "none.png"), "--box", "1,1,2,2", "--out", str(tmp_path / "out")],
                 ["evaluate", str(run), "digits", "--mask", "center"]):
        assert main(["repair", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "best.safetensors: weights do not fit the generator in config.json" in err


def test_resuming_a_checkpoint_that_does_not_fit_the_config_is_a_one_line_error(digits_run, tmp_path, capsys):
    run = shutil.copytree(digits_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["train"]["width"] = 16  # checkpoint.pt's generator is of width 8, as another run's could be
    (run / "config.json").write_text(json.dumps(config))
    epochs = len((run / "metrics.csv").read_text().strip().splitlines()) - 1
    assert main(["repair", "train", "digits", "--out", str(run), "--resume", "--epochs", str(epochs + 1), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{run / 'checkpoint.pt'}: weights do not fit the generator in config.json (size mismatch for " in err
    assert len((run / "metrics.csv").read_text().strip().splitlines()) - 1 == epochs  # nothing trained


def test_resuming_another_kind_of_checkpoint_is_a_one_line_error_naming_its_kind(digits_run, tmp_path, capsys):
    classifier = tmp_path / "classifier"
    data = write_class_folder(tmp_path / "data", per_class=6, size=12)
    assert main(["train", str(data), "--out", str(classifier), "--epochs", "1", "--quiet"]) == 0
    repair = shutil.copytree(digits_run, tmp_path / "repair")
    epochs = len((repair / "metrics.csv").read_text().strip().splitlines()) - 1
    own = {run: (run / "checkpoint.pt").read_bytes() for run in (classifier, repair)}
    (classifier / "checkpoint.pt").write_bytes(own[repair])  # each run's checkpoint.pt copied into the other
    (repair / "checkpoint.pt").write_bytes(own[classifier])
    capsys.readouterr()
    for argv, expected in (
            (["train", str(data), "--out", str(classifier), "--resume", "--epochs", "2"],
             f"{classifier / 'checkpoint.pt'}: the checkpoint of an image-repair run, not of a classifier run;"),
            (["repair", "train", "digits", "--out", str(repair), "--resume", "--epochs", str(epochs + 1)],
             f"{repair / 'checkpoint.pt'}: the checkpoint of a classifier run, not of an image-repair run;")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"visionflow: error: {expected}"), err
    torch.save({"generator": {}, "epoch": 3}, repair / "checkpoint.pt")  # no visionflow trainer's
    assert main(["repair", "train", "digits", "--out", str(repair), "--resume", "--epochs", str(epochs + 1)]) == 2
    assert (f"{repair / 'checkpoint.pt'}: not the checkpoint of an image-repair run (it has no discriminator, "
            "g_optimizer, d_optimizer, state)") in capsys.readouterr().err
    assert len((repair / "metrics.csv").read_text().strip().splitlines()) - 1 == epochs  # nothing trained
    assert [row["epoch"] for row in RunDir(classifier).read_metrics()] == [1]


def test_run_says_when_a_colour_image_is_turned_grey_for_a_grey_model(digits_run, tmp_path, caplog):
    _digit_png(tmp_path / "grey.png")
    colour = np.zeros((28, 28, 3), dtype=np.uint8)
    colour[6:22, 12:16] = (255, 40, 0)
    Image.fromarray(colour).save(tmp_path / "photo.png")
    argv = ["repair", "run", str(digits_run), "--box", "8,8,12,12", "--out", str(tmp_path / "out")]
    assert main([*argv, str(tmp_path / "grey.png")]) == 0
    assert not caplog.records  # a grey image into a grey model: nothing to say
    assert main([*argv, str(tmp_path / "photo.png")]) == 0
    assert caplog.messages == [f"{tmp_path / 'photo.png'} is in colour: converted to grey for the model, which was "
                               "trained on grey images (the repaired picture is grey)"]
    assert Image.open(tmp_path / "out" / "photo_repaired.png").mode == "L"
    caplog.clear()
    Image.fromarray(colour[:, ::-1]).save(tmp_path / "photo2.png")
    assert main([*argv, str(tmp_path / "photo.png"), str(tmp_path / "grey.png"), str(tmp_path / "photo2.png")]) == 0
    assert caplog.messages == [f"{tmp_path / 'photo.png'} and 1 more are in colour: converted to grey for the model, "
                               "which was trained on grey images (the repaired pictures are grey)"]


def test_run_skips_an_unreadable_image_and_repairs_the_rest(digits_run, tmp_path, capsys, caplog):
    _digit_png(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    _digit_png(tmp_path / "c.png")
    argv = ["repair", "run", str(digits_run), str(tmp_path / "a.png"), str(tmp_path / "b.png"), str(tmp_path / "c.png"),
            "--box", "8,8,12,12"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "000_a_repaired.png", "000_a_side_by_side.png", "002_c_repaired.png", "002_c_side_by_side.png"]
    assert "b.png: not a readable image" in caplog.text and "b.png" not in captured.out
    assert main([*argv, "--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert "b.png" in capsys.readouterr().err
    # a path that does not exist is a typo: refused before anything is written
    assert main(["repair", "run", str(digits_run), str(tmp_path / "a.png"), str(tmp_path / "nope.png"),
                 "--box", "8,8,12,12", "--out", str(tmp_path / "typo")]) == 2
    assert "nope.png: no such file" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_run_with_no_image_repaired_exits_2(digits_run, tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"not a png")
    _digit_png(tmp_path / "b.png", size=6)  # smaller than the box
    argv = ["repair", "run", str(digits_run), str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--box", "8,8,12,12",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    unreadable = f"warning: skipped {tmp_path / 'a.png'}: not a readable image (UnidentifiedImageError)"
    assert capsys.readouterr().err.splitlines() == [
        unreadable, f"warning: skipped {tmp_path / 'b.png'}: 6x6 pixels: --box 8,8,12,12 does not lie inside it",
        "visionflow: error: none of the 2 images could be repaired: see the warnings above"]
    assert main(argv[:3] + [str(tmp_path / "a.png")] + argv[5:]) == 2
    assert capsys.readouterr().err.splitlines() == [
        unreadable, "visionflow: error: the image could not be repaired: see the warning above"]


def test_clips_and_contradicting_options_are_one_line_errors(digits_run, tmp_path, capsys):
    for name in ("left", "right"):
        (tmp_path / "clips" / name).mkdir(parents=True)
        for i in range(2):
            np.save(tmp_path / "clips" / name / f"{i}.npy", np.zeros((4, 28, 28), dtype=np.uint8))
    for argv in (["repair", "train", str(tmp_path / "clips"), "--out", str(tmp_path / "run"), "--epochs", "1"],
                 ["repair", "evaluate", str(digits_run), str(tmp_path / "clips"), "--mask", "center"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [f"visionflow: error: image repair takes images but {tmp_path / 'clips'} holds clips"]
    assert main(["repair", "evaluate", str(digits_run), "digits", "--mask", "random", "--hole", "5"]) == 2
    assert "--hole sets the size of the center mask" in capsys.readouterr().err


def test_too_few_images_to_train_and_validate_is_a_one_line_error(tmp_path, capsys):
    # two images: one held out for validation leaves one, and a training step takes two (it had trained nothing)
    (tmp_path / "data" / "only").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((16, 16), 60 * i, dtype=np.uint8)).save(tmp_path / "data" / "only" / f"{i}.png")
    out = tmp_path / "run"
    assert main(["repair", "train", str(tmp_path / "data"), "--out", str(out), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"visionflow: error: {tmp_path / 'data'}: too few images to train on (2 in all, 10% "
                                "held out); add images"]
    assert not out.exists()


def test_evaluate_examples_are_written_in_the_format_their_name_asks_for(digits_run, tmp_path):
    assert main(["repair", "evaluate", str(digits_run), "digits", "--mask", "center", "--limit", "4",
                 "--examples", str(tmp_path / "examples.jpg")]) == 0
    assert Image.open(tmp_path / "examples.jpg").format == "JPEG"


def test_a_bad_examples_path_is_refused_before_any_work_and_a_picture_there_is_replaced(digits_run, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "folder.png").mkdir()
    for examples, message in ((tmp_path / "a-file" / "grid.png",
                               f"--examples {tmp_path / 'a-file' / 'grid.png'}: {tmp_path / 'a-file'} is a file, not a folder"),
                              (tmp_path / "folder.png", f"--examples {tmp_path / 'folder.png'}: is a folder; give the file's name"),
                              (tmp_path / "grid.txt", f"--examples {tmp_path / 'grid.txt'}: not an image file name")):
        # DATA does not exist: the --examples error comes before the run and the data are read, not after scoring
        code = main(["repair", "evaluate", str(digits_run), str(tmp_path / "no-data"), "--mask", "center",
                     "--examples", str(examples)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"visionflow: error: {message}")
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"an older picture")  # replaced, as predict --output replaces its file
    assert main(["repair", "evaluate", str(digits_run), "digits", "--mask", "center", "--limit", "4",
                 "--examples", str(grid)]) == 0
    assert Image.open(grid).size == (4 * 30 + 2, 4 * 30 + 2)


@pytest.mark.parametrize("size, box", [(112, (40, 40, 30, 30)), (60, (3, 5, 10, 7)), (20, (4, 4, 6, 5))])
def test_a_repair_at_another_size_does_not_depend_on_what_the_hole_held(digits_run, size, box):
    from visionflow.api.repair import load_generator, repair_file

    generator, config = load_generator(str(digits_run))
    image = torch.full((1, size, size), 90, dtype=torch.uint8)
    image[:, size // 3:, :size // 2] = 200
    x, y, w, h = box
    masks = torch.zeros(1, 1, size, size)
    masks[..., y:y + h, x:x + w] = 1
    dark, bright = image.clone(), image.clone()
    dark[:, y:y + h, x:x + w], bright[:, y:y + h, x:x + w] = 0, 255
    assert torch.equal(repair_file(generator, config, dark, masks), repair_file(generator, config, bright, masks))
