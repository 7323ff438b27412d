"""Head pose from five landmarks: exact on the model, invariant to similarity transforms, and
spread over the real DigiFace renders of one identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digi2real.face import ARCFACE_TEMPLATE, DetectorSpec, FaceDetector
from digi2real.face.pose import MODEL_3D, estimate_pose, pose_spread


def project(yaw: float, pitch: float, roll: float = 0.0, scale: float = 2.0) -> np.ndarray:
    """The model's landmarks seen with that head pose, in image coordinates (y down)."""
    y, p = np.radians([yaw, pitch])
    turn = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    tilt = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    points = (turn @ tilt @ MODEL_3D.T).T[:, :2]
    c, s = np.cos(np.radians(roll)), np.sin(np.radians(roll))
    points = points @ np.array([[c, -s], [s, c]]).T * scale
    return np.column_stack([points[:, 0] + 300, 200 - points[:, 1]])


@pytest.mark.parametrize("yaw, pitch", [(0, 0), (35, 0), (-60, 0), (0, 25), (-20, -15)])
@pytest.mark.parametrize("roll, scale", [(0, 1.0), (35, 3.5)])
def test_recovers_the_pose_whatever_roll_scale_and_shift(yaw, pitch, roll, scale):
    got_yaw, got_pitch = estimate_pose(project(yaw, pitch, roll, scale))
    assert got_yaw == pytest.approx(yaw, abs=1e-6) and got_pitch == pytest.approx(pitch, abs=1e-6)


def test_signs_and_the_frontal_template():
    assert estimate_pose(ARCFACE_TEMPLATE) == pytest.approx((0.0, 0.0), abs=1e-4)
    nose_right = ARCFACE_TEMPLATE.copy()
    nose_right[2, 0] += 4
    assert estimate_pose(nose_right)[0] > 10  # turned toward the image's right
    nose_down = ARCFACE_TEMPLATE.copy()
    nose_down[2, 1] += 4
    assert estimate_pose(nose_down)[1] > 10  # tilted down


def test_bad_landmarks_are_refused():
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        estimate_pose(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="same point"):
        estimate_pose(np.ones((5, 2)))
    with pytest.raises(ValueError, match="finite"):
        estimate_pose(np.full((5, 2), np.nan))


def test_pose_spread():
    assert pose_spread(np.array([-10.0, 30.0, np.nan])) == {
        "count": 2,
        "min": -10.0,
        "max": 30.0,
        "range": 40.0,
        "std": 20.0,
    }
    assert pose_spread(np.array([]))["range"] is None


@pytest.mark.assets
def test_the_renders_of_one_digiface_identity_spread_in_yaw(assets: Path):
    detector = FaceDetector(
        DetectorSpec(input_size=640, pad_ratio=1.0), assets / "models/hpc203_scrfd_500m_kps.onnx"
    )
    poses = {}
    for index in range(18):
        with Image.open(assets / f"digiface/variety_id1_tile{index:02d}.png") as image:
            detections = detector.detect(np.asarray(image.convert("RGB")))
        assert detections, index
        poses[index] = estimate_pose(detections[0].kps)
    spread = pose_spread(np.array([yaw for yaw, _ in poses.values()]))
    assert spread["count"] == 18 and spread["range"] > 50  # measured: 71 degrees
    assert poses[6][0] > 25 and poses[17][0] < -20  # turned right / left (looked at)
    assert poses[0][1] > 15  # looking down


# -- in the report -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renders_converted(tiny_config, tmp_path_factory, assets):
    """A tiny conversion of ONE identity whose sources are the 18 real DigiFace renders."""
    import shutil

    from digi2real.runner.convert import convert

    if not assets.is_dir():
        pytest.skip("real assets absent")
    root = tmp_path_factory.mktemp("pose")
    identity = root / "src" / "id1"
    identity.mkdir(parents=True)
    for index in range(18):
        name = f"variety_id1_tile{index:02d}.png"
        shutil.copy(assets / "digiface" / name, identity / name)
    out = root / "out"
    config = tiny_config(
        root / "src",
        **{"generation.steps": 2, "interpolation.outputs_per_identity": 4},
    )
    convert(config, out, progress=False)
    return out


@pytest.mark.assets
def test_the_report_shows_the_pose_spread_of_the_renders(renders_converted, assets):
    from digi2real.analysis.report import build_report
    from digi2real.analysis.report.pose import detector_landmarks
    from digi2real.data.layout import OutLayout

    detector = FaceDetector(
        DetectorSpec(input_size=640, pad_ratio=1.0), assets / "models/hpc203_scrfd_500m_kps.onnx"
    )
    report = build_report(
        renders_converted, html=True, pose=detector_landmarks(detector), pose_per_identity=18
    )
    pose = report["pose"]
    sources = pose["sources"]
    # every render of the identity in the run's plan, each with its landmarks
    assert sources["with_landmarks"] == sources["images"] == 18
    (entry,) = pose["identities"]
    assert entry["identity"] == "id1" and entry["sources_yaw"]["range"] > 50  # measured: 71
    paths = OutLayout(renders_converted)
    assert (paths.report / "pose.png").stat().st_size > 1000
    page = (paths.report / "index.html").read_text()
    assert "Pose (degrees" in page and "pose.png" in page


def test_report_pose_from_the_command_line(tiny_config, tiny_weights, tmp_path):
    from digi2real.cli import main
    from digi2real.data.layout import OutLayout
    from digi2real.runner.convert import convert

    out = tmp_path / "out"
    convert(
        tiny_config(**{"source.identities": "first:2", "generation.steps": 2}),
        out,
        progress=False,
    )
    assert main(["report", str(out), "--pose", "--weights", str(tiny_weights.root)]) == 0
    import json

    report = json.loads(OutLayout(out).report_json.read_text())
    # the tiny detector finds no face: the section says so rather than inventing angles
    assert report["pose"]["sources"]["with_landmarks"] == 0
    assert report["pose"]["outputs"]["images"] > 0
    assert (OutLayout(out).report / "pose.png").is_file()
