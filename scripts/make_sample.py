"""Generate the bundled demo sample: ``digi2real/sample/digiface/<identity>/<n>.png``.

A few synthetic identities x a few renders each, 112x112 RGB PNG, in the DigiFace-1M
layout. The faces are drawn here, with numpy only (no third-party images, no drawing
library whose rasteriser could change between versions): a stylised head whose eyes,
nose tip and mouth corners sit near ArcFace's 5-point template for a 112x112 crop, with
per-identity shape and colour and per-render pose, lighting and expression jitter.

Everything derives from fixed seeds, so rerunning gives identical pixels, and identical
files with the same Pillow/zlib build::

    .venv/bin/python scripts/make_sample.py            # rewrites the bundled sample
    .venv/bin/python scripts/make_sample.py --out DIR  # writes elsewhere
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger("make_sample")

SIZE = 112
SUPERSAMPLE = 3  # coverage anti-aliasing: draw at 3x, average 3x3 blocks
IDENTITIES = 6
RENDERS = 4
SEED = "digi2real-sample-v1"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "digi2real" / "sample" / "digiface"

# insightface face_align.arcface_dst: left eye, right eye, nose tip, mouth left, mouth right.
ARCFACE_DST = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)

SKIN_TONES = np.array(
    [
        [241, 204, 178],
        [224, 172, 138],
        [198, 141, 100],
        [160, 106, 70],
        [112, 72, 48],
        [233, 190, 160],
    ],
    dtype=np.float64,
)
HAIR_COLOURS = np.array(
    [[30, 22, 18], [88, 56, 32], [180, 140, 80], [120, 40, 20], [60, 60, 62], [20, 20, 24]],
    dtype=np.float64,
)
IRIS_COLOURS = np.array(
    [[70, 45, 25], [60, 100, 140], [80, 110, 60], [40, 30, 25], [110, 80, 50], [90, 90, 110]],
    dtype=np.float64,
)


def _seed(*parts: object) -> int:
    text = "/".join(str(part) for part in (SEED, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Identity:
    skin: np.ndarray
    hair: np.ndarray
    iris: np.ndarray
    lips: np.ndarray
    clothes: np.ndarray
    background: tuple[np.ndarray, np.ndarray]
    face_half_width: float
    face_half_height: float
    jaw: float  # how much the face narrows toward the chin
    hairline: float
    long_hair: bool
    brow_thickness: float
    brow_tilt: float
    nose_width: float
    lip_height: float
    eye_size: float


@dataclass(frozen=True)
class Render:
    roll_degrees: float
    scale: float
    shift: tuple[float, float]
    yaw_shift: float  # inner features slide sideways, as if the head turned
    light: tuple[float, float]
    light_strength: float
    exposure: float
    smile: float
    mouth_open: float
    brow_raise: float
    eye_open: float


def make_identity(index: int) -> Identity:
    rng = np.random.default_rng(_seed("identity", index))

    def jitter(colour: np.ndarray, amount: float) -> np.ndarray:
        return np.clip(colour + rng.uniform(-amount, amount, 3), 0, 255)

    # Cycle the palettes so a handful of identities still spans them.
    skin = jitter(SKIN_TONES[index % len(SKIN_TONES)], 8)
    hair = jitter(HAIR_COLOURS[(index * 5 + 2) % len(HAIR_COLOURS)], 10)
    iris = jitter(IRIS_COLOURS[(index * 7 + 1) % len(IRIS_COLOURS)], 10)
    lips = np.clip(skin * np.array([0.85, 0.55, 0.55]) + rng.uniform(-6, 6, 3), 0, 255)
    clothes = rng.uniform(40, 220, 3)
    top = rng.uniform(150, 235, 3)
    bottom = np.clip(top * rng.uniform(0.6, 0.85), 0, 255)
    return Identity(
        skin=skin,
        hair=hair,
        iris=iris,
        lips=lips,
        clothes=clothes,
        background=(top, bottom),
        face_half_width=float(rng.uniform(31.0, 36.0)),
        face_half_height=float(rng.uniform(45.0, 49.0)),
        jaw=float(rng.uniform(0.1, 0.25)),
        hairline=float(rng.uniform(24.0, 32.0)),
        long_hair=bool(index % 2),
        brow_thickness=float(rng.uniform(1.3, 2.3)),
        brow_tilt=float(rng.uniform(-6.0, 8.0)),
        nose_width=float(rng.uniform(3.5, 5.5)),
        lip_height=float(rng.uniform(2.6, 4.0)),
        eye_size=float(rng.uniform(5.5, 7.0)),
    )


def make_render(identity_index: int, render_index: int) -> Render:
    rng = np.random.default_rng(_seed("render", identity_index, render_index))
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    return Render(
        roll_degrees=float(rng.uniform(-5.0, 5.0)),
        scale=float(rng.uniform(0.97, 1.03)),
        shift=(float(rng.uniform(-1.5, 1.5)), float(rng.uniform(-1.5, 1.5))),
        yaw_shift=float(rng.uniform(-2.5, 2.5)),
        light=(math.cos(angle), math.sin(angle)),
        light_strength=float(rng.uniform(0.08, 0.25)),
        exposure=float(rng.uniform(0.9, 1.08)),
        smile=float(rng.uniform(-0.2, 1.0)),
        mouth_open=float(rng.uniform(0.0, 1.0)) if rng.uniform() < 0.4 else 0.0,
        brow_raise=float(rng.uniform(-1.0, 2.0)),
        eye_open=float(rng.uniform(0.7, 1.05)),
    )


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, tilt=0.0):
    """Normalised radius (<= 1 inside) of a tilted ellipse."""
    cos_t, sin_t = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    dx, dy = x - cx, y - cy
    u = (dx * cos_t + dy * sin_t) / a
    v = (-dx * sin_t + dy * cos_t) / b
    return u * u + v * v


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    canvas[mask] = colour[mask] if colour.ndim == 3 else colour


def draw_face(identity: Identity, render: Render) -> np.ndarray:
    """One 112x112 RGB uint8 render."""
    size = SIZE * SUPERSAMPLE
    centres = (np.arange(size, dtype=np.float64) + 0.5) / SUPERSAMPLE
    ys, xs = np.meshgrid(centres, centres, indexing="ij")

    # Pose: map each output pixel back into the canonical (template) frame.
    pivot_x, pivot_y = 56.0, 62.0
    cos_r = math.cos(math.radians(render.roll_degrees))
    sin_r = math.sin(math.radians(render.roll_degrees))
    dx = (xs - pivot_x - render.shift[0]) / render.scale
    dy = (ys - pivot_y - render.shift[1]) / render.scale
    x = pivot_x + dx * cos_r + dy * sin_r
    y = pivot_y - dx * sin_r + dy * cos_r

    top, bottom = identity.background
    t = (y / SIZE).clip(0, 1)[..., None]
    canvas = top * (1 - t) + bottom * t

    cx, cy = 56.0, 64.0
    a, b = identity.face_half_width, identity.face_half_height
    # Narrow the jaw: the face's half width shrinks below the eyes.
    below = np.clip((y - 55.0) / b, 0, None)
    face_r = _ellipse(x, y, cx, cy, a, b) / np.maximum(1 - identity.jaw * below**2, 0.3) ** 2
    face_r = np.where(y < 55.0, _ellipse(x, y, cx, cy, a, b), face_r)
    face = face_r <= 1.0

    lx, ly = render.light
    direction = ((x - cx) * lx + (y - cy) * ly) / 40.0
    lighting = render.exposure * (1 + render.light_strength * direction)
    shading = lighting * (1 - 0.22 * np.minimum(face_r, 1.0) ** 3)  # darker toward the rim
    skin = identity.skin * shading[..., None]

    _paint(canvas, _ellipse(x, y, cx, 150.0, 62.0, 45.0) <= 1, identity.clothes * render.exposure)
    if identity.long_hair:
        back_hair = (_ellipse(x, y, cx, cy + 6, a + 8, b + 6) <= 1) & (y < 100)
        _paint(canvas, back_hair, identity.hair * 0.8 * render.exposure)
    neck = (np.abs(x - cx) < 15.0) & (y > cy + 20) & (y < 125)
    _paint(canvas, neck, identity.skin * (0.72 * lighting)[..., None])
    for side in (-1, 1):
        ear = _ellipse(x, y, cx + side * (a - 1), 60.0, 5.0, 9.0) <= 1
        _paint(canvas, ear, identity.skin * (0.85 * lighting)[..., None])
    _paint(canvas, face, skin)

    # Inner features follow the template, shifted sideways by yaw.
    fx = x - render.yaw_shift
    eyes = ARCFACE_DST[:2]
    for side, (ex, ey) in zip((-1, 1), eyes, strict=True):
        brow_y = ey - 9.0 - render.brow_raise
        brow = _ellipse(fx, y, ex, brow_y, 8.0, identity.brow_thickness, side * identity.brow_tilt)
        _paint(canvas, brow <= 1, identity.hair * 0.9)
        eye_b = 3.2 * render.eye_open
        sclera = _ellipse(fx, y, ex, ey, identity.eye_size, eye_b) <= 1
        _paint(canvas, sclera, np.array([235.0, 232.0, 228.0]) * render.exposure)
        iris = sclera & (_ellipse(fx, y, ex, ey, 2.9, 2.9) <= 1)
        _paint(canvas, iris, identity.iris)
        _paint(canvas, iris & (_ellipse(fx, y, ex, ey, 1.2, 1.2) <= 1), np.array([15.0, 12, 12]))
        lid = np.abs(_ellipse(fx, y, ex, ey + 0.6, identity.eye_size + 0.4, eye_b + 0.6) - 1)
        _paint(canvas, (lid < 0.18) & (y < ey), skin * 0.45)

    nose_x, nose_y = ARCFACE_DST[2]
    bridge = (np.abs(fx - nose_x + 1.5) < 0.9) & (y > 56) & (y < nose_y - 1)
    _paint(canvas, bridge, skin * 0.88)
    _paint(canvas, _ellipse(fx, y, nose_x, nose_y, identity.nose_width, 3.2) <= 1, skin * 1.04)
    for side in (-1, 1):
        nostril = _ellipse(fx, y, nose_x + side * 2.6, nose_y + 2.0, 1.5, 0.9) <= 1
        _paint(canvas, nostril, skin * 0.5)

    (left_x, left_y), (right_x, right_y) = ARCFACE_DST[3], ARCFACE_DST[4]
    mouth_x, mouth_y = (left_x + right_x) / 2, (left_y + right_y) / 2
    half_width = (right_x - left_x) / 2
    across = np.clip((fx - mouth_x) / half_width, -1.2, 1.2)
    curve = mouth_y + render.smile * 2.5 * (1 - across**2) - 1.0  # centre dips when smiling
    lips_height = identity.lip_height + render.mouth_open * 2.0
    lips = _ellipse(fx, y - (curve - mouth_y), mouth_x, mouth_y, half_width, lips_height)
    _paint(canvas, lips <= 1, identity.lips * shading[..., None])
    gap = np.abs(y - curve) < 0.5 + render.mouth_open * 1.6
    _paint(canvas, gap & (lips <= 1), np.array([60.0, 25, 25]))

    hair_region = _ellipse(x, y, cx, cy - 2, a + 3, b + 4) <= 1
    edge = np.abs((x - cx) / a) ** 4
    hairline = identity.hairline + 2.5 * np.sin((x - cx) / 9.0) + 26 * edge
    _paint(canvas, hair_region & (y < hairline), identity.hair * render.exposure)

    canvas = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def make_sample(
    out_dir: Path, *, identities: int = IDENTITIES, renders: int = RENDERS
) -> list[Path]:
    """Write the sample under ``out_dir``; returns the files written, sorted."""
    written = []
    for identity_index in range(identities):
        identity = make_identity(identity_index)
        folder = out_dir / str(identity_index)
        folder.mkdir(parents=True, exist_ok=True)
        for render_index in range(renders):
            pixels = draw_face(identity, make_render(identity_index, render_index))
            path = folder / f"{render_index}.png"
            # No metadata chunks (no time stamps); fixed compression settings.
            Image.fromarray(pixels, mode="RGB").save(path, format="PNG", optimize=True)
            written.append(path)
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = make_sample(args.out)
    total = sum(path.stat().st_size for path in files)
    logger.info("wrote %d images (%.1f KB) under %s", len(files), total / 1024, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
