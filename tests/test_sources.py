"""open_data recognises every DATA layout, and refuses unusable data with one clear message."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_class_folder
from visionflow import api
from visionflow.config import TrainConfig
from visionflow.data import loading
from visionflow.data.decode import decode_image
from visionflow.data.loading import decode_part, stratified_split
from visionflow.data.sources import DataSource, ImageArray, expand_inputs, open_data
from visionflow.errors import BrokenImage, VisionflowError


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 30, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (n_train, 28, 28))
    train_labels = np.arange(n_train) % 10
    write_idx(root / "train-images-idx3-ubyte.gz", train_images)
    write_idx(root / "train-labels-idx1-ubyte.gz", train_labels)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)
    return train_images, train_labels


def test_class_folder(patterns: Path):
    (patterns / "square" / "notes.txt").write_text("ignored")
    (patterns / "square" / ".DS_Store").write_bytes(b"\0\1")
    nested = patterns / "square" / "more"
    nested.mkdir()
    Image.new("L", (16, 16)).save(nested / "deep.PNG")
    data = open_data(patterns)
    assert data.test is None
    assert data.train.classes == ["square", "stripes_h", "stripes_v"]
    assert len(data.train) == 61 and np.bincount(data.train.labels).tolist() == [21, 20, 20]
    assert data.train.guess_channels() == 1 and data.train.guess_size() == 16


def test_a_small_colour_class_among_grey_ones_is_seen(tmp_path: Path):
    """Channels are guessed from a sample of files: every class is in it, so 2 colour images in a class of their own
    make a colour data set however many grey ones the others hold. A zip's __MACOSX folder is no class."""
    write_class_folder(tmp_path / "d", per_class=40)
    write_class_folder(tmp_path / "colour", per_class=2, mode="RGB")
    (tmp_path / "colour" / "stripes_v").rename(tmp_path / "d" / "zz_colour")
    (tmp_path / "d" / "__MACOSX" / "square").mkdir(parents=True)
    (tmp_path / "d" / "__MACOSX" / "square" / "._000.png").write_bytes(b"\0\5\26\7")  # AppleDouble, not a PNG
    data = open_data(tmp_path / "d")
    assert data.train.classes == ["square", "stripes_h", "stripes_v", "zz_colour"]
    assert data.train.guess_channels() == 3


def test_colour_arrays_read_as_colour_files_do(tmp_path: Path):
    grey = np.random.default_rng(1).integers(0, 256, size=(1, 5, 7), dtype=np.uint8)  # MNIST's, digits' layout
    Image.fromarray(grey[0]).save(tmp_path / "grey.png")
    from_array = ImageArray(grey, np.array([0]), ["a"], "arrays").read(0, 3, None)
    assert torch.equal(from_array, decode_image(tmp_path / "grey.png", 3))  # for a colour run: grey in every channel
    rgba = np.random.default_rng(0).integers(0, 256, size=(2, 5, 7, 4), dtype=np.uint8)
    source = ImageArray(rgba, np.array([0, 1]), ["a", "b"], "arrays")
    assert source.read(1, 3, None).permute(1, 2, 0).numpy().tolist() == rgba[1, :, :, :3].tolist()
    grey = np.asarray(Image.fromarray(rgba[1]).convert("RGB").convert("L"))
    assert source.read(1, 1, None)[0].numpy().tolist() == grey.tolist()
    grey_alpha = ImageArray(rgba[..., 2:], np.array([0, 1]), ["a", "b"], "arrays")  # (N, H, W, 2): LA
    assert grey_alpha.native_channels == 1
    assert grey_alpha.read(0, 3, None).numpy().tolist() == [rgba[0, :, :, 2].tolist()] * 3


def test_split_folder_uses_given_parts(tmp_path: Path):
    write_class_folder(tmp_path / "d" / "train", per_class=5)
    write_class_folder(tmp_path / "d" / "val", per_class=2, seed=1)
    data = open_data(tmp_path / "d")
    assert len(data.train) == 15 and len(data.test) == 6
    assert data.test.classes == data.train.classes


def test_mnist_layout(tmp_path: Path):
    images, labels = write_mnist(tmp_path / "m")
    data = open_data(tmp_path / "m")
    assert data.train.classes == [str(d) for d in range(10)] and len(data.train) == 30 and len(data.test) == 10
    assert data.train.read(3, 1, None)[0].numpy().tolist() == images[3].tolist()
    assert data.train.labels.tolist() == labels.tolist()


def test_mnist_files_with_a_subset_of_the_digits_have_those_classes(tmp_path: Path):
    root = tmp_path / "m"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((12, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(12) % 3 + 2)  # digits 2, 3, 4 only
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([4, 2, 3]))
    data = open_data(root)
    assert data.train.classes == data.test.classes == ["2", "3", "4"]
    assert data.train.labels.tolist() == (np.arange(12) % 3).tolist() and data.test.labels.tolist() == [2, 0, 1]
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array([4, 2, 7]))
    with pytest.raises(VisionflowError, match=r"labels \[7\] are not among the training part's"):
        open_data(root)


@pytest.mark.parametrize("labels_header, message", [
    (bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 30), "not an IDX file of unsigned bytes (magic 00000d01)"),  # floats
    (bytes([0, 0, 0x08, 3]) + struct.pack(">III", 30, 1, 1), "are not N images and N labels"),  # labels as images
])
def test_idx_files_of_another_kind_are_refused(tmp_path: Path, labels_header: bytes, message: str):
    write_mnist(tmp_path / "m")
    with gzip.open(tmp_path / "m" / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(labels_header + bytes(30))
    with pytest.raises(VisionflowError, match=re.escape(message)):
        open_data(tmp_path / "m")


def test_train_val_and_test_folders_validate_on_val_and_keep_test(tmp_path: Path):
    for part, count in (("Train", 6), ("val", 3), ("test", 4)):
        write_class_folder(tmp_path / "d" / part, per_class=count)
    data = open_data(tmp_path / "d")
    assert (len(data.train), len(data.val), len(data.test)) == (18, 9, 12)
    assert data.val.name.endswith("val") and data.test.name.endswith("test")
    write_class_folder(tmp_path / "e" / "train", per_class=2)
    write_class_folder(tmp_path / "e" / "validation", per_class=1)
    data = open_data(tmp_path / "e")
    assert data.train.classes == ["square", "stripes_h", "stripes_v"] and len(data.test) == 3 and data.val is None


def test_images_in_a_linked_folder_are_read_once_and_a_link_back_up_does_not_loop(tmp_path: Path):
    write_class_folder(tmp_path / "elsewhere", per_class=4)
    data = tmp_path / "data"
    write_class_folder(data, per_class=2)
    (data / "square" / "more").symlink_to(tmp_path / "elsewhere" / "square", target_is_directory=True)
    (data / "square" / "again").symlink_to(tmp_path / "elsewhere" / "square", target_is_directory=True)
    (data / "stripes_h" / "loop").symlink_to(data, target_is_directory=True)
    source = open_data(data).train
    assert np.bincount(source.labels).tolist() == [6, 2, 2]


def test_builtin_digits():
    data = open_data("digits")
    assert len(data.train) == 1797 and data.train.classes == [str(d) for d in range(10)]
    image = data.train.read(0, 1, None)
    assert image.shape == (1, 28, 28) and int(image.max()) > 200  # upscaled and stretched to 0..255


@pytest.mark.parametrize("make, message", [
    (lambda root: (root / "a").mkdir(parents=True) or (root / "b").mkdir(), "holds no images"),
    (lambda root: write_class_folder(root, per_class=2) and [p.unlink() for p in (root / "stripes_h").iterdir()], "holds no images"),
    (lambda root: root.mkdir(parents=True), "no class folders"),
])
def test_unusable_folders_are_one_line_errors(tmp_path: Path, make, message: str):
    make(tmp_path / "bad")
    with pytest.raises(VisionflowError, match=message):
        open_data(tmp_path / "bad")


def test_a_single_class_is_data_but_no_classifier(tmp_path: Path):
    (tmp_path / "one" / "cat").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "one" / "cat" / "a.png")
    assert open_data(tmp_path / "one").train.classes == ["cat"]  # a GAN or a repair model trains on it
    with pytest.raises(VisionflowError, match="only one class"):
        api.train(TrainConfig(data=str(tmp_path / "one"), out=str(tmp_path / "run")), show_progress=False)
    (tmp_path / "one" / "cat").rename(tmp_path / "one" / "train")
    with pytest.raises(VisionflowError, match="a folder of train/ alone is one class"):
        api.train(TrainConfig(data=str(tmp_path / "one"), out=str(tmp_path / "run")), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_missing_path_is_refused(tmp_path: Path):
    with pytest.raises(VisionflowError, match="no such file"):
        open_data(tmp_path / "nowhere")


def test_broken_files_are_skipped_and_named(patterns: Path, caplog):
    (patterns / "square" / "broken.png").write_bytes(b"\x89PNG not really")
    (patterns / "stripes_h" / "empty.jpg").write_bytes(b"")
    part = decode_part(open_data(patterns).train, channels=1, size=16)
    assert len(part) == 60
    assert sorted(Path(p).name for p, _ in part.skipped) == ["broken.png", "empty.jpg"]
    assert "broken.png" in caplog.text and "empty.jpg" in caplog.text
    with pytest.raises(VisionflowError, match="broken.png|empty.jpg"):
        decode_part(open_data(patterns).train, channels=1, size=16, strict=True)


def test_decoding_workers_follow_torch_threads(monkeypatch):
    """--threads 1 (torch.set_num_threads) decodes with one worker; many threads still give one per core, at most 8."""
    monkeypatch.setattr(loading.os, "cpu_count", lambda: 4)  # more cores than one, whatever machine runs the test
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert loading.default_workers() == 1
        torch.set_num_threads(3)
        assert loading.default_workers() == 3
        torch.set_num_threads(64)
        assert loading.default_workers() == 4
    finally:
        torch.set_num_threads(threads)


def test_worker_processes_decode_what_threads_decode(tmp_path: Path, caplog):
    """Collections of 1,000+ files decode in worker processes: same tensors, same order, broken files named."""
    rng = np.random.default_rng(0)
    for i in range(1200):
        folder = tmp_path / f"class{i % 3}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    (tmp_path / "class1" / "0500-broken.png").write_bytes(b"\x89PNG not really")
    # decoded at its own size (size=None), unlike the rest: it cannot join the cache
    Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)).save(tmp_path / "class2" / "0900-bigger.png")
    source = open_data(tmp_path).train
    assert loading._use_processes(source, len(source), workers=2)
    in_processes = decode_part(source, channels=3, size=None, workers=2)
    in_threads = decode_part(source, channels=3, size=None, workers=1)
    assert len(in_processes) == 1200
    assert [Path(p).name for p, _ in in_processes.skipped] == ["0500-broken.png", "0900-bigger.png"]
    assert "0500-broken.png" in caplog.text and "decoded to (3, 7, 7), where the others are (3, 6, 6)" in caplog.text
    with pytest.raises(VisionflowError, match="0500-broken.png"):  # the first broken file, in the collection's order
        decode_part(source, channels=3, size=None, workers=2, strict=True)
    assert in_processes.origins == in_threads.origins
    assert torch.equal(in_processes.images, in_threads.images)
    assert torch.equal(in_processes.labels, in_threads.labels)


class _ManyBlankImages(DataSource):
    """A billion 3x64x64 images (12 TB decoded), each read as the same blank one."""

    classes, name = ["blank"], "many"

    def __init__(self):
        self.labels = np.zeros(1_000_000_000, dtype=np.int64)
        self.reads = 0

    def origin(self, index: int) -> str:
        return f"blank-{index}"

    def read(self, index: int, channels: int, size: int | None) -> torch.Tensor:
        self.reads += 1
        return torch.zeros(channels, size, size, dtype=torch.uint8)


def test_a_cache_bigger_than_memory_is_refused_before_decoding():
    source = _ManyBlankImages()
    with pytest.raises(VisionflowError, match=r"1,000,000,000 items decode to 12,288.0 GB \(3x64x64 bytes each\)"):
        decode_part(source, channels=3, size=64)
    assert source.reads == 1  # one item to learn the shape, then the answer


class _FirstTwoBroken(DataSource):
    """Five 1x2x2 images whose pixels are their index; the first two cannot be read."""

    classes = ["only"]

    def __init__(self):
        self.labels = np.zeros(5, dtype=np.int64)

    def origin(self, index: int) -> str:
        return f"item-{index}"

    def read(self, index: int, channels: int, size: int | None) -> torch.Tensor:
        if index < 2:
            raise BrokenImage(self.origin(index), "unreadable")
        return torch.full((channels, size, size), index, dtype=torch.uint8)


def test_a_cache_whose_first_items_are_broken_starts_at_the_first_readable_one():
    part = decode_part(_FirstTwoBroken(), channels=1, size=2)
    assert part.origins == ["item-2", "item-3", "item-4"]
    assert part.images[:, 0, 0, 0].tolist() == [2, 3, 4]
    assert [origin for origin, _ in part.skipped] == ["item-0", "item-1"]


def test_stratified_split_is_seeded_and_per_class():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    train_a, val_a = stratified_split(labels, 0.2, seed=3)
    train_b, val_b = stratified_split(labels, 0.2, seed=3)
    _, val_c = stratified_split(labels, 0.2, seed=4)
    assert np.array_equal(val_a, val_b) and not np.array_equal(val_a, val_c)
    assert np.bincount(labels[val_a]).tolist() == [10, 6, 4]
    assert len(np.intersect1d(train_a, val_a)) == 0 and len(train_a) + len(val_a) == 100


def test_expand_inputs_files_folders_globs(patterns: Path):
    files = expand_inputs([str(patterns / "square" / "000.png"), str(patterns / "stripes_h"), str(patterns / "stripes_v" / "00*.png")])
    assert len(files) == 1 + 20 + 10
    with pytest.raises(VisionflowError, match="no such file"):
        expand_inputs([str(patterns / "missing*.png")])
    # '**' matches the folder and the files below it: each file is labelled once
    files = expand_inputs([str(patterns)])
    assert expand_inputs([str(patterns / "**")]) == files and len(set(files)) == len(files)


def test_an_input_that_gives_no_image_is_named_and_the_others_go_on(tmp_path: Path, caplog):
    for folder in ("notes", "empty", "photos"):
        (tmp_path / folder).mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not an image")
    Image.new("L", (8, 8)).save(tmp_path / "photos" / "a.png")
    with caplog.at_level("WARNING", logger="visionflow"):
        assert expand_inputs([str(tmp_path / "notes" / "*"), str(tmp_path / "empty"), str(tmp_path / "photos")]) == [
            str(tmp_path / "photos" / "a.png")]
    assert caplog.messages == [f"{tmp_path / 'notes' / '*'}: matches no image files; going on with the other inputs",
                               f"{tmp_path / 'empty'}: holds no image files; going on with the other inputs"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="visionflow"):  # nothing at all: one error names each input, alone
        with pytest.raises(VisionflowError) as raised:
            expand_inputs([str(tmp_path / "empty"), str(tmp_path / "typo*.png")], "repair")
    assert str(raised.value) == (f"nothing to repair: {tmp_path / 'empty'}: holds no image files; "
                                 f"{tmp_path / 'typo*.png'}: no such file, folder or matching glob")
    assert caplog.messages == []


def test_a_glob_passes_over_the_folders_a_folder_listing_passes_over(tmp_path: Path):
    photos = tmp_path / "photos"
    for name in ("a.png", "__MACOSX/b.png", "sub/c.png", "sub/__MACOSX/d.png"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(photos / name)
    listed = [str(photos / "a.png"), str(photos / "sub" / "c.png")]
    assert expand_inputs([str(photos)]) == listed
    assert expand_inputs([str(photos / "**")]) == listed
    assert expand_inputs([str(photos / "**" / "*.png")]) == listed
    assert expand_inputs([str(photos / "*" / "*.png")]) == [str(photos / "sub" / "c.png")]
    # a folder the glob names as typed is the user's choice, as the folder named on its own is
    assert expand_inputs([str(photos / "__MACOSX" / "*.png")]) == expand_inputs([str(photos / "__MACOSX")]) == [
        str(photos / "__MACOSX" / "b.png")]


def test_images_only_in_sub_folders_are_still_an_image_collection(tmp_path: Path):
    for kind in ("cats", "dogs"):
        for year in ("2019", "2020"):
            folder = tmp_path / "pets" / kind / year
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (10, 10), (i * 40, 0, 0)).save(folder / f"{i}.jpg")
    source = open_data(tmp_path / "pets").train
    assert source.kind == "image" and len(source) == 12 and source.classes == ["cats", "dogs"]


def test_thread_decoding_keeps_a_bounded_window_ahead_of_its_consumer():
    """Labelling a big folder in threads: a slow consumer must not find the whole collection decoded in memory."""
    started = []

    class Runner(torch.utils.data.Dataset):
        def __getitem__(self, task):
            started.append(task)
            return task

    results = loading._run_tasks(Runner(), [[i] for i in range(1000)], processes=False, workers=2)
    assert next(results) == [0]
    assert len(started) <= 8  # 4 tasks a worker in flight, not 1,000
    assert list(results) == [[i] for i in range(1, 1000)]  # and every task, in order


def test_labelling_names_a_missing_run_before_a_bad_option(patterns: Path, tmp_path: Path):
    from visionflow import api

    for run, message in ((tmp_path / "nodir", "no such run directory"),
                         (patterns, "not a visionflow run directory")):  # a folder of images, no run
        with pytest.raises(VisionflowError, match=f"{run}: {message}"):
            api.predict(str(run), [str(patterns / "square")], precision="fp16")


def test_memory_is_said_in_units_that_tell_the_need_from_what_is_free(monkeypatch):
    assert [loading.memory_size(n) for n in (120_000_000, 60_000_000, 2_500_000_000, 512)] == [
        "120 MB", "60 MB", "2.5 GB", "512 bytes"]  # 0.1 GB against 0.1 GB had said nothing
    monkeypatch.setattr(loading, "available_memory", lambda: 1_000_000)
    with pytest.raises(VisionflowError, match=r"decode to 1 MB \(1x28x28 bytes each\), more than the 1 MB of memory"):
        decode_part(open_data("digits").train, 1, 28)  # 1,797 x 784 bytes = 1.4 MB: above 90% of 1 MB


def test_a_video_given_to_an_image_model_is_named_as_one(tmp_path: Path):
    from test_clips import write_mp4

    path = write_mp4(tmp_path / "clip.mp4", np.zeros((1, 16, 16), np.uint8))
    with pytest.raises(BrokenImage, match="a video, but the run's model takes images"):
        decode_image(str(path), 1, 16)
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(BrokenImage, match=r"not a readable image \(UnidentifiedImageError\)"):
        decode_image(str(tmp_path / "notes.png"), 1, 16)


def test_inputs_under_the_home_folder_are_found_from_python_too(patterns: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(patterns))
    assert expand_inputs(["~/square/000.png", "~/stripes_v/00*.png"]) == [
        str(patterns / "square" / "000.png"), *sorted(str(p) for p in (patterns / "stripes_v").glob("00*.png"))]
