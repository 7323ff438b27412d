"""The flat labelled layouts (data/labelled.py): detection, scanning, labels, masks."""

from __future__ import annotations

import io
import json
import secrets
from pathlib import Path

import numpy as np
import pytest
from labelled_fixtures import (
    IGNORE,
    LEFT_EYE,
    LEFT_PUPIL,
    NOSE_TIP,
    RIGHT_EYE,
    RIGHT_PUPIL,
    head_pose_for,
    landmarks_for,
    make_facesynthetics,
    make_synthface,
    relative_rotation,
    rot_x,
    rot_y,
    rot_z,
)
from PIL import Image

from digi2real.data.labelled import (
    LABELLED_LAYOUTS,
    NUM_LANDMARKS,
    SEGMENTATION_CLASSES,
    SOURCE_LAYOUTS,
    STAGE_LABELS,
    SYNTHFACE_MASKS,
    LabelError,
    LayoutError,
    RenderLabels,
    detect_layout,
    head_pose_angles,
    read_labels,
    read_mask,
    scan_labelled,
)
from digi2real.data.readers import IdentitySelection
from digi2real.data.store import ObjectPath, location

SIZE = 128  # small renders keep the fixtures fast; the READMEs' 512 is the builders' default


@pytest.fixture
def facesynthetics(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "dataset_100"
    return root, make_facesynthetics(root, 3, size=SIZE)


@pytest.fixture
def synthface(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    root = tmp_path / "synth_face"
    return root, make_synthface(root, 2, 3, size=SIZE)


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, format="PNG")
    return path


# -- constants -----------------------------------------------------------------------------------


def test_constants_follow_the_readmes() -> None:
    assert LABELLED_LAYOUTS == ("facesynthetics", "synthface")
    assert SOURCE_LAYOUTS == ("auto", "folders", "facesynthetics", "synthface")
    assert STAGE_LABELS == "labels"
    assert sorted(SEGMENTATION_CLASSES) == [*range(19), 255]
    assert SEGMENTATION_CLASSES[1] == "SKIN" and SEGMENTATION_CLASSES[18] == "FACEWEAR"
    assert SEGMENTATION_CLASSES[3] == "RIGHT_EYE" and SEGMENTATION_CLASSES[255] == "IGNORE"
    assert len(SYNTHFACE_MASKS) == 8 and "clothing" in SYNTHFACE_MASKS
    assert NUM_LANDMARKS == 70


# -- fixtures are what the READMEs describe ----------------------------------------------------


def test_facesynthetics_fixture_files(facesynthetics) -> None:
    root, truth = facesynthetics
    assert sorted(p.name for p in root.iterdir()) == sorted(
        f"00000{i}{suffix}" for i in range(3) for suffix in (".png", "_seg.png", "_ldmks.txt")
    )
    lines = (root / "000001_ldmks.txt").read_text().splitlines()
    assert len(lines) == 70 and all(len(line.split(" ")) == 2 for line in lines)
    assert truth["000001"].shape == (70, 2)
    image = Image.open(root / "000001.png")
    assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))
    assert np.asarray(image).std() > 10  # a drawn face, not a blank image
    seg = Image.open(root / "000000_seg.png")
    assert seg.mode == "L"
    values = np.asarray(seg)
    assert set(np.unique(values)) <= set(range(18)) | {IGNORE}  # never FACEWEAR 18
    assert {1, 2, 3, 4, 5, 6, 10, 11, 13, IGNORE} <= set(np.unique(values))
    # classes agree with the landmarks: pupils in their eyes, the nose tip on the nose
    points = np.rint(truth["000000"]).astype(int)
    assert values[points[LEFT_PUPIL, 1], points[LEFT_PUPIL, 0]] == 4  # LEFT_EYE
    assert values[points[RIGHT_PUPIL, 1], points[RIGHT_PUPIL, 0]] == 3  # RIGHT_EYE
    assert values[points[NOSE_TIP, 1], points[NOSE_TIP, 0]] == 2


def test_synthface_fixture_files(synthface) -> None:
    root, truth = synthface
    names = {p.name for p in root.iterdir()}
    assert len(names) == 2 * 3 * 5  # jpg, json, parts, hair, clothing
    assert "img_0000001_002.jpg" in names and "segm_clothing_0000001_002.png" in names
    assert set(truth) == {f"img_{i:07d}_{f:03d}.jpg" for i in range(2) for f in range(3)}
    meta = json.loads((root / "metadata_0000000_000.json").read_text())
    assert set(meta) == {"camera", "head_pose", "left_eye_pose", "right_eye_pose", "landmarks"}
    assert set(meta["camera"]) == {"world_to_camera", "camera_to_image", "resolution"}
    assert np.asarray(meta["camera"]["world_to_camera"]).shape == (4, 4)
    assert meta["camera"]["resolution"] == [SIZE, SIZE]
    assert np.allclose(meta["head_pose"], np.diag([-1, 1, -1]))  # frame 0 is frontal
    assert np.asarray(meta["landmarks"]["2D"]).shape == (70, 2)
    parts = Image.open(root / "segm_parts_0000000_001.png")
    assert parts.mode == "L" and np.asarray(parts).max() <= 12
    hair = Image.open(root / "segm_hair_0000000_001.png")
    assert hair.mode == "L" and set(np.unique(np.asarray(hair))) == {0, 255}
    assert Image.open(root / "img_0000000_001.jpg").format == "JPEG"


def test_landmarks_for_is_a_plausible_face() -> None:
    frontal = landmarks_for(0.0, 512)
    assert frontal.shape == (70, 2)
    # subject's left eye (42-47) is on the image's right, pupils inside their eye contours
    assert frontal[LEFT_EYE, 0].mean() > frontal[RIGHT_EYE, 0].mean()
    for pupil, eye in ((LEFT_PUPIL, LEFT_EYE), (RIGHT_PUPIL, RIGHT_EYE)):
        low, high = frontal[eye].min(axis=0), frontal[eye].max(axis=0)
        assert np.all(frontal[pupil] > low) and np.all(frontal[pupil] < high)
    assert np.all(frontal > 0) and np.all(frontal < 512)
    assert abs(frontal[NOSE_TIP, 0] - 256) < 1e-9
    turned = landmarks_for(30.0, 512)
    assert turned[NOSE_TIP, 0] > frontal[NOSE_TIP, 0] + 20  # positive yaw: nose moves right
    assert landmarks_for(0.0, 512, pitch=20)[NOSE_TIP, 1] > frontal[NOSE_TIP, 1]  # down


# -- detection -----------------------------------------------------------------------------------


def test_detect_each_layout(tmp_path, facesynthetics, synthface) -> None:
    assert detect_layout(facesynthetics[0]) == "facesynthetics"
    assert detect_layout(str(synthface[0])) == "synthface"
    folders = tmp_path / "folders"
    _png(folders / "alice" / "0.png", np.zeros((4, 4, 3), np.uint8))
    _png(folders / "bob" / "0.png", np.zeros((4, 4, 3), np.uint8))
    (folders / "README.md").write_text("x")
    (folders / ".DS_Store").write_text("x")
    assert detect_layout(folders) == "folders"


def test_detect_ignores_hidden_entries_and_stray_files(facesynthetics) -> None:
    root, _ = facesynthetics
    (root / ".cache").mkdir()
    (root / "__MACOSX").mkdir()
    (root / "README.txt").write_text("readme")
    (root / ".000009.png").write_bytes(b"x")
    assert detect_layout(root) == "facesynthetics"


def test_detect_refuses_both_labelled_layouts(facesynthetics) -> None:
    root, _ = facesynthetics
    make_synthface(root, 1, 1, size=64)
    with pytest.raises(LayoutError) as caught:
        detect_layout(root)
    message = str(caught.value)
    assert "FaceSynthetics" in message and "SynthFace" in message
    assert "source.layout" in message and "\n" not in message
    assert "9 FaceSynthetics file(s)" in message and "'000000.png'" in message


def test_detect_refuses_identity_folders_beside_labelled_files(synthface) -> None:
    root, _ = synthface
    (root / "alice").mkdir()
    with pytest.raises(
        LayoutError, match=r"1 identity folder\(s\) \(e\.g\. 'alice'\).*source\.layout"
    ):
        detect_layout(root)


def test_detect_refuses_empty_and_unrecognisable_roots(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayoutError, match="nothing to convert: .*empty is empty$"):
        detect_layout(empty)
    # numbered PNGs with no label siblings (e.g. one DigiFace identity folder): not FaceSynthetics
    numbered = tmp_path / "numbered"
    for index in range(5):
        _png(numbered / f"{index}.png", np.zeros((4, 4, 3), np.uint8))
    (numbered / "notes.txt").write_text("x")
    with pytest.raises(LayoutError) as caught:
        detect_layout(numbered)
    # the likely mistake is named: SRC is one identity's folder
    assert "holds 5 image(s) (e.g. '0.png', '1.png', '2.png', ...) and no identity folder" in str(
        caught.value
    )
    assert "looks like one identity's folder" in str(caught.value)
    (labels_only := tmp_path / "labels_only").mkdir()
    (labels_only / "notes.txt").write_text("x")
    with pytest.raises(LayoutError, match=r"cannot tell the layout .* 1 other file\(s\)"):
        detect_layout(labels_only)
    with pytest.raises(FileNotFoundError):
        detect_layout(tmp_path / "absent")
    with pytest.raises(NotADirectoryError):
        detect_layout(numbered / "notes.txt")


def test_detect_refuses_synthbody_and_synthhand(tmp_path) -> None:
    body = tmp_path / "synth_body"
    make_synthface(body, 1, 1, size=64, masks=())
    with pytest.raises(LayoutError, match="SynthBody.*only SynthFace"):
        detect_layout(body)


# -- scanning ------------------------------------------------------------------------------------


def test_scan_facesynthetics_one_identity_per_frame(facesynthetics) -> None:
    root, truth = facesynthetics
    sources, rows = scan_labelled(root, "facesynthetics")
    assert rows == []
    assert [source.name for source in sources] == ["000000", "000001", "000002"]
    assert [source.files for source in sources] == [[root / f"{s}.png"] for s in sorted(truth)]
    assert all(source.folder == source.name for source in sources)


def test_scan_synthface_groups_frames_by_identity(synthface) -> None:
    root, _ = synthface
    for frame in (10, 4):  # frames sort by number, label and mask files never listed
        (root / f"img_0000001_{frame:03d}.jpg").write_bytes(b"jpeg")
    sources, rows = scan_labelled(root, "synthface")
    assert rows == []
    assert [source.name for source in sources] == ["0000000", "0000001"]
    assert [p.name for p in sources[0].files] == [f"img_0000000_{f:03d}.jpg" for f in range(3)]
    assert [p.name for p in sources[1].files][-2:] == ["img_0000001_004.jpg", "img_0000001_010.jpg"]


def test_scan_applies_the_selection(facesynthetics, synthface) -> None:
    root, _ = facesynthetics
    names = lambda select: [s.name for s in scan_labelled(root, "facesynthetics", select=select)[0]]  # noqa: E731
    assert names("2") == ["000000", "000001"]
    assert names("1:") == ["000001", "000002"]
    assert names(IdentitySelection.of_names(["000002"])) == ["000002"]
    with pytest.raises(ValueError, match="not in the dataset"):
        names("names:000009")
    sources, _ = scan_labelled(synthface[0], "synthface", select="names:0000001")
    assert [s.name for s in sources] == ["0000001"] and len(sources[0].files) == 3


def test_scan_ignores_strays_and_reports_skipped_items(tmp_path, facesynthetics) -> None:
    root, _ = facesynthetics
    (root / "README.md").write_text("x")
    (root / "photo.jpg").write_bytes(b"x")  # not a FaceSynthetics name: ignored
    (root / "000007_ldmks.txt").write_text("orphan label")  # a label file is never an image
    (root / "000008_seg.png").write_bytes(b"x")
    (root / ".000009.png").write_bytes(b"x")  # hidden
    (root / "\u0661\u0662.png").write_bytes(b"x")  # Arabic-Indic digits: not a frame name
    (root / "000005.png").mkdir()  # an image name that is a folder
    (root / "extras").mkdir()  # a labelled layout is flat
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    (root / "000006.png").symlink_to(outside)
    (root / "000004.png").symlink_to(root / "gone.png")
    (root / "000003.png").symlink_to(root / "000000.png")  # inside the root: kept
    sources, rows = scan_labelled(root, "facesynthetics")
    assert [s.name for s in sources] == ["000000", "000001", "000002", "000003"]
    by_path = {row.path: row for row in rows}
    assert set(by_path) == {"000004.png", "000005.png", "000006.png", "extras"}
    assert by_path["000004.png"].reason == "broken symlink"
    assert by_path["000005.png"].reason == "not a regular file"
    assert by_path["000006.png"].reason == "symlink resolves outside the dataset root"
    assert by_path["000006.png"].identity == "000006"
    assert by_path["extras"].identity == "" and "flat" in by_path["extras"].reason
    assert all(row.stage == "scan" for row in rows)
    # a skipped identity named explicitly is not an unknown name, just not returned
    sources, _ = scan_labelled(root, "facesynthetics", select="names:000006,000001")
    assert [s.name for s in sources] == ["000001"]


def test_scan_refuses_bad_arguments(tmp_path, facesynthetics) -> None:
    with pytest.raises(ValueError, match="unknown labelled layout"):
        scan_labelled(facesynthetics[0], "folders")
    with pytest.raises(FileNotFoundError):
        scan_labelled(tmp_path / "absent", "synthface")


@pytest.fixture
def store_root(tmp_path) -> ObjectPath:
    """A FaceSynthetics and a SynthFace copy in fsspec's in-memory store."""
    base = location(f"memory://labelled-{secrets.token_hex(4)}")
    assert isinstance(base, ObjectPath)
    make_facesynthetics(tmp_path / "fs", 2, size=64)
    make_synthface(tmp_path / "sf", 1, 2, size=64)
    for folder in ("fs", "sf"):
        for path in (tmp_path / folder).iterdir():
            base.fs.pipe_file(f"{base.key}/{folder}/{path.name}", path.read_bytes())
    return base


def test_object_store_roots(store_root, tmp_path) -> None:
    fs_root, sf_root = store_root / "fs", store_root / "sf"
    assert detect_layout(str(fs_root)) == "facesynthetics"
    assert detect_layout(sf_root) == "synthface"
    assert detect_layout(store_root) == "folders"
    sources, rows = scan_labelled(fs_root, "facesynthetics")
    assert rows == [] and [s.files for s in sources] == [
        [fs_root / "000000.png"],
        [fs_root / "000001.png"],
    ]
    sources, rows = scan_labelled(str(sf_root), "synthface")
    assert rows == [] and [p.name for p in sources[0].files] == [
        "img_0000000_000.jpg",
        "img_0000000_001.jpg",
    ]

    local = read_labels(tmp_path / "sf", "img_0000000_001.jpg", "synthface")
    remote = read_labels(sf_root, "img_0000000_001.jpg", "synthface")
    assert np.array_equal(local.landmarks, remote.landmarks)
    assert (remote.scalars, remote.segmentation, remote.masks, remote.size) == (
        local.scalars,
        local.segmentation,
        local.masks,
        local.size,
    )
    remote = read_labels(fs_root, "000001.png", "facesynthetics")
    assert remote.segmentation == "000001_seg.png"
    assert np.array_equal(
        remote.landmarks, read_labels(tmp_path / "fs", "000001.png", "facesynthetics").landmarks
    )
    assert np.array_equal(
        read_mask(sf_root, "segm_parts_0000000_000.png"),
        read_mask(tmp_path / "sf", "segm_parts_0000000_000.png"),
    )
    with pytest.raises(LabelError, match="missing landmarks file 000009_ldmks.txt"):
        read_labels(fs_root, "000009.png", "facesynthetics")


# -- labels round trip ---------------------------------------------------------------------------


def test_facesynthetics_labels_round_trip(facesynthetics) -> None:
    root, truth = facesynthetics
    for stem, points in truth.items():
        labels = read_labels(root, f"{stem}.png", "facesynthetics")
        assert isinstance(labels, RenderLabels)
        assert labels.landmarks.shape == (70, 2) and labels.landmarks.dtype == np.float64
        np.testing.assert_allclose(labels.landmarks, points, atol=1e-6, rtol=0)
        assert labels.segmentation == f"{stem}_seg.png"
        assert (labels.scalars, labels.masks, labels.size) == ({}, {}, None)
    (root / "000001_seg.png").unlink()  # a missing segmentation is not an error
    assert read_labels(root, "000001.png", "facesynthetics").segmentation is None


def test_synthface_labels_round_trip(synthface) -> None:
    root, truth = synthface
    for relative, expected in truth.items():
        labels = read_labels(root, relative, "synthface")
        np.testing.assert_allclose(labels.landmarks, expected["landmarks"], atol=1e-6, rtol=0)
        assert set(labels.scalars) == {"yaw", "pitch", "roll"}
        for key in ("yaw", "pitch", "roll"):
            assert labels.scalars[key] == pytest.approx(expected[key], abs=1e-6)
        suffix = relative.removeprefix("img_").removesuffix(".jpg")
        assert labels.segmentation == f"segm_parts_{suffix}.png"
        assert labels.masks == {
            "hair": f"segm_hair_{suffix}.png",
            "clothing": f"segm_clothing_{suffix}.png",
        }
        assert labels.size == (SIZE, SIZE)
    assert any(abs(item["yaw"]) > 5 for item in truth.values())  # the poses do vary


def test_synthface_given_yaws_and_all_masks(tmp_path) -> None:
    root = tmp_path / "synth_face"
    truth = make_synthface(root, 1, 3, size=64, yaws=[-60.0, 0.0, 75.0], masks=SYNTHFACE_MASKS)
    yaws = [read_labels(root, name, "synthface").scalars["yaw"] for name in sorted(truth)]
    assert yaws == pytest.approx([-60.0, 0.0, 75.0], abs=1e-6)
    labels = read_labels(root, "img_0000000_000.jpg", "synthface")
    assert list(labels.masks) == list(SYNTHFACE_MASKS)
    (root / "segm_parts_0000000_000.png").unlink()
    (root / "segm_glasses_0000000_000.png").unlink()
    labels = read_labels(root, "img_0000000_000.jpg", "synthface")
    assert labels.segmentation is None and "glasses" not in labels.masks


def test_labels_of_an_image_in_a_sub_folder(tmp_path) -> None:
    make_facesynthetics(tmp_path / "part", 1, size=64)
    labels = read_labels(tmp_path, "part/000000.png", "facesynthetics")
    assert labels.segmentation == "part/000000_seg.png"


# -- head pose conventions -----------------------------------------------------------------------


def test_frontal_head_pose_is_zero() -> None:
    assert head_pose_angles(np.diag([-1.0, 1.0, -1.0])) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "angles",
    [
        (30.0, 0.0, 0.0),
        (-50.0, 10.0, 5.0),
        (0.0, -25.0, 0.0),
        (0.0, 0.0, 40.0),
        (170.0, -80.0, -170.0),
    ],
)
def test_head_pose_angles_invert_the_construction(angles) -> None:
    yaw, pitch, roll = angles
    rotation = rot_y(-yaw) @ rot_x(pitch) @ rot_z(roll) @ np.diag([-1.0, 1.0, -1.0])
    assert head_pose_angles(rotation) == pytest.approx(angles, abs=1e-6)


def test_head_pose_signs_by_projecting_the_nose_and_the_head_top() -> None:
    # OpenCV camera: x right, y down, z forward; a frontal face points its nose at -z
    nose, top = np.array([0.0, 0.0, -1.0]), np.array([0.0, -1.0, 0.0])
    for axis, degrees in (("yaw", 20.0), ("pitch", 20.0), ("roll", 20.0)):
        kwargs = {"yaw": 0.0, "pitch": 0.0, "roll": 0.0, axis: degrees}
        pose = head_pose_for(**kwargs)
        yaw, pitch, roll = head_pose_angles(pose)
        relative = pose @ np.diag([-1.0, 1.0, -1.0])
        moved_nose, moved_top = relative @ nose, relative @ top
        if axis == "yaw":
            assert yaw > 0 and moved_nose[0] > 0.3  # the nose moves toward the image's right
        if axis == "pitch":
            assert pitch > 0 and moved_nose[1] > 0.3  # the nose moves down
        if axis == "roll":
            assert roll > 0 and moved_top[0] > 0.3  # the head's top leans right: clockwise
    # and the landmarks a camera would see agree: the projected nose tip moves the same way
    frontal = landmarks_for(0.0, 512)[NOSE_TIP]
    assert landmarks_for(20.0, 512)[NOSE_TIP][0] > frontal[0]
    assert np.allclose(relative_rotation(20.0) @ nose, head_pose_for(20.0) @ np.array([0, 0, 1.0]))


def test_head_pose_gimbal_lock_and_bad_input() -> None:
    yaw, pitch, roll = head_pose_angles(head_pose_for(30.0, 90.0, 0.0))
    assert pitch == pytest.approx(90.0) and roll == 0.0 and yaw == pytest.approx(30.0)
    with pytest.raises(ValueError, match="3x3"):
        head_pose_angles(np.eye(4))
    with pytest.raises(ValueError, match="finite"):
        head_pose_angles(np.full((3, 3), np.nan))


# -- malformed and missing label files -----------------------------------------------------------


def _ldmks(points: np.ndarray) -> str:
    return "".join(f"{x:.6f} {y:.6f}\n" for x, y in points)


def test_landmark_text_is_parsed_tolerantly(facesynthetics) -> None:
    root, truth = facesynthetics
    points = truth["000000"]
    variants = [
        _ldmks(points).rstrip("\n"),  # no final newline
        _ldmks(points).replace(" ", "   ").replace("\n", "  \n"),  # extra spaces
        _ldmks(points).replace("\n", "\r\n") + "\n\n",  # CRLF, trailing blank lines
        "".join(f"\t{float(x)!r}\t{float(y)!r}\n" for x, y in points),  # tabs, full precision
        "\ufeff" + _ldmks(points),  # a byte-order mark
    ]
    for text in variants:
        (root / "000000_ldmks.txt").write_text(text, encoding="utf-8", newline="")
        labels = read_labels(root, "000000.png", "facesynthetics")
        np.testing.assert_allclose(labels.landmarks, points, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "missing landmarks file 000001_ldmks.txt"),
        ("68 rows", "malformed landmarks file 000001_ldmks.txt: 68 rows, expected 70"),
        ("", "0 rows, expected 70"),
        ("three values", "row 5 has 3 values, expected 2"),
        ("comma", "row 1 has 1 values, expected 2"),
        ("not a number", "row 70 is not two numbers"),
        ("nan", "row 3 is not finite"),
        (b"\xff\xfe" + b"1 2\n" * 70, "not UTF-8"),
        (b"1.0 2.0\n" * 200_000, "larger than 1 MiB"),
        ("folder", "000001_ldmks.txt is not a regular file"),
    ],
)
def test_bad_landmark_files(facesynthetics, content, reason) -> None:
    root, truth = facesynthetics
    path = root / "000001_ldmks.txt"
    lines = _ldmks(truth["000001"]).splitlines(keepends=True)
    path.unlink()
    if content == "68 rows":
        path.write_text("".join(lines[:68]))
    elif content == "":
        path.write_text("")
    elif content == "three values":
        lines[4] = "1.0 2.0 3.0\n"
        path.write_text("".join(lines))
    elif content == "comma":
        lines[0] = "1.0,2.0\n"
        path.write_text("".join(lines))
    elif content == "not a number":
        lines[69] = "1.0 abc\n"
        path.write_text("".join(lines))
    elif content == "nan":
        lines[2] = "nan 2.0\n"
        path.write_text("".join(lines))
    elif content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(LabelError) as caught:
        read_labels(root, "000001.png", "facesynthetics")
    assert reason in caught.value.reason and "\n" not in caught.value.reason
    assert caught.value.path == "000001_ldmks.txt"
    assert str(caught.value) == caught.value.reason


def _edit_metadata(root: Path, change) -> None:
    path = root / "metadata_0000000_001.json"
    meta = json.loads(path.read_text())
    result = change(meta)
    path.write_text(json.dumps(meta if result is None else result))


def _pop(meta, *path) -> None:
    target = meta
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


def _set(meta, path, value):
    target = meta
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: [1, 2], "the JSON is a list of 2, expected an object"),
        (lambda m: _pop(m, "head_pose"), "no head_pose"),
        (
            lambda m: _set(m, ["head_pose"], [[1, 0, 0], [0, 1, 0]]),
            "head_pose is 2x3, expected 3x3",
        ),
        (lambda m: _set(m, ["head_pose"], "3x3 rotation matrix"), "head_pose is a string"),
        (lambda m: _set(m, ["head_pose"], [[1, 0, 0], [0, 1, 0], [0, 0, "1"]]), "not numbers"),
        (lambda m: _set(m, ["head_pose"], [[1, 0, 0], [0, True, 0], [0, 0, 1]]), "not numbers"),
        (
            lambda m: _set(m, ["head_pose"], (1.01 * np.eye(3)).tolist()),
            "head_pose is not a rotation",
        ),
        (
            lambda m: _set(m, ["head_pose"], np.diag([1.0, 1.0, -1.0]).tolist()),
            "head_pose is a reflection",
        ),
        (
            lambda m: _set(m, ["head_pose"], [[float("nan")] * 3] * 3),
            "head_pose holds values that are not finite",
        ),
        (lambda m: _pop(m, "landmarks"), "no landmarks.2D"),
        (lambda m: _set(m, ["landmarks"], {"3D_cam": []}), "no landmarks.2D"),
        (
            lambda m: _set(m, ["landmarks", "2D"], [[1.0, 2.0]] * 52),
            "landmarks.2D is 52x2, expected 70x2",
        ),
        (lambda m: _set(m, ["landmarks", "2D"], [[1.0, 2.0, 3.0]] * 70), "landmarks.2D is 70x3"),
        (lambda m: _set(m, ["landmarks", "2D"], [[1.0, float("inf")]] * 70), "not finite"),
        (lambda m: _set(m, ["camera", "resolution"], [512]), "camera.resolution is a list of 1"),
        (lambda m: _set(m, ["camera", "resolution"], [512, 0]), "expected [width, height]"),
        (lambda m: _set(m, ["camera"], "pinhole"), "camera is a string, expected an object"),
    ],
)
def test_bad_metadata(synthface, change, reason) -> None:
    root, _ = synthface
    _edit_metadata(root, change)
    with pytest.raises(LabelError) as caught:
        read_labels(root, "img_0000000_001.jpg", "synthface")
    assert caught.value.reason.startswith("malformed metadata file metadata_0000000_001.json: ")
    assert reason in caught.value.reason and "\n" not in caught.value.reason
    assert caught.value.path == "metadata_0000000_001.json"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "missing metadata file metadata_0000000_001.json"),
        (b'{"head_pose": ', "not valid JSON"),
        (b"\xff" * 10, "not UTF-8"),
        ("{}".encode("utf-16"), "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
        (b'{"pad": "' + b"x" * (1 << 20) + b'"}', "larger than 1 MiB"),
        (b'{"n": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_bad_metadata_files(synthface, content, reason) -> None:
    root, _ = synthface
    path = root / "metadata_0000000_001.json"
    path.unlink()
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LabelError) as caught:
        read_labels(root, "img_0000000_001.jpg", "synthface")
    assert reason in caught.value.reason and "\n" not in caught.value.reason


def test_missing_resolution_is_no_size(synthface) -> None:
    root, _ = synthface
    _edit_metadata(root, lambda m: _pop(m, "camera", "resolution"))
    assert read_labels(root, "img_0000000_001.jpg", "synthface").size is None
    _edit_metadata(root, lambda m: _pop(m, "camera"))
    assert read_labels(root, "img_0000000_001.jpg", "synthface").size is None


def test_read_labels_refuses_bad_names(facesynthetics) -> None:
    root, _ = facesynthetics
    with pytest.raises(LabelError, match="not a FaceSynthetics image name"):
        read_labels(root, "000000_seg.png", "facesynthetics")
    with pytest.raises(LabelError, match="not a SynthFace image name"):
        read_labels(root, "000000.png", "synthface")
    with pytest.raises(LabelError, match="not a path relative"):
        read_labels(root, "../000000.png", "facesynthetics")
    with pytest.raises(LabelError, match="not a path relative"):
        read_labels(root, str(root / "000000.png"), "facesynthetics")
    with pytest.raises(ValueError, match="unknown labelled layout"):
        read_labels(root, "000000.png", "digiface")


# -- masks ---------------------------------------------------------------------------------------


def test_read_mask_keeps_stored_values(tmp_path, facesynthetics) -> None:
    root, _ = facesynthetics
    stored = np.asarray(Image.open(root / "000000_seg.png"))
    mask = read_mask(root, "000000_seg.png")
    assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE)
    assert np.array_equal(mask, stored) and IGNORE in mask
    values = np.arange(20, dtype=np.uint8).reshape(4, 5)
    palette = Image.fromarray(values, mode="L").convert("P")  # indices, not colours
    palette.putpalette([255 - v for v in range(256)] * 3)
    palette.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.array_equal(read_mask(tmp_path, "p.png"), np.asarray(Image.open(tmp_path / "p.png")))


@pytest.mark.parametrize(
    ("mode", "array"),
    [
        ("RGB", np.zeros((4, 4, 3), np.uint8)),
        ("RGBA", np.zeros((4, 4, 4), np.uint8)),
        ("LA", np.zeros((4, 4, 2), np.uint8)),
        ("I;16", np.full((4, 4), 300, np.uint16)),
    ],
)
def test_read_mask_refuses_other_modes(tmp_path, mode, array) -> None:
    Image.fromarray(array).save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == mode
    with pytest.raises(LabelError, match=f"has mode {mode}, expected 8-bit single channel"):
        read_mask(tmp_path, "m.png")


def test_read_mask_refuses_hostile_and_broken_files(tmp_path, monkeypatch) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    (tmp_path / "eps.png").write_bytes(eps)
    gif = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(gif, format="GIF")
    (tmp_path / "gif.png").write_bytes(gif.getvalue())
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(jpeg, format="JPEG")
    (tmp_path / "jpeg.png").write_bytes(jpeg.getvalue())
    for name in ("eps.png", "gif.png", "jpeg.png"):
        with pytest.raises(LabelError, match=f"mask {name} is not a PNG"):
            read_mask(tmp_path, name)
    good = _png(
        tmp_path / "good.png", np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
    )
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(LabelError, match="mask cut.png is corrupt"):
        read_mask(tmp_path, "cut.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(LabelError, match="not a PNG"):
        read_mask(tmp_path, "empty.png")
    with pytest.raises(LabelError, match="missing mask file absent.png"):
        read_mask(tmp_path, "absent.png")
    with pytest.raises(LabelError, match=r"too large \(64x64 > 1000 pixels\)"):
        read_mask(tmp_path, "good.png", max_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 4096 > 2x: Pillow's bomb error
    with pytest.raises(LabelError, match="decompression bomb"):
        read_mask(tmp_path, "good.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 in 1x..2x: Pillow's warning
    with pytest.raises(LabelError, match="decompression bomb"):
        read_mask(tmp_path, "good.png")
    with pytest.raises(LabelError, match="not a path relative"):
        read_mask(tmp_path, "../good.png")
