"""Clip data: each format decodes, temporal sampling, broken videos, kind mismatches, moving-digits, CLI."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, write_class_folder
from visionflow import api
from visionflow.cli import main
from visionflow.config import TrainConfig
from visionflow.data.clips import ClipFiles, clip_indices, decoded_frames, expand_clip_inputs, sample_frames
from visionflow.data.loading import decode_part
from visionflow.data.moving_digits import DIRECTIONS, MovingDigitsSpec, make_moving_digits, render_clip
from visionflow.data.sources import open_data
from visionflow.data.transforms import Augment, AugmentSpec, Preprocess
from visionflow.errors import BrokenImage, VisionflowError


def write_mp4(path: Path, frames: np.ndarray, fps: int = 10, rotation: int = 0, x264_params: str | None = None) -> Path:
    """(T, H, W) grey or (T, H, W, 3) colour uint8 -> H.264 in the container `path`'s suffix names (mp4 unless told),
    with a display rotation (degrees counterclockwise) and x264's own options (keyframe interval, B-frames)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"x264-params": x264_params} if x264_params else {})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for frame in frames:
            fmt = "gray" if frame.ndim == 2 else "rgb24"
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=fmt)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def moving_square(frames: int, size: int, step: int = 2) -> np.ndarray:
    """A bright square moving right one `step` per frame: its column says which frame we are looking at."""
    clip = np.zeros((frames, size, size), dtype=np.uint8)
    for t in range(frames):
        clip[t, size // 2 - 2: size // 2 + 2, t * step: t * step + 4] = 255
    return clip


def square_column(frame: torch.Tensor) -> float:
    """The mean column of the bright pixels of a (C, H, W) frame."""
    columns = torch.nonzero(frame[0] > 128)[:, 1].float()
    return float(columns.mean())


@pytest.fixture(scope="module")
def digit_clips(tmp_path_factory) -> dict[str, Path]:
    """The same 16 moving-digits clips (8 directions x 2) written in each of the three formats."""
    root = tmp_path_factory.mktemp("moving")
    spec = dict(clips=16, frames=8, size=32, seed=3)
    return {fmt: Path(make_moving_digits(root / fmt, MovingDigitsSpec(format=fmt, **spec))["out"])
            for fmt in ("npy", "frames", "mp4")}


# --- decoding each format --------------------------------------------------------------------------------

def test_every_format_is_detected_as_clip_data_and_decodes_to_the_same_clips(digit_clips):
    parts = {}
    for fmt, root in digit_clips.items():
        source = open_data(root, frames=4, kind="clip").train
        assert isinstance(source, ClipFiles) and source.kind == "clip" and len(source) == 16
        # videos and arrays are clips whoever asks; folders of frames are nested images to an image model
        assert open_data(root, frames=4, kind="image").train.kind == ("image" if fmt == "frames" else "clip")
        assert source.classes == sorted(DIRECTIONS)
        assert source.guess_channels() == 1 and source.guess_size() == 32
        parts[fmt] = decode_part(source, 1, 32)
        assert parts[fmt].images.shape == (16, decoded_frames(4), 1, 32, 32)
        assert parts[fmt].images.dtype == torch.uint8
    assert torch.equal(parts["npy"].images, parts["frames"].images)  # both lossless
    assert parts["npy"].labels.tolist() == parts["mp4"].labels.tolist()
    error = (parts["mp4"].images.float() - parts["npy"].images.float()).abs().mean()
    assert error < 3.0  # H.264 at crf 17: a few grey levels on average


def test_frames_are_read_in_natural_name_order_and_resized(tmp_path: Path):
    clip = moving_square(12, 32)
    folder = tmp_path / "clip"
    folder.mkdir()
    for t, frame in enumerate(clip):
        Image.fromarray(frame).save(folder / f"frame_{t}.png")  # frame_10 sorts before frame_2 as text
    source = ClipFiles([str(folder)], [0], ["a"], frames=12)
    frames = source.read(0, 1, 16)
    assert frames.shape == (24, 1, 16, 16)
    columns = [square_column(f) for f in frames[::2]]
    assert columns == sorted(columns) and columns[-1] > columns[0]


def test_phone_videos_named_mov_are_clips(tmp_path: Path):
    # an iPhone writes .MOV (the mp4 family): a folder of them had been "no clips" to train and an empty frame
    # folder to predict, while one given by name was read
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i, extension in enumerate((".MOV", ".m4v")):
            write_mp4(tmp_path / name / f"clip{i}{extension}", moving_square(6, 16))
    source = open_data(tmp_path, frames=3).train
    assert source.kind == "clip" and len(source) == 4
    assert expand_clip_inputs([str(tmp_path / "a")]) == [str(tmp_path / "a" / "clip0.MOV"), str(tmp_path / "a" / "clip1.m4v")]
    assert decode_part(source, 1, 16).skipped == []


def test_mixed_resolutions_and_frame_rates_stack_into_one_batch(tmp_path: Path):
    for name, size, fps in (("a", 32, 10), ("a", 48, 25), ("b", 64, 30), ("b", 40, 5)):
        (tmp_path / name).mkdir(exist_ok=True)
        write_mp4(tmp_path / name / f"{size}_{fps}.mp4", moving_square(10, size), fps=fps)
    source = open_data(tmp_path, frames=5).train
    part = decode_part(source, 1, 24)
    assert part.images.shape == (4, 10, 1, 24, 24) and part.skipped == []
    for clip in part.images:  # the square moves right in every clip, whatever its size or frame rate
        assert square_column(clip[-1]) > square_column(clip[0]) + 4


def pyav_frames(path: Path) -> np.ndarray:
    """Every frame PyAV decodes from a video, (T, 3, H, W) RGB."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24").transpose(2, 0, 1) for frame in container.decode(video=0)])


def test_an_avi_that_dropped_frames_gives_the_frames_it_holds(tmp_path: Path):
    # Frames stamped 0, 2, 4, ...: the AVI muxer writes a null frame into each gap and its header counts them
    # (31 frames for 16); they decode to nothing, so the last half of the clip had been its last frame repeated.
    path = tmp_path / "dropped.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for t, frame in enumerate(moving_square(16, 32)):
            video_frame = av.VideoFrame.from_ndarray(frame, format="gray")
            video_frame.pts, video_frame.time_base = 2 * t, Fraction(1, 30)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 31
    decoded = pyav_frames(path)
    assert len(decoded) == 16
    frames = ClipFiles([str(path)], [0], ["a"], frames=8).read(0, 3, None)
    assert np.array_equal(frames.numpy(), decoded[clip_indices(16, 16, 8)])


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_a_video_with_a_display_rotation_is_read_upright(tmp_path: Path, degrees):
    # A phone stores a portrait video as landscape frames and a rotation that players apply; PyAV does not.
    clip = np.zeros((4, 24, 40, 3), dtype=np.uint8)
    clip[:, 2:8, 2:12] = (255, 0, 0)  # a red bar in the top-left corner
    write_mp4(tmp_path / "stored.mp4", clip)
    write_mp4(tmp_path / "rotated.mp4", clip, rotation=degrees)
    stored, rotated = (ClipFiles([str(tmp_path / name)], [0], ["a"], frames=4) for name in ("stored.mp4", "rotated.mp4"))
    expected = torch.rot90(stored.read(0, 3, None), k=degrees // 90, dims=(2, 3))  # counterclockwise, as PyAV says
    assert torch.equal(rotated.read(0, 3, None), expected)
    assert rotated.probe(str(tmp_path / "rotated.mp4"))[1] == ((40, 24) if degrees == 180 else (24, 40))


def test_a_clip_cut_between_keyframes_keeps_each_frame_at_its_place(tmp_path: Path):
    # Cut without re-encoding, a clip starts on frames that refer to a keyframe it no longer holds: the decoder
    # drops them. Numbered as decoded, every later frame had moved forward and the clip ended on its last frame
    # repeated; numbered by time, the dropped places take the first frame decoded.
    whole, cut = tmp_path / "whole.mkv", tmp_path / "cut.mkv"
    write_mp4(whole, moving_square(16, 48), x264_params="keyint=8:min-keyint=8:scenecut=0:bframes=0")
    with av.open(str(whole)) as source, av.open(str(cut), "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for number, packet in enumerate(p for p in source.demux(video=0) if p.size):
            if number >= 3:  # frames 3..15 kept; 8 is the first keyframe among them
                packet.stream = stream
                target.mux(packet)
    assert len(pyav_frames(cut)) == 8
    frames = ClipFiles([str(cut)], [0], ["a"], frames=4).read(0, 1, None)
    shown = [3 + i for i in clip_indices(13, 8, 4)]  # 3, 4, 6, 7, 9, 11, 12, 14
    assert [round((square_column(f) - 1.5) / 2) for f in frames] == [max(8, t) for t in shown]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".avi"])
def test_b_frames_are_read_in_display_order_in_every_container(tmp_path: Path, suffix):
    # B-frames are stored after the frames they refer to; an AVI has no display times, and the decoder hands its
    # frames made-up ones out of order: placing each frame by its time had shuffled an AVI's frames.
    path = tmp_path / f"b{suffix}"
    write_mp4(path, moving_square(24, 56), x264_params="bframes=3:keyint=24")
    assert len(pyav_frames(path)) == 24
    frames = ClipFiles([str(path)], [0], ["a"], frames=8).read(0, 1, None)
    assert [round((square_column(f) - 1.5) / 2) for f in frames] == clip_indices(24, 16, 8).tolist()


def test_frames_an_edit_list_trims_off_are_not_counted(tmp_path: Path):
    # Frames before an mp4's start time (an edit list, as a trim without re-encoding writes) are marked to discard
    # and never decoded; counted as frames, they made the clip start on its first frame repeated.
    whole, trimmed = tmp_path / "whole.mp4", tmp_path / "trimmed.mp4"
    write_mp4(whole, moving_square(24, 56), fps=25)
    with av.open(str(whole)) as source, av.open(str(trimmed), "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        shift = 3 * round(1 / (25 * source.streams.video[0].time_base))  # three frames before time 0
        for packet in source.demux(video=0):
            if packet.size:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, stream
                target.mux(packet)
    shown = pyav_frames(trimmed)
    assert len(shown) == 21
    frames = ClipFiles([str(trimmed)], [0], ["a"], frames=8).read(0, 1, None)
    assert [round((square_column(f) - 1.5) / 2) for f in frames] == [3 + i for i in clip_indices(21, 16, 8).tolist()]


def test_a_video_that_changes_resolution_midway_is_probed_and_read(tmp_path: Path):
    # VP8 keyframes carry their own size, so one stream can switch (a video call's recording); reading the first
    # and the middle frame at their own sizes to probe had crashed training with a traceback.
    path = tmp_path / "switch.webm"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = 40, 32, "yuv420p"
        for part, (width, height) in enumerate([(40, 32), (20, 16)]):
            encoder = av.CodecContext.create("libvpx", "w")
            encoder.width, encoder.height, encoder.pix_fmt, encoder.time_base = width, height, "yuv420p", Fraction(1, 10)
            packets = []
            for t in range(4):
                frame = av.VideoFrame.from_ndarray(np.full((height, width), 60 * t, dtype=np.uint8), format="gray")
                frame.pts = t
                packets += encoder.encode(frame)
            for t, packet in enumerate(packets + encoder.encode(None)):
                packet.stream, packet.time_base = stream, Fraction(1, 10)
                packet.pts = packet.dts = 4 * part + t
                container.mux(packet)
    with av.open(str(path)) as container:
        assert [(f.width, f.height) for f in container.decode(video=0)] == [(40, 32)] * 4 + [(20, 16)] * 4
    source = ClipFiles([str(path)], [0], ["a"], frames=4)
    assert source.guess_channels() == 1 and source.guess_size() == 40  # from the first frame
    frames = source.read(0, 1, 24)
    assert frames.shape == (8, 1, 24, 24)
    assert [round(f.float().mean().item() / 60) for f in frames[::2]] == [0, 2, 0, 2]  # both parts, in order


def test_colour_video_keeps_its_colours(tmp_path: Path):
    clip = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    clip[..., 0] = 200  # red
    source = ClipFiles([str(write_mp4(tmp_path / "red.mp4", clip))], [0], ["a"], frames=3)
    assert source.guess_channels() == 3
    frames = source.read(0, 3, 32).float()
    assert frames[:, 0].mean() > 150 and frames[:, 1].mean() < 60 and frames[:, 2].mean() < 60


def test_arrays_in_float_and_colour_are_read(tmp_path: Path):
    clip = np.random.default_rng(0).random((5, 20, 30, 3)).astype(np.float32)
    np.save(tmp_path / "c.npy", clip)
    frames = ClipFiles([str(tmp_path / "c.npy")], [0], ["a"], frames=5).read(0, 3, 20)
    assert frames.shape == (10, 3, 20, 20)
    assert abs(frames.float().mean().item() / 255 - clip.mean()) < 0.02


@pytest.mark.parametrize("values, reason", [
    (np.full((5, 8, 8), 200.0, dtype=np.float32), "is not in [0, 1] (min 200, max 200)"),  # floats scaled 0..255
    (np.full((5, 8, 8), np.nan, dtype=np.float32), "holds NaN or infinite values"),
])
def test_float_arrays_outside_0_1_are_broken_not_clipped(tmp_path: Path, values, reason):
    np.save(tmp_path / "c.npy", values)
    with pytest.raises(BrokenImage) as caught:
        ClipFiles([str(tmp_path / "c.npy")], [0], ["a"], frames=5).read(0, 1, 8)
    assert reason in caught.value.reason


@pytest.mark.parametrize("shape", [(5, 0, 8), (5, 8, 0, 3)])
def test_an_array_of_frames_with_no_pixels_is_broken(tmp_path: Path, shape):
    np.save(tmp_path / "c.npy", np.zeros(shape, dtype=np.float32))  # had crashed training with a traceback
    source = ClipFiles([str(tmp_path / "c.npy")], [0], ["a"], frames=5)
    with pytest.raises(BrokenImage, match="has frames with no pixels"):
        source.read(0, 1, 8)
    assert source.guess_channels() == 3 and source.guess_size() == 32  # the probe skips it, no file left to measure


def test_a_file_named_npy_that_is_no_array_is_named_as_such(tmp_path: Path):
    (tmp_path / "notes.npy").write_text("not an array")  # numpy alone would call it pickled data to load unsafely
    with pytest.raises(BrokenImage, match="not a .npy array file"):
        ClipFiles([str(tmp_path / "notes.npy")], [0], ["a"], frames=5).read(0, 1, 8)


def test_a_clip_folder_with_no_frames_is_skipped_and_named(tmp_path: Path, caplog):
    for name in ("a", "b"):
        for clip in range(2):
            (tmp_path / name / f"clip{clip}").mkdir(parents=True)
            for t in range(3):
                Image.new("L", (8, 8), 40 * t).save(tmp_path / name / f"clip{clip}" / f"{t}.png")
    (tmp_path / "b" / "empty").mkdir()
    (tmp_path / "b" / "notes").mkdir()
    (tmp_path / "b" / "notes" / "readme.txt").write_text("no frames here")
    source = open_data(tmp_path, frames=3, kind="clip").train
    with caplog.at_level(logging.WARNING, logger="visionflow"):
        part = decode_part(source, 1, 8)
    assert len(part) == 4
    assert [origin for origin, _ in part.skipped] == [str(tmp_path / "b" / "empty")]  # notes/ is not a clip
    assert str(tmp_path / "b" / "empty") in caplog.text
    with pytest.raises(VisionflowError, match="refused by --strict"):
        decode_part(source, 1, 8, strict=True)
    # given by name to predict, it is a row of its own rather than nothing
    assert expand_clip_inputs([str(tmp_path / "b" / "empty"), str(tmp_path / "a" / "clip0")]) == [
        str(tmp_path / "b" / "empty"), str(tmp_path / "a" / "clip0")]


def test_a_frame_folder_with_a_broken_frame_is_one_error_row_naming_the_clip_that_resume_counts_done(tmp_path: Path,
                                                                                                      capsys):
    data, run = tmp_path / "clips", tmp_path / "run"
    make_moving_digits(data, MovingDigitsSpec(clips=16, frames=4, size=16, format="frames"))
    api.train(TrainConfig(data=str(data), out=str(run), model="cnn-rnn", frames=4, epochs=1), show_progress=False)
    good, broken = sorted(path for path in data.rglob("clip_*") if path.is_dir())[:2]
    (broken / "zy.png").write_bytes(b"")  # two unreadable frames among good ones: the clip fails once, at the first
    (broken / "zz.png").write_bytes(b"not a png")
    # training and evaluating skip the clip, and their warning names it and the frame
    part = decode_part(ClipFiles([str(good), str(broken)], [0, 0], ["a"], frames=4), 1, 16)
    assert part.skipped == [(str(broken), "zy.png: empty file")]
    rows = tmp_path / "rows.csv"
    assert main(["predict", str(run), str(good), str(broken), "--output", str(rows)]) == 0
    assert f"warning: skipped {broken}: zy.png: empty file" in capsys.readouterr().err
    table = list(csv.DictReader(io.StringIO(rows.read_text())))
    assert [(r["path"], bool(r["label"]), r["error"]) for r in table] == [(str(good), True, ""),
                                                                        (str(broken), False, "zy.png: empty file")]
    # --resume finds the clip in the rows, by the path the user gave: nothing is left to label
    assert main(["predict", str(run), str(good), str(broken), "--output", str(rows), "--resume"]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == f"wrote 0 rows to {rows}, after the 2 it held"


def test_a_glob_gives_clips_only_and_one_that_matches_nothing_is_named_and_passed_over(tmp_path: Path, caplog):
    np.save(tmp_path / "moving.npy", np.zeros((4, 8, 8), dtype=np.uint8))
    (tmp_path / "moving.txt").write_text("notes on the clip")
    Image.new("L", (8, 8)).save(tmp_path / "moving.png")  # a thumbnail: a folder of clips may hold one
    with caplog.at_level(logging.WARNING, logger="visionflow"):
        assert expand_clip_inputs([str(tmp_path / "moving.*"), str(tmp_path / "typo*")]) == [str(tmp_path / "moving.npy")]
    assert caplog.messages == [f"{tmp_path / 'typo*'}: no such file, folder or matching glob; going on with the other inputs"]
    with pytest.raises(VisionflowError, match=r"nothing to label: .*typo\*: no such file, folder or matching glob$"):
        expand_clip_inputs([str(tmp_path / "typo*")])  # nothing else to label: an error
    (tmp_path / "clips" / "sub").mkdir(parents=True)
    for name in ("a.npy", "sub/b.npy"):
        np.save(tmp_path / "clips" / name, np.zeros((4, 8, 8), dtype=np.uint8))
    # once each, though '**' matches the folders and the clips in them
    assert expand_clip_inputs([str(tmp_path / "clips" / "**")]) == [str(tmp_path / "clips" / n) for n in ("a.npy", "sub/b.npy")]
    # a glob that matches only other files is named too, and __MACOSX is passed over as a folder listing does
    (tmp_path / "clips" / "__MACOSX").mkdir()
    np.save(tmp_path / "clips" / "__MACOSX" / "c.npy", np.zeros((4, 8, 8), dtype=np.uint8))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visionflow"):
        assert expand_clip_inputs([str(tmp_path / "moving.t*"), str(tmp_path / "clips" / "**")]) == [
            str(tmp_path / "clips" / n) for n in ("a.npy", "sub/b.npy")]
    assert caplog.messages == [f"{tmp_path / 'moving.t*'}: matches no clips; going on with the other inputs"]


# --- sampling frames ------------------------------------------------------------------------------------

def test_short_clips_are_padded_with_their_last_frame():
    assert clip_indices(5, 16, 8).tolist()[1::2] == [0, 1, 2, 3, 4, 4, 4, 4]
    assert clip_indices(40, 4, 4).tolist() == [0, 10, 20, 30]  # long clips: the start of each equal part


@pytest.mark.parametrize("length", [5, 8, 9, 12, 17, 25, 64, 100])
def test_every_format_gives_the_segment_centres_in_evaluation_and_their_own_segment_in_training(tmp_path, length):
    frames = 8
    # frame t says t in two flat halves, 16 grey levels apart per step: t // 16 on the left, t % 16 on the right
    t = np.arange(length)
    clip = np.zeros((length, 16, 16), dtype=np.uint8)
    clip[:, :, :8], clip[:, :, 8:] = (16 * (t // 16) + 8)[:, None, None], (16 * (t % 16) + 8)[:, None, None]
    np.save(tmp_path / "c.npy", clip)
    write_mp4(tmp_path / "c.mp4", clip)
    write_mp4(tmp_path / "c.mkv", clip)  # H.264 in Matroska, which keeps no frame count: its packets are counted
    (tmp_path / "f").mkdir()
    for t, picture in enumerate(clip):
        Image.fromarray(picture).save(tmp_path / "f" / f"frame_{t}.png")
    paths = [str(tmp_path / name) for name in ("c.npy", "c.mp4", "c.mkv", "f")]
    decoded = torch.stack([ClipFiles(paths, [0] * 4, ["a"], frames=frames).read(i, 1, 16) for i in range(4)])
    def frame_of(x: torch.Tensor) -> torch.Tensor:  # read t back, through the mp4's compression noise
        halves = x.float()[..., 2:14, :].unflatten(-1, (2, 8))[..., 2:6].mean((-1, -3, -4))
        levels = ((halves - 8) / 16).round().long()
        return 16 * levels[..., 0] + levels[..., 1]
    centres = [min(int((i + 0.5) * max(length, frames) / frames), length - 1) for i in range(frames)]
    for picks in frame_of(sample_frames(decoded, frames)).tolist():  # npy, mp4, mkv, frame folder alike
        assert picks == centres
    starts = [min(int(i * max(length, frames) / frames), length - 1) for i in range(frames)]
    # segment i spans [i, i + 1) x L / T: the frames it overlaps
    ends = [min(math.ceil((i + 1) * max(length, frames) / frames) - 1, length - 1) for i in range(frames)]
    for seed in range(10):
        picks = frame_of(sample_frames(decoded, frames, torch.Generator().manual_seed(seed)))
        assert all(starts[i] <= p <= ends[i] for row in picks.tolist() for i, p in enumerate(row))


def test_evaluation_takes_segment_centres_and_training_jitters_within_segments():
    clips = torch.arange(16).view(1, 16, 1, 1, 1).expand(3, 16, 1, 1, 1)  # frame t holds the value t
    uniform = sample_frames(clips, 4)
    assert uniform[:, :, 0, 0, 0].tolist() == [[2, 6, 10, 14]] * 3  # 16 cached frames: each segment's 3rd of 4
    picks = torch.stack([sample_frames(clips, 4, torch.Generator().manual_seed(s))[:, :, 0, 0, 0] for s in range(20)])
    segment = torch.arange(4) * 4
    assert ((picks >= segment) & (picks < segment + 4)).all()  # one frame from each segment, in order
    assert len(torch.unique(picks[:, 0, 0])) > 1  # different frames on different draws
    assert not torch.equal(picks[0, 0], picks[0, 1]) or not torch.equal(picks[1, 0], picks[1, 1])  # per clip


def test_preprocess_keeps_frames_per_clip_and_augments_all_frames_alike():
    preprocess = Preprocess(image_size=16, channels=1, mean=[0.0], std=[1.0], frames=4)
    frame = torch.randint(0, 256, (1, 1, 16, 16), dtype=torch.uint8)
    clips = frame.expand(6, 8, 1, 16, 16).clone()  # every frame of every clip the same picture
    augment = Augment(AugmentSpec.parse("rotate=30,shift=0.2"))
    x = preprocess(clips, augment, torch.Generator().manual_seed(0))
    assert x.shape == (6, 4, 1, 16, 16)
    assert torch.allclose(x, x[:, :1].expand_as(x))  # one transform per clip, shared by its frames
    assert not torch.allclose(x[0], x[1])  # but different clips are transformed differently
    assert preprocess(clips).shape == (6, 4, 1, 16, 16)


# --- broken input ----------------------------------------------------------------------------------------

def write_broken_videos(root: Path) -> list[str]:
    """Class folders a/ and b/ with good clips, plus an empty, a garbage and a zero-frame video."""
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            write_mp4(root / name / f"good{i}.mp4", moving_square(6, 16))
    (root / "a" / "empty.mp4").write_bytes(b"")
    (root / "a" / "garbage.webm").write_bytes(b"not a video at all" * 50)
    with av.open(str(root / "b" / "zero.avi"), "w") as container:  # a video stream that holds no frames
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        container.start_encoding()
    return [str(root / "a" / "empty.mp4"), str(root / "a" / "garbage.webm"), str(root / "b" / "zero.avi")]


def test_broken_and_zero_frame_videos_are_skipped_and_named(tmp_path: Path, caplog):
    broken = write_broken_videos(tmp_path)
    source = open_data(tmp_path, frames=3).train
    with caplog.at_level(logging.WARNING, logger="visionflow"):
        part = decode_part(source, 1, 16)
    assert len(part) == 6 and sorted(origin for origin, _ in part.skipped) == sorted(broken)
    reasons = dict(part.skipped)
    assert "no frames" in reasons[broken[2]] and "empty" in reasons[broken[0]]
    assert all(path in caplog.text for path in broken)
    with pytest.raises(VisionflowError, match="refused by --strict"):
        decode_part(source, 1, 16, strict=True)


def test_strict_training_refuses_a_broken_video_naming_it(tmp_path: Path):
    write_broken_videos(tmp_path / "clips")
    cfg = TrainConfig(data=str(tmp_path / "clips"), out=str(tmp_path / "run"), model="cnn-rnn", frames=3, epochs=1,
                      strict=True)
    with pytest.raises(VisionflowError, match=r"refused by --strict\): .*(empty\.mp4|garbage\.webm|zero\.avi)"):
        api.train(cfg, show_progress=False)


def test_image_files_next_to_clips_are_an_error(tmp_path: Path):
    write_broken_videos(tmp_path)
    Image.new("L", (8, 8)).save(tmp_path / "b" / "stray.png")
    with pytest.raises(VisionflowError, match="image files next to clips"):
        open_data(tmp_path)
    # given to predict, the folder is not a clip of that one image besides its videos (it had been a row of its own)
    with pytest.raises(VisionflowError, match=f"{tmp_path / 'b'}: holds image files next to clips"):
        expand_clip_inputs([str(tmp_path / "b")])
    assert expand_clip_inputs([str(tmp_path / "a")]) == sorted(str(p) for p in (tmp_path / "a").iterdir())
    # and so at any depth: a class's sub-folder of videos with a cover image is no frame folder
    nested = tmp_path / "nested" / "a" / "sub"
    nested.mkdir(parents=True)
    shutil.copy(next((tmp_path / "a").iterdir()), nested / "clip.mp4")
    Image.new("L", (8, 8)).save(nested / "cover.png")
    shutil.copytree(tmp_path / "a", tmp_path / "nested" / "b")
    for data in (tmp_path / "nested", tmp_path / "nested" / "a"):
        with pytest.raises(VisionflowError, match=f"{nested}: holds image files next to clips"):
            open_data(data, kind="clip") if data.name == "nested" else expand_clip_inputs([str(data)])


# --- moving digits ---------------------------------------------------------------------------------------

def corner_track(clip: np.ndarray) -> np.ndarray:
    """(frames, 2) top-left corner (x, y) of the white square in each frame."""
    return np.array([(np.nonzero(frame)[1].min(), np.nonzero(frame)[0].min()) for frame in clip], dtype=float)


@pytest.mark.parametrize("size", [32, 16])  # under 32 px the speed's floor of a pixel a frame keeps each step
def test_moving_digits_move_in_their_labelled_direction_at_the_middle_and_bounce(size):
    rng = np.random.default_rng(0)
    square = np.full((size // 2, size // 2), 255, dtype=np.uint8)
    bounced = 0
    for direction in range(8):
        want = np.sign(np.round([np.cos(direction * np.pi / 4), -np.sin(direction * np.pi / 4)], 6))
        for _ in range(10):
            track = corner_track(render_clip(square, direction, 8, size, rng))
            steps = np.diff(track, axis=0)
            assert (np.sign(steps[3]) == want).all()  # the middle step (frame 3 -> 4) shows the class
            assert ((track >= 0) & (track <= size // 2)).all()  # the digit never leaves the canvas
            moving = want != 0
            assert (np.abs(steps[:, moving]) >= 1).all() and (steps[:, ~moving] == 0).all()
            bounced += int((np.sign(steps[:, moving]) != want[moving]).any())
    assert bounced > 10  # some clips turn at an edge


def test_moving_digits_hide_the_direction_from_where_the_digit_is():
    """Order-blind models must stay near chance: the positions a clip visits do not depend on its direction."""
    rng = np.random.default_rng(1)
    square = np.full((16, 16), 255, dtype=np.uint8)
    mean_x = {d: np.mean([corner_track(render_clip(square, d, 8, 32, rng))[:, 0].mean() for _ in range(300)])
              for d in (0, 4)}  # right, left
    assert abs(mean_x[0] - mean_x[4]) < 0.6  # labelled at the first frame instead, the gap is about 4 pixels


def test_moving_digits_refuses_a_non_empty_folder_and_bad_options(tmp_path: Path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(VisionflowError, match="not empty"):
        make_moving_digits(tmp_path, MovingDigitsSpec(clips=2))
    with pytest.raises(VisionflowError, match="even"):
        make_moving_digits(tmp_path / "new", MovingDigitsSpec(clips=2, size=33))


# --- the CLI, end to end -------------------------------------------------------------------------------

def test_cli_makes_clips_trains_evaluates_and_labels_one_row_per_clip(tmp_path: Path):
    data, run = tmp_path / "clips", tmp_path / "run"
    made = run_cli("datasets", "make", "moving-digits", data, "--clips", "24", "--frames", "8", "--size", "16",
                   "--label", "digit", "--seed", "1")
    assert made.returncode == 0, made.stderr
    clips = sorted(str(p) for p in data.rglob("*.mp4"))
    assert len(clips) == 24
    trained = run_cli("train", data, "--model", "cnn-rnn", "--frames", "4", "--epochs", "1", "--val-split", "0.25",
                      "--model-options", "cell=gru,hidden=16", "--temporal-pool", "mean", "--out", run, "--quiet")
    assert trained.returncode == 0, trained.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["input_kind"] == "clip" and config["preprocess"]["frames"] == 4
    assert config["train"]["model_options"] == {"cell": "gru", "hidden": 16, "temporal_pool": "mean"}
    assert config["clip_sampling"]["short_clips"] == "pad by repeating the last frame"
    held_out = json.loads((run / "split.json").read_text())["held_out"]
    size, channels = config["preprocess"]["image_size"], config["preprocess"]["channels"]
    assert f"({len(held_out)} clips of {size}x{size}x{channels}, best epoch 1," in trained.stdout, trained.stdout
    assert "train clips/s" in trained.stdout
    assert api.evaluate(str(run), str(data))["n"] == len(held_out)  # the run's held-out clips
    evaluated = run_cli("evaluate", run, data)
    assert evaluated.returncode == 0 and " clips/s " in evaluated.stdout, evaluated.stderr
    predicted = run_cli("predict", run, data, "--format", "jsonl")
    assert predicted.returncode == 0, predicted.stderr
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert sorted(row["path"] for row in rows) == clips
    assert all(row["label"] in config["classes"] and row["error"] is None for row in rows)


def test_kind_mismatches_are_one_line_errors(tmp_path: Path):
    clips = tmp_path / "clips"
    make_moving_digits(clips, MovingDigitsSpec(clips=8, frames=4, size=16, format="npy"))
    images = write_class_folder(tmp_path / "images", per_class=6)
    result = run_cli("train", clips, "--model", "seed-cnn", "--epochs", "1", "--out", tmp_path / "r1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"model 'seed-cnn' takes images but {clips} holds clips" in result.stderr
    with pytest.raises(VisionflowError, match="model 'cnn-rnn' takes clips but .*images holds images"):
        api.train(TrainConfig(data=str(images), out=str(tmp_path / "r2"), model="cnn-rnn", epochs=1))
    # a trained image run given clips to evaluate or label
    run = str(tmp_path / "r3")
    api.train(TrainConfig(data=str(images), out=run, model="seed-cnn", epochs=1), show_progress=False)
    with pytest.raises(VisionflowError, match="takes images but .* holds clips"):
        api.evaluate(run, str(clips))
    with pytest.raises(VisionflowError, match="takes images but .* holds clips"):
        list(api.predict(run, [str(clips)]))
    with pytest.raises(VisionflowError) as refused:  # the input that holds clips is named, not the others
        list(api.predict(run, [str(clips), str(tmp_path / "typo*.png")]))
    assert str(refused.value) == f"the run's model takes images but {clips} holds clips (video files or .npy arrays)"


def test_preview_shows_one_clip_per_row(digit_clips, tmp_path: Path):
    path = api.preview(str(digit_clips["npy"]), "rotate=10", str(tmp_path / "preview.png"), count=3)
    width, height = Image.open(path).size
    assert (width, height) == (2 + 16 * 34, 2 + 3 * 34)  # 16 frames (the default --frames) of 32 px, 3 rows
    # from the command line, folders of frames read as clips once --frames is given
    result = run_cli("preview", digit_clips["frames"], "--augment", "flip", "--frames", "5", "--count", "2",
                     "--out", tmp_path / "frames.png")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "frames.png").size == (2 + 5 * 34, 2 + 2 * 34)
    refused = run_cli("preview", digit_clips["frames"], "--augment", "flip", "--frames", "0", "--out", tmp_path / "x.png")
    assert refused.returncode == 2 and refused.stderr.strip() == "visionflow: error: --frames must be at least 1 (got 0)"


def test_a_small_colour_class_among_grey_clips_is_probed(tmp_path: Path):
    # Eight evenly spaced probes miss the one colour clip listed last; the first clip of every class is probed too
    # (a probe decodes one frame, so every class costs little), as for images.
    for i in range(20):
        (tmp_path / "grey").mkdir(exist_ok=True)
        np.save(tmp_path / "grey" / f"{i:02d}.npy", np.full((4, 8, 8), 10 * i, dtype=np.uint8))
    (tmp_path / "red").mkdir()
    colour = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    colour[..., 0] = 200
    np.save(tmp_path / "red" / "0.npy", colour)
    assert open_data(tmp_path, kind="clip").train.guess_channels() == 3


def test_messages_about_held_out_clips_say_clips(tmp_path: Path, caplog, capsys):
    data = tmp_path / "clips"
    make_moving_digits(data, MovingDigitsSpec(clips=24, frames=4, size=16, format="npy"))
    out = tmp_path / "run"
    assert main(["train", str(data), "--model", "cnn-rnn", "--frames", "4", "--epochs", "1", "--val-split", "0.34",
                 "--quiet", "--out", str(out)]) == 0
    held_out = json.loads((out / "split.json").read_text())["held_out"]
    Path(held_out[0]).unlink()
    caplog.clear()
    assert main(["evaluate", str(out), str(data), "--json"]) == 0
    assert [m for m in caplog.messages if "gone" in m] == [
        f"{data}: 1 of the {len(held_out)} held-out clips is gone (scoring the other {len(held_out) - 1})"]
