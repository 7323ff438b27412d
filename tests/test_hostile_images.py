"""Untrusted images are decoded with an allow-list of formats (JPEG, PNG, WebP, BMP, TIFF, PPM) and
with Pillow's decompression-bomb limit as an error: source renders (an error row, the run goes
on), ``.bin`` verification pairs and training images (a one-line error naming the file and the
item), the report's contact sheets (a placeholder tile). An EPS file never reaches Pillow's EPS
plugin, which runs Ghostscript."""

from __future__ import annotations

import io
import pickle
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from digi2real.cli import main
from digi2real.data.images import ALLOWED_FORMATS, ImageError, load_image, open_image

REFUSED_EPS = "format EPS is not read (allowed: JPEG, PNG, WEBP, BMP, TIFF, PPM)"
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 112 112\n%%EndComments\n"
    b"newpath 0 0 moveto 112 112 lineto stroke\nshowpage\n%%EOF\n"
)
# above Image.MAX_IMAGE_PIXELS (~89.5 M: Pillow warns), and above twice it (Pillow raises)
BOMB_WARNING_SIDE, BOMB_ERROR_SIDE = 10_000, 14_000


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(side: int) -> bytes:
    """A complete, decodable 1-bit black PNG of side x side pixels: a few KB on disk."""
    row = b"\x00" + bytes((side + 7) // 8)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(row * side, 9))
        + _chunk(b"IEND", b"")
    )


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (112, 112), 90).save(buffer, format="GIF")
    return buffer.getvalue()


def _no_large_decode(patch: pytest.MonkeyPatch) -> None:
    """Fail the test if the pixels of an image larger than 112x112 are decoded."""
    load = ImageFile.ImageFile.load

    def guarded(self):
        if self.width * self.height > 112 * 112:
            pytest.fail(f"the pixels of a {self.width}x{self.height} image were decoded")
        return load(self)

    patch.setattr(ImageFile.ImageFile, "load", guarded)


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {"warning": _bomb_png(BOMB_WARNING_SIDE), "error": _bomb_png(BOMB_ERROR_SIDE)}


class _Calls(list):
    """Records any call of Pillow's EPS plugin or of a subprocess."""

    def watch(self, patch: pytest.MonkeyPatch, *, subprocesses: bool = True) -> _Calls:
        def recorder(name):
            def record(*args, **kwargs):
                self.append(name)
                raise AssertionError(f"{name} was called")

            return record

        patch.setattr(EpsImagePlugin.EpsImageFile, "_open", recorder("EpsImageFile._open"))
        patch.setattr(EpsImagePlugin.EpsImageFile, "load", recorder("EpsImageFile.load"))
        if subprocesses:
            patch.setattr(subprocess, "Popen", recorder("subprocess.Popen"))
        return self


@pytest.fixture()
def calls(monkeypatch) -> _Calls:
    return _Calls().watch(monkeypatch)


# -- the allow-list itself -------------------------------------------------------------------


def test_the_allow_list_is_the_face_dataset_formats_and_they_decode(tmp_path: Path) -> None:
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "PPM")
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    for fmt in ALLOWED_FORMATS:
        if fmt not in Image.OPEN:
            continue  # this Pillow has no WebP
        path = tmp_path / f"a.{fmt.lower()}"
        lossless = {"lossless": True} if fmt == "WEBP" else {}
        Image.fromarray(pixels).save(path, format=fmt, **lossless)
        decoded = load_image(path)
        assert decoded.shape == (16, 16, 3), fmt
        if fmt != "JPEG":
            np.testing.assert_array_equal(decoded, pixels, err_msg=fmt)


def test_every_extension_the_readers_scan_for_is_an_allowed_format() -> None:
    # a file the readers list must be one open_image may decode, or a whole folder of
    # renders with a scanned extension would be error rows
    from digi2real.data.readers import IMAGE_EXTENSIONS

    registered = Image.registered_extensions()
    for extension in IMAGE_EXTENSIONS:
        assert registered[extension] in ALLOWED_FORMATS, extension


@pytest.mark.parametrize("name", ["render.png", "render.jpg", "render.tif"])
def test_an_eps_source_is_refused_without_reaching_the_eps_plugin(
    tmp_path: Path, monkeypatch, name: str
) -> None:
    path = tmp_path / name
    path.write_bytes(EPS)
    # the premise: Pillow alone takes the file for EPS (whose load runs Ghostscript)
    with Image.open(path) as image:
        assert image.format == "EPS" and image.size == (112, 112)
    calls = _Calls().watch(monkeypatch)
    with pytest.raises(ImageError) as caught:
        load_image(path)
    assert caught.value.reason == REFUSED_EPS
    assert str(caught.value) == f"{path}: {REFUSED_EPS}"
    with pytest.raises(ImageError, match="format EPS is not read"):
        open_image(io.BytesIO(EPS))
    assert calls == []


def test_another_format_is_refused_by_name(tmp_path: Path, calls: _Calls) -> None:
    (tmp_path / "a.jpg").write_bytes(_gif())
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "a.jpg")
    assert (
        caught.value.reason == "format GIF is not read (allowed: JPEG, PNG, WEBP, BMP, TIFF, PPM)"
    )
    (tmp_path / "notes.png").write_text("this is not an image\n")
    with pytest.raises(ImageError) as caught:
        load_image(tmp_path / "notes.png")
    assert caught.value.reason == "not an image"


@pytest.mark.parametrize("kind", ["warning", "error"])
def test_a_decompression_bomb_is_too_large_before_any_pixel_is_decoded(
    tmp_path: Path, bombs: dict[str, bytes], kind: str, monkeypatch
) -> None:
    _no_large_decode(monkeypatch)
    path = tmp_path / "bomb.png"
    path.write_bytes(bombs[kind])
    # the limit is Pillow's own: kept, and an error even where Pillow only warns
    assert Image.MAX_IMAGE_PIXELS is not None
    limit = Image.MAX_IMAGE_PIXELS * (2 if kind == "error" else 1)
    assert limit < (BOMB_WARNING_SIDE if kind == "warning" else BOMB_ERROR_SIDE) ** 2
    with pytest.raises(ImageError) as caught:
        open_image(io.BytesIO(bombs[kind]))
    assert caught.value.reason == "too large"
    assert caught.value.detail.startswith("Image size (") and "exceeds limit" in caught.value.detail
    with pytest.raises(ImageError, match="too large"):
        load_image(path)
    if kind == "error":  # Pillow's hard limit holds even where a caller lifts digi2real's
        with pytest.raises(ImageError, match="too large"):
            load_image(path, max_pixels=None)


# -- sources: error rows, the run goes on ------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory, sample_dataset, tiny_weights, bombs, keep_torch_threads) -> dict:
    base = tmp_path_factory.mktemp("hostile_images")
    src, out = base / "src", base / "out"
    shutil.copytree(sample_dataset / "0", src / "hostile")
    shutil.copytree(sample_dataset / "1", src / "good")
    (src / "hostile" / "4.png").write_bytes(EPS)
    (src / "hostile" / "5.png").write_bytes(bombs["warning"])
    (src / "hostile" / "6.png").write_bytes(bombs["error"])
    (src / "hostile" / "7.jpg").write_bytes(_gif())
    argv = [
        "convert", str(src), str(out), "--weights", str(tiny_weights.root),
        "--preset", "tiny", "--steps", "1", "--outputs-per-identity", "1", "-q",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        calls = _Calls().watch(patch, subprocesses=False)
        code = main(argv)
    return {"code": code, "out": out, "calls": list(calls)}


def test_hostile_sources_are_error_rows_and_the_rest_is_converted(converted) -> None:
    assert converted["code"] == 0
    assert converted["calls"] == []
    out = converted["out"]
    errors = {row["path"]: row for row in pq.read_table(out / "errors.parquet").to_pylist()}
    assert {path: row["reason"] for path, row in errors.items()} == {
        "hostile/4.png": REFUSED_EPS,
        "hostile/5.png": errors["hostile/5.png"]["reason"],
        "hostile/6.png": errors["hostile/6.png"]["reason"],
        "hostile/7.jpg": "format GIF is not read (allowed: JPEG, PNG, WEBP, BMP, TIFF, PPM)",
    }
    for name in ("5.png", "6.png"):
        row = errors[f"hostile/{name}"]
        assert row["reason"].startswith("too large: Image size (") and row["stage"] == "read"
        assert row["identity"] == "hostile"
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {row["identity"] for row in manifest} == {"hostile", "good"}
    used = {path for row in manifest for path in row["source_paths"]}
    assert used and used <= {f"{who}/{n}.png" for who in ("hostile", "good") for n in range(4)}


# -- .bin verification pairs: one line naming the file and the item -----------------------------


def _pairs() -> list[bytes]:
    return [_png(np.full((112, 112, 3), 30 * n, np.uint8)) for n in range(4)]


@pytest.fixture(scope="module")
def bins(tmp_path_factory, bombs) -> Path:
    folder = tmp_path_factory.mktemp("bins")
    eps, bomb = _pairs(), _pairs()
    eps[1] = EPS
    bomb[2] = bombs["warning"]
    for name, images in (("lfw", eps), ("cfp_fp", bomb), ("agedb_30", _pairs())):
        (folder / f"{name}.bin").write_bytes(pickle.dumps((images, [True, False]), protocol=4))
    return folder


def test_bin_images_are_read_with_the_allow_list(bins: Path, calls: _Calls) -> None:
    from digi2real.evaluate.verify import decode_images, load_bin

    images, _ = load_bin(bins / "lfw.bin")
    with pytest.raises(ValueError) as caught:
        decode_images(images, str(bins / "lfw.bin"))
    message = str(caught.value)
    assert message == f"{bins / 'lfw.bin'}: image 1 does not decode: {REFUSED_EPS}"
    assert calls == []


def test_a_bomb_in_a_bin_is_refused_from_its_header(bins: Path, monkeypatch) -> None:
    from digi2real.evaluate.verify import decode_images, load_bin

    _no_large_decode(monkeypatch)
    images, _ = load_bin(bins / "cfp_fp.bin")
    with pytest.raises(ValueError, match=r"cfp_fp\.bin: image 2 does not decode: too large \("):
        decode_images(images, str(bins / "cfp_fp.bin"))
    images, _ = load_bin(bins / "agedb_30.bin")
    assert decode_images(images).shape == (4, 112, 112, 3)


def test_a_hostile_bin_through_the_cli_is_one_line(bins: Path, tmp_path: Path, capsys) -> None:
    from test_evaluate_verify import linear_onnx

    model = linear_onnx(tmp_path / "m.onnx", np.ones((3 * 112 * 112, 4)))
    for name, expected in (("lfw", f"image 1 does not decode: {REFUSED_EPS}"),
                           ("cfp_fp", "image 2 does not decode: too large (Image size")):  # fmt: skip
        argv = ["evaluate", "verify", str(model), "--bins", str(bins), "--names", name]
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "Traceback" not in error, error
        assert f"{name}.bin: {expected}" in error


# -- training images and the report's pictures ---------------------------------------------------


def test_training_images_are_read_with_the_allow_list(
    tmp_path: Path, bombs: dict[str, bytes], calls: _Calls
) -> None:
    from digi2real.evaluate.data import ImageFolderFaces

    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "0000.jpg").write_bytes(EPS)
    (tmp_path / "images" / "a" / "0001.jpg").write_bytes(bombs["warning"])
    (tmp_path / "labels.csv").write_text("label,identity\n0,a\n", encoding="utf-8")
    faces = ImageFolderFaces(tmp_path, flip=False)
    with pytest.raises(ValueError, match=re.escape(f"0000.jpg: {REFUSED_EPS}")):
        faces[0]
    with pytest.raises(ValueError, match="0001.jpg: too large"):
        faces[1]
    assert calls == []


def test_a_hostile_rec_record_is_refused_by_name(tmp_path: Path, calls: _Calls) -> None:
    """A ``.rec`` handed to ``evaluate train`` (a public training set) is untrusted too."""
    from digi2real.data.writers.recordio import IRHeader, RecordIODataset, frame, pack

    rec = tmp_path / "rec"
    rec.mkdir()
    # record 0: insightface's header (images are ids 1..1, one class); record 1: an EPS "image"
    records = [pack(IRHeader(2, np.array([2.0, 3.0]), 0, 0)), pack(IRHeader(0, 0.0, 1, 0), EPS)]
    blob, index = b"", ""
    for number, record in enumerate(records):
        index += f"{number}\t{len(blob)}\n"
        blob += frame(record)
    (rec / "train.rec").write_bytes(blob)
    (rec / "train.idx").write_text(index, encoding="ascii")
    dataset = RecordIODataset(rec)
    assert len(dataset) == 1
    with pytest.raises(ImageError, match=re.escape(f"record 0: {REFUSED_EPS}")):
        dataset[0]
    assert calls == []


def test_contact_sheet_tiles_never_reach_the_eps_plugin(tmp_path: Path, calls: _Calls) -> None:
    from digi2real.analysis.report.attributes import _open_rgb
    from digi2real.analysis.report.pictures import _tile

    path = tmp_path / "0.png"
    path.write_bytes(EPS)
    tile = _tile(path, "unreadable")
    assert tile.size == (112, 112) and tile.getpixel((0, 0)) == (200, 200, 200)  # placeholder
    assert _open_rgb(path) is None
    assert calls == []
