"""GAN image generation: networks, domain FID, training/resume, the divergence guard, sampling, bad input,
and --gan-augment. Everything runs on a few hundred built-in digits at 16x16 so the file stays fast."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from visionflow import api
from visionflow.cli import main
from visionflow.config import TrainConfig
from visionflow.data.sources import builtin_digits
from visionflow.errors import VisionflowError
from visionflow.api import gan as gan_api
from visionflow.gan import train as gan_train
from visionflow.gan.dcgan import Discriminator, Generator, MinibatchStdDev, upsampling_plan
from visionflow.gan.fid import feature_distance, frechet_distance
from visionflow.gan.train import GanConfig, GanDiverged
from visionflow.runs import RunDir

from conftest import flat_images, write_class_folder

SIZE = 16


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """An MNIST-layout folder: 300 training and 100 test images of the built-in digits."""
    root = tmp_path_factory.mktemp("digits-mnist")
    digits = builtin_digits()
    _write_idx(root / "train-images-idx3-ubyte.gz", digits.images[:300])
    _write_idx(root / "train-labels-idx1-ubyte.gz", digits.labels[:300])
    _write_idx(root / "t10k-images-idx3-ubyte.gz", digits.images[300:400])
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", digits.labels[300:400])
    return str(root)


def _config(data: str, out, epochs: int = 1, **options) -> GanConfig:
    return GanConfig(data=data, out=str(out), epochs=epochs, conditional=True, image_size=SIZE, batch_size=32,
                     **options)


@pytest.fixture(scope="module")
def one_epoch_run(digit_folder, tmp_path_factory):
    """A conditional GAN trained for one epoch; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("gan") / "run"
    gan_api.train_gan(_config(digit_folder, out), show_progress=False)
    return out


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


# --- the networks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,size,classes,spectral", [(1, 28, 0, False), (1, 28, 10, True), (3, 32, 10, False),
                                                            (3, 64, 0, True)])
def test_generator_and_discriminator_shapes(channels, size, classes, spectral):
    generator = Generator(channels, size, classes, latent_dim=16, width=8)
    discriminator = Discriminator(channels, size, classes, width=8, use_spectral_norm=spectral)
    labels = torch.tensor([0, classes - 1, 1]) if classes else None
    images = generator(torch.randn(3, 16), labels)
    assert images.shape == (3, channels, size, size)
    assert images.min() >= -1.0 and images.max() <= 1.0  # tanh: the range real images are scaled to
    assert discriminator(images, labels).shape == (3,)


def test_conditional_generator_depends_on_the_label():
    generator = Generator(1, 16, 10, latent_dim=8, width=8).eval()
    noise = torch.randn(1, 8).expand(2, 8)
    images = generator(noise, torch.tensor([0, 7]))
    assert not torch.allclose(images[0], images[1])


def test_minibatch_stddev_channel_measures_the_spread_within_each_group():
    layer = MinibatchStdDev(group=4)
    copies = torch.randn(1, 3, 5, 5).expand(8, 3, 5, 5)
    varied = torch.randn(8, 3, 5, 5)
    assert layer(copies).shape == (8, 4, 5, 5)
    assert torch.allclose(layer(copies)[:, :3], copies)  # the input passes through unchanged
    assert layer(copies)[:, 3].max() < 1e-3  # a batch of copies has no spread
    spread = layer(varied)[:, 3]
    # images i and i + 2 share a group (8 images, 4 per group, strided); the unit-normal spread is about 0.8
    assert torch.equal(spread[0], spread[2]) and 0.5 < float(spread.mean()) < 1.0
    assert layer(varied[:3]).shape == (3, 4, 5, 5)  # a batch the group size does not divide: one group


def test_image_sizes_the_generator_cannot_make_are_refused():
    assert upsampling_plan(28) == (7, 2)
    assert upsampling_plan(32) == (8, 2)
    with pytest.raises(VisionflowError, match="power of two"):
        upsampling_plan(27)


def test_an_image_size_beyond_the_gans_limit_is_refused_before_any_work(tmp_path, capsys):
    # 2048 is 8 * 2**8, a side the generator can make, with 900 M parameters: allocating them was a traceback
    out = tmp_path / "run"
    assert main(["gan", "train", "digits", "--out", str(out), "--image-size", "2048", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["visionflow: error: --image-size must be at most 512 for the GAN (got 2048)"]
    assert not out.exists()


def test_a_single_image_is_refused_rather_than_trained_on_for_no_step(tmp_path, capsys):
    # a step takes two images: one had made an "epoch" of no step, D and G losses 0 and a diversity of 2e10
    (tmp_path / "data" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "data" / "only" / "0.png")
    out = tmp_path / "run"
    assert main(["gan", "train", str(tmp_path / "data"), "--out", str(out), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"visionflow: error: {tmp_path / 'data'}: the GAN needs at least 2 readable images (found 1)"]
    assert not out.exists()


# --- domain FID ----------------------------------------------------------------------------------------

def test_frechet_distance_of_gaussians_with_a_known_answer():
    # Covariances sharing eigenvectors: FD = |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    cov_a, cov_b = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
    mean_a, mean_b = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1.0 + 4.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # = 5 + 1 + 1 + 0 + 0.25
    assert frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, abs=1e-9)
    assert frechet_distance(mean_a, cov_a, mean_a, cov_a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_from_samples_approaches_the_closed_form():
    rng = np.random.default_rng(1)
    samples_a = rng.normal(0.0, 1.0, size=(20_000, 3))
    samples_b = rng.normal([2.0, 0.0, 0.0], [1.0, 2.0, 1.0], size=(20_000, 3))
    assert feature_distance(samples_a, samples_b) == pytest.approx(4.0 + 1.0, rel=0.03)


# --- training, resume, the divergence guard ------------------------------------------------------------

def test_training_writes_a_run_that_resumes_to_the_same_result(one_epoch_run, digit_folder, tmp_path):
    resumed = _copy(one_epoch_run, tmp_path)
    gan_api.resume_gan(str(resumed), epochs=2, show_progress=False)
    straight = tmp_path / "straight"
    gan_api.train_gan(_config(digit_folder, straight, epochs=2), show_progress=False)

    run = RunDir(resumed)
    assert [row["epoch"] for row in run.read_metrics()] == [1.0, 2.0]
    assert run.load_checkpoint()["epoch"] == 2
    assert sorted(p.name for p in (resumed / "samples").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    # The (seed, epoch)-seeded noise and restored optimizers make the resumed run the uninterrupted one.
    resumed_weights, straight_weights = run.load_weights("generator.safetensors"), RunDir(straight).load_weights("generator.safetensors")
    assert all(torch.allclose(resumed_weights[k], straight_weights[k], atol=1e-6) for k in straight_weights)


def test_images_per_second_counts_the_images_trained_on(one_epoch_run):
    # 300 images in batches of 32: the last batch holds 12, and a rate of full batches would say 320 images
    row = RunDir(one_epoch_run).read_metrics()[0]
    assert row["images_per_second"] * row["seconds"] == pytest.approx(300, rel=0.01)


def test_resume_reads_the_data_where_it_is_now_and_names_what_it_ignores(one_epoch_run, digit_folder, tmp_path, caplog):
    run_path = _copy(one_epoch_run, tmp_path)
    config = json.loads((run_path / "config.json").read_text())
    config["gan"]["data"] = str(tmp_path / "moved-away")  # the folder it trained on is gone
    (run_path / "config.json").write_text(json.dumps(config))
    moved = shutil.copytree(digit_folder, tmp_path / "moved")
    assert main(["gan", "train", str(moved), "--out", str(run_path), "--resume", "--epochs", "2", "--lr", "0.1",
                 "--no-minibatch-std", "--quiet"]) == 0
    assert "ignored: --no-minibatch-std, --lr" in caplog.text
    after = json.loads((run_path / "config.json").read_text())
    recorded = after["gan"]
    assert recorded["data"] == str(moved) and recorded["lr"] == config["gan"]["lr"] and recorded["minibatch_std"]
    assert after["data_spec"] == str(moved)
    assert RunDir(run_path).load_checkpoint()["epoch"] == 2


def test_mode_seeking_on_an_unconditional_gan_is_named_as_ignored_once_the_data_is_checked(tmp_path, caplog, capsys):
    data = write_class_folder(tmp_path / "data", per_class=4)
    train = ["gan", "train", str(data), "--mode-seeking", "2", "--batch-size", "4", "--quiet"]
    # refused before the data is checked: the error alone, on one line
    assert main([*train, "--out", str(tmp_path / "refused"), "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["visionflow: error: --epochs must be at least 1 (got 0)"]
    assert caplog.messages == []
    assert main([*train, "--out", str(tmp_path / "run"), "--epochs", "1"]) == 0
    assert caplog.messages == ["--mode-seeking keeps the samples of one class apart: it applies to --conditional GANs "
                               "only; ignored"]
    caplog.clear()
    assert main([*train, "--out", str(tmp_path / "conditional"), "--epochs", "1", "--conditional"]) == 0
    assert caplog.messages == []
    # data the GAN cannot take, or a resume on other classes: the error alone
    clips = tmp_path / "clips" / "a"
    clips.mkdir(parents=True)
    np.save(clips / "0.npy", np.zeros((4, 16, 16), dtype=np.uint8))
    capsys.readouterr()
    assert main([*train[:2], str(clips.parent), *train[3:], "--out", str(tmp_path / "on-clips"), "--epochs", "1"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1 and caplog.messages == []
    other = flat_images(tmp_path / "other", ("x", "y"), per_class=3)
    assert main(["gan", "train", str(other), "--out", str(tmp_path / "run"), "--resume", "--epochs", "2", "--lr", "0.1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"visionflow: error: {other}: its classes ['x', 'y'] differ from the run's ['square', 'stripes_h', 'stripes_v']"]
    for name in ("square", "stripes_h", "stripes_v"):  # clips of the run's classes, elsewhere: no "resuming on" first
        (tmp_path / "clips" / name).mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "clips" / name / "0.npy", np.zeros((4, 16, 16), dtype=np.uint8))
    assert main(["gan", "train", str(tmp_path / "clips"), "--out", str(tmp_path / "run"), "--resume", "--epochs", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"visionflow: error: the GAN takes images but {tmp_path / 'clips'} holds clips"]


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(one_epoch_run, tmp_path, monkeypatch):
    run_path = _copy(one_epoch_run, tmp_path)
    weights_before = (run_path / "generator.safetensors").read_bytes()
    monkeypatch.setattr(gan_train, "generator_loss", lambda logits, kind="ns": logits.mean() * float("nan"))
    with pytest.raises(GanDiverged, match=r"diverged in epoch 2 \(g loss nan\); kept the last good checkpoint \(epoch 1\)"):
        gan_api.resume_gan(str(run_path), epochs=3, show_progress=False)
    run = RunDir(run_path)
    assert run.load_checkpoint()["epoch"] == 1
    assert (run_path / "generator.safetensors").read_bytes() == weights_before
    assert len(run.read_metrics()) == 1


def _within_class_spread(generator: Generator, labels: torch.Tensor) -> float:
    generator.train()  # batch statistics, as in training
    with torch.no_grad():
        torch.manual_seed(1)
        return gan_train.sample_diversity(generator(torch.randn(len(labels), generator.latent_dim), labels), labels)


def test_mode_seeking_keeps_a_collapsing_conditional_generator_apart():
    """A generator that has (nearly) stopped listening to its noise makes one image per class; twenty steps with
    the mode-seeking term spread the images of each class apart, twenty steps without it do not."""
    torch.manual_seed(0)
    generator = Generator(1, SIZE, 10, latent_dim=8, width=8)
    with torch.no_grad():
        generator.project[0].weight[:, :8] *= 0.01  # the noise's columns: a collapsed start
    discriminator = Discriminator(1, SIZE, 10, width=8)
    real = torch.rand(32, 1, SIZE, SIZE) * 2 - 1
    labels = torch.arange(32) % 10
    spreads = {}
    for weight in (0.0, 1.0):
        g, d = copy.deepcopy(generator), copy.deepcopy(discriminator)
        opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
        torch.manual_seed(2)
        for _ in range(20):
            gan_train.gan_step(g, d, opt_g, opt_d, real, labels, torch.randn(32, 8), "ns", mode_seeking=weight)
        spreads[weight] = _within_class_spread(g, labels)
    before = _within_class_spread(copy.deepcopy(generator), labels)
    assert spreads[1.0] > 2 * spreads[0.0] and spreads[1.0] > 2 * before


def test_a_collapsing_sample_diversity_is_reported(one_epoch_run, tmp_path, monkeypatch, caplog):
    run_path = _copy(one_epoch_run, tmp_path)
    # The first call measures the real images, the second epoch 2's grid: make that grid one repeated image.
    measured = iter([1.0, 0.0])
    monkeypatch.setattr(gan_train, "sample_diversity", lambda images, labels=None: next(measured))
    gan_api.resume_gan(str(run_path), epochs=2, show_progress=False)
    assert any("sample diversity fell" in record.getMessage() for record in caplog.records)
    assert RunDir(run_path).read_metrics()[-1]["diversity"] == 0.0


def test_the_collapse_warning_is_the_same_whether_the_run_was_resumed_or_not(digit_folder, tmp_path, monkeypatch, caplog):
    # Epoch 2's diversity is under half of epoch 1's as measured (0.40004), not of epoch 1's as metrics.csv keeps
    # it (0.4), where a resumed run reads it back: both runs must judge by the same figure.
    def measuring(*values):  # the real images first, then each epoch's grid
        measured = iter(values)
        monkeypatch.setattr(gan_train, "sample_diversity", lambda images, labels=None: next(measured))

    measuring(1.0, 0.40004, 0.200015)
    gan_api.train_gan(_config(digit_folder, tmp_path / "straight", epochs=2), show_progress=False)
    straight = [r.getMessage() for r in caplog.records if "sample diversity fell" in r.getMessage()]
    caplog.clear()
    measuring(1.0, 0.40004)
    gan_api.train_gan(_config(digit_folder, tmp_path / "cut", epochs=1), show_progress=False)
    measuring(1.0, 0.200015)
    gan_api.resume_gan(str(tmp_path / "cut"), epochs=2, show_progress=False)
    resumed = [r.getMessage() for r in caplog.records if "sample diversity fell" in r.getMessage()]
    assert straight == resumed == []
    for run in ("straight", "cut"):
        assert [row["diversity"] for row in RunDir(tmp_path / run).read_metrics()] == [0.4, 0.2]
    # and a fall below half warns in both alike (the check above would also pass with no warning at all)
    caplog.clear()
    measuring(1.0, 0.40004, 0.19999)
    gan_api.train_gan(_config(digit_folder, tmp_path / "straight2", epochs=2), show_progress=False)
    straight = [r.getMessage().split(" (look at")[0] for r in caplog.records if "sample diversity fell" in r.getMessage()]
    caplog.clear()
    measuring(1.0, 0.40004)
    gan_api.train_gan(_config(digit_folder, tmp_path / "cut2", epochs=1), show_progress=False)
    measuring(1.0, 0.19999)
    gan_api.resume_gan(str(tmp_path / "cut2"), epochs=2, show_progress=False)
    resumed = [r.getMessage().split(" (look at")[0] for r in caplog.records if "sample diversity fell" in r.getMessage()]
    assert len(straight) == 1 and straight == resumed


def test_the_real_images_yardstick_spreads_over_every_class():
    images = torch.cat([torch.zeros(300, 1, 4, 4, dtype=torch.uint8), torch.full((300, 1, 4, 4), 255, dtype=torch.uint8)])
    # listed class by class, as a folder is: black images first, then white ones
    # black to white is 8 apart (2 in each of 16 pixels); about half the pairs are such pairs, the first 64 none
    assert gan_train.reference_diversity(images, None, 64, seed=0) > 3.0
    assert gan_train.reference_diversity(images, torch.arange(600) // 300, 64, seed=0) == 0.0  # none within a class


def test_diversity_of_a_conditional_grid_is_measured_within_each_class():
    prototypes = torch.rand(3, 1, 8, 8) * 2 - 1
    labels = torch.arange(12) % 3
    collapsed = prototypes[labels]  # one image per class, repeated: diverse across classes only
    assert gan_train.sample_diversity(collapsed) > 1.0
    assert gan_train.sample_diversity(collapsed, labels) == 0.0


# --- sampling ------------------------------------------------------------------------------------------------

def test_gan_sample_writes_the_requested_images(one_epoch_run, tmp_path):
    folder = tmp_path / "samples"
    assert main(["gan", "sample", str(one_epoch_run), "--n", "5", "--out", str(folder), "--label", "3"]) == 0
    files = sorted(folder.iterdir())
    assert len(files) == 5 and all(f.name.endswith("_3.png") for f in files)
    assert all(Image.open(f).size == (SIZE, SIZE) for f in files)
    before = [f.read_bytes() for f in files]
    assert main(["gan", "sample", str(one_epoch_run), "--n", "5", "--out", str(folder), "--label", "3",
                 "--seed", "1"]) == 2  # the folder's files stay as they were
    assert [f.read_bytes() for f in sorted(folder.iterdir())] == before

    grid = tmp_path / "grid.png"
    assert main(["gan", "sample", str(one_epoch_run), "--n", "12", "--out", str(grid)]) == 0
    # a conditional grid puts one class per column: 10 columns, 2 rows of 16px tiles with 2px padding
    assert Image.open(grid).size == (10 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)


def test_gan_sample_writes_a_grid_in_the_format_its_name_asks_for(one_epoch_run, tmp_path):
    grid = tmp_path / "grid.jpg"  # once, a folder named grid.jpg holding PNGs
    assert main(["gan", "sample", str(one_epoch_run), "--n", "4", "--out", str(grid)]) == 0
    assert grid.is_file() and Image.open(grid).format == "JPEG"


def test_a_grid_too_large_for_its_format_is_a_one_line_error(one_epoch_run, tmp_path, capsys):
    # 10,000 16px tiles in 10 columns make a grid 18,002 pixels tall: beyond WebP's 16,383 (PNG has no such limit)
    grid = tmp_path / "grid.webp"
    assert main(["gan", "sample", str(one_epoch_run), "--n", "10000", "--out", str(grid)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "beyond the 16383 a .webp file can hold" in err and not grid.exists()


def test_a_grid_that_could_not_be_written_is_refused_before_sampling(one_epoch_run, tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "a-file").write_text("")
    for out, message in ((tmp_path / "folder.png", f"--out {tmp_path / 'folder.png'}: is a folder; give the file's name"),
                         (tmp_path / "a-file" / "samples", f"--out {tmp_path / 'a-file' / 'samples'}: {tmp_path / 'a-file'} "
                                                           "is a file; give a folder, or an image file name for one grid")):
        assert main(["gan", "sample", str(one_epoch_run), "--n", "4", "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"visionflow: error: {message}"]
    assert list((tmp_path / "folder.png").iterdir()) == []


def test_a_gan_run_given_as_the_feature_classifier_is_named_as_such(one_epoch_run, digit_folder, capsys):
    assert main(["gan", "evaluate", str(one_epoch_run), str(digit_folder), "--classifier", str(one_epoch_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"visionflow: error: {one_epoch_run}: a GAN run, not a classifier run"]


@pytest.mark.parametrize("argv,message", [
    (["--n", "4", "--label", "cat"], "unknown class 'cat'"),
    (["--n", "0"], "--n must be at least 1"),
])
def test_bad_sample_requests_exit_2_with_one_line(one_epoch_run, tmp_path, capsys, argv, message):
    assert main(["gan", "sample", str(one_epoch_run), "--out", str(tmp_path / "x.png"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_missing_or_wrong_run_exits_2_with_one_line(tmp_path, capsys):
    assert main(["gan", "sample", str(tmp_path / "nope"), "--n", "4", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"visionflow: error: {tmp_path / 'nope'}: no such run directory"]
    assert main(["gan", "evaluate", str(tmp_path), "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a visionflow GAN run directory" in err
    (tmp_path / "config.json").write_text(json.dumps({"version": 1, "kind": "gan"}))  # training never finished an epoch
    assert main(["gan", "sample", str(tmp_path), "--n", "4", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"visionflow: error: {tmp_path}: the run has no weights yet (training never finished an epoch)"]


def test_weights_that_do_not_fit_the_runs_config_are_a_one_line_error(one_epoch_run, tmp_path, capsys):
    run = _copy(one_epoch_run, tmp_path)
    RunDir(run).save_weights("generator.safetensors", Generator(1, SIZE).state_dict())  # an unconditional GAN's
    assert main(["gan", "sample", str(run), "--n", "2", "--out", str(tmp_path / "grid.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "generator.safetensors: weights do not fit the generator in config.json" in err


def test_resuming_a_checkpoint_that_does_not_fit_the_config_is_a_one_line_error(one_epoch_run, digit_folder, tmp_path, capsys):
    run = _copy(one_epoch_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["gan"]["width"] = 16  # checkpoint.pt's networks are of width 32, as another run's could be
    (run / "config.json").write_text(json.dumps(config))
    assert main(["gan", "train", digit_folder, "--out", str(run), "--resume", "--epochs", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{run / 'checkpoint.pt'}: weights do not fit the generator in config.json (size mismatch for " in err
    assert RunDir(run).load_checkpoint()["epoch"] == 1


def test_resuming_another_kind_of_checkpoint_is_a_one_line_error_naming_its_kind(one_epoch_run, digit_folder, tmp_path,
                                                                                 capsys):
    gan = _copy(one_epoch_run, tmp_path)
    classifier = tmp_path / "classifier"
    assert main(["train", digit_folder, "--out", str(classifier), "--epochs", "1", "--quiet"]) == 0
    own = {run: (run / "checkpoint.pt").read_bytes() for run in (classifier, gan)}
    (classifier / "checkpoint.pt").write_bytes(own[gan])  # each run's checkpoint.pt copied into the other
    (gan / "checkpoint.pt").write_bytes(own[classifier])
    capsys.readouterr()
    for argv, expected in (
            (["train", digit_folder, "--out", str(classifier)],
             f"{classifier / 'checkpoint.pt'}: the checkpoint of a GAN run, not of a classifier run;"),
            (["gan", "train", digit_folder, "--out", str(gan)],
             f"{gan / 'checkpoint.pt'}: the checkpoint of a classifier run, not of a GAN run;")):
        assert main([*argv, "--resume", "--epochs", "2", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"visionflow: error: {expected}"), err
    assert [row["epoch"] for row in RunDir(gan).read_metrics()] == [1]  # nothing trained
    assert [row["epoch"] for row in RunDir(classifier).read_metrics()] == [1]


# --- domain FID on a run -----------------------------------------------------------------------------------

def test_gan_evaluate_reports_fid_beside_its_references(one_epoch_run, digit_folder, tmp_path, caplog):
    run_path = _copy(one_epoch_run, tmp_path)
    result = gan_api.evaluate_gan(str(run_path), digit_folder, count=200, show_progress=False)
    assert result["n"] == 200 and result["n_real_held_out"] == 100
    # 100 held-out images and 300 in the reference, in 64 dimensions
    assert not [m for m in caplog.messages if m.startswith(("the floor", "every FID"))]
    assert 0.0 <= result["fid_real_floor"] < result["fid_untrained"]  # real images are closer than noise
    assert 0.0 <= result["label_accuracy"] <= 1.0 and set(result["label_accuracy_per_class"]) <= set(map(str, range(10)))
    # the classifier was trained once and is kept for the next evaluation
    weights = run_path / "classifier" / "best.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = gan_api.evaluate_gan(str(run_path), digit_folder, count=200, show_progress=False)
    assert weights.stat().st_mtime_ns == stamp and again["fid"] == result["fid"]
    # one test image: its covariance, the floor's, would be NaN
    one_test = shutil.copytree(digit_folder, tmp_path / "one-test")
    digits = builtin_digits()
    _write_idx(one_test / "t10k-images-idx3-ubyte.gz", digits.images[300:301])
    _write_idx(one_test / "t10k-labels-idx1-ubyte.gz", digits.labels[300:301])
    with pytest.raises(VisionflowError) as refused:
        gan_api.evaluate_gan(str(run_path), str(one_test), classifier=str(run_path / "classifier"), count=200,
                             show_progress=False)
    assert str(refused.value) == (f"{one_test}: the domain FID needs 2 readable images or more to measure against and "
                                  "2 held out (found 1 held out); give more images")


def test_an_interrupted_domain_fid_classifier_is_finished_before_it_measures(one_epoch_run, digit_folder, tmp_path,
                                                                             monkeypatch):
    straight = gan_api.evaluate_gan(str(_copy(one_epoch_run, tmp_path)), digit_folder, count=200, show_progress=False)
    interrupted = shutil.copytree(one_epoch_run, tmp_path / "interrupted")
    shutil.rmtree(interrupted / "classifier", ignore_errors=True)
    write_metrics = RunDir.write_metrics

    def ctrl_c_after_the_second_epoch(self, rows):
        if len(rows) == 2:
            raise KeyboardInterrupt
        write_metrics(self, rows)

    monkeypatch.setattr(RunDir, "write_metrics", ctrl_c_after_the_second_epoch)
    assert main(["gan", "evaluate", str(interrupted), digit_folder, "--n", "200", "--quiet"]) == 130
    monkeypatch.undo()
    # the next evaluation finishes the classifier (all its epochs) and measures with it, not with epoch 1's weights
    resumed = gan_api.evaluate_gan(str(interrupted), digit_folder, count=200, show_progress=False)
    assert len(RunDir(interrupted / "classifier").read_metrics()) == TrainConfig.epochs
    assert (resumed["fid"], resumed["fid_real_floor"]) == (straight["fid"], straight["fid_real_floor"])


def test_too_few_samples_are_named_before_the_feature_classifier_trains(one_epoch_run, digit_folder, tmp_path,
                                                                        monkeypatch, caplog):
    said_before_training = []

    def interrupted_training(cfg, show_progress=True):  # as a Ctrl-C in its first epoch
        said_before_training.extend(caplog.messages)
        raise KeyboardInterrupt

    monkeypatch.setattr(gan_api, "train_classifier", interrupted_training)
    with pytest.raises(KeyboardInterrupt):
        gan_api.evaluate_gan(str(_copy(one_epoch_run, tmp_path)), digit_folder, count=10, show_progress=False)
    assert [m for m in said_before_training if m.startswith("--n")] == [
        "--n 10, not above the 64 feature dimensions of the domain FID: the covariance of no more vectors than "
        "dimensions is singular, so the FID is unreliable (give --n 65 or more)"]


def _class_folders(data, numbers: range):
    """The built-in digits `numbers` as PNGs in class folders 0-9, as the run's MNIST labels."""
    digits = builtin_digits()
    for i in numbers:
        (data / str(digits.labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[i]).save(data / str(digits.labels[i]) / f"{i}.png")
    return data


def test_a_floor_on_fewer_held_out_images_than_feature_dimensions_is_warned_of(one_epoch_run, tmp_path, caplog,
                                                                                capsys):
    data = _class_folders(tmp_path / "data", range(60))  # no test part: a fifth held out
    run = _copy(one_epoch_run, tmp_path)
    assert main(["gan", "evaluate", str(run), str(data), "--n", "65", "--device", "cpu", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_real_held_out"] == 11  # a fifth of each class, rounded class by class
    assert [m for m in caplog.messages if m.startswith(("the floor", "every FID"))] == [
        f"every FID is measured against 49 training images of {data} (four fifths of them), not above the 64 feature "
        "dimensions of the domain FID: the covariance of no more vectors than dimensions is singular, so every FID here "
        "is unreliable (give more images, 65 or more in the reference, or a --classifier with fewer feature dimensions: "
        "seed-rnn has 32)",
        f"the floor (fid_real_floor) is measured on 11 held-out images (a fifth of {data}), not above the 64 feature "
        "dimensions of the domain FID: the covariance of no more vectors than dimensions is singular, so the floor is "
        "unreliable (give more images, 65 or more held out, or a --classifier with fewer feature dimensions: seed-rnn "
        "has 32)"]


def test_a_classifier_trained_on_other_data_is_refused_alone_before_too_few_samples_are_warned_of(one_epoch_run,
                                                                                                 digit_folder, tmp_path,
                                                                                                 caplog, capsys):
    run = _copy(one_epoch_run, tmp_path)
    (run / "classifier").mkdir()  # what a finished classifier on other data leaves; refused before it is loaded
    (run / "classifier" / "config.json").write_text(json.dumps({"data_spec": str(tmp_path / "elsewhere")}))
    (run / "classifier" / "best.safetensors").write_bytes(b"")
    assert main(["gan", "evaluate", str(run), digit_folder, "--n", "10", "--device", "cpu", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"visionflow: error: {run / 'classifier'} was trained on other data; give --classifier for {digit_folder}"]
    assert caplog.messages == []  # in the CLI, a warning would be a line on stderr before the error


def test_gan_evaluate_names_a_broken_file_once_and_warns_of_too_few_samples(one_epoch_run, tmp_path, caplog, capsys):
    data = _class_folders(tmp_path / "data", range(60))
    (data / "3" / "broken.png").write_bytes(b"not a png")  # and one file that is no image
    run = _copy(one_epoch_run, tmp_path)
    argv = ["gan", "evaluate", str(run), str(data), "--device", "cpu", "--quiet", "--json"]
    # the feature classifier is trained on the data first, which decodes the broken file too: one warning all the same
    assert main([*argv, "--n", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n"], result["skipped_files"]) == (64, 1)
    broken = f"skipped {data / '3' / 'broken.png'}: not a readable image (UnidentifiedImageError)"
    assert [m for m in caplog.messages if "broken.png" in m] == [broken]
    assert [m for m in caplog.messages if m.startswith("--n")] == [  # 64 samples in 64 dimensions: rank 63
        "--n 64, not above the 64 feature dimensions of the domain FID: the covariance of no more vectors than "
        "dimensions is singular, so the FID is unreliable (give --n 65 or more)"]
    caplog.clear()
    assert main([*argv, "--n", "65"]) == 0  # enough samples: the broken file is the only warning but the too few real
    assert [m for m in caplog.messages if not m.startswith(("the floor", "every FID"))] == [broken]  # images' ones
    capsys.readouterr()
    assert main([*argv, "--n", "65", "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"visionflow: error: broken file (refused by --strict): {data / '3' / 'broken.png'}: not a readable "
                   "image (UnidentifiedImageError)"]


def test_gan_evaluate_counts_the_broken_files_it_skipped(one_epoch_run, tmp_path, capsys):
    data = tmp_path / "data"  # train/ and test/ parts, a file that is no image in each
    _class_folders(data / "train", range(60))
    _class_folders(data / "test", range(60, 80))
    (data / "train" / "3" / "broken.png").write_bytes(b"not a png")
    (data / "test" / "5" / "broken.png").write_bytes(b"not a png")
    argv = ["gan", "evaluate", str(_copy(one_epoch_run, tmp_path)), str(data), "--n", "65", "--device", "cpu", "--quiet"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_files"] == 2  # a count, as `evaluate --json` gives
    assert main(argv) == 0
    assert "  skipped files                 2   (broken files in DATA)" in capsys.readouterr().out.splitlines()


# --- --gan-augment ---------------------------------------------------------------------------------------

def test_gan_augment_appends_generated_images_class_by_class(one_epoch_run, digit_folder, tmp_path):
    cfg = TrainConfig(data=digit_folder, out=str(tmp_path / "cls"), image_size=SIZE, channels=1,
                      gan_augment=str(one_epoch_run), gan_ratio=0.5)
    data = api.load_training_data(cfg, channels=1, size=SIZE)
    real = data.train.labels[:300]
    synthetic = data.train.labels[300:]
    assert len(synthetic) == sum(round(0.5 * int(c)) for c in torch.bincount(real, minlength=10))
    assert torch.equal(torch.bincount(synthetic, minlength=10),
                       torch.tensor([round(0.5 * int(c)) for c in torch.bincount(real, minlength=10)]))
    assert len(data.val) == 100  # the validation data stays real
    cfg.gan_ratio = 0.01  # about 30 images a class: rounds to none
    with pytest.raises(VisionflowError, match="--gan-ratio 0.01 adds no generated image"):
        api.load_training_data(cfg, channels=1, size=SIZE)


def test_gan_augment_samples_on_the_device_the_classifier_trains_on(one_epoch_run, digit_folder, tmp_path, monkeypatch):
    from visionflow.gan import generate

    asked = []
    monkeypatch.setattr(generate, "select_device", lambda name="auto": asked.append(name) or torch.device("cpu"))
    cfg = TrainConfig(data=digit_folder, out=str(tmp_path / "cls"), image_size=SIZE, channels=1, device="cpu",
                      gan_augment=str(one_epoch_run), gan_ratio=0.5)
    api.load_training_data(cfg, channels=1, size=SIZE)
    assert asked == ["cpu"]  # not "auto", which is the first GPU on a GPU machine whatever --device said


def test_gan_augment_refuses_a_gan_of_another_image_format(one_epoch_run, digit_folder, tmp_path, capsys):
    code = main(["train", digit_folder, "--out", str(tmp_path / "cls"), "--image-size", "28", "--epochs", "1",
                 "--gan-augment", str(one_epoch_run), "--quiet"])
    assert code == 2
    assert "the GAN makes 1x16x16 images but the classifier trains on 1x28x28" in capsys.readouterr().err
