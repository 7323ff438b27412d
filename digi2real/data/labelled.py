"""Read the two flat, labelled synthetic-face layouts: FaceSynthetics and SynthFace.

Both keep every file of the dataset side by side in one folder; the labels sit beside each
image under a related name. What ``readers.scan_dataset`` does for one-folder-per-identity
trees, ``scan_labelled`` does here (same ``IdentitySource`` / ``ErrorRow`` contract), and
``read_labels`` gives the ground truth of one image.

FaceSynthetics (microsoft/FaceSynthetics; 100,000 frames, 512x512)::

    {frame}.png          the rendered RGB image (frames are 6-digit, 000000..099999)
    {frame}_seg.png      class-id segmentation, 8-bit single channel (SEGMENTATION_CLASSES:
                         0..18 and 255 IGNORE; FACEWEAR 18 never occurs in the released data)
    {frame}_ldmks.txt    70 rows ``x y``: iBUG-68 then the two pupil centres, projections of
                         3D points ("x-ray" landmarks, not the visible outline)

  Every frame is a different synthetic person, so every frame is its own identity (named by
  its stem, e.g. ``"000123"``). There are no pose labels.

SynthFace (microsoft/SynthMoCap, ``synth_face/``; ~20,000 identities x 5 frames, 512x512)::

    img_{id:07d}_{frame:03d}.jpg          the rendered RGB image (JPEG)
    metadata_{id:07d}_{frame:03d}.json    camera {world_to_camera 4x4, camera_to_image 3x3,
                                          resolution [W, H]}, head_pose 3x3 (camera space),
                                          left_eye_pose / right_eye_pose 3x3, landmarks {"2D"
                                          70x2} in image pixels
    segm_parts_{id}_{frame}.png           class ids 0..12 (the same ids as FaceSynthetics)
    segm_{name}_{id}_{frame}.png          binary masks, one per SYNTHFACE_MASKS name, 0/255

  The identity is the 7-digit id; its files are its frames.

Landmarks are returned as (70, 2) float64 image pixels, x right, y down, origin at the top-left
corner of the image. Head pose (SynthFace only) becomes yaw, pitch, roll in degrees with the
signs of ``digi2real.face.pose`` (``head_pose_angles``).

Assumptions (what the datasets' own documentation does not say; the research notes mark each
of them unverified):

- Rows 68 and 69 are the left and right pupil, "left" meaning the subject's left. SynthMoCap's
  visualiser pairs row 68 with ``left_eye_pose``; FaceSynthetics says nothing, so the same order
  is assumed there.
- Landmarks are pixels with the origin at the top-left; whether 0.0 is a pixel's centre or its
  corner is not documented (neither is the precision of ``_ldmks.txt``, nor whether its last
  line ends with a newline: any whitespace layout is accepted).
- ``_seg.png`` / ``segm_parts_*.png`` are 8-bit single-channel PNGs (mode L; P is read as its
  stored indices). SynthFace masks are 0/255 (SynthMoCap thresholds them at > 100); a missing
  mask file is simply absent from ``RenderLabels.masks``, not an error.
- A frontal SynthFace head has ``head_pose`` = diag(-1, 1, -1), a 180-degree turn about the
  camera's y axis (reported in microsoft/SynthMoCap#12, not in the documentation); which head
  axis is "yaw" is inferred from that.
- Layout detection reads file names only; a FaceSynthetics archive unpacked into a single
  sub-folder (``dataset_100/``) looks like a one-identity folder tree, so point the root at it.

Label files are read with a size cap (``MAX_LABEL_BYTES``) and parsed defensively: anything
unexpected is a ``LabelError`` whose ``reason`` names the file and what is wrong, for an error
row of stage ``STAGE_LABELS``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from digi2real.config import SOURCE_LAYOUTS
from digi2real.data.images import _WARNINGS_LOCK, DEFAULT_MAX_PIXELS
from digi2real.data.readers import (
    IGNORED_NAMES,
    IMAGE_EXTENSIONS,
    STAGE_SCAN,
    ErrorRow,
    IdentitySelection,
    IdentitySource,
    _resolve_inside,
    printable,
    scan_dataset,
)
from digi2real.data.store import ObjectPath, entry_path, location, object_scandir

logger = logging.getLogger(__name__)

LABELLED_LAYOUTS = SOURCE_LAYOUTS[2:]  # facesynthetics, synthface
STAGE_LABELS = "labels"

IGNORE = 255
SEGMENTATION_CLASSES: dict[int, str] = {
    0: "BACKGROUND",
    1: "SKIN",
    2: "NOSE",
    3: "RIGHT_EYE",
    4: "LEFT_EYE",
    5: "RIGHT_BROW",
    6: "LEFT_BROW",
    7: "RIGHT_EAR",
    8: "LEFT_EAR",
    9: "MOUTH_INTERIOR",
    10: "TOP_LIP",
    11: "BOTTOM_LIP",
    12: "NECK",
    13: "HAIR",
    14: "BEARD",
    15: "CLOTHING",
    16: "GLASSES",
    17: "HEADWEAR",
    18: "FACEWEAR",
    IGNORE: "IGNORE",
}
SYNTHFACE_MASKS = (
    "hair",
    "beard",
    "eyebrows",
    "eyelashes",
    "glasses",
    "headwear",
    "facewear",
    "clothing",
)
NUM_LANDMARKS = 70  # iBUG-68, then the left (68) and right (69) pupil: see the assumptions
MAX_LABEL_BYTES = 1 << 20  # a landmarks file is ~1.4 KB, a SynthFace metadata file ~5 KB
ROTATION_TOLERANCE = 1e-3

# SynthFace's frontal head_pose: the head turned 180 degrees about the camera's y axis
FRONTAL_HEAD_POSE = np.diag([-1.0, 1.0, -1.0])

# matched with fullmatch, ASCII digits only (no "\n" before "$", no other scripts' digits)
_FS_IMAGE = re.compile(r"(\d+)\.png", re.ASCII)
_FS_LABEL = re.compile(r"(\d+)_(?:ldmks\.txt|seg\.png)", re.ASCII)
_SF_IMAGE = re.compile(r"img_(\d{7})_(\d{3})\.jpg", re.ASCII)
_SF_METADATA = re.compile(r"metadata_(\d{7})_(\d{3})\.json", re.ASCII)
_SF_LABEL = re.compile(r"segm_[a-z]+_\d{7}_\d{3}\.png", re.ASCII)
_OTHER_SYNTHMOCAP = {"synth_body": "SynthBody", "synth_hand": "SynthHand"}


class LayoutError(ValueError):
    """The layout of a source root cannot be told (or is not one this module reads)."""


class LabelError(ValueError):
    """A label file that is missing or malformed; ``reason`` is one line for an error row,
    ``path`` the offending file relative to the root (POSIX), when there is one."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(reason)


@dataclass
class RenderLabels:
    """The ground truth of one rendered image."""

    scalars: dict[str, float] = field(default_factory=dict)  # SynthFace: yaw, pitch, roll (deg)
    landmarks: np.ndarray | None = None  # (70, 2) float64 pixels, x right, y down
    segmentation: str | None = None  # class-id mask, POSIX path relative to the root
    masks: dict[str, str] = field(default_factory=dict)  # SynthFace mask name -> relative path
    size: tuple[int, int] | None = None  # (width, height) where the labels state it


# -- layout detection --------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _top_level(root: Path | ObjectPath) -> list[tuple[str, bool]]:
    """(name, is_folder) of each entry directly in ``root``: one listing, not recursive."""
    if isinstance(root, ObjectPath):
        found = []
        for info in root.fs.ls(root.key, detail=True):
            full = str(info["name"]).strip("/")
            if full != root.key:
                found.append((full.rpartition("/")[2], info.get("type") == "directory"))
        return found
    entries = []
    with os.scandir(root) as listing:
        for entry in listing:
            try:
                is_dir = entry.is_dir()  # follows symlinks, as readers does
            except OSError:
                is_dir = False
            entries.append((entry.name, is_dir))
    return entries


def _check_root(root: Path | ObjectPath) -> None:
    if not root.exists():
        raise FileNotFoundError(f"dataset root not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset root is not a folder: {root}")


def _examples(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(printable(name)) for name in sorted(names)[:limit])
    return f" (e.g. {shown}{', ...' if len(names) > limit else ''})" if names else ""


def detect_layout(root: str | Path | ObjectPath) -> str:
    """``"folders"``, ``"facesynthetics"`` or ``"synthface"``, from one listing of ``root``.

    - folders: sub-folders (identity folders) and no labelled files;
    - facesynthetics: ``<digits>.png`` images with ``_ldmks.txt`` / ``_seg.png`` siblings;
    - synthface: ``img_<7 digits>_<3 digits>.jpg`` images with ``metadata_*.json`` siblings.

    Anything else (both labelled kinds, identity folders beside labelled files, nothing
    recognisable, a SynthBody/SynthHand folder) is a one-line ``LayoutError``.
    """
    root = location(root)
    _check_root(root)
    folders: list[str] = []
    fs_images: list[str] = []
    fs_labels: list[str] = []
    sf_images: list[str] = []
    sf_metadata: list[str] = []
    sf_labels: list[str] = []  # segmentations and masks: named in messages, not evidence
    others: list[str] = []
    for name, is_dir in _top_level(root):
        if _is_hidden(name):
            continue
        if is_dir:
            folders.append(name)
        elif _FS_IMAGE.fullmatch(name):
            fs_images.append(name)
        elif _FS_LABEL.fullmatch(name):
            fs_labels.append(name)
        elif _SF_IMAGE.fullmatch(name):
            sf_images.append(name)
        elif _SF_METADATA.fullmatch(name):
            sf_metadata.append(name)
        elif _SF_LABEL.fullmatch(name):
            sf_labels.append(name)
        else:
            others.append(name)

    facesynthetics = bool(fs_images and fs_labels)
    synthface = bool(sf_images and sf_metadata)
    found = [
        (folders, "identity folder(s)"),
        (fs_images + fs_labels, "FaceSynthetics file(s)"),
        (sf_images + sf_metadata + sf_labels, "SynthFace file(s)"),
        (others, "other file(s)"),
    ]
    summary = ", ".join(f"{len(names)} {what}{_examples(names)}" for names, what in found if names)
    advice = f"pass source.layout explicitly (one of {', '.join(SOURCE_LAYOUTS[1:])})"
    if facesynthetics and synthface:
        raise LayoutError(
            f"{root} holds both FaceSynthetics and SynthFace files: {summary}; {advice}"
        )
    if (facesynthetics or synthface) and folders:
        raise LayoutError(f"{root} holds identity folders and labelled files: {summary}; {advice}")
    if synthface and root.name in _OTHER_SYNTHMOCAP:
        raise LayoutError(
            f"{root} looks like {_OTHER_SYNTHMOCAP[root.name]} (by its folder name); of "
            "SynthMoCap only SynthFace (synth_face/) is supported"
        )
    if facesynthetics:
        return "facesynthetics"
    if synthface:
        return "synthface"
    if folders:
        return "folders"
    if not summary:
        raise LayoutError(f"nothing to convert: {root} is empty")
    images = [
        name
        for name in fs_images + sf_images + others
        if PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS
    ]
    if images:
        raise LayoutError(
            f"{root} holds {len(images)} image(s){_examples(images)} and no identity folder: it "
            "looks like one identity's folder; give the folder that holds one folder per "
            "identity (or, for a labelled set, pass source.layout: facesynthetics, synthface)"
        )
    raise LayoutError(f"cannot tell the layout of {root}: found {summary}; {advice}")


# -- scanning ------------------------------------------------------------------------------------


def _image_key(layout: str, name: str) -> tuple[str, int] | None:
    """(identity, frame) of an image file name of ``layout``, or None for any other name."""
    if layout == "facesynthetics":
        match = _FS_IMAGE.fullmatch(name)
        return (match[1], 0) if match else None
    match = _SF_IMAGE.fullmatch(name)
    return (match[1], int(match[2])) if match else None


def scan_labelled(
    root: str | Path | ObjectPath,
    layout: str,
    *,
    select: IdentitySelection | str | None = None,
) -> tuple[list[IdentitySource], list[ErrorRow]]:
    """The identities of a flat labelled ``root`` (selected, sorted) and rows for what was
    skipped, as ``readers.scan_dataset`` gives them for identity folders.

    FaceSynthetics: each ``<digits>.png`` is an identity named by its stem. SynthFace: each
    7-digit id is an identity, its ``img_*.jpg`` files in frame order. Label, metadata and
    mask files are never listed as images, and their presence is not checked here
    (``read_labels`` does, per image). Hidden entries are ignored, and so are other files;
    a sub-folder, or an image name that is not a regular file or is a symlink leading
    outside the root, is a row. One listing of the root (one recursive listing on a store).
    """
    if layout not in LABELLED_LAYOUTS:
        raise ValueError(
            f"unknown labelled layout {layout!r}; valid: {', '.join(LABELLED_LAYOUTS)}"
        )
    root = location(root)
    _check_root(root)
    if select is None or isinstance(select, str):
        select = IdentitySelection.from_spec(select)
    store = isinstance(root, ObjectPath)
    scandir = object_scandir(root) if store else os.scandir
    root_resolved = root.resolve()

    rows: list[ErrorRow] = []
    frames: dict[str, list[tuple[int, str, Any]]] = {}
    with scandir(root) as entries:
        for entry in entries:
            name = entry.name
            if _is_hidden(name):
                continue
            shown = printable(name)
            key = _image_key(layout, name)
            if key is None:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    rows.append(
                        ErrorRow(shown, "", STAGE_SCAN, "folder ignored: a labelled layout is flat")
                    )
                continue
            identity = key[0]
            if entry.is_symlink():
                target, problem = _resolve_inside(Path(entry.path), root_resolved)
                if target is None:
                    rows.append(ErrorRow(shown, identity, STAGE_SCAN, str(problem)))
                    continue
                is_file = target.is_file()
            else:
                try:
                    is_file = entry.is_file()
                except OSError as exc:
                    rows.append(ErrorRow(shown, identity, STAGE_SCAN, type(exc).__name__))
                    continue
            if not is_file:
                rows.append(ErrorRow(shown, identity, STAGE_SCAN, "not a regular file"))
                continue
            frames.setdefault(identity, []).append((key[1], name, entry_path(entry)))

    skipped = {row.identity for row in rows if row.identity}
    selected = select.apply(sorted(frames), known=skipped)
    sources = []
    for identity in selected:
        files = [path for _, _, path in sorted(frames[identity], key=lambda item: item[:2])]
        sources.append(IdentitySource(identity, files))
    logger.info(
        "scanned %s (%s): %d identities, %d images, %d skipped item(s)",
        root,
        layout,
        len(sources),
        sum(len(source.files) for source in sources),
        len(rows),
    )
    return sources, rows


# -- labels --------------------------------------------------------------------------------------


def _relative(relative: str) -> PurePosixPath:
    path = PurePosixPath(str(relative).replace(os.sep, "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise LabelError(f"not a path relative to the dataset root: {printable(str(relative))}")
    return path


def _read_capped(root: Path | ObjectPath, relative: PurePosixPath, what: str) -> bytes:
    """The bytes of ``root/relative``, at most ``MAX_LABEL_BYTES``; LabelError otherwise."""
    name = relative.as_posix()
    try:
        with (root / name).open("rb") as handle:
            data = handle.read(MAX_LABEL_BYTES + 1)
    except FileNotFoundError:
        raise LabelError(f"missing {what} {relative.name}", name) from None
    except IsADirectoryError:
        raise LabelError(f"{what} {relative.name} is not a regular file", name) from None
    except OSError as exc:
        raise LabelError(
            f"unreadable {what} {relative.name} ({type(exc).__name__})", name
        ) from None
    if len(data) > MAX_LABEL_BYTES:
        raise LabelError(f"malformed {what} {relative.name}: larger than 1 MiB", name)
    return data


def _decode(data: bytes, relative: PurePosixPath, what: str) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise LabelError(
            f"malformed {what} {relative.name}: not UTF-8 (byte {exc.start})", relative.as_posix()
        ) from None


def _parse_ldmks(text: str) -> np.ndarray:
    """(70, 2) from the text of a ``_ldmks.txt``; ValueError naming the problem."""
    rows = [line.split() for line in text.splitlines() if line.strip()]
    if len(rows) != NUM_LANDMARKS:
        raise ValueError(f"{len(rows)} rows, expected {NUM_LANDMARKS}")
    values = np.empty((NUM_LANDMARKS, 2), dtype=np.float64)
    for index, row in enumerate(rows):
        if len(row) != 2:
            raise ValueError(f"row {index + 1} has {len(row)} values, expected 2 (x y)")
        try:
            values[index] = [float(row[0]), float(row[1])]
        except ValueError:
            raise ValueError(f"row {index + 1} is not two numbers") from None
        if not np.isfinite(values[index]).all():
            raise ValueError(f"row {index + 1} is not finite")
    return values


def _describe(value: Any) -> str:
    if isinstance(value, list):
        if value and all(isinstance(row, list) for row in value):
            widths = {len(row) for row in value}
            if len(widths) == 1:
                return f"{len(value)}x{widths.pop()}"
            return f"a ragged list of {len(value)} rows"
        return f"a list of {len(value)}"
    return {
        dict: "an object",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), "a number")


def _matrix(value: Any, rows: int, cols: int, what: str) -> np.ndarray:
    """A finite ``rows`` x ``cols`` float64 array from nested JSON lists of numbers."""
    if (
        not isinstance(value, list)
        or len(value) != rows
        or any(not isinstance(row, list) or len(row) != cols for row in value)
    ):
        raise ValueError(f"{what} is {_describe(value)}, expected {rows}x{cols}")
    flat = [item for row in value for item in row]
    if any(isinstance(item, bool) or not isinstance(item, int | float) for item in flat):
        raise ValueError(f"{what} holds values that are not numbers")
    try:
        array = np.array(value, dtype=np.float64)
    except OverflowError:
        raise ValueError(f"{what} holds values that are not finite") from None
    if not np.isfinite(array).all():
        raise ValueError(f"{what} holds values that are not finite")
    return array


def _rotation(value: Any, what: str) -> np.ndarray:
    matrix = _matrix(value, 3, 3, what)
    error = float(np.abs(matrix @ matrix.T - np.eye(3)).max())
    if error > ROTATION_TOLERANCE:
        raise ValueError(f"{what} is not a rotation (R R^T differs from I by {error:.3g})")
    determinant = float(np.linalg.det(matrix))
    if determinant < 0:
        raise ValueError(f"{what} is a reflection (det {determinant:.3f}), not a rotation")
    return matrix


def _resolution(camera: Any) -> tuple[int, int] | None:
    if camera is None:
        return None
    if not isinstance(camera, dict):
        raise ValueError(f"camera is {_describe(camera)}, expected an object")
    value = camera.get("resolution")
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int | float) for v in value)
        or not all(math.isfinite(v) and v == int(v) and v >= 1 for v in value)
    ):
        raise ValueError(f"camera.resolution is {_describe(value)}, expected [width, height]")
    return int(value[0]), int(value[1])


def _parse_metadata(data: bytes, relative: PurePosixPath) -> tuple[np.ndarray, np.ndarray, Any]:
    text = _decode(data, relative, "metadata file")
    try:
        meta = json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    except ValueError:  # an integer past Python's digit limit
        raise ValueError("not valid JSON (a number with too many digits)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"the JSON is {_describe(meta)}, expected an object")
    if "head_pose" not in meta:
        raise ValueError(
            "no head_pose (SynthBody and SynthHand metadata have none; only SynthFace is read)"
        )
    rotation = _rotation(meta["head_pose"], "head_pose")
    landmarks = meta.get("landmarks")
    if not isinstance(landmarks, dict) or "2D" not in landmarks:
        raise ValueError("no landmarks.2D")
    points = _matrix(landmarks["2D"], NUM_LANDMARKS, 2, "landmarks.2D")
    return rotation, points, meta.get("camera")


def _present(root: Path | ObjectPath, relative: PurePosixPath) -> bool:
    try:
        return bool((root / relative.as_posix()).is_file())
    except OSError:
        return False


def read_labels(root: str | Path | ObjectPath, relative_image: str, layout: str) -> RenderLabels:
    """The labels of the image ``relative_image`` (POSIX, relative to ``root``) of ``layout``.

    A missing or malformed landmarks / metadata file is a ``LabelError``; a missing
    segmentation or mask file is not (``segmentation`` None, the mask absent).
    """
    if layout not in LABELLED_LAYOUTS:
        raise ValueError(
            f"unknown labelled layout {layout!r}; valid: {', '.join(LABELLED_LAYOUTS)}"
        )
    root = location(root)
    image = _relative(relative_image)
    folder = image.parent

    if layout == "facesynthetics":
        match = _FS_IMAGE.fullmatch(image.name)
        if match is None:
            raise LabelError(f"not a FaceSynthetics image name: {printable(image.name)}")
        stem = match[1]
        ldmks = folder / f"{stem}_ldmks.txt"
        text = _decode(_read_capped(root, ldmks, "landmarks file"), ldmks, "landmarks file")
        try:
            points = _parse_ldmks(text)
        except ValueError as exc:
            raise LabelError(
                f"malformed landmarks file {ldmks.name}: {exc}", ldmks.as_posix()
            ) from None
        seg = folder / f"{stem}_seg.png"
        return RenderLabels(
            scalars={},
            landmarks=points,
            segmentation=seg.as_posix() if _present(root, seg) else None,
            masks={},
            size=None,
        )

    match = _SF_IMAGE.fullmatch(image.name)
    if match is None:
        raise LabelError(f"not a SynthFace image name: {printable(image.name)}")
    suffix = f"{match[1]}_{match[2]}"
    metadata = folder / f"metadata_{suffix}.json"
    data = _read_capped(root, metadata, "metadata file")
    try:
        rotation, points, camera = _parse_metadata(data, metadata)
        size = _resolution(camera)
    except ValueError as exc:
        if isinstance(exc, LabelError):
            raise
        raise LabelError(
            f"malformed metadata file {metadata.name}: {exc}", metadata.as_posix()
        ) from None
    yaw, pitch, roll = head_pose_angles(rotation)
    parts = folder / f"segm_parts_{suffix}.png"
    masks = {}
    for name in SYNTHFACE_MASKS:
        mask = folder / f"segm_{name}_{suffix}.png"
        if _present(root, mask):
            masks[name] = mask.as_posix()
    return RenderLabels(
        scalars={"yaw": yaw, "pitch": pitch, "roll": roll},
        landmarks=points,
        segmentation=parts.as_posix() if _present(root, parts) else None,
        masks=masks,
        size=size,
    )


# -- head pose -----------------------------------------------------------------------------------


def head_pose_angles(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of a SynthFace ``head_pose`` (3x3, camera space, OpenCV
    camera: x right, y down, z forward).

    The pose relative to frontal, ``R_rel = R @ diag(-1, 1, -1)`` (frontal is diag(-1, 1, -1):
    an assumption, see the module notes), is decomposed as ``Ry(a) @ Rx(b) @ Rz(c)`` (right-
    handed rotations about the camera axes). With ``digi2real.face.pose``'s signs:
    ``yaw = -a`` (positive: the nose moves toward the image's right), ``pitch = b`` (positive:
    the nose moves down), ``roll = c`` (positive: the top of the head leans toward the image's
    right, clockwise on screen). At pitch +-90 degrees yaw and roll are not separable; roll is
    then reported as 0.
    """
    matrix = np.asarray(rotation, dtype=np.float64)
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        raise ValueError(f"head_pose must be a finite 3x3 matrix, got shape {matrix.shape}")
    relative = matrix @ FRONTAL_HEAD_POSE
    # Ry(a) Rx(b) Rz(c) = [[ . , . , sa cb], [cb sc, cb cc, -sb], [ . , . , ca cb]]
    sin_b = float(np.clip(-relative[1, 2], -1.0, 1.0))
    cos_b = math.hypot(relative[1, 0], relative[1, 1])
    b = math.atan2(sin_b, cos_b)
    if cos_b > 1e-9:
        a = math.atan2(relative[0, 2], relative[2, 2])
        c = math.atan2(relative[1, 0], relative[1, 1])
    else:  # gimbal lock: only a -+ c is defined; put it all in a
        a = math.atan2(-relative[2, 0], relative[0, 0])
        c = 0.0
    yaw, pitch, roll = -math.degrees(a), math.degrees(b), math.degrees(c)
    return yaw + 0.0, pitch + 0.0, roll + 0.0  # no -0.0


# -- masks ---------------------------------------------------------------------------------------


def read_mask(
    root: str | Path | ObjectPath, relative: str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """The (H, W) uint8 values of the PNG mask ``root/relative``: mode L or P as stored (P gives
    its palette indices). Any other format or mode, a missing, undecodable or oversized file
    (``max_pixels``, and Pillow's decompression-bomb limit) is a ``LabelError``."""
    root = location(root)
    rel = _relative(relative)
    name = rel.as_posix()
    path = root / name
    try:
        source: Any = io.BytesIO(path.read_bytes()) if isinstance(path, ObjectPath) else path
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source, formats=["PNG"])
    except FileNotFoundError:
        raise LabelError(f"missing mask file {rel.name}", name) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise LabelError(f"mask {rel.name} is too large (decompression bomb limit)", name) from None
    except UnidentifiedImageError:
        raise LabelError(f"mask {rel.name} is not a PNG", name) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise LabelError(f"mask {rel.name} is unreadable ({type(exc).__name__})", name) from None
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise LabelError(
                f"mask {rel.name} is too large ({width}x{height} > {max_pixels} pixels)", name
            )
        if image.mode not in ("L", "P"):
            raise LabelError(
                f"mask {rel.name} has mode {image.mode}, expected 8-bit single channel (L or P)",
                name,
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise LabelError(f"mask {rel.name} is corrupt ({type(exc).__name__})", name) from None
        return np.array(image, dtype=np.uint8)


def resolve_layout(root: str | Path | ObjectPath, layout: str = "auto") -> str:
    """``layout``, or for ``"auto"`` the one :func:`detect_layout` finds."""
    if layout not in SOURCE_LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; valid: {', '.join(SOURCE_LAYOUTS)}")
    return detect_layout(root) if layout == "auto" else layout


def scan_source(
    root: str | Path | ObjectPath,
    layout: str,
    *,
    select: IdentitySelection | str | None = None,
) -> tuple[list[IdentitySource], list[ErrorRow]]:
    """The identities of a source of a resolved ``layout``: identity folders
    (:func:`~digi2real.data.readers.scan_dataset`) or a labelled layout (:func:`scan_labelled`)."""
    if layout == "folders":
        return scan_dataset(root, select=select)
    return scan_labelled(root, layout, select=select)


def labelled_layout_of(root: str | Path) -> str | None:
    """The labelled layout of a local folder, or None when it is not one (any other folder of
    images: read as before). Never raises for an unrecognised tree."""
    try:
        layout = detect_layout(root)
    except (LayoutError, OSError):
        return None
    return layout if layout in LABELLED_LAYOUTS else None
