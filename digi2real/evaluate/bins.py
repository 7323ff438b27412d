"""Reading insightface verification ``.bin`` files without running anything they contain.

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``2 * len(issame_list)`` images, pair ``i``
being images ``2i`` and ``2i + 1``. insightface's tools write it in several shapes, all read
here:

- ``bins``: a list of encoded images, as ``bytes`` (Python 3; ``fin.read()`` in insightface's
  ``lfw2pack.py``), ``str`` (Python 2, read with ``encoding="bytes"``), ``bytearray``, or uint8
  numpy arrays of the encoded bytes: 1-D (``np.frombuffer`` of the file, as in arcface_paddle's
  ``small_lfw.bin``) or a single column ``(N, 1)``, which is what ``cv2.imencode`` returns
  and how insightface's ``cfp2pack.py``, ``agedb2pack2.py`` and the RetinaFace-aligned packers
  store them (``_, s = cv2.imencode('.jpg', img); bins.append(s)``); a single row ``(1, N)``
  too. arcface_paddle's reader (``BytesIO(item)``) and arcface_torch's
  (``mx.image.imdecode(item)``) read every one of these as the encoded file. Also accepted:
  decoded ``(H, W, 3)`` uint8 arrays, taken as RGB (the order PIL and ``mx.image.imdecode``
  decode to).
- ``issame_list``: a list of bools (Python or numpy) or a 1-D numpy bool array.
- Any pickle protocol, Python 2 or 3, numpy 1.x (``numpy.core``) or 2.x (``numpy._core``).

Pickles execute code when loaded, so :class:`_BinUnpickler` resolves a global only if it is
in :data:`ALLOWED_GLOBALS`, and then to a checking stand-in, never to the named object: the
numpy array rebuilders accept only uint8 and bool dtypes, ``_codecs.encode`` (Python 3 bytes
under protocol <= 2) only latin-1 text, ``bytearray`` only bytes (or Python 2's latin-1
text). Every other global (``os.system``, ``builtins.eval``, any class, an mxnet ``NDArray``)
is refused before it is called. After loading, every item is
checked for type, dtype and shape.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.data.images import ImageError, open_image

IMAGE_SIZE = 112

BinImage = bytes | np.ndarray
"""Encoded image bytes, or a decoded (H, W, 3) uint8 RGB array."""

# numpy's pickles name these dtypes by their ``dtype.str`` without byte order; nothing else
# is allowed, so object arrays (the route to arbitrary objects) cannot even be described.
_DTYPES = {"u1": np.dtype(np.uint8), "b1": np.dtype(np.bool_)}


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(
        f"refusing {what}; a .bin may hold only bytes, bools, lists and uint8/bool numpy arrays"
    )


class _ArrayMarker:
    """Stands in for ``numpy.ndarray``: only ``_reconstruct`` accepts it; it is not callable."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _ArrayMarker()


class _Dtype:
    """Stands in for ``numpy.dtype(name, align, copy)`` plus the state the pickle then sets.

    numpy's own ``dtype.__setstate__`` could turn the dtype into a structured or subarray
    one; this accepts only the state numpy writes for a plain uint8 / bool dtype.
    """

    def __init__(self, name: Any, align: Any = False, copy: Any = False) -> None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        if not isinstance(text, str) or text not in _DTYPES:
            raise _refuse(f"numpy dtype {text!r}")
        self.dtype = _DTYPES[text]

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, subarray, names, fields, elsize, alignment, flags)
        if (
            not isinstance(state, tuple)
            or len(state) < 5
            or state[1] not in ("|", b"|")
            or state[2:5] != (None, None, None)
        ):
            raise _refuse(f"numpy dtype state {state!r}")


def _plain_dtype(value: Any) -> np.dtype:
    if isinstance(value, _Dtype):
        return value.dtype
    raise _refuse(f"numpy dtype {value!r}")


class _Array:
    """Stands in for numpy's ``_reconstruct(ndarray, (0,), b'b')`` and the BUILD that fills it.

    The array is made here with ``np.frombuffer``; numpy's ``ndarray.__setstate__`` never
    sees the file's data. :func:`load_bin` swaps each stand-in for its ``array``.
    """

    def __init__(self, subtype: Any, shape: Any, typecode: Any) -> None:
        if subtype is not _NDARRAY or tuple(shape) != (0,) or typecode not in (b"b", "b"):
            raise _refuse(f"numpy _reconstruct{(subtype, shape, typecode)!r}")
        self.array: np.ndarray | None = None

    @classmethod
    def filled(cls, array: np.ndarray) -> _Array:
        made = cls(_NDARRAY, (0,), b"b")
        made.array = array
        return made

    def __setstate__(self, state: Any) -> None:
        if self.array is not None:
            raise _refuse("a second state for a numpy array")
        # (version, shape, dtype, is_fortran, raw data); very old numpy omitted the version
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise _refuse(f"numpy array state of type {type(state).__name__}")
        shape, dtype, fortran, raw = state
        self.array = _from_bytes(raw, _plain_dtype(dtype), shape, "F" if fortran else "C")


def _from_bytes(raw: Any, dtype: np.dtype, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(raw, bytes | bytearray) or order not in ("C", "F"):
        raise _refuse(f"numpy array data of type {type(raw).__name__}, order {order!r}")
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise _refuse(f"numpy array shape {shape!r}")
    # reshape raises when the data does not fill the shape exactly
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order=order)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _Array:
    """numpy's protocol-5 rebuild ``frombuffer(buffer, dtype).reshape(shape, order)``."""
    return _Array.filled(_from_bytes(buffer, _plain_dtype(dtype), shape, order))


def _scalar(dtype: Any, data: Any) -> bool:
    """numpy's ``scalar(dtype, raw bytes)``, for the ``np.bool_`` items of an issame list.

    Returned as a Python bool, which a later BUILD cannot alter (it has no state to set).
    """
    plain = _plain_dtype(dtype)
    if plain != np.bool_ or not isinstance(data, bytes) or len(data) != 1:
        raise _refuse(f"numpy scalar of {plain} from {data!r}")
    return bool(data[0])


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode(text, 'latin1')``: how Python 3 pickles bytes under protocol <= 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _refuse(f"_codecs.encode of {type(text).__name__} to {encoding!r}")
    return text.encode("latin-1")


def _bytearray(data: Any = b"", encoding: Any = None) -> bytes:
    """``bytearray(data)`` as pickled below protocol 5 (protocol 5 has its own opcode);
    Python 2 pickled ``bytearray(u'text', 'latin-1')``. Returned as immutable bytes."""
    if isinstance(encoding, bytes):  # a Python 2 str, read with encoding="bytes"
        encoding = encoding.decode("ascii", "replace")
    if isinstance(data, bytes) and encoding is None:
        return data
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return data.encode("latin-1")
    raise _refuse(f"bytearray of {type(data).__name__} with encoding {encoding!r}")


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _Array,
    ("numpy._core.multiarray", "_reconstruct"): _Array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1,
    ("builtins", "bytearray"): _bytearray,
    ("__builtin__", "bytearray"): _bytearray,  # Python 2 (this unpickler sees raw names)
}
"""The only globals a ``.bin`` may name, each mapped to a checking stand-in."""


def _unwrap(item: Any, path: Path) -> Any:
    if isinstance(item, _Array):
        if item.array is None:
            raise ValueError(f"{path}: a numpy array without data")
        return item.array
    return item


class _BinUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            if module.split(".")[0] == "mxnet":
                raise _refuse(
                    f"mxnet {module}.{name} (write the images as bytes or numpy arrays, e.g. "
                    "NDArray.asnumpy(), and pickle again)"
                ) from None
            raise _refuse(f"to load global {module}.{name}") from None


def _check_images(images: Any, path: Path) -> list[BinImage]:
    if not isinstance(images, list | tuple):
        raise ValueError(f"{path}: images must be a list, got {type(images).__name__}")
    out: list[BinImage] = []
    for index, item in enumerate(_unwrap(item, path) for item in images):
        if isinstance(item, bytes | bytearray):
            out.append(bytes(item))
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8:
            if item.size and (item.ndim == 1 or (item.ndim == 2 and 1 in item.shape)):
                # the encoded file: np.frombuffer gives (N,), cv2.imencode (N, 1)
                out.append(item.tobytes())
            elif item.ndim == 3 and item.shape[2] == 3 and item.shape[0] and item.shape[1]:
                out.append(np.ascontiguousarray(item))
            else:
                raise ValueError(
                    f"{path}: image {index} is a uint8 array of shape {item.shape}; expected "
                    "encoded bytes ((N,), or (N, 1) as cv2.imencode returns) or a decoded "
                    "(H, W, 3) image"
                )
        else:
            kind = f"a {item.dtype} array" if isinstance(item, np.ndarray) else type(item).__name__
            raise ValueError(
                f"{path}: image {index} is {kind}; images must be encoded image bytes or "
                "uint8 arrays"
            )
    return out


def _check_issame(issame: Any, path: Path) -> list[bool]:
    issame = _unwrap(issame, path)
    if isinstance(issame, np.ndarray):
        if issame.dtype != np.bool_ or issame.ndim != 1:
            raise ValueError(
                f"{path}: issame must be bools; got a {issame.dtype} array of shape {issame.shape}"
            )
        return [bool(x) for x in issame]
    if not isinstance(issame, list | tuple):
        raise ValueError(f"{path}: issame must be a list of bools, got {type(issame).__name__}")
    for index, item in enumerate(issame):
        if type(item) is not bool and type(item) is not np.bool_:
            raise ValueError(f"{path}: issame must be bools; item {index} is {type(item).__name__}")
    return [bool(x) for x in issame]


def load_bin(path: str | Path) -> tuple[list[BinImage], list[bool]]:
    """Read and check a verification ``.bin`` without executing anything it contains.

    Returns the images (encoded bytes, or decoded (H, W, 3) uint8 RGB arrays) and the
    pair labels; any other content is a ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set not found: {path}")
    try:
        with open(path, "rb") as handle:
            # encoding="bytes": Python 2 str (the published files' images) stays bytes
            data = _BinUnpickler(handle, encoding="bytes").load()
    except Exception as error:  # a malformed pickle raises many types; all mean "not a .bin"
        raise ValueError(f"{path}: not a plain (images, issame) pickle: {error}") from error
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise ValueError(f"{path}: expected a pair (images, issame), got {type(data).__name__}")
    images, issame = _check_images(data[0], path), _check_issame(data[1], path)
    if not issame or len(images) != 2 * len(issame):
        raise ValueError(
            f"{path}: expected 2 images per pair, got {len(images)} images for {len(issame)} pairs"
        )
    return images, issame


def decode_images(images: Sequence[BinImage], source: str = "images") -> np.ndarray:
    """Encoded images or decoded RGB arrays -> uint8 RGB (N, 112, 112, 3).

    Encoded images are read as untrusted (``digi2real.data.images.open_image``): only JPEG,
    PNG, WebP, BMP, TIFF and PPM/PGM, Pillow's decompression-bomb warning an error, and the size
    checked from the header before any pixel is decoded."""
    out = np.empty((len(images), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for index, item in enumerate(images):
        if isinstance(item, np.ndarray):
            pixels = item
        else:
            try:
                with open_image(io.BytesIO(item)) as image:
                    # the header's size first: another size is refused below, undecoded
                    pixels = (
                        np.asarray(image.convert("RGB"))
                        if image.size == (IMAGE_SIZE, IMAGE_SIZE)
                        else np.empty((image.height, image.width, 0), np.uint8)
                    )
            except ImageError as error:  # no traceback to chain: the reason says it all
                raise ValueError(f"{source}: image {index} does not decode: {error}") from None
            except Exception as error:
                raise ValueError(f"{source}: image {index} does not decode: {error}") from error
        if pixels.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{source}: image {index} is {pixels.shape[:2]}, expected 112x112")
        out[index] = pixels
    return out
