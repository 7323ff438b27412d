"""Pose in the report: was the renders' pose variety kept?

For each identity, the detector's five landmarks of its source renders and of its outputs
give yaw/pitch estimates (:func:`digi2real.face.pose.estimate_pose`); the report gives the
spread of each (overall, and the per-identity yaw range) and draws ``pose.png``. Detection is
padded (aligned crops are found), and the landmarks of an aligned crop give the pose of the
image it came from (the estimate ignores in-plane rotation, scale and shift).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.analysis.report.dataset import Dataset, source_root
from digi2real.analysis.report.figures import distribution
from digi2real.data import layout
from digi2real.data.images import ImageError, load_image
from digi2real.data.layout import OutLayout
from digi2real.data.manifest import read_table
from digi2real.face.pose import estimate_pose, pose_spread

logger = logging.getLogger(__name__)

POSE_PNG = layout.REPORT_POSE
# images per identity and side: detection costs about as much per image as embedding
DEFAULT_PER_IDENTITY = 16

Landmarks = Callable[[np.ndarray], np.ndarray | None]  # RGB image -> (5, 2) or None


def detector_landmarks(detector: Any) -> Landmarks:
    """The best face's landmarks from a :class:`~digi2real.face.detect.FaceDetector`."""

    def landmarks(image: np.ndarray) -> np.ndarray | None:
        detections = detector.detect(image)
        return detections[0].kps if detections else None

    return landmarks


def _poses(paths: list[Path], landmarks: Landmarks) -> np.ndarray:
    """(n, 2) yaw/pitch per image; NaN rows where the image or its face was unusable."""
    poses = np.full((len(paths), 2), np.nan)
    for i, path in enumerate(paths):
        try:
            points = landmarks(load_image(path))
        except (ImageError, FileNotFoundError) as error:
            logger.warning("pose: skipped %s: %s", path, error)
            continue
        if points is not None:
            poses[i] = estimate_pose(points)
    return poses


def _renders(dataset: Dataset) -> dict[str, list[str]]:
    """Identity -> its source files (relative to the source root)."""
    plan = OutLayout(dataset.out_dir).plan
    renders: dict[str, list[str]] = {}
    if plan.is_file():
        table = read_table(plan, columns=["identity", "files"])
        for name, files in zip(
            table.column("identity").to_pylist(), table.column("files").to_pylist(), strict=True
        ):
            renders[name] = list(files)
        return renders
    table = read_table(dataset.manifest_path, columns=["identity", "source_paths"])
    for name, sources in zip(
        table.column("identity").to_pylist(),
        table.column("source_paths").to_pylist(),
        strict=True,
    ):
        known = renders.setdefault(name, [])
        known.extend(s for s in sources or [] if s not in known)
    return renders


def pose_figures(
    dataset: Dataset, landmarks: Landmarks, *, per_identity: int = DEFAULT_PER_IDENTITY
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The report's ``pose`` section and the yaw/pitch of every image looked at, per side.

    An identity's renders are all its source files in the run's plan (the variety the source
    offered), or, without a plan (a pruned copy), the renders its outputs drew on."""
    root = source_root(dataset.out_dir, dataset.config)
    renders_of = _renders(dataset)
    sides: dict[str, list[np.ndarray]] = {"sources": [], "outputs": []}
    identities = []
    for code, name in enumerate(dataset.identities):
        rows = np.flatnonzero(dataset.codes == code)
        renders = renders_of.get(name, [])
        chosen = {
            "sources": [root / s for s in renders[:per_identity]] if root is not None else [],
            "outputs": [dataset.out_dir / dataset.paths[r] for r in rows[:per_identity]],
        }
        entry: dict[str, Any] = {"identity": name, "label": dataset.labels[code]}
        for side, paths in chosen.items():
            poses = _poses(paths, landmarks)
            sides[side].append(poses)
            entry[f"{side}_yaw"] = pose_spread(poses[:, 0])
        identities.append(entry)
    section: dict[str, Any] = {"per_identity_limit": per_identity, "identities": identities}
    samples = {}
    for side, chunks in sides.items():
        poses = np.concatenate(chunks) if chunks else np.zeros((0, 2))
        samples[side] = poses
        found = poses[np.isfinite(poses[:, 0])]
        ranges = [e[f"{side}_yaw"]["range"] for e in identities]
        section[side] = {
            "images": int(len(poses)),
            "with_landmarks": int(len(found)),
            "yaw": distribution(found[:, 0]),
            "pitch": distribution(found[:, 1]),
            "identity_yaw_range": distribution(
                np.array([r for r in ranges if r is not None], dtype=np.float64)
            ),
        }
    return section, samples


def plot_pose(samples: dict[str, np.ndarray], path: Path) -> Path:
    """Yaw against pitch of the sources and the outputs, and their yaw histograms."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    scatter, histogram = figure.subplots(1, 2)
    edges = np.linspace(-90, 90, 37)
    for side, color in (("sources", "tab:gray"), ("outputs", "tab:green")):
        poses = samples[side]
        poses = poses[np.isfinite(poses[:, 0])]
        label = f"{side} (n={len(poses)})"
        scatter.scatter(poses[:, 0], poses[:, 1], s=8, alpha=0.6, color=color, label=label)
        counts, _ = np.histogram(poses[:, 0], edges)
        histogram.stairs(counts, edges, color=color, label=label)
    scatter.set_xlabel("yaw (degrees, + = turned to the image's right)")
    scatter.set_ylabel("pitch (degrees, + = down)")
    scatter.set_xlim(-90, 90)
    scatter.set_ylim(-60, 60)
    scatter.legend(fontsize=8)
    histogram.set_xlabel("yaw (degrees)")
    histogram.set_ylabel("images")
    histogram.legend(fontsize=8)
    figure.suptitle("Pose from five landmarks: renders vs outputs")
    from digi2real.analysis.report.pictures import save_figure

    return save_figure(figure, path)
