"""Tiny FaceSynthetics and SynthFace datasets on disk, built as their READMEs describe.

FaceSynthetics (flat)::

    {i:06d}.png  {i:06d}_seg.png  {i:06d}_ldmks.txt

SynthFace (flat, ``synth_face/``)::

    img_{id:07d}_{f:03d}.jpg  metadata_{id:07d}_{f:03d}.json  segm_parts_{id:07d}_{f:03d}.png
    segm_{mask}_{id:07d}_{f:03d}.png

Each image is a simple drawn face (skin-coloured head, dark eyes, red lips, hair) whose
landmarks, segmentation and pose all agree: landmarks come from a 3D template of the 68 iBUG
points plus the two pupils, turned by the pose and projected orthographically. The head pose
matrices are built here, independently of ``digi2real.data.labelled``, with the convention its
``head_pose_angles`` reads: ``head_pose = Ry(-yaw) @ Rx(pitch) @ Rz(roll) @ diag(-1, 1, -1)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# The subject's right eye is on the image's left for a frontal face.
RIGHT_EYE = slice(36, 42)
LEFT_EYE = slice(42, 48)
LEFT_PUPIL, RIGHT_PUPIL = 68, 69
NOSE_TIP = 30

SKIN, NOSE, RIGHT_EYE_ID, LEFT_EYE_ID, RIGHT_BROW, LEFT_BROW = 1, 2, 3, 4, 5, 6
MOUTH_INTERIOR, TOP_LIP, BOTTOM_LIP, NECK, HAIR, IGNORE = 9, 10, 11, 12, 13, 255


def _template() -> np.ndarray:
    """(70, 3) frontal points in face units: x right, y down, depth toward the camera."""
    points = np.zeros((70, 3))
    # jaw 0..16, from the subject's right ear (image left) round the chin
    theta = np.linspace(0.0, math.pi, 17)
    points[0:17] = np.column_stack(
        [-0.48 * np.cos(theta), 0.55 * np.sin(theta), -0.35 * np.abs(np.cos(theta))]
    )
    arch = np.sin(np.linspace(0.0, math.pi, 5))
    for start, xs in ((17, np.linspace(-0.40, -0.08, 5)), (22, np.linspace(0.08, 0.40, 5))):
        points[start : start + 5] = np.column_stack([xs, -0.22 - 0.05 * arch, np.full(5, 0.08)])
    points[27:31] = np.column_stack(
        [np.zeros(4), np.linspace(-0.14, 0.12, 4), np.linspace(0.10, 0.30, 4)]
    )
    points[31:36] = np.column_stack(
        [np.linspace(-0.10, 0.10, 5), np.full(5, 0.18), [0.12, 0.16, 0.20, 0.16, 0.12]]
    )
    width, height = 0.09, 0.035
    for start, centre in ((36, -0.2), (42, 0.2)):  # corner, top, top, corner, bottom, bottom
        xs = centre + width * np.array([-1.0, -1 / 3, 1 / 3, 1.0, 1 / 3, -1 / 3])
        ys = -0.1 + height * np.array([0.0, -1.0, -1.0, 0.0, 1.0, 1.0])
        points[start : start + 6] = np.column_stack([xs, ys, np.full(6, 0.05)])
    mouth_w, mouth_y = 0.17, 0.36
    thirds = np.array([-2 / 3, -1 / 3, 0.0, 1 / 3, 2 / 3])
    points[48] = [-mouth_w, mouth_y, 0.08]
    points[49:54] = np.column_stack(
        [mouth_w * thirds, mouth_y - 0.05 + 0.02 * np.abs(thirds), 0.15 - 0.05 * np.abs(thirds)]
    )
    points[54] = [mouth_w, mouth_y, 0.08]
    points[55:60] = np.column_stack(
        [-mouth_w * thirds, mouth_y + 0.06 - 0.02 * np.abs(thirds), 0.15 - 0.05 * np.abs(thirds)]
    )
    inner = np.array([-1 / 3, 0.0, 1 / 3])
    points[60] = [-0.8 * mouth_w, mouth_y, 0.10]
    points[61:64] = np.column_stack([mouth_w * inner, np.full(3, mouth_y - 0.01), np.full(3, 0.13)])
    points[64] = [0.8 * mouth_w, mouth_y, 0.10]
    points[65:68] = np.column_stack(
        [-mouth_w * inner, np.full(3, mouth_y + 0.01), np.full(3, 0.13)]
    )
    points[LEFT_PUPIL] = [0.2, -0.1, 0.06]  # the subject's left: image right when frontal
    points[RIGHT_PUPIL] = [-0.2, -0.1, 0.06]
    return points


TEMPLATE = _template()


def rot_x(degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    return np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])


def rot_y(degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    return np.array([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]])


def rot_z(degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    return np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])


def relative_rotation(yaw: float, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """The head's rotation from frontal, in OpenCV camera axes (x right, y down, z forward)."""
    return rot_y(-yaw) @ rot_x(pitch) @ rot_z(roll)


def head_pose_for(yaw: float, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """A SynthFace ``head_pose`` for these angles (frontal: diag(-1, 1, -1))."""
    return relative_rotation(yaw, pitch, roll) @ np.diag([-1.0, 1.0, -1.0])


def landmarks_for(
    yaw: float,
    size: int,
    *,
    pitch: float = 0.0,
    roll: float = 0.0,
    scale: float = 0.5,
    offset: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """(70, 2) float64 pixels of a face centred in a ``size`` x ``size`` image: iBUG-68 then the
    left and right pupil, turned by the pose (positive yaw moves the nose right, positive pitch
    moves it down, positive roll leans the head clockwise). ``scale`` is the face width in
    image widths, ``offset`` a shift in pixels."""
    camera = TEMPLATE * np.array([1.0, 1.0, -1.0])  # depth toward the camera is -z
    turned = camera @ relative_rotation(yaw, pitch, roll).T
    pixels = scale * size
    centre = np.array([size / 2 + offset[0], size / 2 + offset[1]])
    return turned[:, :2] * pixels + centre


def _poly(points: np.ndarray) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points]


def _head_outline(points: np.ndarray) -> np.ndarray:
    """The jaw and an arc over the forehead, closed."""
    jaw = points[0:17]
    brow_top = points[17:27, 1].min()
    left, right = jaw[0], jaw[16]
    height = (jaw[8, 1] - brow_top) * 0.45
    arc = np.linspace(0.0, math.pi, 9)[1:-1]
    top = np.column_stack(
        [
            right[0] + (left[0] - right[0]) * (1 - np.cos(arc)) / 2,
            brow_top - height * np.sin(arc) + (right[1] - brow_top) * 0.1,
        ]
    )
    return np.vstack([jaw, top])


def _regions(points: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Named polygons, back to front."""
    head = _head_outline(points)
    centre = head.mean(axis=0)
    hair = centre + (head - centre) * 1.15 - np.array([0.0, 0.08 * np.ptp(head[:, 1])])
    hair = hair[hair[:, 1] <= points[0:17, 1].min() + 0.25 * np.ptp(head[:, 1])]
    chin = points[8]
    half = 0.45 * (points[16, 0] - points[0, 0])
    neck = np.array(
        [
            [chin[0] - half * 0.6, chin[1] - 0.2 * half],
            [chin[0] + half * 0.6, chin[1] - 0.2 * half],
            [chin[0] + half * 0.6, chin[1] + 0.9 * half],
            [chin[0] - half * 0.6, chin[1] + 0.9 * half],
        ]
    )
    return [
        ("hair", hair),
        ("neck", neck),
        ("skin", head),
        ("right_brow", np.vstack([points[17:22], points[21:16:-1] + [0.0, 0.08 * half]])),
        ("left_brow", np.vstack([points[22:27], points[26:21:-1] + [0.0, 0.08 * half]])),
        ("right_eye", points[RIGHT_EYE]),
        ("left_eye", points[LEFT_EYE]),
        ("nose", points[[27, 31, 32, 33, 34, 35]]),
        ("top_lip", points[[48, 49, 50, 51, 52, 53, 54, 64, 63, 62, 61, 60]]),
        ("bottom_lip", points[[54, 55, 56, 57, 58, 59, 48, 60, 67, 66, 65, 64]]),
        ("mouth_interior", points[60:68]),
    ]


_PART_IDS = {
    "hair": HAIR,
    "neck": NECK,
    "skin": SKIN,
    "right_brow": RIGHT_BROW,
    "left_brow": LEFT_BROW,
    "right_eye": RIGHT_EYE_ID,
    "left_eye": LEFT_EYE_ID,
    "nose": NOSE,
    "top_lip": TOP_LIP,
    "bottom_lip": BOTTOM_LIP,
    "mouth_interior": MOUTH_INTERIOR,
}


def draw_face(points: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB picture of the face whose landmarks are ``points``."""
    background = tuple(int(v) for v in rng.integers(40, 200, 3))
    skin = tuple(int(v) for v in rng.integers([170, 120, 90], [240, 190, 160]))
    colours = {
        "hair": tuple(int(v) for v in rng.integers(10, 90, 3)),
        "neck": tuple(int(v * 0.9) for v in skin),
        "skin": skin,
        "right_brow": (40, 30, 20),
        "left_brow": (40, 30, 20),
        "right_eye": (235, 235, 235),
        "left_eye": (235, 235, 235),
        "nose": tuple(int(v * 0.92) for v in skin),
        "top_lip": (170, 60, 70),
        "bottom_lip": (185, 70, 80),
        "mouth_interior": (60, 20, 25),
    }
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for name, polygon in _regions(points):
        draw.polygon(_poly(polygon), fill=colours[name])
    radius = max(1.0, 0.012 * size)
    for index in (LEFT_PUPIL, RIGHT_PUPIL):
        x, y = points[index]
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(30, 20, 15))
    return image


def segmentation_for(points: np.ndarray, size: int, *, parts_only: bool = False) -> np.ndarray:
    """(size, size) uint8 class ids painted from the same polygons as ``draw_face``.

    FaceSynthetics: hair 13 and a few IGNORE (255) pixels beyond the right brow, never 18.
    SynthFace ``segm_parts`` (``parts_only``): ids 0..12 only (hair lives in its own mask).
    """
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    for name, polygon in _regions(points):
        if parts_only and name == "hair":
            continue
        draw.polygon(_poly(polygon), fill=_PART_IDS[name])
    values = np.array(image)
    if not parts_only:  # "a few eyebrow pixels may extend beyond the face: IGNORE"
        x, y = np.clip(np.rint(points[17]).astype(int) - [2, 1], 0, size - 3)
        values[y : y + 2, x : x + 2] = IGNORE
    return values


def mask_for(name: str, points: np.ndarray, size: int) -> np.ndarray:
    """A SynthFace binary mask (0/255) of ``name``."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    regions = dict(_regions(points))
    if name == "hair":
        draw.polygon(_poly(regions["hair"]), fill=255)
        draw.polygon(_poly(regions["skin"]), fill=0)
    elif name == "clothing":
        top = int(min(size - 1, regions["neck"][:, 1].max()))
        draw.rectangle([0, top, size - 1, size - 1], fill=255)
    elif name == "eyebrows":
        draw.polygon(_poly(regions["right_brow"]), fill=255)
        draw.polygon(_poly(regions["left_brow"]), fill=255)
    elif name == "eyelashes":
        for eye in ("right_eye", "left_eye"):
            draw.line(_poly(regions[eye][:4]), fill=255, width=max(1, size // 128))
    elif name == "glasses":
        for eye in ("right_eye", "left_eye"):
            box = regions[eye]
            draw.rectangle([*(box.min(axis=0) - 4), *(box.max(axis=0) + 4)], outline=255)
    elif name == "beard":
        draw.polygon(_poly(points[4:13]), fill=255)
        draw.polygon(_poly(regions["top_lip"]), fill=0)
        draw.polygon(_poly(regions["bottom_lip"]), fill=0)
    elif name == "headwear":
        draw.rectangle([0, 0, size - 1, max(1, int(regions["hair"][:, 1].min()))], fill=255)
    elif name == "facewear":
        pass  # masks are often all background
    else:
        raise ValueError(f"unknown SynthFace mask {name!r}")
    return np.array(image)


def _save_png(values: np.ndarray | Image.Image, path: Path) -> None:
    image = values if isinstance(values, Image.Image) else Image.fromarray(values, mode="L")
    image.save(path, format="PNG", compress_level=1)


def _ldmks_text(points: np.ndarray) -> str:
    return "".join(f"{x:.6f} {y:.6f}\n" for x, y in points)


def make_facesynthetics(
    root: Path, count: int = 3, *, size: int = 512, seed: int = 0
) -> dict[str, np.ndarray]:
    """``count`` FaceSynthetics frames ``000000``.. in ``root``; frame stem -> its (70, 2)
    landmarks exactly as written (6 decimals). Frame 0 is frontal, the others turned."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for index in range(count):
        if index == 0:
            yaw = pitch = roll = 0.0
        else:
            yaw, pitch, roll = rng.uniform([-35, -12, -10], [35, 12, 10])
        points = landmarks_for(
            yaw, size, pitch=pitch, roll=roll, offset=tuple(rng.uniform(-0.02, 0.02, 2) * size)
        )
        text = _ldmks_text(points)
        stem = f"{index:06d}"
        _save_png(draw_face(points, size, rng), root / f"{stem}.png")
        _save_png(segmentation_for(points, size), root / f"{stem}_seg.png")
        (root / f"{stem}_ldmks.txt").write_text(text, encoding="utf-8")
        truth[stem] = np.array([[float(v) for v in line.split()] for line in text.splitlines()])
    return truth


def synthface_metadata(
    points: np.ndarray, size: int, yaw: float, pitch: float, roll: float
) -> dict:
    """A SynthFace metadata object (DATASETS.md's keys and shapes)."""
    focal = 600.0 * size / 512
    return {
        "camera": {
            "world_to_camera": np.eye(4).tolist(),
            "camera_to_image": [[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]],
            "resolution": [size, size],
        },
        "head_pose": head_pose_for(yaw, pitch, roll).tolist(),
        "left_eye_pose": np.eye(3).tolist(),
        "right_eye_pose": np.eye(3).tolist(),
        "landmarks": {"2D": points.tolist()},
    }


def make_synthface(
    root: Path,
    identities: int = 2,
    frames: int = 3,
    *,
    size: int = 512,
    seed: int = 0,
    yaws: Sequence[float] | None = None,
    masks: Sequence[str] = ("hair", "clothing"),
) -> dict[str, dict]:
    """A SynthFace folder in ``root``: ``identities`` x ``frames`` images with metadata,
    ``segm_parts`` and the named ``masks``. Returns image file name (relative to ``root``) ->
    ``{"yaw", "pitch", "roll", "landmarks"}``. ``yaws`` (optional) are the yaws of the images
    in order (identity-major), repeated when shorter; otherwise frame 0 of each identity is
    frontal (head_pose diag(-1, 1, -1)) and the others turned at random."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth: dict[str, dict] = {}
    number = 0
    for identity in range(identities):
        for frame in range(frames):
            if yaws is not None:
                yaw, pitch, roll = float(yaws[number % len(yaws)]), 0.0, 0.0
            elif frame == 0:
                yaw = pitch = roll = 0.0
            else:
                yaw, pitch, roll = (float(v) for v in rng.uniform([-45, -15, -10], [45, 15, 10]))
            number += 1
            points = landmarks_for(yaw, size, pitch=pitch, roll=roll)
            suffix = f"{identity:07d}_{frame:03d}"
            draw_face(points, size, rng).save(root / f"img_{suffix}.jpg", quality=90)
            metadata = synthface_metadata(points, size, yaw, pitch, roll)
            (root / f"metadata_{suffix}.json").write_text(json.dumps(metadata, indent=4))
            _save_png(
                segmentation_for(points, size, parts_only=True), root / f"segm_parts_{suffix}.png"
            )
            for name in masks:
                _save_png(mask_for(name, points, size), root / f"segm_{name}_{suffix}.png")
            truth[f"img_{suffix}.jpg"] = {
                "yaw": yaw,
                "pitch": pitch,
                "roll": roll,
                "landmarks": points.copy(),
            }
    return truth
