"""buffalo_l's optional attribute models (1k3d68.onnx, genderage.onnx): the manifest entries,
the tiny stand-ins through insightface's own classes, :class:`AttributeModels` and its pose
signs, and `weights download --with landmarks3d,genderage` from a stand-in release page."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import math
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from digi2real import weights
from digi2real.cli import main
from digi2real.face.attribute_models import (
    MODEL_ESTIMATES,
    AttributeModels,
    _Face,
    model_file,
)
from digi2real.face.detect import Detection
from digi2real.face.pose import estimate_pose
from digi2real.face.session import make_session
from digi2real.weights import fetch
from digi2real.weights import manifest as manifest_module
from digi2real.weights.manifest import (
    entry_for,
    groups_for,
    lora_groups,
    optional_groups,
    parse_groups,
    write_dir_manifest,
)
from digi2real.weights.tiny_face import (
    LANDMARK_3D_POINTS,
    _insightface_mean_shape,
    export_tiny_genderage,
    export_tiny_landmark_3d,
)

GROUPS = {"1k3d68.onnx": "landmarks3d", "genderage.onnx": "genderage"}
RELEASES = "https://github.com/deepinsight/insightface/releases/download/v0.7"
ALL_ESTIMATES = ("yaw_3d_est", "pitch_3d_est", "roll_3d_est", "age_est", "gender_est")


def image(seed: int = 0, size: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def detection(x1: float = 64.0, y1: float = 64.0, x2: float = 192.0, y2: float = 192.0):
    kps = np.array([[100, 110], [156, 110], [128, 135], [105, 165], [151, 165]], np.float32)
    return Detection(bbox=np.array([x1, y1, x2, y2], np.float32), kps=kps, score=0.9)


# -- the package manifest and the --with names ------------------------------------------------


def test_manifest_lists_the_attribute_models_as_optional_buffalo_l_members():
    files = {e["path"]: e for e in weights.load_package_manifest()["files"]}
    detector = files["det_10g.onnx"]
    for rel, group in GROUPS.items():
        entry = files[rel]
        assert entry["component"] == group and entry["optional"] == group
        source = entry["source"]
        assert source["type"] == "url" and source["member"] == rel
        assert source["url"] == detector["source"]["url"]
        assert source["url"].endswith("/buffalo_l.zip") and source["manual"]
        # the pack's licence: InsightFace's non-commercial research terms, as the detector's
        for key in ("license", "license_url", "commercial"):
            assert entry[key] == detector[key], key
        assert entry["commercial"] is False and "non-commercial" in entry["license"]
        assert entry["sha256"] is None and entry["size"] is None  # trust on first use
        assert not manifest_module.is_required(entry)


def test_with_names_know_the_attribute_groups():
    assert {"landmarks3d", "genderage"} <= set(optional_groups())
    assert parse_groups("landmarks3d,genderage") == ("landmarks3d", "genderage")
    assert {"landmarks3d", "genderage"} <= set(parse_groups("all"))
    # not LoRAs, and no generation setting pulls them into a run's files
    assert not {"landmarks3d", "genderage"} & set(lora_groups())
    assert groups_for("lcm", "tiny") == ("lcm", "taesd")
    with pytest.raises(ValueError, match="landmarks3d"):
        parse_groups("landmarks")


# -- the tiny stand-ins ------------------------------------------------------------------------


def test_tiny_profile_has_the_stand_ins_outside_its_digest(tiny_weights):
    assert tiny_weights.has("landmarks3d") and tiny_weights.has("genderage")
    entries = {f["path"]: f for f in tiny_weights.files}
    for rel, group in GROUPS.items():
        entry = entries[rel]
        assert entry["component"] == group and entry["optional"] == group
        assert entry["commercial"] is True and "tiny profile" in entry["license"]
        assert entry["size"] < 100_000
        assert model_file(tiny_weights, group) == tiny_weights.root / rel
    # the dir's digest covers the required files only
    without = [f for f in tiny_weights.files if f["path"] not in GROUPS]
    assert manifest_module._dir_digest(without) == tiny_weights.digest


def test_tiny_stand_ins_load_through_insightface_classes(tiny_weights):
    from insightface.model_zoo.attribute import Attribute
    from insightface.model_zoo.landmark import Landmark

    path = tiny_weights.root / "1k3d68.onnx"
    landmark = Landmark(model_file=str(path), session=make_session(path))
    assert landmark.input_size == (192, 192) and landmark.taskname == "landmark_3d_68"
    assert landmark.require_pose and landmark.lmk_num == 68 and landmark.lmk_dim == 3
    # no Sub/Mul among the first nodes: the class feeds (x - 127.5) / 128
    assert (landmark.input_mean, landmark.input_std) == (127.5, 128.0)
    path = tiny_weights.root / "genderage.onnx"
    attribute = Attribute(model_file=str(path), session=make_session(path))
    assert attribute.input_size == (96, 96) and attribute.taskname == "genderage"
    for model in (landmark, attribute):  # batch is dynamic, as the real exports' N
        assert model.session.get_inputs()[0].shape[0] == "batch"
    face = _Face(detection().bbox)
    bgr = np.ascontiguousarray(image()[:, :, ::-1])
    points = landmark.get(bgr, face)
    assert points.shape == (68, 3) and np.isfinite(points).all()
    assert face["pose"].shape == (3,) and np.isfinite(face["pose"]).all()
    gender, age = attribute.get(bgr, face)
    assert gender in (0, 1) and 0 <= age <= 100


def test_tiny_stand_ins_are_deterministic(tmp_path):
    for export in (export_tiny_landmark_3d, export_tiny_genderage):
        first = export(tmp_path / "a.onnx", seed=3).read_bytes()
        assert export(tmp_path / "b.onnx", seed=3).read_bytes() == first
        assert export(tmp_path / "c.onnx", seed=4).read_bytes() != first
    with pytest.raises(ValueError, match="68, 3"):
        export_tiny_landmark_3d(tmp_path / "d.onnx", points=np.zeros((5, 3)))


# -- AttributeModels -----------------------------------------------------------------------------


def test_attribute_models_estimate_on_the_tiny_profile(tiny_weights):
    models = AttributeModels(tiny_weights, "cpu")
    assert models.available == ("landmarks3d", "genderage")
    assert models.names == ALL_ESTIMATES
    assert MODEL_ESTIMATES == {
        "landmarks3d": ("yaw_3d_est", "pitch_3d_est", "roll_3d_est"),
        "genderage": ("age_est", "gender_est"),
    }
    assert models.providers == {
        "landmarks3d": ["CPUExecutionProvider"],
        "genderage": ["CPUExecutionProvider"],
    }
    digests = models.file_digests()
    assert set(digests) == {"landmarks3d", "genderage"}
    assert digests["genderage"] == tiny_weights.file_digest("genderage")
    values = models.estimate(image(0), detection())
    assert tuple(values) == ALL_ESTIMATES
    assert all(isinstance(v, float) and math.isfinite(v) for v in values.values()), values
    # the stand-in is the mean shape moved a little by the image: near frontal
    for name in ("yaw_3d_est", "pitch_3d_est", "roll_3d_est"):
        assert abs(values[name]) < 30, values
    assert 0 <= values["age_est"] <= 100 and values["gender_est"] in (0.0, 1.0)
    assert models.estimate(image(0), detection()) == values  # deterministic
    other = models.estimate(image(1), detection(40, 50, 200, 220))
    assert other["yaw_3d_est"] != values["yaw_3d_est"]  # it follows the image
    # no face: every estimate missing
    assert models.estimate(image(0), None) == dict.fromkeys(ALL_ESTIMATES)
    with pytest.raises(ValueError, match="bbox"):
        models.estimate(image(0), detection(100, 100, 100, 150))
    with pytest.raises(ValueError, match="uint8"):
        models.estimate(image(0).astype(np.float32), detection())


def test_a_dir_without_them_estimates_nothing(tiny_weights):
    bare = dataclasses.replace(
        tiny_weights, files=tuple(f for f in tiny_weights.files if f["path"] not in GROUPS)
    )
    models = AttributeModels(bare)
    assert models.available == () and models.names == ()
    assert models.estimate(image(), detection()) == {}
    assert models.estimate(image(), None) == {}
    assert models.file_digests() == {}
    with pytest.raises(FileNotFoundError, match="weights tiny"):
        model_file(bare, "landmarks3d")
    real = dataclasses.replace(bare, profile="real")
    with pytest.raises(FileNotFoundError, match="--with genderage"):
        model_file(real, "genderage")
    # one of the two
    one = dataclasses.replace(
        tiny_weights, files=tuple(f for f in tiny_weights.files if f["path"] != "1k3d68.onnx")
    )
    models = AttributeModels(one)
    assert models.available == ("genderage",)
    assert tuple(models.estimate(image(), detection())) == ("age_est", "gender_est")


# -- pose signs: a constant 1k3d68 stand-in whose points are the mean shape turned --------------


def _rotation(axis: str, degrees: float) -> np.ndarray:
    """Rotation about an axis of insightface's mean shape (x image right, y down, z toward
    the camera: the nose tip has the largest z)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


def _turned(axis: str, degrees: float) -> np.ndarray:
    shape = _insightface_mean_shape().astype(np.float64)
    centre = shape.mean(axis=0)
    return (shape - centre) @ _rotation(axis, degrees).T + centre


def _constant_landmark_dir(root: Path, points: np.ndarray) -> weights.WeightsDir:
    root.mkdir(parents=True)
    export_tiny_landmark_3d(root / "1k3d68.onnx", points=points, std=0.0)
    meta = {"component": "landmarks3d", "optional": "landmarks3d", "license": "test"}
    write_dir_manifest(root, "tiny", [entry_for(root, "1k3d68.onnx", {**meta, "commercial": True})])
    return weights.open_weights(root)


def _five(points: np.ndarray) -> np.ndarray:
    """insightface's five points from iBUG-68: eye centres, nose tip, mouth corners."""
    return np.stack(
        [points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]
    )


def _nose_offset(points: np.ndarray) -> np.ndarray:
    """The nose tip's image (x, y) relative to the eyes' and mouth corners' centre."""
    five = _five(points)[:, :2]
    return five[2] - five[[0, 1, 3, 4]].mean(axis=0)


@pytest.mark.parametrize("degrees", [20.0, -20.0])
def test_pose_signs_follow_digi2real_convention(tmp_path, degrees):
    """insightface reports [pitch, yaw, roll]; AttributeModels gives yaw + (nose toward the
    image's right), pitch + (nose down), roll + (clockwise on screen), as face.pose does."""
    frontal = _turned("x", 0.0)
    frontal_nose = _nose_offset(frontal)
    frontal_yaw, frontal_pitch = estimate_pose(_five(frontal)[:, :2])
    box = detection()
    for axis in "xyz":
        points = _turned(axis, degrees)
        models = AttributeModels(_constant_landmark_dir(tmp_path / f"{axis}{degrees}", points))
        values = models.estimate(image(), box)
        yaw, pitch, roll = (values[f"{k}_3d_est"] for k in ("yaw", "pitch", "roll"))
        nose = _nose_offset(points) - frontal_nose
        five = _five(points)
        eye_line = math.degrees(math.atan2(*(five[1, :2] - five[0, :2])[::-1]))
        five_yaw, five_pitch = estimate_pose(five[:, :2])
        if axis == "y":  # the nose tip moves sideways: yaw
            assert yaw == pytest.approx(degrees, abs=0.01)
            assert pitch == pytest.approx(0.0, abs=0.01) and roll == pytest.approx(0.0, abs=0.01)
            assert np.sign(nose[0]) == np.sign(yaw)  # + : toward the image's right
            assert np.sign(five_yaw - frontal_yaw) == np.sign(yaw)
        elif axis == "x":  # the nose tip moves up or down: pitch
            assert pitch == pytest.approx(-degrees, abs=0.01)  # insightface's pitch negated
            assert yaw == pytest.approx(0.0, abs=0.01) and roll == pytest.approx(0.0, abs=0.01)
            assert np.sign(nose[1]) == np.sign(pitch)  # + : down (image y grows down)
            assert np.sign(five_pitch - frontal_pitch) == np.sign(pitch)
        else:  # in the image plane: roll
            assert roll == pytest.approx(degrees, abs=0.01)
            assert yaw == pytest.approx(0.0, abs=0.01) and pitch == pytest.approx(0.0, abs=0.01)
            assert np.sign(eye_line) == np.sign(roll)  # + : clockwise on screen
    # a box elsewhere in a larger image: the same angles (the crop is a similarity map)
    points = _turned("y", degrees)
    models = AttributeModels(_constant_landmark_dir(tmp_path / f"moved{degrees}", points))
    values = models.estimate(image(size=400), detection(150, 90, 330, 300))
    assert values["yaw_3d_est"] == pytest.approx(degrees, abs=0.01)


def test_constant_stand_in_points_are_the_ones_given(tmp_path):
    points = _turned("y", 10.0)
    path = export_tiny_landmark_3d(tmp_path / "c.onnx", points=points, std=0.0)
    session = make_session(path)
    batch = np.random.default_rng(0).normal(size=(2, 3, 192, 192)).astype(np.float32)
    out = session.run(None, {"data": batch})[0]
    assert out.shape == (2, 3309)
    np.testing.assert_allclose(out[:, -LANDMARK_3D_POINTS * 3 :], [points.ravel()] * 2, atol=1e-6)
    assert not out[:, : -LANDMARK_3D_POINTS * 3].any()


# -- `weights download --with landmarks3d,genderage` from a stand-in release page --------------


@pytest.fixture()
def fake_hub(tiny_weights, tmp_path, monkeypatch):
    """Serves the tiny profile's files under the real repos' file names (as
    test_weights_download's fixture does)."""
    served = tmp_path / "hub"
    for entry in weights.load_package_manifest()["files"]:
        source = entry["source"]
        if source["type"] != "huggingface":
            continue
        target = served / source["repo_id"] / source["filename"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if source["filename"] == "encoder/pytorch_model.bin":
            torch.save(load_file(tiny_weights.root / "encoder" / "model.safetensors"), target)
        else:
            shutil.copyfile(tiny_weights.root / entry["path"], target)

    def hf_hub_download(*, repo_id, filename, revision, local_dir, token=None):
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(served / repo_id / filename, out)
        return str(out)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)


@pytest.fixture()
def buffalo_l_server(tiny_weights, tmp_path, monkeypatch):
    """buffalo_l.zip on 127.0.0.1 with the tiny detector and attribute models under their
    real names, the package manifest's URLs rewritten to it. Counts requests."""
    folder = tmp_path / "release"
    folder.mkdir()
    with zipfile.ZipFile(folder / "buffalo_l.zip", "w") as pack:
        for name in ("det_10g.onnx", *GROUPS):
            pack.write(tiny_weights.root / name, name)
        pack.writestr("w600k_r50.onnx", b"not needed by digi2real")
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    package = json.loads(json.dumps(weights.load_package_manifest()))
    for entry in package["files"]:
        if "url" in entry["source"]:
            entry["source"]["url"] = entry["source"]["url"].replace(RELEASES, base)
    for module in (fetch, manifest_module):
        monkeypatch.setattr(module, "load_package_manifest", lambda: package)
    yield requests
    server.shutdown()
    server.server_close()


def test_download_with_attribute_groups_extracts_them_from_the_pack(
    fake_hub, buffalo_l_server, tiny_weights, tmp_path
):
    root = tmp_path / "real"
    assert weights.download(root).ok
    assert buffalo_l_server == ["/buffalo_l.zip"]  # the detector only
    opened = weights.open_weights(root)
    digest = opened.digest
    assert not opened.has("landmarks3d") and not opened.has("genderage")
    assert AttributeModels(opened).available == ()
    argv = ["weights", "download", "--dir", str(root), "--with", "landmarks3d,genderage"]
    assert main(argv) == 0
    # one more download of the pack, for both members
    assert buffalo_l_server == ["/buffalo_l.zip", "/buffalo_l.zip"]
    opened = weights.open_weights(root)
    assert opened.has("landmarks3d") and opened.has("genderage")
    assert opened.digest == digest  # optional files leave the dir's digest alone
    entries = {e["path"]: e for e in opened.files}
    licences = {e["path"]: e for e in opened.licenses()}
    for rel, group in GROUPS.items():
        assert (root / rel).read_bytes() == (tiny_weights.root / rel).read_bytes()
        entry = entries[rel]
        assert entry["optional"] == group and entry["trust"] == "first-use"
        assert entry["source"]["member"] == rel and entry["source"]["sha256_of_source"]
        assert licences[rel]["commercial"] is False
        assert licences[rel]["license"] == licences["det_10g.onnx"]["license"]
    assert not (root / ".download").exists()
    assert weights.verify(root).ok
    models = AttributeModels(opened)
    assert models.available == ("landmarks3d", "genderage")
    assert all(v is not None for v in models.estimate(image(), detection()).values())
    # a recorded optional file that goes missing: verify says how to get it back
    (root / "genderage.onnx").unlink()
    problems = weights.verify(root).problems
    [line] = [p for p in problems if "genderage.onnx" in p]
    assert "buffalo_l.zip" in line and "--with genderage" in line


def test_download_fetches_the_pack_once_for_all_its_members(fake_hub, buffalo_l_server, tmp_path):
    root = tmp_path / "real"
    assert weights.download(root, with_=("landmarks3d", "genderage")).ok
    assert buffalo_l_server == ["/buffalo_l.zip"]  # det_10g, 1k3d68 and genderage from one
    paths = {e["path"] for e in weights.open_weights(root).files}
    assert {"det_10g.onnx", *GROUPS} <= paths
    # resumable: nothing fetched again
    assert weights.download(root, with_=("landmarks3d", "genderage")).ok
    assert buffalo_l_server == ["/buffalo_l.zip"]
