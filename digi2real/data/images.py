"""Robust image decoding to HxWx3 uint8 RGB, and JPEG encoding that marks images as synthetic.

Decoding policy (``load_image``):

- Only the formats a face dataset uses are decoded (``ALLOWED_FORMATS``: JPEG, PNG, WebP,
  BMP, TIFF, PPM/PGM, where this Pillow has them), here and wherever an image digi2real did not write
  is opened (``open_image``: source renders, ``.bin`` pairs, galleries, training data).
  Anything else is refused before its plugin reads more than the first 16 bytes: not EPS/PS
  (Pillow runs Ghostscript on those), nor any other format; a file another Pillow plugin
  would take is ``ImageError("format EPS is not read (allowed: ...)")``.
- EXIF orientation is applied, so arrays are upright as a viewer shows them.
- Alpha (RGBA, LA, PA, P with transparency) is composited on **black**: the colour stored
  under transparent pixels is arbitrary, and black is what ArcFace alignment pads with
  (``norm_crop`` fills with 0), so a cut-out face looks the same whether it came aligned
  or was aligned here.
- 16-bit integer images (``I;16*``, and ``I`` holding values in [0, 65535]) are scaled
  by 255/65535 with rounding, never clipped. Float ``F`` in [0, 1] is multiplied by 255,
  ``F`` in [0, 255] is rounded as is; ``I`` outside [0, 65535] and ``F`` outside [0, 255]
  are stretched min-max to [0, 255]. NaN and infinities become 0.
- CMYK and other colour modes go through Pillow's own conversion; there is no ICC colour
  management (embedded profiles are ignored).
- Multi-frame files (TIFF, animated WebP or PNG) give their first frame.
- A pixel limit (``max_pixels``, default 64 MP) is checked from the header before any pixel
  is decoded. Pillow's decompression-bomb warning (above ``Image.MAX_IMAGE_PIXELS``) and error
  (above twice that) become ``ImageError("too large")`` (``open_image``);
  ``Image.MAX_IMAGE_PIXELS`` and ``ImageFile.LOAD_TRUNCATED_IMAGES`` are never changed.

Every failure is an ``ImageError`` (a ``ValueError``) with a short ``reason`` a caller can
group by (it starts with one of ``REASONS``) and the ``path``.

Synthetic-image note (``encode_jpeg`` / ``read_image_note``): written three ways, because
tools keep different segments when they copy or re-save a JPEG:

- a JPEG COM segment with the note text (``exiftool -Comment``, ``rdjpgcom``); this is what
  ``read_image_note`` returns first;
- EXIF ``ImageDescription`` (the note) and ``Software`` (``digi2real <version>``);
- a compact XMP packet with IPTC ``DigitalSourceType`` =
  ``trainedAlgorithmicMedia``, the vocabulary platforms read to label AI-generated images.

No timestamp or host information is written, so equal pixels give equal bytes.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

REASONS = (
    "not found",
    "unreadable",
    "empty file",
    "not an image",
    "truncated",
    "corrupt",
    "too large",
    "unsupported mode",  # "unsupported mode CMYK;16"
    "format",  # "format EPS is not read (allowed: JPEG, PNG, WEBP, BMP, TIFF, PPM)"
)

# The only formats an image digi2real did not write is decoded from (``open_image``), in
# the order they are tried; filtered by what this Pillow build has.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "PPM")

# Signatures of formats we read: a file starting with one that Pillow cannot identify is
# a damaged image, not some other kind of file.
_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)

IPTC_SYNTHETIC = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"

_EXIF_IMAGE_DESCRIPTION = 0x010E
_EXIF_SOFTWARE = 0x0131
_EXIF_ORIENTATION = 0x0112

_formats_cache: tuple[str, ...] | None = None
_WARNINGS_LOCK = threading.Lock()


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is short and stable, ``detail`` is free text."""

    def __init__(self, reason: str, path: str | Path | None, detail: str = "") -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.detail = detail
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{reason}" + (f" ({detail})" if detail else ""))


def _available_formats() -> tuple[str, ...]:
    global _formats_cache
    if _formats_cache is None:
        Image.init()
        _formats_cache = tuple(name for name in ALLOWED_FORMATS if name in Image.OPEN)
    return _formats_cache


def _has_image_signature(head: bytes) -> bool:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(signature) for signature in _SIGNATURES)


def _other_format(head: bytes) -> str | None:
    """The format, not allowed, that another Pillow plugin would take ``head`` (a file's first
    16 bytes) for. Only the plugins' prefix checks run, never a plugin's reader."""
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if name in ALLOWED_FORMATS or accept is None:
            continue
        try:
            if accept(head):
                return name
        except Exception:  # noqa: BLE001 - a prefix check choking on short input: not that format
            continue
    return None


def _head(source: str | Path | IO[bytes]) -> bytes:
    try:
        if isinstance(source, str | Path):
            with open(source, "rb") as handle:
                return handle.read(16)
        source.seek(0)
        return source.read(16)
    except (OSError, ValueError):
        return b""


def open_image(
    source: str | Path | IO[bytes],
    *,
    path: str | Path | None = None,
    bomb_warning: bool = True,
) -> Image.Image:
    """``Image.open`` for an image digi2real did not write: only ``ALLOWED_FORMATS``, and
    Pillow's decompression-bomb warning an error (``bomb_warning=False`` leaves only its
    error, at twice ``Image.MAX_IMAGE_PIXELS``, for a caller that checks a larger limit
    itself). Reads the header only: the caller loads the pixels, checking the size first.

    Any failure is an ``ImageError`` naming ``path`` (default: ``source`` when it is a path):
    "not found", "unreadable", "too large", "format X is not read (allowed: ...)", "corrupt"
    (an allowed format's signature, damaged) or "not an image".
    """
    if path is None and isinstance(source, str | Path):
        path = source
    if not isinstance(source, str | Path):
        try:
            source.seek(0)
        except (AttributeError, OSError, io.UnsupportedOperation):
            source = io.BytesIO(source.read())  # a stream: read whole, so its head can be seen
    # catch_warnings swaps the process-wide filter list; the lock keeps our own threads from
    # restoring each other's filters. Only the header parse runs under it, not the decode.
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error" if bomb_warning else "ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(source, formats=_available_formats())
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError("too large", path, str(exc).split(",")[0]) from None
        except UnidentifiedImageError:
            pass
        except FileNotFoundError:
            raise ImageError("not found", path) from None
        except PermissionError as exc:
            raise ImageError("unreadable", path, type(exc).__name__) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError("corrupt", path, f"{type(exc).__name__}: {exc}") from None
    head = _head(source)
    if _has_image_signature(head):
        raise ImageError("corrupt", path)
    other = _other_format(head)
    if other is not None:
        allowed = ", ".join(ALLOWED_FORMATS)
        raise ImageError(f"format {other} is not read (allowed: {allowed})", path)
    raise ImageError("not an image", path)


def load_image(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` to an upright HxWx3 uint8 RGB array, or raise ``ImageError``.

    ``max_pixels`` (width x height) guards against decompression bombs; ``None`` leaves only
    Pillow's own limit (``Image.MAX_IMAGE_PIXELS`` x 2, which raises).
    """
    path = Path(path)
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError("not found", path) from None
    except OSError as exc:
        raise ImageError("unreadable", path, type(exc).__name__) from None
    if size == 0:
        raise ImageError("empty file", path)

    # Above Pillow's soft limit our own check decides (the caller may allow more).
    soft_limit = Image.MAX_IMAGE_PIXELS or 0
    bomb_warning = max_pixels is not None and max_pixels <= soft_limit
    image = open_image(path, bomb_warning=bomb_warning)

    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError("too large", path, f"{width}x{height} > {max_pixels} pixels")
        if width < 1 or height < 1:
            raise ImageError("corrupt", path, f"size {width}x{height}")
        try:
            image.load()
        except (OSError, SyntaxError, EOFError, ValueError) as exc:
            message = str(exc)
            truncated = isinstance(exc, EOFError) or "truncated" in message.lower()
            reason = "truncated" if truncated else "corrupt"
            raise ImageError(reason, path, f"{type(exc).__name__}: {message}") from None
        image = _apply_exif_orientation(image, path)
        return _to_rgb(image, path)


def _apply_exif_orientation(image: Image.Image, path: Path) -> Image.Image:
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not cost the pixels
        logger.debug("%s: unreadable EXIF ignored (%s)", path, exc)
        return image
    if orientation in (None, 1):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - same: keep the image, lose the rotation
        logger.warning("%s: EXIF orientation %r not applied (%s)", path, orientation, exc)
        return image


def _composite_on_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    weighted = rgb.astype(np.uint32) * alpha.astype(np.uint32)[..., None]
    return ((weighted + 127) // 255).astype(np.uint8)


def _scale_to_uint8(values: np.ndarray, *, sixteen_bit: bool) -> np.ndarray:
    if sixteen_bit:
        # round(v * 255 / 65535): 0 -> 0, 65535 -> 255, monotone, no clipping.
        return ((values.astype(np.uint64) * 255 + 32767) // 65535).astype(np.uint8)
    values = values.astype(np.float64)
    values[~np.isfinite(values)] = 0.0
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode.startswith("I;16"):
        gray = _scale_to_uint8(np.asarray(image), sixteen_bit=True)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "I":
        values = np.asarray(image)
        in_16_bit_range = values.size and values.min() >= 0 and values.max() <= 65535
        gray = _scale_to_uint8(values, sixteen_bit=bool(in_16_bit_range))
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        gray = _scale_to_uint8(np.asarray(image), sixteen_bit=False)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P":
        palette_mode = image.palette.mode if image.palette is not None else "RGB"
        has_alpha = image.info.get("transparency") is not None or palette_mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        return _composite_on_black(rgba[..., :3], rgba[..., 3])
    if mode in ("RGBa", "La"):
        # Already premultiplied: the colour channels are the composite on black.
        channels = np.asarray(image, dtype=np.uint8)
        return channels[..., :3].copy() if mode == "RGBa" else np.repeat(channels[..., :1], 3, 2)
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    try:
        converted = image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"unsupported mode {mode}", path, str(exc)) from None
    return np.asarray(converted, dtype=np.uint8).copy()


def default_note() -> str:
    from digi2real.version import __version__

    return (
        f"Synthetic image generated by digi2real {__version__} (Arc2Face); "
        "not a photograph of a real person."
    )


def _xmp_packet(note: str) -> bytes:
    from xml.sax.saxutils import escape

    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about=""'
        ' xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
        ' xmlns:dc="http://purl.org/dc/elements/1.1/"'
        f' Iptc4xmpExt:DigitalSourceType="{IPTC_SYNTHETIC}">'
        '<dc:description><rdf:Alt><rdf:li xml:lang="x-default">'
        f"{escape(note)}"
        "</rdf:li></rdf:Alt></dc:description>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()


def encode_jpeg(
    rgb: np.ndarray,
    *,
    quality: int = 95,
    note: str | None = None,
    subsampling: str = "4:2:0",
    xmp: bool = True,
) -> bytes:
    """Encode an HxWx3 uint8 RGB array as a JPEG that says it is synthetic.

    ``note`` defaults to ``default_note()`` (tool and version). The same array and arguments
    give the same bytes.
    """
    array = np.asarray(rgb)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"encode_jpeg expects an HxWx3 uint8 RGB array, got shape {array.shape} "
            f"dtype {array.dtype}"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"encode_jpeg got an empty image of shape {array.shape}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality!r}")
    valid_subsampling = ("4:4:4", "4:2:2", "4:2:0")
    if subsampling not in valid_subsampling:
        raise ValueError(f"subsampling must be one of {valid_subsampling}, got {subsampling!r}")
    from digi2real.version import __version__

    text = default_note() if note is None else note
    image = Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    exif = Image.Exif()
    exif[_EXIF_IMAGE_DESCRIPTION] = text
    exif[_EXIF_SOFTWARE] = f"digi2real {__version__}"
    options: dict[str, object] = {
        "quality": int(quality),
        "subsampling": subsampling,
        "optimize": False,
        "progressive": False,
        "comment": text.encode("utf-8"),
        "exif": exif.tobytes(),
    }
    if xmp:
        options["xmp"] = _xmp_packet(text)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def read_image_note(source: bytes | str | Path) -> str | None:
    """The synthetic-image note of a JPEG (COM segment, else EXIF ImageDescription), or None."""
    path = None if isinstance(source, bytes | bytearray) else Path(source)
    with open_image(io.BytesIO(source) if path is None else path, path=path) as image:
        comment = image.info.get("comment")
        if isinstance(comment, bytes):
            comment = comment.decode("utf-8", errors="replace")
        if comment:
            return comment
        try:
            description = image.getexif().get(_EXIF_IMAGE_DESCRIPTION)
        except Exception:  # noqa: BLE001 - a broken EXIF block simply carries no note
            return None
        if isinstance(description, bytes):
            description = description.decode("utf-8", errors="replace")
        return description or None
