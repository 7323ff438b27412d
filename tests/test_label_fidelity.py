"""Label fidelity through the shard's own transform chain, with the real SCRFD detector.

The diffusion step is replaced by a pass-through (the "generated" image IS the init render in
the generation frame), so a carried label can only miss the face if a transform is wrong:
render -> generation frame (align_at's detected, scaled norm_crop) -> output crop (the
output's own detection and norm_crop). The renders' carried landmarks are their own SCRFD
points (DigiFace ships none), written into iBUG/pupil rows of a 70-point set."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from digi2real.config import Config
from digi2real.data import attributes as attrs
from digi2real.face import DetectorSpec, FaceDetector
from digi2real.face import landmarks as geometry
from digi2real.face.stack import FaceStack
from digi2real.pipeline.identity_filter import Pending
from digi2real.pipeline.interpolate import Target
from digi2real.runner.shard import ShardRunner

pytestmark = pytest.mark.assets

SCRFD_FILE = "models/hpc203_scrfd_500m_kps.onnx"
TILES = [f"variety_id1_tile{i:02d}.png" for i in range(18)]
RESOLUTION = 448  # the generation frame: a multiple of 112, as Arc2Face's 512 is not needed


def _seventy(kps: np.ndarray) -> np.ndarray:
    """A 70-point set whose pupils, nose tip and mouth corners are ``kps``."""
    points = np.tile(kps.mean(axis=0), (70, 1))
    points[geometry.PUPIL_SUBJECT_RIGHT], points[geometry.PUPIL_SUBJECT_LEFT] = kps[0], kps[1]
    points[geometry.NOSE_TIP] = kps[2]
    points[geometry.MOUTH_LEFT], points[geometry.MOUTH_RIGHT] = kps[3], kps[4]
    return points


@pytest.fixture(scope="module")
def detector(assets: Path) -> FaceDetector:
    return FaceDetector(DetectorSpec(input_size=640, pad_ratio=1.0), assets / SCRFD_FILE)


def test_pass_through_keeps_carried_landmarks_on_the_face(assets, detector, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    landmarks, masks = {}, {}
    for tile in TILES:
        shutil.copy(assets / "digiface" / tile, source / tile)
        with Image.open(source / tile) as image:
            rgb = np.asarray(image.convert("RGB"))
        (found,) = detector.detect(rgb)[:1]
        landmarks[tile] = _seventy(np.asarray(found.kps, np.float64))
        mask = np.zeros(rgb.shape[:2], np.uint8)
        mask[rgb.shape[0] // 3 :, :] = 1
        Image.fromarray(mask, "L").save(source / tile.replace(".png", "_seg.png"))
        masks[tile] = tile.replace(".png", "_seg.png")
    config = Config().override({"generation.init_strength": 0.5})
    engine = SimpleNamespace(detector=detector, generator=SimpleNamespace(resolution=RESOLUTION))
    runner = ShardRunner(engine, config, tmp_path / "out", source)
    truth = attrs.SourceAttributes(
        {"pose": pa.float64()}, {t: {"pose": 0.0} for t in TILES}, landmarks, masks, "table"
    )
    runner.__dict__["control"] = attrs.resolve_control(config, truth)
    assert runner.control.geometry
    faces = SimpleNamespace(
        detector=detector,
        recognizer_spec=SimpleNamespace(input_size=112),
        embed=lambda crops: np.zeros((len(crops), 4), np.float32),
        config=config,
    )
    errors = []
    for tile in TILES:
        item = Pending("id1", Target(0, "source", (0,), (1.0,), np.zeros(4)), [tile])
        generated = runner.init_image(item)  # the pass-through "generation"
        assert generated.shape == (RESOLUTION, RESOLUTION, 3)
        (face,) = FaceStack.postprocess(faces, [generated])
        assert face.kps is not None, f"{tile}: no face in the pass-through output"
        row, mask_png, image = runner.carry(item, face, {})
        assert image.shape == (112, 112, 3)
        matrix = np.asarray(row[attrs.LABEL_MATRIX]).reshape(2, 3)
        np.testing.assert_allclose(
            row[attrs.LANDMARKS], geometry.apply(matrix, landmarks[tile]), atol=1e-4
        )
        assert mask_png is not None
        errors.append(row[attrs.NME])
    errors = np.array(errors)
    assert errors.max() < 5.0, errors  # percent of the inter-pupil distance


def test_label_fidelity_sees_a_shifted_chain(detector, assets):
    """NME is not blind: the same render, its carried points shifted by a tenth of the
    inter-pupil distance, reads ~10%."""
    with Image.open(assets / "digiface" / TILES[0]) as image:
        rgb = np.asarray(image.convert("RGB"))
    (found,) = detector.detect(rgb)[:1]
    points = _seventy(np.asarray(found.kps, np.float64))
    shift = 0.1 * np.linalg.norm(points[68] - points[69])
    assert geometry.nme(found.kps, points) == pytest.approx(0.0, abs=1e-4)
    assert geometry.nme(found.kps, points + [shift, 0.0]) == pytest.approx(10.0, rel=1e-3)
