from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import digi2real
from digi2real.data.images import (
    IPTC_SYNTHETIC,
    ImageError,
    encode_jpeg,
    load_image,
    read_image_note,
)


def _rgb(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def _reason(path: Path, **kwargs) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(path, **kwargs)
    assert caught.value.path == str(path)
    return caught.value.reason


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    pixels = _rgb()
    out = load_image(_save(Image.fromarray(pixels), tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == pixels.shape
    np.testing.assert_array_equal(out, pixels)


def test_image_error_is_value_error_with_reason_and_path(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file") as caught:
        load_image(path)
    assert isinstance(caught.value, ImageError)
    assert caught.value.reason == "empty file"
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.png") == "not found"


def test_text_file_named_png_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    assert _reason(path) == "not an image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buffer, format=fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert _reason(path) == "truncated"


def test_png_cut_inside_header_is_corrupt_not_foreign(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_rgb()).save(buffer, format="PNG")
    path = tmp_path / "head.png"
    path.write_bytes(buffer.getvalue()[:20])
    assert _reason(path) == "corrupt"


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8] = (200, 40, 40)
    pixels[:, 8:] = (30, 60, 220)
    path = _save(Image.fromarray(pixels).convert("CMYK"), tmp_path / "cmyk.jpg", quality=98)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path)
    assert out.shape == (16, 16, 3)
    assert np.abs(out[4, 2].astype(int) - (200, 40, 40)).max() < 12
    assert np.abs(out[4, 13].astype(int) - (30, 60, 220)).max() < 12


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 257 * 200, 65535, 300]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I;16")
    out = load_image(path)
    assert out.shape == (1, 5, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 200, 255, 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_mode_i_and_f_tiffs(tmp_path: Path) -> None:
    ints = np.array([[0, 65535, 32896]], dtype=np.int32)
    path = _save(Image.fromarray(ints, mode="I"), tmp_path / "i.tif")
    np.testing.assert_array_equal(load_image(path)[0, :, 0], [0, 255, 128])
    wide = np.array([[-1000, 0, 1000]], dtype=np.int32)  # outside 16 bits: stretched
    path = _save(Image.fromarray(wide, mode="I"), tmp_path / "wide.tif")
    np.testing.assert_array_equal(load_image(path)[0, :, 0], [0, 128, 255])
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    path = _save(Image.fromarray(unit, mode="F"), tmp_path / "f.tif")
    np.testing.assert_array_equal(load_image(path)[0, :, 0], [0, 128, 255])


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[0, :, 3] = (255, 128, 0)
    rgba[1, :, 3] = 255
    out = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    np.testing.assert_array_equal(out[0, 0], (200, 100, 50))
    np.testing.assert_array_equal(out[0, 1], (100, 50, 25))
    np.testing.assert_array_equal(out[0, 2], (0, 0, 0))
    np.testing.assert_array_equal(out[1, 2], (200, 100, 50))


def test_gray_and_gray_alpha(tmp_path: Path) -> None:
    gray = np.array([[0, 77, 255]], np.uint8)
    out = load_image(_save(Image.fromarray(gray, "L"), tmp_path / "l.png"))
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [77, 77, 77], [255, 255, 255]])
    la = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(np.full_like(gray, 0))])
    out = load_image(_save(la, tmp_path / "la.png"))
    assert not out.any()


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pixels = _rgb(8, 8)
    palette = Image.fromarray(pixels).quantize(16)
    plain = load_image(_save(palette, tmp_path / "p.png"))
    np.testing.assert_array_equal(plain, np.asarray(palette.convert("RGB")))
    index = palette.getpixel((0, 0))
    transparent = load_image(_save(palette, tmp_path / "pt.png", transparency=index))
    mask = np.asarray(palette) == index
    assert not transparent[mask].any()
    np.testing.assert_array_equal(transparent[~mask], plain[~mask])


def test_bilevel_image(tmp_path: Path) -> None:
    bits = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    out = load_image(_save(bits, tmp_path / "b.png"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)  # top-left marker
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display
    path = _save(Image.fromarray(pixels), tmp_path / "rot.png", exif=exif.tobytes())
    out = load_image(path)
    assert out.shape == (20, 10, 3)
    assert out[0, -1, 0] > 200 and out[0, 0].max() == 0  # top-left went to top-right


def test_pixel_limit_from_header_without_allocating(tmp_path: Path) -> None:
    # A PNG whose header claims 100000 x 100000 pixels and holds no pixel data.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak as a warning
        assert _reason(path) == "too large"
        assert _reason(path, max_pixels=10**11) == "too large"  # Pillow's hard limit


def test_lower_pixel_limit(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_rgb(20, 20)), tmp_path / "a.png")
    assert _reason(path, max_pixels=399) == "too large"
    assert load_image(path, max_pixels=400).shape == (20, 20, 3)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(path, max_pixels=0)


def test_our_limit_governs_above_pillow_soft_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    path = _save(Image.fromarray(_rgb(20, 20)), tmp_path / "a.png")  # 400 > soft limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path, max_pixels=500).shape == (20, 20, 3)
        assert load_image(path).shape == (20, 20, 3)
    big = _save(Image.fromarray(_rgb(30, 30)), tmp_path / "b.png")  # 900 > Pillow's hard 600
    assert _reason(big) == "too large"
    assert _reason(path, max_pixels=350) == "too large"


def test_encode_jpeg_is_deterministic_and_decodes() -> None:
    pixels = _rgb(48, 40, seed=3)
    first = encode_jpeg(pixels)
    assert first == encode_jpeg(pixels.copy())
    assert first != encode_jpeg(pixels, quality=80)
    decoded = np.asarray(Image.open(io.BytesIO(first)).convert("RGB"))
    assert decoded.shape == pixels.shape
    smooth = np.tile(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], (48, 1, 3))
    again = np.asarray(Image.open(io.BytesIO(encode_jpeg(smooth))).convert("RGB"))
    assert np.abs(again.astype(int) - smooth).mean() < 2


def test_image_note_round_trip(tmp_path: Path) -> None:
    data = encode_jpeg(_rgb())
    note = read_image_note(data)
    assert note is not None
    assert "synthetic" in note.lower() and digi2real.__version__ in note and "digi2real" in note
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    assert read_image_note(path) == note
    with Image.open(path) as image:
        assert image.getexif()[0x0131] == f"digi2real {digi2real.__version__}"
        assert image.getexif()[0x010E] == note
        assert IPTC_SYNTHETIC.encode() in image.info["xmp"]


def test_custom_note_and_missing_note(tmp_path: Path) -> None:
    custom = "synthetic — ünïcode note"
    assert read_image_note(encode_jpeg(_rgb(), note=custom)) == custom
    plain = io.BytesIO()
    Image.fromarray(_rgb()).save(plain, format="JPEG")
    assert read_image_note(plain.getvalue()) is None
    exif_only = io.BytesIO()
    exif = Image.Exif()
    exif[0x010E] = "from exif"
    Image.fromarray(_rgb()).save(exif_only, format="JPEG", exif=exif.tobytes())
    assert read_image_note(exif_only.getvalue()) == "from exif"
    with pytest.raises(ImageError, match="not an image"):
        read_image_note(b"plain text")


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4), np.uint8), "HxWx3"),
        (np.zeros((4, 4, 4), np.uint8), "HxWx3"),
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ],
)
def test_encode_jpeg_rejects_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_jpeg(array)


def test_encode_jpeg_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="quality"):
        encode_jpeg(_rgb(), quality=0)
    with pytest.raises(ValueError, match="subsampling"):
        encode_jpeg(_rgb(), subsampling="4:1:1")
