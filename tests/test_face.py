from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from insightface.utils import face_align
from onnx import TensorProto, helper

from digi2real.face import (
    ARCFACE_TEMPLATE,
    DetectorSpec,
    FaceDetector,
    FaceEmbedder,
    RecognizerSpec,
    align_face,
    center_crop_align,
    is_aligned_crop,
    locate_and_align,
    make_session,
)
from digi2real.face.embed import preprocess
from digi2real.weights.configs import TINY_ID_DIM
from digi2real.weights.face_config import load_face_config, save_face_config
from digi2real.weights.tiny_face import (
    export_tiny_detector,
    export_tiny_recognizer,
    tiny_face_specs,
)

TINY_DIM = TINY_ID_DIM
TINY_DET_SIZE = 160


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_face")
    export_tiny_recognizer(root / "arcface.onnx", dim=TINY_DIM, seed=0)
    export_tiny_detector(root / "scrfd_10g_bnkps.onnx", input_size=TINY_DET_SIZE, seed=0)
    save_face_config(root, *tiny_face_specs(detector_input_size=TINY_DET_SIZE))
    return root


@pytest.fixture(scope="module")
def embedder(tiny_dir: Path) -> FaceEmbedder:
    recognizer, _ = load_face_config(tiny_dir)
    return FaceEmbedder(recognizer, tiny_dir, batch_size=2)


@pytest.fixture(scope="module")
def detector(tiny_dir: Path) -> FaceDetector:
    _, spec = load_face_config(tiny_dir)
    return FaceDetector(spec, tiny_dir)


def random_faces(count: int, size: int = 112, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


# --- specs -------------------------------------------------------------------------------


def test_specs_round_trip_through_face_json(tmp_path: Path) -> None:
    recognizer = RecognizerSpec(color="BGR", mean=(1, 2, 3), std=(4.0, 5.0, 6.0))
    detector = DetectorSpec(input_size=320, pad_ratio=0.5, fallback="center_crop")
    save_face_config(tmp_path, recognizer, detector)
    data = json.loads((tmp_path / "face.json").read_text())
    assert data["recognizer"]["mean"] == [1.0, 2.0, 3.0]
    assert load_face_config(tmp_path) == (recognizer, detector)


def test_spec_reads_the_documented_json() -> None:
    recognizer = RecognizerSpec.from_dict(
        {
            "file": "arcface.onnx",
            "input_size": 112,
            "color": "RGB",
            "mean": [127.5] * 3,
            "std": [127.5] * 3,
        }
    )
    detector = DetectorSpec.from_dict(
        {
            "file": "scrfd_10g_bnkps.onnx",
            "kind": "scrfd",
            "input_size": 640,
            "score_threshold": 0.5,
            "nms_threshold": 0.4,
            "pad_ratio": 1.0,
        }
    )
    assert recognizer.mean == (127.5, 127.5, 127.5)
    assert detector.fallback == "none"
    assert DetectorSpec.from_dict(detector.to_dict()) == detector


@pytest.mark.parametrize(
    ("cls", "data", "match"),
    [
        (RecognizerSpec, {"colour": "RGB"}, "colour"),
        (RecognizerSpec, {"color": "YUV"}, "YUV"),
        (RecognizerSpec, {"mean": [1, 2]}, "mean"),
        (RecognizerSpec, {"std": [1, 0, 1]}, "std"),
        (DetectorSpec, {"kind": "retinaface"}, "retinaface"),
        (DetectorSpec, {"input_size": 100}, "100"),
        (DetectorSpec, {"pad_ratio": -1}, "pad_ratio"),
        (DetectorSpec, {"score_threshold": 1.5}, "score_threshold"),
        (DetectorSpec, {"fallback": "guess"}, "guess"),
    ],
)
def test_spec_rejects_bad_values(cls: type, data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls.from_dict(data)


def test_load_face_config_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="face.json"):
        load_face_config(tmp_path)
    (tmp_path / "face.json").write_text(json.dumps({"recognizer": {}}))
    with pytest.raises(ValueError, match="detector"):
        load_face_config(tmp_path)


# --- sessions ----------------------------------------------------------------------------


def test_session_is_explicit_and_reports_live_providers(
    tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session = make_session(tiny_dir / "arcface.onnx")
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == 1

    with caplog.at_level(logging.WARNING, logger="digi2real.face.session"):
        cuda = make_session(tiny_dir / "arcface.onnx", "cuda:0")
    live = cuda.get_providers()
    assert live[-1] == "CPUExecutionProvider"
    warned = [r.getMessage() for r in caplog.records if "cuda:0" in r.getMessage()]
    if "CUDAExecutionProvider" in live:
        assert not warned
    else:  # onnxruntime-gpu without a usable GPU falls back silently; we must not
        assert len(warned) == 1 and "CPUExecutionProvider" in warned[0]


def test_session_errors(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        make_session(tmp_path / "missing.onnx")
    for device in ("gpu", "cuda:x", "cpu:0", "cuda:-1"):
        with pytest.raises(ValueError, match="device"):
            make_session(tiny_dir / "arcface.onnx", device)


# --- tiny models -------------------------------------------------------------------------


def test_tiny_models_are_small_deterministic_and_seeded(tiny_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = export_tiny_recognizer(tmp_path / "a.onnx", dim=TINY_DIM, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global RNG is untouched
    other = export_tiny_recognizer(tmp_path / "b.onnx", dim=TINY_DIM, seed=1)
    first = (tiny_dir / "arcface.onnx").read_bytes()
    assert len(first) < 1_000_000
    assert again.read_bytes() == first
    assert other.read_bytes() != first
    det = export_tiny_detector(tmp_path / "d.onnx", input_size=TINY_DET_SIZE, seed=0)
    assert det.read_bytes() == (tiny_dir / "scrfd_10g_bnkps.onnx").read_bytes()
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*.partial"))


def test_tiny_recognizer_has_dynamic_batch(tiny_dir: Path) -> None:
    session = make_session(tiny_dir / "arcface.onnx")
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert not isinstance(inp.shape[0], int) and inp.shape[1:] == [3, 112, 112]
    for batch in (1, 3):
        x = np.zeros((batch, 3, 112, 112), np.float32)
        assert session.run(None, {inp.name: x})[0].shape == (batch, TINY_DIM)
    assert out.shape[1] == TINY_DIM


def test_tiny_recognizer_keeps_images_apart(embedder: FaceEmbedder) -> None:
    faces = random_faces(6)
    faces[5] = 90  # a flat image has no pattern: a finite embedding all the same
    tinted = np.clip(faces[:1].astype(int) + 40, 0, 255).astype(np.uint8)
    out = embedder.embed(np.concatenate([faces, tinted]))
    assert np.isfinite(out).all()
    cosines = out[:5] @ out[:5].T
    assert np.abs(cosines[~np.eye(5, dtype=bool)]).max() < 0.6  # unrelated images stay apart
    assert out[0] @ out[6] > 0.99  # an overall colour shift is not a different face


def test_tiny_detector_has_scrfd_output_layout(tiny_dir: Path) -> None:
    model = onnx.load(str(tiny_dir / "scrfd_10g_bnkps.onnx"))
    assert len(model.graph.output) == 9
    session = ort.InferenceSession(
        str(tiny_dir / "scrfd_10g_bnkps.onnx"), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, TINY_DET_SIZE, TINY_DET_SIZE))
    outs = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})
    for index, out in enumerate(outs):
        stride = (8, 16, 32)[index % 3]
        width = (1, 4, 10)[index // 3]
        assert out.shape == ((TINY_DET_SIZE // stride) ** 2 * 2, width)
    assert max(float(score.max()) for score in outs[:3]) < 1e-6


# --- embedder ----------------------------------------------------------------------------


def test_embedder_output_is_unit_norm(embedder: FaceEmbedder) -> None:
    out = embedder.embed(random_faces(5))
    assert embedder.dim == TINY_DIM
    assert out.shape == (5, TINY_DIM) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(out[0], out[1])
    assert embedder.providers == ["CPUExecutionProvider"]


def test_embedder_is_batch_invariant(tiny_dir: Path, embedder: FaceEmbedder) -> None:
    faces = random_faces(5, seed=1)
    batched = FaceEmbedder(embedder.spec, tiny_dir, batch_size=5).embed(faces)
    singles = np.concatenate([embedder.embed(faces[i : i + 1]) for i in range(5)])
    chunked = embedder.embed(faces)  # batch_size=2: chunks of 2, 2, 1
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    np.testing.assert_allclose(chunked, singles, atol=1e-5)


def test_preprocessing_matches_opencv_blob_semantics() -> None:
    faces = random_faces(3, seed=2)
    spec = RecognizerSpec()
    bgr = [np.ascontiguousarray(face[:, :, ::-1]) for face in faces]
    blob = cv2.dnn.blobFromImages(bgr, 1.0 / 127.5, (112, 112), (127.5,) * 3, swapRB=True)
    np.testing.assert_allclose(preprocess(faces, spec), blob, atol=1e-5)
    # BGR models get the channels reversed, with mean/std listed in the model's order.
    bgr_spec = RecognizerSpec(color="BGR", mean=(10, 20, 30), std=(1, 2, 4))
    expected = (faces[..., ::-1].astype(np.float32) - [10, 20, 30]) / [1, 2, 4]
    np.testing.assert_allclose(preprocess(faces, bgr_spec), expected.transpose(0, 3, 1, 2))


def test_embedding_depends_on_spec_preprocessing(tiny_dir: Path, embedder: FaceEmbedder) -> None:
    faces = random_faces(2, seed=3)
    base = embedder.embed(faces)
    # the tiny recognizer centres each channel on its image mean: a mean is invisible to it,
    # a per-channel scale is not
    for change in ({"std": (30.0, 127.5, 127.5)}, {"color": "BGR"}):
        spec = dataclasses.replace(embedder.spec, **change)
        assert not np.allclose(FaceEmbedder(spec, tiny_dir).embed(faces), base, atol=1e-4)


def test_embedder_validation(tiny_dir: Path, embedder: FaceEmbedder) -> None:
    with pytest.raises(ValueError, match="empty"):
        embedder.embed(np.zeros((0, 112, 112, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(2, 96, 96, 3\)"):
        embedder.embed(np.zeros((2, 96, 96, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(112, 112, 3\)"):
        embedder.embed(np.zeros((112, 112, 3), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        embedder.embed(np.zeros((1, 112, 112, 3), np.float32))
    with pytest.raises(ValueError, match="128"):
        FaceEmbedder(RecognizerSpec(input_size=128), tiny_dir)
    with pytest.raises(ValueError, match="batch_size"):
        FaceEmbedder(embedder.spec, tiny_dir, batch_size=0)
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        FaceEmbedder(embedder.spec, tiny_dir / "nope.onnx")


def test_embedder_rejects_non_finite_output(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedder = FaceEmbedder(RecognizerSpec(), tiny_dir)
    real_run = embedder.session.run

    def run_with_nan(names: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        (out,) = real_run(names, feeds)
        out[1, 3] = np.nan
        return [out]

    monkeypatch.setattr(embedder, "session", type("S", (), {"run": staticmethod(run_with_nan)}))
    with pytest.raises(FloatingPointError, match=r"non-finite.*\[1\]"):
        embedder.embed(random_faces(3))


def write_mean_colour_model(path: Path) -> Path:
    """An "MXNet-style" recognizer normalising inside the graph; embedding = mean colour."""
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["data", "mean"], ["centred"]),
            helper.make_node("Mul", ["centred", "scale"], ["scaled"]),
            helper.make_node("GlobalAveragePool", ["scaled"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["fc1"]),
        ],
        "mean_colour",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 3])],
        [
            helper.make_tensor("mean", TensorProto.FLOAT, [], [127.5]),
            helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 128]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def test_embedder_on_a_known_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_mean_colour_model(tmp_path / "mean_colour.onnx")
    faces = random_faces(4, seed=8)
    raw = RecognizerSpec(mean=(0, 0, 0), std=(1, 1, 1))
    with caplog.at_level(logging.WARNING, logger="digi2real.face.embed"):
        embedder = FaceEmbedder(raw, path, batch_size=3)
    assert not caplog.records
    assert embedder.dim == 3
    expected = (faces.astype(np.float64).mean(axis=(1, 2)) - 127.5) / 128
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.embed(faces), expected, atol=1e-5)
    # A spec that normalises again is almost certainly wrong for such a graph: say so.
    with caplog.at_level(logging.WARNING, logger="digi2real.face.embed"):
        FaceEmbedder(RecognizerSpec(), path)
    assert any("inside the graph" in r.getMessage() for r in caplog.records)


# --- detector ----------------------------------------------------------------------------


def test_tiny_detector_finds_nothing(detector: FaceDetector) -> None:
    assert detector.providers == ["CPUExecutionProvider"]
    rng = np.random.default_rng(4)
    for shape in ((112, 112, 3), (300, 200, 3), (64, 480, 3)):
        assert detector.detect(rng.integers(0, 256, shape, dtype=np.uint8)) == []


def test_detector_validation(detector: FaceDetector, tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(64, 64, 4\)"):
        detector.detect(np.zeros((64, 64, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        detector.detect(np.zeros((64, 64), np.uint8))
    # the tiny detector has a fixed 160x160 input
    with pytest.raises(ValueError, match="640"):
        FaceDetector(DetectorSpec(input_size=640), tiny_dir)


@pytest.mark.parametrize("input_size", [640, 160])
def test_detector_pads_and_maps_back(
    detector: FaceDetector, monkeypatch: pytest.MonkeyPatch, input_size: int
) -> None:
    # 100x60 padded by its own size on every side is a 300x180 canvas: at 640 it is used
    # as is, at 160 the image is shrunk first so the canvas is about 160 high.
    image = np.random.default_rng(5).integers(0, 256, (100, 60, 3), dtype=np.uint8)
    truth_boxes = np.array([[10, 20, 40, 60], [5, 5, 50, 60]], np.float32)
    truth_kps = np.stack([ARCFACE_TEMPLATE / 3, ARCFACE_TEMPLATE / 2])
    seen = {}

    def fake_detect(img: np.ndarray, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        seen["img"], seen["kwargs"] = img, kwargs
        inner_h, inner_w = img.shape[0] // 3, img.shape[1] // 3  # pad == own size
        scale = np.array([inner_w / 60, inner_h / 100], np.float32)
        pad = np.array([inner_w, inner_h], np.float32)
        boxes = (truth_boxes.reshape(2, 2, 2) * scale + pad).reshape(2, 4)
        scores = np.array([[0.6], [0.9]], np.float32)
        return np.hstack([boxes, scores]), truth_kps * scale + pad

    spec = dataclasses.replace(detector.spec, input_size=input_size, score_threshold=0.3)
    monkeypatch.setattr(detector, "spec", spec)
    monkeypatch.setattr(detector._scrfd, "detect", fake_detect)
    found = detector.detect(image)

    canvas = seen["img"]
    assert seen["kwargs"] == {"input_size": (input_size, input_size), "det_thresh": 0.3}
    if input_size == 640:
        assert canvas.shape == (300, 180, 3)
        np.testing.assert_array_equal(canvas[100:200, 60:120], image[:, :, ::-1])  # BGR in
    else:
        assert canvas.shape == (159, 96, 3)
        inner = canvas[53:106, 32:64].astype(int)
        shrunk = cv2.resize(image[:, :, ::-1], (32, 53), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(inner, shrunk)
    assert (
        canvas[: canvas.shape[0] // 3].max() == 0 and canvas[:, : canvas.shape[1] // 3].max() == 0
    )
    assert [d.score for d in found] == pytest.approx([0.9, 0.6])
    np.testing.assert_allclose(found[0].bbox, truth_boxes[1], atol=1e-3)
    np.testing.assert_allclose(found[1].bbox, truth_boxes[0], atol=1e-3)
    np.testing.assert_allclose(found[0].kps, truth_kps[1], atol=1e-3)
    assert found[0].bbox.dtype == np.float32 and found[0].kps.dtype == np.float32


# --- alignment ---------------------------------------------------------------------------


def test_align_face_puts_keypoints_on_the_template() -> None:
    # Keypoints: the template scaled by 1.7, rotated by 12 degrees, shifted; a white dot
    # on each must end up on the template after alignment.
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    kps = (ARCFACE_TEMPLATE @ rotation.T) * 1.7 + [40, 25]
    image = np.zeros((260, 240, 3), np.uint8)
    for x, y in kps:
        cv2.circle(image, (round(x), round(y)), 3, (255, 255, 255), -1)

    aligned = align_face(image, kps)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    np.testing.assert_array_equal(aligned, face_align.norm_crop(image, kps, image_size=112))
    for x, y in ARCFACE_TEMPLATE:
        top, left = round(y) - 5, round(x) - 5
        patch = aligned[top : top + 11, left : left + 11, 0].astype(np.float64)
        assert patch.sum() > 0, (x, y)
        rows, cols = np.mgrid[top : top + 11, left : left + 11]
        centroid = ((cols * patch).sum() / patch.sum(), (rows * patch).sum() / patch.sum())
        np.testing.assert_allclose(centroid, (x, y), atol=1.0)
    assert align_face(image, kps, size=224).shape == (224, 224, 3)


def test_align_validation() -> None:
    image = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        align_face(image, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="100"):
        align_face(image, ARCFACE_TEMPLATE, size=100)
    with pytest.raises(ValueError, match="uint8"):
        align_face(image.astype(np.float32), ARCFACE_TEMPLATE)


def test_is_aligned_crop() -> None:
    assert is_aligned_crop(np.zeros((112, 112, 3), np.uint8))
    assert not is_aligned_crop(np.zeros((112, 113, 3), np.uint8))
    assert is_aligned_crop(np.zeros((224, 224, 3), np.uint8), size=224)


def test_center_crop_align() -> None:
    image = np.zeros((200, 400, 3), np.uint8)
    image[:, 100:300] = 200  # the central square
    out = center_crop_align(image, 112)
    assert out.shape == (112, 112, 3)
    assert (out == 200).all()
    square = np.random.default_rng(6).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_align(square, 112), square)


def test_locate_and_align_paths(detector: FaceDetector) -> None:
    aligned = random_faces(1)[0]
    result = locate_and_align(aligned, detector)
    assert result.method == "aligned_input"
    np.testing.assert_array_equal(result.image, aligned)
    photo = np.random.default_rng(7).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    fallback = locate_and_align(photo, detector)  # tiny spec: detects nothing, crops
    assert fallback.method == "center_crop" and fallback.image.shape == (112, 112, 3)
    strict = FaceDetector(dataclasses.replace(detector.spec, fallback="none"), detector.model_path)
    rejected = locate_and_align(photo, strict)
    assert rejected.image is None and rejected.method is None
    with pytest.raises(ValueError, match="no detector"):
        locate_and_align(photo, None)
