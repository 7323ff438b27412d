from __future__ import annotations

import collections
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digi2real.evaluate.backbones import get_backbone
from digi2real.evaluate.verify import (
    THRESHOLDS,
    OnnxEmbedder,
    evaluate_bin,
    fold_accuracies,
    load_backbone,
    load_bin,
    verify,
)

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


def test_onnx_recognizer(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3 * 112 * 112, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["data"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["embedding"]),
        ],
        "linear",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "linear.onnx"
    onnx.save(model, str(path))
    images = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    embedder = OnnxEmbedder(path, batch_size=2)
    blob = ((images.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).reshape(3, -1)
    np.testing.assert_allclose(embedder(images), blob @ weight, rtol=1e-4, atol=1e-2)


class _Marker:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.target,))


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda tmp: (collections.OrderedDict, [True]), id="class"),
        pytest.param(lambda tmp: ([np.zeros(3)], [True]), id="numpy-array"),
        pytest.param(lambda tmp: ([b"a", b"b"], [np.bool_(True)]), id="numpy-bool"),
        pytest.param(lambda tmp: ([b"a", _Marker(str(tmp / "pwned"))], [True]), id="function"),
        pytest.param(lambda tmp: (print, [True]), id="builtin-function"),
    ],
)
def test_pickles_with_globals_are_refused_unexecuted(tmp_path: Path, payload) -> None:
    path = write_bin(tmp_path / "evil.bin", payload(tmp_path))
    with pytest.raises(ValueError, match="evil.bin"):
        load_bin(path)
    assert not (tmp_path / "pwned").exists()


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
    # Python 3 bytes under protocol 2 are a call to _codecs.encode: refused, documented.
    path = write_bin(tmp_path / "p2.bin", ([b"a", b"b"], [True]), protocol=2)
    with pytest.raises(ValueError, match="_codecs"):
        load_bin(path)
    for protocol in (3, 4, 5):
        path = write_bin(tmp_path / f"p{protocol}.bin", ([b"a", b"b"], [False]), protocol)
        assert load_bin(path) == ([b"a", b"b"], [False])
