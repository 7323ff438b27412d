"""Face detection and alignment against real third-party files (skipped without them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from insightface.utils import face_align
from PIL import Image

from digi2real.face import ARCFACE_TEMPLATE, DetectorSpec, FaceDetector, align_face

pytestmark = pytest.mark.assets

SCRFD_FILE = "models/hpc203_scrfd_500m_kps.onnx"
DIGIFACE_TILES = [f"digiface/variety_id1_tile{i:02d}.png" for i in range(18)]


def load_rgb(assets: Path, name: str) -> np.ndarray:
    with Image.open(assets / name) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def padded(assets: Path) -> FaceDetector:
    return FaceDetector(DetectorSpec(input_size=640, pad_ratio=1.0), assets / SCRFD_FILE)


@pytest.fixture(scope="module")
def unpadded(padded: FaceDetector) -> FaceDetector:
    return FaceDetector(dataclasses.replace(padded.spec, pad_ratio=0.0), padded.model_path)


def check_detections(detections: list, image: np.ndarray) -> None:
    scores = [d.score for d in detections]
    assert scores == sorted(scores, reverse=True)
    height, width = image.shape[:2]
    for d in detections:
        x1, y1, x2, y2 = d.bbox
        assert -0.1 * width < x1 < x2 < 1.1 * width and -0.1 * height < y1 < y2 < 1.1 * height
        # keypoints (eyes, nose, mouth) lie inside their own box
        assert (d.kps[:, 0] > x1).all() and (d.kps[:, 0] < x2).all()
        assert (d.kps[:, 1] > y1).all() and (d.kps[:, 1] < y2).all()


@pytest.mark.parametrize("pad_ratio", [0.0, 1.0])
def test_group_photo_has_six_faces(assets: Path, padded: FaceDetector, pad_ratio: float) -> None:
    image = load_rgb(assets, "faces/t1.jpg")
    detector = FaceDetector(
        dataclasses.replace(padded.spec, pad_ratio=pad_ratio), padded.model_path
    )
    detections = detector.detect(image)
    assert len(detections) == 6
    check_detections(detections, image)


def test_no_face_image(assets: Path, padded: FaceDetector, unpadded: FaceDetector) -> None:
    with Image.open(assets / "faces/no_face.png") as raw:
        assert raw.mode == "RGBA"
        rgba = np.asarray(raw)
    with pytest.raises(ValueError, match="4"):
        padded.detect(rgba)
    image = load_rgb(assets, "faces/no_face.png")
    assert padded.detect(image) == [] and unpadded.detect(image) == []


@pytest.mark.parametrize("name", DIGIFACE_TILES)
def test_digiface_render_has_one_face_and_aligns(
    assets: Path, padded: FaceDetector, name: str
) -> None:
    image = load_rgb(assets, name)
    detections = padded.detect(image)
    assert len(detections) == 1
    check_detections(detections, image)
    kps = detections[0].kps
    aligned = align_face(image, kps)
    np.testing.assert_array_equal(aligned, face_align.norm_crop(image, kps, image_size=112))
    # Round trip: the aligned crop, detected again, has its landmarks on the template.
    again = padded.detect(aligned)
    assert len(again) == 1
    distances = np.linalg.norm(again[0].kps - ARCFACE_TEMPLATE, axis=1)
    assert distances.mean() < 5.0, distances


def test_aligned_crop_needs_padding(
    assets: Path, padded: FaceDetector, unpadded: FaceDetector
) -> None:
    image = load_rgb(assets, "faces/Tom_Hanks_54745.png")
    assert image.shape == (112, 112, 3)
    assert unpadded.detect(image) == []
    detections = padded.detect(image)
    assert len(detections) == 1
    distances = np.linalg.norm(detections[0].kps - ARCFACE_TEMPLATE, axis=1)
    assert distances.max() < 8.0 and distances.mean() < 5.0, distances
    # Re-aligning an aligned face with its own landmarks changes it little.
    realigned = align_face(image, detections[0].kps)
    np.testing.assert_array_equal(
        realigned, face_align.norm_crop(image, detections[0].kps, image_size=112)
    )
    correlation = np.corrcoef(realigned.ravel(), image.ravel())[0, 1]
    assert correlation > 0.9
