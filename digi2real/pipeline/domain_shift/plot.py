"""The figure of :func:`~digi2real.pipeline.domain_shift.compare.compare`: distance per token
position, per-position mean norms, a 2-D PCA of sample conditionings and the variance-ratio
distribution, rendered to PNG bytes in memory and written atomically."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from digi2real.data.fsio import atomic_write_bytes
from digi2real.pipeline.domain_shift.shift import DomainShift, negligible_std, varying_positions
from digi2real.pipeline.domain_shift.stats import ConditioningStats

if TYPE_CHECKING:
    from matplotlib.axes import Axes

logger = logging.getLogger(__name__)


def _projection_points(
    real: ConditioningStats,
    synthetic: ConditioningStats,
    n_points: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, str]:
    if len(real.samples) >= 2 and len(synthetic.samples) >= 2:
        return (
            real.samples.astype(np.float32),
            synthetic.samples.astype(np.float32),
            "stored samples",
        )
    rng = np.random.default_rng(seed)
    points = [
        (stats.mean + stats.std * rng.standard_normal((n_points, *stats.shape))).astype(np.float32)
        for stats in (real, synthetic)
    ]
    return points[0], points[1], "Gaussian draws from per-dimension stats"


def plot_compare(
    real: ConditioningStats,
    synthetic: ConditioningStats,
    shift: DomainShift | None,
    result: dict[str, Any],
    out_png: Path,
    *,
    n_points: int,
    seed: int,
    tolerance: float,
) -> str:
    """Write the figure of ``result`` (from :func:`compare`) to ``out_png``; returns where the
    PCA points came from ("stored samples" or Gaussian draws)."""
    data, origin = render_compare_png(
        real, synthetic, shift, result, n_points=n_points, seed=seed, tolerance=tolerance
    )
    atomic_write_bytes(out_png, data)
    logger.info("wrote domain-gap figure to %s", out_png)
    return origin


def render_compare_png(
    real: ConditioningStats,
    synthetic: ConditioningStats,
    shift: DomainShift | None,
    result: dict[str, Any],
    *,
    n_points: int,
    seed: int,
    tolerance: float,
) -> tuple[bytes, str]:
    """The figure as PNG bytes, and the origin of the PCA points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    real_points, synth_points, origin = _projection_points(real, synthetic, n_points, seed)
    clouds = [("real", real_points, "tab:blue"), ("synthetic", synth_points, "tab:orange")]
    if shift is not None:
        corrected_points = shift.apply(torch.from_numpy(synth_points)).numpy()
        clouds.append(("corrected synthetic", corrected_points, "tab:green"))

    figure = Figure(figsize=(12, 9), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    _distance_panel(axes[0, 0], result)
    _norm_panel(axes[0, 1], result)
    _pca_panel(axes[1, 0], clouds, varying_positions(real, synthetic, tolerance), origin)
    _ratio_panel(axes[1, 1], real, synthetic, shift, tolerance)

    title = f"real ({real.count}) vs synthetic ({synthetic.count}) conditioning"
    if shift is not None:
        title += f" - {shift.method}, alpha={shift.alpha:g}, positions={shift.positions}"
    figure.suptitle(title)
    buffer = io.BytesIO()
    # No "Software" entry: the PNG then depends only on the data.
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue(), origin


def _distance_panel(ax: Axes, result: dict[str, Any]) -> None:
    before, after = result["before"], result["after"]
    positions = np.arange(len(before["mean_distance_per_position"]))
    ax.plot(positions, before["mean_distance_per_position"], label="before", marker=".")
    if after is not None:
        ax.plot(positions, after["mean_distance_per_position"], label="after", marker=".")
    ax.set(
        title="||mu_real - mu_synth|| per token position",
        xlabel="token position",
        ylabel="L2 distance",
    )
    ax.legend()


def _norm_panel(ax: Axes, result: dict[str, Any]) -> None:
    before, after = result["before"], result["after"]
    positions = np.arange(len(result["real_position_norms"]))
    ax.plot(positions, result["real_position_norms"], label="real", marker=".")
    ax.plot(positions, before["position_norms"], label="synthetic", marker=".")
    if after is not None:
        ax.plot(positions, after["position_norms"], label="corrected", marker=".", ls="--")
    ax.set(title="per-position mean norm", xlabel="token position", ylabel="||mu||")
    ax.legend()


def _pca_panel(
    ax: Axes, clouds: list[tuple[str, np.ndarray, str]], keep: np.ndarray, origin: str
) -> None:
    """The clouds projected on the first two principal components of real + synthetic."""
    # Constant positions carry no spread; leaving them out keeps the PCA small.
    if not keep.any():
        keep = np.ones_like(keep)

    def flat(points: np.ndarray) -> np.ndarray:
        return points[:, keep].reshape(len(points), -1).astype(np.float64)

    fit = np.concatenate([flat(clouds[0][1]), flat(clouds[1][1])])
    centre = fit.mean(axis=0)
    _, _, components = np.linalg.svd(fit - centre, full_matrices=False)
    basis = components[:2].T
    for label, points, colour in clouds:
        xy = (flat(points) - centre) @ basis
        ax.scatter(xy[:, 0], xy[:, 1], s=12, alpha=0.7, label=label, color=colour)
    ax.set(title=f"PCA of conditionings ({origin})", xlabel="PC 1", ylabel="PC 2")
    ax.legend()


def _ratio_panel(
    ax: Axes,
    real: ConditioningStats,
    synthetic: ConditioningStats,
    shift: DomainShift | None,
    tolerance: float,
) -> None:
    sets = [("before", synthetic.mean, synthetic.variance)]
    if shift is not None:
        sets.append(("after", *shift.corrected_stats(synthetic)))
    log_ratios = []
    for label, gap_mean, gap_var in sets:
        usable = ~negligible_std(np.sqrt(real.variance), real.mean, tolerance) & ~negligible_std(
            np.sqrt(gap_var), gap_mean, tolerance
        )
        if usable.any():
            log_ratios.append((label, np.log10(gap_var[usable] / real.variance[usable])))
    if log_ratios:
        # Shared bins: after moment matching every ratio sits at 0, in a single bin.
        edges = np.histogram_bin_edges(np.concatenate([ratio for _, ratio in log_ratios]), 60)
        for label, ratio in log_ratios:
            ax.hist(ratio, bins=edges, alpha=0.6, label=label, log=True)
        ax.legend()
    ax.set(
        title="per-dimension log10(var_synth / var_real)",
        xlabel="log10 variance ratio",
        ylabel="elements",
    )
