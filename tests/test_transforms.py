"""Batched augmentation and the recorded deterministic preprocessing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import flat_images
from visionflow.data.transforms import Augment, AugmentSpec, Preprocess, affine_grid, channel_stats
from visionflow.errors import VisionflowError
from visionflow.runs import RunDir


def test_spec_round_trip_and_errors():
    spec = AugmentSpec.parse("flip,rotate=15,crop=0.8,elastic=0.5")
    assert spec == AugmentSpec(flip=True, rotate=15.0, crop=0.8, elastic=0.5)
    assert AugmentSpec.parse(str(spec)) == spec
    assert AugmentSpec.parse("none") == AugmentSpec() and str(AugmentSpec()) == "none"
    with pytest.raises(VisionflowError, match="unknown operation 'blur'"):
        AugmentSpec.parse("blur=3")
    with pytest.raises(VisionflowError, match="needs a number"):
        AugmentSpec.parse("rotate=lots")
    with pytest.raises(VisionflowError, match="'flip' takes no value"):
        AugmentSpec.parse("flip=0")  # not a flip
    with pytest.raises(VisionflowError, match="whole pixels"):
        AugmentSpec.parse("translate=1.5")  # would shift by 1
    assert AugmentSpec.parse("translate=3").translate == 3
    for text in ("translate=inf", "rotate=nan"):
        with pytest.raises(VisionflowError, match="needs a finite number"):
            AugmentSpec.parse(text)
    with pytest.raises(VisionflowError, match="'rotate' is given twice"):
        AugmentSpec.parse("rotate=15,rotate=30")
    with pytest.raises(VisionflowError, match="below 1"):
        AugmentSpec.parse("shift=2")  # would move every image off its canvas
    assert AugmentSpec.parse("rotate,crop") == AugmentSpec(rotate=15.0, crop=0.8)  # the defaults --help names
    assert AugmentSpec.parse("flip,,rotate=5,") == AugmentSpec(flip=True, rotate=5.0)


def test_strengths_out_of_range_are_refused_naming_the_operation_and_the_range(tmp_path, capsys):
    from visionflow.cli import main

    assert AugmentSpec.parse("rotate=180,elastic=5") == AugmentSpec(rotate=180.0, elastic=5.0)  # the ends are in
    for text, message in (("rotate=720", "--augment: rotate=720 must be between 0 and 180 (degrees either way)"),
                          ("elastic=100", "--augment: elastic=100 must be between 0 and 5 (each unit moves pixels by "
                                          "up to about 5% of the side)")):
        with pytest.raises(VisionflowError) as refused:
            AugmentSpec.parse(f"flip,{text}").refuse_unusual_strengths()
        assert str(refused.value) == message
        for verb in (["preview", "digits", "--augment", text, "--out", str(tmp_path / "grid.png")],
                     ["train", "digits", "--augment", text, "--out", str(tmp_path / "run")]):
            assert main(verb) == 2
            assert capsys.readouterr().err == f"visionflow: error: {message}\n"
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "run").exists()


def test_a_translate_of_the_whole_side_is_refused_once_the_side_is_known(tmp_path, capsys):
    from visionflow.cli import main

    message = ("visionflow: error: --augment: translate=28 must be less than the 28-pixel side of the images (at most "
               "27; shift=F moves by a fraction of it)\n")
    for verb in (["preview", "digits", "--augment", "translate=28", "--out", str(tmp_path / "grid.png")],
                 # --frames on images is warned of after the refusal, which comes alone
                 ["preview", "digits", "--augment", "translate=28", "--frames", "4", "--out", str(tmp_path / "grid.png")],
                 ["train", "digits", "--augment", "translate=28", "--out", str(tmp_path / "run")]):
        assert main(verb) == 2
        assert capsys.readouterr().err == message
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "run").exists()
    # measured on the size the images are decoded to: at 32 pixels, 28 is in range
    assert main(["preview", "digits", "--augment", "translate=28", "--image-size", "32",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert main(["preview", "digits", "--augment", "translate=27", "--out", str(tmp_path / "grid.png")]) == 0


def test_a_run_recorded_with_strengths_now_refused_still_resumes(tmp_path):
    import json

    from visionflow.cli import main

    out = tmp_path / "run"
    assert main(["train", "digits", "--out", str(out), "--epochs", "1", "--augment", "rotate=90", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    config["train"]["augment"] = "rotate=270,elastic=8"  # as a run made before the limits recorded it
    (out / "config.json").write_text(json.dumps(config))
    assert main(["train", "digits", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert len(RunDir(out).read_metrics()) == 2
    assert json.loads((out / "config.json").read_text())["train"]["augment"] == "rotate=270,elastic=8"  # as recorded


def test_flips_warn_once_when_a_class_names_the_side_they_swap(tmp_path, caplog, capsys):
    from visionflow.cli import main

    def warnings_of_training(data: Path, augment: str, exit_code: int = 0) -> list[str]:
        caplog.clear()
        # two epochs: said once before training, not once per epoch
        assert main(["train", str(data), "--augment", augment, "--epochs", "2", "--quiet",
                     "--out", str(tmp_path / f"run-{data.name}-{augment}")]) == exit_code
        return [record.getMessage() for record in caplog.records]

    hands = flat_images(tmp_path / "hands", ("left", "right"))
    assert warnings_of_training(hands, "flip,rotate=5") == [
        "--augment flip mirrors images left to right, but class 'left' names a side: flipped images keep a label that "
        "no longer fits (drop flip, or use translate/crop)"]
    assert warnings_of_training(hands, "vflip") == []  # upside down, a left hand is still the left one
    assert warnings_of_training(flat_images(tmp_path / "light", ("bright", "upright", "T2")), "flip,vflip") == []
    # data refused before decoding: the error comes alone, on one line
    capsys.readouterr()
    one_each = flat_images(tmp_path / "one-each", ("left", "right"), per_class=1)
    assert warnings_of_training(one_each, "flip", exit_code=2) == []
    assert capsys.readouterr().err.startswith("visionflow: error: ")
    caplog.clear()
    AugmentSpec.parse("vflip").warn_of_mirrored_sides(["T-shirt/top", "Cat", "UpHill", "down-left"])
    assert [record.getMessage() for record in caplog.records] == [
        "--augment vflip mirrors images top to bottom, but class 'UpHill' names a side: flipped images keep a label "
        "that no longer fits (drop vflip, or use translate/crop)"]


def test_test_time_flips_warn_once_per_command_when_a_class_names_a_side(tmp_path, caplog):
    from visionflow.cli import main

    def warnings_of(*argv: str) -> list[str]:
        caplog.clear()
        assert main([*argv, "--quiet"] if argv[0] == "train" else list(argv)) == 0
        return [record.getMessage() for record in caplog.records]

    hands = flat_images(tmp_path / "hands", ("left", "right"))
    light = flat_images(tmp_path / "light", ("bright", "upright", "T2"))
    averaged = ("mirrors images left to right, but class 'left' names a side: each image's logits are averaged with "
                "its mirror's, which shows the other side (use --augment-eval none)")
    run = tmp_path / "run-hands"
    assert warnings_of("train", str(hands), "--augment-eval", "flip", "--epochs", "2", "--out", str(run)) == [
        f"--augment-eval flip {averaged}"]  # once, though both epochs' validations average the mirrors
    # evaluate and predict: the run's recorded views, or the ones the command asks for instead
    assert warnings_of("evaluate", str(run), str(hands), "--engine", "torch") == [
        f"the run's --augment-eval flip {averaged}"]
    assert warnings_of("evaluate", str(run), str(hands), "--engine", "torch", "--augment-eval", "none") == []
    assert warnings_of("predict", str(run), str(hands), "--engine", "torch", "--augment-eval", "flip-translate") == [
        f"--augment-eval flip-translate {averaged}"]
    plain = tmp_path / "run-light"
    assert warnings_of("train", str(light), "--augment-eval", "flip-translate", "--epochs", "1",
                       "--out", str(plain)) == []
    assert warnings_of("evaluate", str(plain), str(light), "--engine", "torch") == []


@pytest.mark.parametrize("h,w", [(32, 32), (28, 20), (1, 5)])
def test_affine_grid_is_torchs(h, w):
    theta = torch.randn(7, 2, 3, generator=torch.Generator().manual_seed(h))
    expected = F.affine_grid(theta, [7, 3, h, w], align_corners=False)
    assert torch.allclose(affine_grid(theta, h, w), expected, rtol=0, atol=1e-6)


def test_no_augmentation_is_identity():
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(Augment(AugmentSpec())(x, torch.Generator().manual_seed(0)), x)


def test_flip_mirrors_about_half_of_the_batch():
    x = torch.rand(200, 1, 6, 6)
    out = Augment(AugmentSpec(flip=True))(x, torch.Generator().manual_seed(0))
    same = torch.isclose(out, x, atol=1e-5).flatten(1).all(1)
    mirrored = torch.isclose(out, x.flip(-1), atol=1e-5).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 60 < int(mirrored.sum()) < 140


@pytest.mark.parametrize("crop", [0.95, 0.9, 0.8, 0.5, 0.3])
def test_random_resized_crop_keeps_at_least_its_area_inside_the_image(crop):
    theta = Augment(AugmentSpec(crop=crop))._affine(4000, torch.Generator().manual_seed(0))
    kept = torch.linalg.det(theta[:, :, :2])  # the sampled window's share of the image
    assert float(kept.min()) >= crop - 1e-9 and float(kept.max()) <= 1 + 1e-9
    assert float(theta[:, 0, 0].max()) <= 1 + 1e-9 and float(theta[:, 1, 1].max()) <= 1 + 1e-9  # each side inside
    sides = theta[:, 0, 0] / theta[:, 1, 1]
    assert float(sides.max() - sides.min()) > 0.05  # aspect ratios still vary


def test_elastic_displacements_stay_within_their_strength():
    field = Augment(AugmentSpec(elastic=0.5))._elastic_field(500, 28, 28, torch.Generator().manual_seed(0))
    # normalised coordinates span the side twice: 0.5 x 5% of the side is 0.05 of them
    assert 0.045 < float(field.abs().max()) <= 0.05 + 1e-7


def test_rotation_by_90_degrees_moves_pixels_where_expected():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 1, 4] = 1.0  # a dot above the centre
    augment = Augment(AugmentSpec(rotate=90.0))
    # find a seed whose draw is close to +-90 degrees: the dot must then sit left or right of the centre
    rotated = [augment(x, torch.Generator().manual_seed(s)) for s in range(200)]
    side_hits = [r for r in rotated if r[0, 0, 4, :3].sum() > 0.5 or r[0, 0, 4, 6:].sum() > 0.5]
    assert side_hits, "no rotation moved the dot to the side"
    assert all(abs(float(r.sum()) - 1.0) < 0.35 for r in rotated)  # mass is kept (bilinear)


def test_same_seed_same_batch_different_seed_different_batch():
    x = torch.rand(8, 1, 16, 16)
    augment = Augment(AugmentSpec.parse("rotate=20,crop=0.6,elastic=1"))
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    c = augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_clip_frames_get_the_same_transform():
    frame = torch.rand(1, 3, 12, 12)
    clip = frame.unsqueeze(1).expand(2, 5, 3, 12, 12).contiguous()  # 2 clips x 5 identical frames
    out = Augment(AugmentSpec.parse("flip,rotate=30,crop=0.5,elastic=1"))(clip, torch.Generator().manual_seed(0))
    assert out.shape == clip.shape
    assert torch.allclose(out, out[:, :1].expand_as(out))  # every frame of a clip transformed identically
    assert not torch.allclose(out[0], out[1])  # but clips differ


def test_preprocess_normalises_with_training_statistics():
    images = (torch.rand(64, 3, 8, 8) * 120 + 60).round().to(torch.uint8)
    mean, std = channel_stats(images)
    x = Preprocess(image_size=8, channels=3, mean=mean, std=std)(images)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2)


def test_translate_copies_whole_pixels_with_reflect_padding_and_leaves_other_borders_black():
    x = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    out = Augment(AugmentSpec.parse("translate=2"))(x, torch.Generator().manual_seed(1))
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")  # as airbench pads, and as test-time augmentation does
    windows = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    found = [next((w for w in windows if torch.equal(out[i], padded[i, :, 2 - w[0]:14 - w[0], 2 - w[1]:14 - w[1]])), None)
             for i in range(16)]
    assert None not in found and len(set(found)) > 4  # each a window of the padded image, not all the same one
    white = torch.ones(8, 1, 32, 32)
    rotated = Augment(AugmentSpec.parse("rotate=45,translate=1"))(white, torch.Generator().manual_seed(2))
    assert (rotated == 0).float().mean() > 0.03  # the rotation's uncovered corners stay black, translate or not


def test_rotation_turns_pixels_on_non_square_images_too():
    x = torch.zeros(6, 1, 32, 96)
    x[:, 0, 16, 60] = 1.0  # 12.5 px right of the centre (47.5, 15.5)
    out = Augment(AugmentSpec(rotate=90.0))(x, torch.Generator().manual_seed(0))
    # the angles Augment draws: the first of nine uniform numbers per image, from the same seed
    angles = (2 * torch.rand(6, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[:, 0] - 1) * 90
    rows, cols = torch.arange(32.0)[:, None], torch.arange(96.0)[None]
    for image, angle in zip(out[:, 0], angles):
        cy, cx = (image * rows).sum() / image.sum() - 15.5, (image * cols).sum() / image.sum() - 47.5
        turn = math.radians(float(angle))
        expected = (12.5 * math.cos(turn), -12.5 * math.sin(turn))  # (x, y), y down
        assert math.dist((float(cx), float(cy)), expected) < 0.75  # the normalised square's turn had sheared it
