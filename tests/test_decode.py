"""decode_image reads every odd-but-valid image correctly and names every broken one."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionflow.data.decode import MAX_PIXELS, decode_image, is_image_file, probe_image
from visionflow.errors import BrokenImage


def rgb_array() -> np.ndarray:
    array = np.zeros((6, 8, 3), dtype=np.uint8)
    array[..., 0] = 200  # red everywhere
    array[:, :4, 1] = 100  # green on the left half
    return array


def test_rgb_png_decodes_exactly(tmp_path: Path):
    Image.fromarray(rgb_array()).save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", channels=3)
    assert out.dtype == torch.uint8 and out.shape == (3, 6, 8)
    assert torch.equal(out.permute(1, 2, 0), torch.from_numpy(rgb_array()))


def test_rgb_to_one_channel_uses_luminance(tmp_path: Path):
    Image.fromarray(rgb_array()).save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", channels=1)
    expected = np.array(Image.fromarray(rgb_array()).convert("L"))
    assert out.shape == (1, 6, 8) and torch.equal(out[0], torch.from_numpy(expected))


def test_grey_to_three_channels_repeats(tmp_path: Path):
    Image.fromarray(np.full((5, 5), 77, np.uint8)).save(tmp_path / "g.png")
    out = decode_image(tmp_path / "g.png", channels=3)
    assert out.shape == (3, 5, 5) and int(out.min()) == int(out.max()) == 77


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "LA"])
def test_other_modes_convert(tmp_path: Path, mode: str):
    image = Image.fromarray(rgb_array()).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path, quality=100) if mode == "CMYK" else image.save(path)
    out = decode_image(path, channels=3)
    assert out.shape == (3, 6, 8)
    if mode != "LA":  # LA has no colour to keep
        red = out[0].float().mean()
        assert 180 < red < 220, f"{mode}: red channel lost ({red})"


def test_sixteen_bit_scales_instead_of_clipping(tmp_path: Path):
    array = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "deep.png")
    out = decode_image(tmp_path / "deep.png", channels=1)
    assert out[0, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path):
    array = np.zeros((10, 20, 3), dtype=np.uint8)
    array[:, :10] = 255  # white left half in the stored pixels
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    data = (tmp_path / "rotated.jpg").read_bytes()
    comment = b"\xff\xfe" + (65_000).to_bytes(2, "big") + b"c" * 64_998
    (tmp_path / "comments-first.jpg").write_bytes(data[:2] + comment * 2 + data[2:])  # EXIF 130 KB in
    for name in ("rotated.jpg", "comments-first.jpg"):
        for channels in (1, 3):  # colour kept is libjpeg-turbo's fast path, unless the header may rotate it
            out = decode_image(tmp_path / name, channels=channels)
            assert out.shape == (channels, 20, 10), name  # displayed upright: taller than wide
            assert out[0, :10].float().mean() > 200 and out[0, 10:].float().mean() < 50  # left became top


def test_resize_to_square(tmp_path: Path):
    Image.fromarray(rgb_array()).save(tmp_path / "a.png")
    assert decode_image(tmp_path / "a.png", channels=3, size=12).shape == (3, 12, 12)


def test_webp_and_upper_case_extension(tmp_path: Path):
    Image.fromarray(rgb_array()).save(tmp_path / "a.WEBP", format="WEBP", lossless=True)
    assert is_image_file(tmp_path / "a.WEBP")
    assert torch.equal(decode_image(tmp_path / "a.WEBP", channels=3).permute(1, 2, 0), torch.from_numpy(rgb_array()))


def test_bytes_decode_like_files():
    buffer = io.BytesIO()
    Image.fromarray(rgb_array()).save(buffer, format="PNG")
    assert torch.equal(decode_image(buffer.getvalue(), channels=3).permute(1, 2, 0), torch.from_numpy(rgb_array()))


def test_non_images_are_not_image_files():
    assert not is_image_file("notes.txt") and not is_image_file(".DS_Store") and not is_image_file("a/.hidden.png")
    assert is_image_file("a/B.JPG")


def broken_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    Image.fromarray(rgb_array()).save(good, format="PNG")
    paths = {"empty": folder / "empty.png", "text": folder / "text.jpg", "truncated": folder / "truncated.png"}
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("this is not an image")
    paths["truncated"].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    return paths


def test_broken_files_raise_broken_image_naming_the_file(tmp_path: Path):
    for kind, path in broken_files(tmp_path).items():
        with pytest.raises(BrokenImage) as info:
            decode_image(path, channels=3)
        assert str(path) in str(info.value), kind


@pytest.mark.parametrize("times", [1.01, 2.5])  # Pillow only warns up to 2x its limit, and raises its own error above
def test_decompression_bomb_is_refused(tmp_path: Path, times: float):
    side = int((MAX_PIXELS * times) ** 0.5)
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")  # 1-bit: tiny file, huge image
    assert (tmp_path / "bomb.png").stat().st_size < 5_000_000
    for read in (lambda path: decode_image(path, channels=1), probe_image):  # probing (guessing the size) as well
        with pytest.raises(BrokenImage, match="decompression bomb"):
            read(tmp_path / "bomb.png")


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus noise: what a JPEG encoder meets in photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode,subsampling,channels,size", [
    ("RGB", 2, 3, None), ("RGB", 0, 3, None), ("RGB", 2, 3, 16), ("RGB", 2, 1, None),
    ("L", -1, 1, None), ("L", -1, 3, 24),
])
def test_plain_jpegs_decode_exactly_as_pillow_does(tmp_path: Path, mode, subsampling, channels, size):
    """The libjpeg-turbo fast path and Pillow give the same pixels, resized or not, for every channel choice."""
    from visionflow.data.decode import decode_plain_jpeg, open_image, pil_to_tensor

    for i, (height, width) in enumerate([(32, 32), (37, 53), (120, 90)]):
        image = Image.fromarray(_photo(height, width, i)).convert(mode)
        path = tmp_path / f"{mode}{subsampling}-{i}.jpg"
        image.save(path, quality=75, **({"subsampling": subsampling} if subsampling >= 0 else {}))
        expected = pil_to_tensor(open_image(path), channels, size)
        assert torch.equal(decode_image(path, channels, size), expected), path.name
        assert torch.equal(decode_image(path.read_bytes(), channels, size), expected), path.name
        took_fast_path = decode_plain_jpeg(path.read_bytes(), channels, size) is not None
        assert took_fast_path == (mode == "L" or channels == 3)  # colour to grey stays with Pillow's weights


def test_truncated_jpeg_is_named_not_half_decoded(tmp_path: Path):
    good = io.BytesIO()
    Image.fromarray(_photo(64, 64, 0)).save(good, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(BrokenImage, match="cut.jpg"):
        decode_image(path, channels=3)


def test_what_is_not_a_regular_file_is_broken_not_a_hang(tmp_path):
    """In a child process with a timeout: broken, this would block the reader for ever, not fail."""
    import subprocess
    import sys

    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would block the reader for ever
    (tmp_path / "zeros.jpg").symlink_to("/dev/zero")  # reading it would never end
    code = f"""
from visionflow.data.decode import decode_image, probe_image
from visionflow.errors import BrokenImage
for name in ("pipe.jpg", "zeros.jpg"):
    for read in (lambda path: decode_image(path, 1, 8), probe_image):  # probing (guessing the size) as well
        try:
            read({str(tmp_path)!r} + "/" + name)
            print("read", name)
        except BrokenImage as exc:
            print(exc.reason)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines() == ["not a regular file (a pipe, a device or a socket)"] * 4, result.stderr


def test_lab_images_decode_in_grey_and_colour(tmp_path):
    lab = Image.fromarray(rgb_array()).convert("LAB")
    lab.save(tmp_path / "lab.tif")
    reference = lab.convert("RGB")  # Pillow converts LAB to RGB only: grey goes through RGB
    assert decode_image(tmp_path / "lab.tif", 3).permute(1, 2, 0).numpy().tolist() == np.asarray(reference).tolist()
    assert decode_image(tmp_path / "lab.tif", 1)[0].numpy().tolist() == np.asarray(reference.convert("L")).tolist()


def test_deep_integer_and_float_images_scale_to_eight_bits(tmp_path):
    ints = np.array([[-60000, -1, 0, 256, 65535, 90000]], dtype=np.int32)
    Image.fromarray(ints, mode="I").save(tmp_path / "int.tif")
    assert decode_image(tmp_path / "int.tif", 1)[0, 0].tolist() == [0, 0, 0, 1, 255, 255]  # negatives are black
    unit = np.array([[0.2, 0.4, 1.02, np.nan, np.inf, -0.01]], dtype=np.float32)  # intensities, not stretched
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    assert decode_image(tmp_path / "unit.tif", 1)[0, 0].tolist() == [51, 102, 255, 0, 255, 0]
    Image.fromarray(np.full((1, 3), 5.0, dtype=np.float32), mode="F").save(tmp_path / "flat.tif")
    assert decode_image(tmp_path / "flat.tif", 1)[0, 0].tolist() == [255, 255, 255]  # one value: clipped
    wide = np.array([[-2.0, 0.0, 2.0, -np.inf]], dtype=np.float32)  # another range: stretched over its finite values
    Image.fromarray(wide, mode="F").save(tmp_path / "wide.tif")
    assert decode_image(tmp_path / "wide.tif", 1)[0, 0].tolist() == [0, 128, 255, 0]
