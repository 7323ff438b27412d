from __future__ import annotations

import builtins
import collections
import io
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digi2real.cli import main
from digi2real.evaluate.backbones import get_backbone
from digi2real.evaluate.bins import ALLOWED_GLOBALS, decode_images
from digi2real.evaluate.verify import (
    THRESHOLDS,
    OnnxEmbedder,
    evaluate_bin,
    fold_accuracies,
    load_backbone,
    load_bin,
    recognizer_spec,
    verify,
)
from digi2real.weights.face_config import RecognizerSpec

NUM_IDENTITIES = 20


def encode_identity(identity: int) -> bytes:
    """A flat grey image whose level encodes the identity (flip-invariant, lossless)."""
    pixels = np.full((112, 112, 3), 20 + 10 * identity, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def identity_embedder(images: np.ndarray) -> np.ndarray:
    """Decodes the grey level back to a one-hot identity vector."""
    identities = (images[:, 0, 0, 0].astype(int) - 20) // 10
    return np.eye(NUM_IDENTITIES)[identities]


def make_pairs(num_pairs: int, wrong: set[int], seed: int) -> tuple[list[bytes], list[bool]]:
    """Pairs of known identities; the labels of the pairs in ``wrong`` are inverted."""
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for pair in range(num_pairs):
        first = int(rng.integers(NUM_IDENTITIES))
        same = pair % 2 == 0
        second = first if same else int((first + rng.integers(1, NUM_IDENTITIES)) % NUM_IDENTITIES)
        images += [encode_identity(first), encode_identity(second)]
        issame.append(same != (pair in wrong))
    return images, issame


def write_bin(path: Path, payload: object, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    return path


def expected_folds(num_pairs: int, wrong: set[int], folds: int = 10) -> np.ndarray:
    # sklearn KFold(shuffle=False): the first num_pairs % folds folds hold one extra pair.
    sizes = [num_pairs // folds + (1 if f < num_pairs % folds else 0) for f in range(folds)]
    starts = np.cumsum([0, *sizes])
    return np.array(
        [
            1 - len([w for w in wrong if starts[f] <= w < starts[f + 1]]) / sizes[f]
            for f in range(folds)
        ]
    )


def test_identity_coded_bin_gives_the_expected_accuracy(tmp_path: Path) -> None:
    num_pairs = 305
    wrong = {3, 4, 40, 41, 42, 100, 200, 201, 250, 251, 252, 253, 304}
    path = write_bin(tmp_path / "lfw.bin", make_pairs(num_pairs, wrong, seed=1))
    result = evaluate_bin(path, identity_embedder)
    expected = expected_folds(num_pairs, wrong)
    np.testing.assert_allclose(result.fold_accuracies, expected, rtol=0, atol=1e-12)
    assert result.accuracy == pytest.approx(expected.mean(), abs=1e-12)
    assert result.std == pytest.approx(expected.std(), abs=1e-12)
    assert result.accuracy == pytest.approx(1 - len(wrong) / num_pairs, abs=0.01)
    # Same-identity pairs sit at distance 0, others at 2: the smallest separating threshold.
    assert result.thresholds == [pytest.approx(0.01)] * 10
    assert result.num_pairs == num_pairs and result.column == "LFW"


def _reference_accuracy(embeddings: np.ndarray, issame: np.ndarray, folds: int = 10) -> list:
    """insightface calculate_roc/calculate_accuracy, loop by loop, for comparison."""
    dist = np.sum((embeddings[0::2] - embeddings[1::2]) ** 2, axis=1)
    n = len(issame)
    bounds = np.linspace(0, n, folds + 1).astype(int) if n % folds == 0 else None
    assert bounds is not None
    out = []
    for fold in range(folds):
        test = np.arange(bounds[fold], bounds[fold + 1])
        train = np.setdiff1d(np.arange(n), test)

        def accuracy(threshold: float, index: np.ndarray) -> float:
            predict = dist[index] < threshold
            actual = issame[index]
            tp = np.sum(predict & actual)
            tn = np.sum(~predict & ~actual)
            return float(tp + tn) / index.size

        best = max(range(len(THRESHOLDS)), key=lambda t: (accuracy(THRESHOLDS[t], train), -t))
        out.append(accuracy(THRESHOLDS[best], test))
    return out


def test_fold_accuracies_match_the_insightface_loops() -> None:
    rng = np.random.default_rng(5)
    issame = rng.random(200) < 0.5
    base = rng.normal(size=(200, 16))
    noise = np.where(issame[:, None], 0.6, 1.6) * rng.normal(size=(200, 16))
    pairs = np.stack([base, base + noise], axis=1).reshape(400, 16)
    embeddings = pairs / np.linalg.norm(pairs, axis=1, keepdims=True)
    accuracies, _ = fold_accuracies(embeddings, issame)
    reference = _reference_accuracy(embeddings, issame)
    np.testing.assert_allclose(accuracies, reference, atol=1e-12)
    assert 0.6 < accuracies.mean() < 1.0  # informative, not trivially perfect


def test_flip_sum_is_used(tmp_path: Path) -> None:
    """An embedder that sees only the left half: the flip sum makes it see both halves."""
    images, issame = [], []
    rng = np.random.default_rng(0)
    for pair in range(40):
        left = rng.integers(0, 256, (112, 56, 3), dtype=np.uint8)
        right_a = rng.integers(0, 256, (112, 56, 3), dtype=np.uint8)
        right_b = right_a if pair % 2 == 0 else rng.integers(0, 256, (112, 56, 3), dtype=np.uint8)
        for right in (right_a, right_b):
            buffer = io.BytesIO()
            Image.fromarray(np.concatenate([left, right], axis=1)).save(buffer, format="PNG")
            images.append(buffer.getvalue())
        issame.append(pair % 2 == 0)
    path = write_bin(tmp_path / "halves.bin", (images, issame))

    def left_half(batch: np.ndarray) -> np.ndarray:
        return batch[:, :, :56].reshape(len(batch), -1).astype(np.float64)

    assert evaluate_bin(path, left_half).accuracy == 1.0


def test_report_table_order_and_files(tmp_path: Path) -> None:
    bins = tmp_path / "bins"
    bins.mkdir()
    wrongs = {"lfw": set(), "cfp_fp": {0}, "agedb_30": {1, 2}, "calfw": {5}, "cplfw": {7, 8, 9}}
    for seed, (name, wrong) in enumerate(wrongs.items()):
        write_bin(bins / f"{name}.bin", make_pairs(50, wrong, seed))
    out = tmp_path / "table.md"
    report = verify(
        identity_embedder,
        bins,
        ["cplfw", "lfw", "calfw", "agedb_30", "cfp_fp"],
        out,
        model_name="coded",
    )
    table = out.read_text(encoding="utf-8").splitlines()
    assert table[0] == "| Model | LFW | CFP-FP | AgeDB-30 | CALFW | CPLFW | Avg |"
    expected = {name: expected_folds(50, wrong).mean() for name, wrong in wrongs.items()}
    assert table[2].startswith("| coded | 100.00 ± 0.00 | ")
    average = np.mean(list(expected.values()))
    assert table[2].endswith(f"| {100 * average:.2f} |")
    data = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert data["columns"] == ["LFW", "CFP-FP", "AgeDB-30", "CALFW", "CPLFW", "Avg"]
    for row in data["results"]:
        assert row["accuracy"] == pytest.approx(expected[row["name"]], abs=1e-12)
    assert data["average"] == pytest.approx(report.average) == pytest.approx(average)
    with pytest.raises(FileNotFoundError, match="present"):
        verify(identity_embedder, bins, ["lfw", "ijbc"])


def test_trained_backbone_file_is_an_embedder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = get_backbone("small", embedding_size=32).eval()
    path = tmp_path / "backbone.safetensors"
    save_file(model.state_dict(), str(path), {"backbone": "small", "embedding_size": "32"})
    bins = tmp_path / "bins"
    bins.mkdir()
    write_bin(bins / "lfw.bin", make_pairs(20, set(), seed=3))
    report = verify(tmp_path, bins, ["lfw"])
    assert 0.0 <= report.results[0].accuracy <= 1.0
    loaded = load_backbone(tmp_path).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def linear_onnx(path: Path, weight: np.ndarray, size: int = 112) -> Path:
    """A recognizer ``flatten(NCHW input) @ weight``, the input side ``size``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["data"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["embedding"]),
        ],
        "linear",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnx_recognizer(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3 * 112 * 112, 8)).astype(np.float32)
    path = linear_onnx(tmp_path / "linear.onnx", weight)
    images = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    embedder = OnnxEmbedder(path, batch_size=2)
    blob = ((images.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).reshape(3, -1)
    np.testing.assert_allclose(embedder(images), blob @ weight, rtol=1e-4, atol=1e-2)


class _Call:
    """Pickles as a call of ``function(*args)``: what a hostile ``.bin`` would hold."""

    def __init__(self, function: object, *args: object) -> None:
        self.call = (function, args)

    def __reduce__(self) -> tuple:
        return self.call


def _sentinel_payloads(tmp: Path) -> dict[str, object]:
    pwned = tmp / "pwned"
    return {
        "os-system": ([b"a", _Call(os.system, f"touch {pwned}")], [True]),
        "eval": ([b"a", b"b"], [_Call(builtins.eval, f"open({str(pwned)!r}, 'w')")]),
        "mkdir": ([b"a", _Call(os.mkdir, str(pwned))], [True]),
        # a known global with a hostile argument: the stand-in refuses it too
        "codecs": ([_Call(__import__("_codecs").encode, str(pwned), "rot13"), b"b"], [True]),
        "class": (collections.OrderedDict, [True]),
        "builtin-function": (print, [True]),
        # issame as an object array: the objects would be built after the dtype is refused
        "object-array": ([b"a", b"b"], np.array([_Call(os.mkdir, str(pwned))], dtype=object)),
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("kind", list(_sentinel_payloads(Path("."))))
def test_pickles_with_globals_are_refused_unexecuted(
    tmp_path: Path, kind: str, protocol: int
) -> None:
    path = write_bin(tmp_path / "evil.bin", _sentinel_payloads(tmp_path)[kind], protocol)
    with pytest.raises(ValueError, match="evil.bin: not a plain .*refusing") as info:
        load_bin(path)
    assert "a .bin may hold only" in str(info.value)
    assert not (tmp_path / "pwned").exists()


class _Reduce:
    """Pickles as whatever ``__reduce__`` tuple it is given."""

    def __init__(self, *reduced: object) -> None:
        self.reduced = reduced

    def __reduce__(self) -> tuple:
        return self.reduced


_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]
_U1_STATE = (3, "|", None, None, None, -1, -1, 0)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (_Reduce(np.ndarray, ((10**12,), "u1")), "not callable"),
        (_Reduce(np.dtype, ("O", False, True)), "dtype 'O'"),
        (_Reduce(_RECONSTRUCT, (np.ndarray, (10**9,), b"b")), "_reconstruct"),
        (_Reduce(_RECONSTRUCT, (np.dtype, (0,), b"b")), "_reconstruct"),
        # a uint8 dtype whose state would make it a structured one
        (_Reduce(np.dtype, ("u1", False, True), (3, "|", None, ("a",), {}, 1, 1, 0)), "state"),
        # array data that does not fill its shape
        (
            _Reduce(
                _RECONSTRUCT,
                (np.ndarray, (0,), b"b"),
                (1, (112, 112, 3), _Reduce(np.dtype, ("u1", False, True), _U1_STATE), False, b"x"),
            ),
            "reshape",
        ),
        (
            _Reduce(
                _RECONSTRUCT,
                (np.ndarray, (0,), b"b"),
                (1, (1,), _Reduce(np.dtype, ("u1", False, True), _U1_STATE), False, [b"x"]),
            ),
            "numpy array data of type list",
        ),
    ],
)
def test_allowed_globals_with_hostile_arguments_are_refused(
    tmp_path: Path, item: object, message: str
) -> None:
    path = write_bin(tmp_path / "evil.bin", ([item, b"b"], [True]))
    with pytest.raises(ValueError, match=message):
        load_bin(path)


def test_hostile_bin_through_the_cli_runs_nothing(tmp_path: Path, capsys) -> None:
    model = linear_onnx(tmp_path / "m.onnx", np.ones((3 * 112 * 112, 4)))
    bins = tmp_path / "bins"
    bins.mkdir()
    write_bin(bins / "lfw.bin", _sentinel_payloads(tmp_path)["os-system"])
    assert main(["evaluate", "verify", str(model), "--bins", str(bins), "--names", "lfw"]) == 2
    error = capsys.readouterr().err
    assert "lfw.bin: not a plain (images, issame) pickle: refusing to load global" in error
    assert f"{os.system.__module__}.system" in error  # posix.system on Linux
    assert not (tmp_path / "pwned").exists()


def test_the_allow_list_is_exactly_numpy_array_rebuilding_and_bytes() -> None:
    assert set(ALLOWED_GLOBALS) == {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
        ("__builtin__", "bytearray"),
    }
    # each maps to a stand-in of this package, never to the numpy/codecs object it names
    assert all(
        getattr(value, "__module__", "").startswith("digi2real.")
        or type(value).__module__.startswith("digi2real.")
        for value in ALLOWED_GLOBALS.values()
    )


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (([np.zeros((112, 112, 3)), np.zeros((112, 112, 3))], [True]), "dtype 'f8'"),
        (([b"a", b"b"], np.array([None], dtype=object)), "dtype 'O8'"),
        (([b"a", b"b"], np.array([1])), "dtype 'i8'"),
        (([np.zeros((2, 3), np.float32), b"b"], [True]), "dtype 'f4'"),
        (([b"a", b"b"], [np.int64(1)]), "dtype 'i8'"),
        (([np.zeros((112, 112), np.uint8), b"b"], [True]), r"shape \(112, 112\)"),
        (([np.zeros((112, 112, 4), np.uint8), b"b"], [True]), r"shape \(112, 112, 4\)"),
        (([b"a", b"b"], np.array([[True]])), r"bool array of shape \(1, 1\)"),
        (([b"a", b"b"], [np.uint8(1)]), "numpy scalar of uint8"),
    ],
)
def test_arrays_of_other_dtypes_or_shapes_are_refused(
    tmp_path: Path, payload: object, message: str, protocol: int
) -> None:
    path = write_bin(tmp_path / "bad.bin", payload, protocol)
    with pytest.raises(ValueError, match=message) as info:
        load_bin(path)
    assert "bad.bin" in str(info.value)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"images": [], "issame": []}, "pair"),
        (([b"a", b"b", b"c"], [True]), "2 images per pair"),
        (([b"a", "b"], [True]), "bytes"),
        (([b"a", b"b"], [1]), "bools"),
        (([], []), "2 images per pair"),
        (([b"a", b"b"], [True], [False]), "pair"),
    ],
)
def test_malformed_structure_is_refused(tmp_path: Path, payload: object, message: str) -> None:
    path = write_bin(tmp_path / "bad.bin", payload)
    with pytest.raises(ValueError, match=message) as info:
        load_bin(path)
    assert "bad.bin" in str(info.value)


def test_python2_and_protocol2_pickles(tmp_path: Path) -> None:
    # Python 2's pickle.dump((bins, issame_list), f, protocol=2) with str images, spelled out:
    # PROTO 2, list of two SHORT_BINSTRINGs, list [True], TUPLE2, STOP.
    py2 = b"\x80\x02]q\x00(U\x03abcq\x01U\x03defq\x02e]q\x03\x88a\x86q\x04."
    (tmp_path / "py2.bin").write_bytes(py2)
    assert load_bin(tmp_path / "py2.bin") == ([b"abc", b"def"], [True])
    # Python 3 bytes under protocol 0-2 are pickled as _codecs.encode(text, "latin1")
    for protocol in (0, 1, 2, 3, 4, 5):
        path = write_bin(tmp_path / f"p{protocol}.bin", ([b"a", b"\xff"], [False]), protocol)
        assert load_bin(path) == ([b"a", b"\xff"], [False])


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2 + numpy 1.x wrote with protocol 2: every str/bytes as a Python 2
    ``str`` (BINSTRING, read back as bytes under ``encoding="bytes"``, no ``_codecs``), and
    numpy's functions under ``numpy.core``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = str(getattr(obj, "__module__", None)).replace("numpy._core", "numpy.core")
        name = name or obj.__qualname__  # type: ignore[attr-defined]
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


class _Numpy1Pickler(pickle._Pickler):
    """Writes what Python 3 + numpy 1.x wrote (protocol 4): numpy's functions under
    ``numpy.core``, as in insightface's ``small_lfw.bin``."""

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = str(getattr(obj, "__module__", None)).replace("numpy._core", "numpy.core")
        self.save(module)
        self.save(name or obj.__qualname__)  # type: ignore[attr-defined]
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def write_numpy1_bin(path: Path, payload: object) -> Path:
    buffer = io.BytesIO()
    _Numpy1Pickler(buffer, protocol=4).dump(payload)
    assert b"numpy.core" in buffer.getvalue() and b"numpy._core" not in buffer.getvalue()
    path.write_bytes(buffer.getvalue())
    return path


def write_py2_bin(path: Path, payload: object) -> Path:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(payload)
    data = buffer.getvalue()
    assert b"_codecs" not in data and b"numpy._core" not in data  # as Python 2 wrote them
    path.write_bytes(data)
    return path


def coded_images(identities: list[int]) -> list[np.ndarray]:
    """Decoded 112x112 RGB images that :func:`identity_embedder` maps back to identities."""
    return [
        np.asarray(Image.open(io.BytesIO(encode_identity(i))).convert("RGB")) for i in identities
    ]


def pair_identities(num_pairs: int, seed: int) -> tuple[list[int], list[bool]]:
    rng = np.random.default_rng(seed)
    identities, issame = [], []
    for pair in range(num_pairs):
        first = int(rng.integers(NUM_IDENTITIES))
        same = pair % 2 == 0
        second = first if same else int((first + rng.integers(1, NUM_IDENTITIES)) % NUM_IDENTITIES)
        identities += [first, second]
        issame.append(same)
    return identities, issame


def imencode_columns(identities: list[int]) -> list[np.ndarray]:
    """What insightface's ``cfp2pack.py`` / ``agedb2pack2.py`` append per image:
    ``_, s = cv2.imencode('.jpg', bgr)``. OpenCV 2-4 return a uint8 column (N, 1); this
    environment's OpenCV 5 returns (N,), so it is shaped as the tools' OpenCV gave it. A flat
    grey JPEG decodes exactly, so the images equal :func:`coded_images`."""
    import cv2

    columns = []
    for image in coded_images(identities):
        ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]))
        assert ok and encoded.dtype == np.uint8
        columns.append(encoded.reshape(-1, 1))
    return columns


def py2_bytearray_bin(path: Path, images: list[bytes], issame: list[bool]) -> Path:
    """Python 2's ``pickle.dump(([bytearray(data), ...], issame), f, 2)``: each item is
    ``__builtin__.bytearray(u'<data as latin-1>', 'latin-1')``, spelled out in opcodes."""
    out = bytearray(b"\x80\x02(]")
    for data in images:
        text = data.decode("latin-1").encode("utf-8")
        out += b"c__builtin__\nbytearray\nX" + struct.pack("<I", len(text)) + text
        out += b"U\x07latin-1\x86Ra"  # TUPLE2, REDUCE, APPEND
    out += b"]" + b"".join(b"\x88a" if same else b"\x89a" for same in issame) + b"t."
    path.write_bytes(bytes(out))
    return path


def bin_forms(num_pairs: int) -> dict[str, tuple[object, int | str]]:
    """(payload, pickle protocol or writer) for each shape insightface's tools write."""
    identities, issame = pair_identities(num_pairs, seed=7)
    encoded = [encode_identity(i) for i in identities]
    as_arrays = [np.frombuffer(data, dtype=np.uint8) for data in encoded]  # small_lfw.bin
    columns = imencode_columns(identities)
    decoded = coded_images(identities)
    flags = np.array(issame, dtype=bool)
    return {
        # cfp2pack.py / agedb2pack2.py: cv2.imencode columns, pickle.HIGHEST_PROTOCOL; on
        # Python 2 + numpy 1 (2), on Python 3 + numpy 1 (4), on Python 3.8+ + numpy 2 (5)
        "cv2-columns-py2": ((columns, issame), "py2"),
        "cv2-columns-numpy1-p4": ((columns, issame), "numpy1"),
        "cv2-columns-p5": ((columns, issame), 5),
        "cv2-columns-p2": ((columns, flags), 2),
        "cv2-rows-p4": (([c.reshape(1, -1) for c in columns], issame), 4),
        # bins.append(bytearray(fin.read())): Python 3 protocols 2-4 name builtins.bytearray,
        # protocol 5 has an opcode for it; Python 2 names __builtin__.bytearray
        "bytearray-p2": (([bytearray(e) for e in encoded], issame), 2),
        "bytearray-p4": (([bytearray(e) for e in encoded], issame), 4),
        "bytearray-p5": (([bytearray(e) for e in encoded], issame), 5),
        "py2-bytearray": ((encoded, issame), "py2-bytearray"),
        "bytes-list-p4": ((encoded, issame), 4),
        "encoded-arrays-p4": ((as_arrays, issame), 4),
        "encoded-arrays-numpy-bools-p2": ((as_arrays, [np.bool_(x) for x in issame]), 2),
        "decoded-arrays-bool-array-p4": ((decoded, flags), 4),
        "decoded-arrays-bool-array-p5": ((decoded, flags), 5),
        "decoded-arrays-bool-array-p2": ((decoded, flags), 2),
        "fortran-arrays-p4": (([np.asfortranarray(d) for d in decoded], issame), 4),
        "numpy1-encoded-arrays": ((as_arrays, issame), "numpy1"),
        "numpy1-decoded-arrays-bool-array": ((decoded, flags), "numpy1"),
        "py2-str-images": ((encoded, issame), "py2"),
        "py2-encoded-arrays": ((as_arrays, flags), "py2"),
        "py2-decoded-arrays": ((decoded, [np.bool_(x) for x in issame]), "py2"),
    }


@pytest.mark.parametrize("form", list(bin_forms(1)))
def test_every_bin_form_loads_to_the_same_images(tmp_path: Path, form: str) -> None:
    payload, protocol = bin_forms(30)[form]
    path = tmp_path / "lfw.bin"
    if protocol == "py2":
        write_py2_bin(path, payload)
    elif protocol == "py2-bytearray":
        py2_bytearray_bin(path, *payload)  # type: ignore[misc]
    elif protocol == "numpy1":
        write_numpy1_bin(path, payload)
    else:
        write_bin(path, payload, int(protocol))
    result = evaluate_bin(path, identity_embedder)
    assert result.num_pairs == 30 and result.accuracy == 1.0
    identities, issame = pair_identities(30, seed=7)
    images, labels = load_bin(path)
    assert labels == issame and all(type(x) is bool for x in labels)
    np.testing.assert_array_equal(decode_images(images), np.stack(coded_images(identities)))


def test_cli_reads_a_cv2_imencode_bin_like_the_same_pairs_as_bytes(tmp_path: Path) -> None:
    """A .bin of cv2.imencode columns (N, 1) scores exactly as the same JPEGs stored as bytes."""
    import cv2

    rng = np.random.default_rng(3)
    faces = rng.integers(0, 256, (NUM_IDENTITIES, 112, 112, 3), dtype=np.uint8)
    identities, issame = pair_identities(60, seed=4)
    columns = []
    for identity in identities:
        noisy = faces[identity] + rng.normal(0, 40, (112, 112, 3))
        image = np.clip(noisy, 0, 255).astype(np.uint8)
        ok, encoded = cv2.imencode(".jpg", image)
        assert ok
        columns.append(encoded.reshape(-1, 1))  # OpenCV 2-4's shape (see imencode_columns)
    bins = tmp_path / "bins"
    bins.mkdir()
    write_bin(bins / "lfw.bin", (columns, issame), pickle.HIGHEST_PROTOCOL)
    write_bin(bins / "cfp_fp.bin", ([c.tobytes() for c in columns], issame), 4)
    model = linear_onnx(tmp_path / "rec.onnx", rng.normal(size=(3 * 112 * 112, 16)))
    out = tmp_path / "table.md"
    argv = ["evaluate", "verify", str(model), "--bins", str(bins), "--out", str(out)]
    assert main([*argv, "--names", "lfw,cfp_fp"]) == 0
    results = {
        row["name"]: row for row in json.loads(out.with_suffix(".json").read_text())["results"]
    }
    assert results["lfw"]["num_pairs"] == results["cfp_fp"]["num_pairs"] == 60
    assert results["lfw"]["accuracy"] == results["cfp_fp"]["accuracy"] > 0.6
    assert results["lfw"]["fold_accuracies"] == results["cfp_fp"]["fold_accuracies"]


def test_mxnet_ndarrays_are_refused_with_the_way_out(tmp_path: Path) -> None:
    # what pickling mxnet NDArray images names first: refused before anything is built
    path = tmp_path / "nd.bin"
    path.write_bytes(b"\x80\x02(]cmxnet.ndarray.ndarray\nNDArray\n)Ra]\x88at.")
    with pytest.raises(ValueError, match=r"mxnet .*asnumpy"):
        load_bin(path)


def test_cli_reads_numpy_array_and_python2_bins(tmp_path: Path, capsys) -> None:
    """The .bin shapes that used to be refused, through ``digi2real evaluate verify``."""
    rng = np.random.default_rng(1)
    model = linear_onnx(tmp_path / "rec.onnx", rng.normal(size=(3 * 112 * 112, 16)))
    bins = tmp_path / "bins"
    bins.mkdir()
    forms = bin_forms(40)
    write_bin(bins / "lfw.bin", forms["decoded-arrays-bool-array-p4"][0])  # numpy arrays
    write_numpy1_bin(bins / "cfp_fp.bin", forms["numpy1-encoded-arrays"][0])  # as small_lfw.bin
    write_py2_bin(bins / "agedb_30.bin", bin_forms(30)["py2-str-images"][0])  # Python 2
    out = tmp_path / "table.md"
    argv = ["evaluate", "verify", str(model), "--bins", str(bins), "--out", str(out)]
    assert main([*argv, "--names", "lfw,cfp_fp,agedb_30"]) == 0
    report = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    pairs = {row["name"]: row["num_pairs"] for row in report["results"]}
    assert pairs == {"lfw": 40, "cfp_fp": 40, "agedb_30": 30}
    # same images, same model: the array and the bytes forms give the same accuracy
    accuracy = {row["name"]: row["accuracy"] for row in report["results"]}
    assert accuracy["lfw"] == accuracy["cfp_fp"]
    printed = capsys.readouterr().out
    assert printed.startswith("| Model | LFW | CFP-FP | AgeDB-30 | Avg |")
    assert "Preprocessing: RGB 112x112, mean 127.5,127.5,127.5, std 127.5,127.5,127.5" in printed
    assert report["preprocessing"]["source"] == "default (ArcFace)"


def test_onnx_preprocessing_follows_the_spec(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    weight = rng.normal(size=(3 * 112 * 112, 8)).astype(np.float32)
    path = linear_onnx(tmp_path / "linear.onnx", weight)
    spec = RecognizerSpec(color="BGR", mean=(10, 20, 30), std=(2, 4, 8))
    mean, std = np.array([10, 20, 30], np.float32), np.array([2, 4, 8], np.float32)
    bgr = (images[..., ::-1].astype(np.float32) - mean) / std
    expected = bgr.transpose(0, 3, 1, 2).reshape(3, -1) @ weight
    got = OnnxEmbedder(path, spec=spec)(images)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-2)
    assert not np.allclose(OnnxEmbedder(path)(images), got, atol=1.0)
    # another input size: the 112x112 images are resized for the model
    small = linear_onnx(tmp_path / "small.onnx", weight[: 3 * 64 * 64], size=64)
    resized = np.stack(
        [np.asarray(Image.fromarray(i).resize((64, 64), Image.BILINEAR)) for i in images]
    )
    blob = ((resized.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).reshape(3, -1)
    embedder = OnnxEmbedder(small, spec=RecognizerSpec(input_size=64), batch_size=2)
    np.testing.assert_allclose(embedder(images), blob @ weight[: 3 * 64 * 64], rtol=1e-4, atol=1e-2)
    with pytest.raises(ValueError, match="small.onnx takes 64x64 input, but the preprocessing"):
        OnnxEmbedder(small)


def write_face_json(path: Path, **recognizer: object) -> Path:
    path.write_text(json.dumps({"recognizer": recognizer}), encoding="utf-8")
    return path


def test_recognizer_spec_sources_and_precedence(tmp_path: Path) -> None:
    model = tmp_path / "rec.onnx"
    spec, source = recognizer_spec(model)
    assert spec == RecognizerSpec() and source == "default (ArcFace)"
    beside = write_face_json(tmp_path / "face.json", color="BGR", mean=[0, 0, 0], std=[1, 1, 1])
    spec, source = recognizer_spec(model)
    assert (spec.color, spec.mean, spec.std) == ("BGR", (0.0,) * 3, (1.0,) * 3)
    assert source == f"face.json {beside}"
    other = write_face_json(tmp_path / "other.json", input_size=128, mean=[1, 2, 3])
    spec, source = recognizer_spec(model, other)  # given beats beside
    assert (spec.color, spec.input_size, spec.mean) == ("RGB", 128, (1.0, 2.0, 3.0))
    spec, source = recognizer_spec(model, other, color="BGR", std=(5, 5, 5))  # flags beat both
    assert (spec.color, spec.input_size, spec.std) == ("BGR", 128, (5.0,) * 3)
    assert source == f"face.json {other} + flags --color, --std"
    with pytest.raises(ValueError, match="color must be one of"):
        recognizer_spec(model, color="YUV")
    (tmp_path / "detector.json").write_text('{"detector": {}}', encoding="utf-8")
    with pytest.raises(ValueError, match="detector.json has no 'recognizer' section"):
        recognizer_spec(model, tmp_path / "detector.json")
    with pytest.raises(FileNotFoundError, match="face config not found"):
        recognizer_spec(model, tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"recognizer": {"colour": "RGB"}}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.json: unknown recognizer keys \['colour'\]"):
        recognizer_spec(model, tmp_path / "bad.json")
    with pytest.raises(ValueError, match="applies to .onnx models"):
        recognizer_spec(tmp_path / "checkpoint.pt", color="BGR")


def red_coded_bin(path: Path, num_pairs: int) -> Path:
    """Identity in the red channel (a noise pattern each); blue is one pattern for all."""
    rng = np.random.default_rng(3)
    reds = rng.integers(0, 256, (NUM_IDENTITIES, 112, 112), dtype=np.uint8)
    blue = rng.integers(0, 256, (112, 112), dtype=np.uint8)
    identities, issame = pair_identities(num_pairs, seed=4)
    images = [np.stack([reds[i], np.full_like(blue, 50), blue], axis=-1) for i in identities]
    return write_bin(path, (images, np.array(issame)))


def test_cli_preprocessing_from_face_json_and_flags(tmp_path: Path, capsys) -> None:
    # the model reads only its first input channel: red under RGB, blue under BGR
    weight = np.zeros((3 * 112 * 112, 8), dtype=np.float32)
    weight[: 112 * 112] = np.random.default_rng(5).normal(size=(112 * 112, 8))
    models = tmp_path / "models"
    models.mkdir()
    model = linear_onnx(models / "rec.onnx", weight)
    bins = tmp_path / "bins"
    bins.mkdir()
    red_coded_bin(bins / "lfw.bin", 40)
    out = tmp_path / "table.md"

    def run(*flags: str) -> dict:
        argv = ["evaluate", "verify", str(model), "--bins", str(bins), "--names", "lfw"]
        assert main([*argv, "--out", str(out), *flags]) == 0
        return json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))

    default = run()
    assert default["preprocessing"]["color"] == "RGB"
    assert default["results"][0]["accuracy"] == 1.0  # the identities are in red
    beside = write_face_json(models / "face.json", color="BGR", mean=[0, 0, 0], std=[255, 255, 255])
    from_json = run()
    assert from_json["preprocessing"] == {
        "color": "BGR",
        "input_size": 112,
        "mean": [0.0, 0.0, 0.0],
        "std": [255.0, 255.0, 255.0],
        "source": f"face.json {beside}",
    }
    assert from_json["results"][0]["accuracy"] == 0.5  # blue is the same in every image
    assert "Preprocessing: BGR 112x112, mean 0,0,0, std 255,255,255" in out.read_text("utf-8")
    overridden = run("--color", "RGB", "--mean", "1,2,3")
    assert overridden["preprocessing"]["color"] == "RGB"
    assert overridden["preprocessing"]["mean"] == [1.0, 2.0, 3.0]
    assert overridden["preprocessing"]["std"] == [255.0] * 3  # the rest from face.json
    assert overridden["preprocessing"]["source"] == f"face.json {beside} + flags --color, --mean"
    assert overridden["results"][0]["accuracy"] == 1.0
    given = write_face_json(tmp_path / "given.json", color="RGB")
    assert run("--face-config", str(given))["preprocessing"]["source"] == f"face.json {given}"
    capsys.readouterr()
    argv = ["evaluate", "verify", str(model), "--bins", str(bins), "--names", "lfw"]
    with pytest.raises(SystemExit):
        main([*argv, "--mean", "1,2"])
    assert "expected three comma-separated numbers, got '1,2'" in capsys.readouterr().err
    assert main([*argv, "--input-size", "96"]) == 2
    assert "rec.onnx takes 112x112 input, but the preprocessing says input_size 96" in (
        capsys.readouterr().err
    )


def test_preprocessing_flags_are_refused_for_a_checkpoint(tmp_path: Path, capsys) -> None:
    bins = tmp_path / "bins"
    bins.mkdir()
    write_bin(bins / "lfw.bin", make_pairs(20, set(), seed=3))
    argv = ["evaluate", "verify", str(tmp_path), "--bins", str(bins), "--names", "lfw"]
    assert main([*argv, "--color", "BGR"]) == 2
    assert "apply to .onnx models" in capsys.readouterr().err
    with pytest.raises(ValueError, match="applies to .onnx models only"):
        verify(identity_embedder, bins, ["lfw"], spec=RecognizerSpec())
