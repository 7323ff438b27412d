"""How large the real/synthetic gap is, before and after a :class:`DomainShift`:
:func:`compare` (a JSON-able dict, optionally with a figure), :func:`format_compare` (a text
table) and :func:`compare_files` (``digi2real stats compare``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.pipeline.domain_shift.plot import plot_compare
from digi2real.pipeline.domain_shift.shift import (
    DEFAULT_TOLERANCE,
    DomainShift,
    check_pair,
    negligible_std,
    varying_positions,
)
from digi2real.pipeline.domain_shift.stats import ConditioningStats, load_stats


def _ratio_summary(
    real_mean: np.ndarray,
    real_var: np.ndarray,
    other_mean: np.ndarray,
    other_var: np.ndarray,
    tolerance: float,
) -> dict[str, float | int]:
    """Quantiles of var_other / var_real over elements that vary in both populations."""
    usable = ~negligible_std(np.sqrt(real_var), real_mean, tolerance) & ~negligible_std(
        np.sqrt(other_var), other_mean, tolerance
    )
    if not usable.any():
        nan = float("nan")
        return {"elements": 0, "median": nan, "p05": nan, "p95": nan, "mean_abs_log10": nan}
    ratio = other_var[usable] / real_var[usable]
    p05, median, p95 = np.quantile(ratio, [0.05, 0.5, 0.95])
    return {
        "elements": int(usable.sum()),
        "median": float(median),
        "p05": float(p05),
        "p95": float(p95),
        "mean_abs_log10": float(np.abs(np.log10(ratio)).mean()),
    }


def _gap(
    real: ConditioningStats, mean: np.ndarray, variance: np.ndarray, tolerance: float
) -> dict[str, Any]:
    difference = real.mean - mean
    distance = float(np.linalg.norm(difference))
    return {
        "mean_distance": distance,
        "relative_mean_distance": distance / max(float(np.linalg.norm(real.mean)), 1e-30),
        "mean_distance_per_position": np.linalg.norm(difference, axis=1).tolist(),
        "position_norms": np.linalg.norm(mean, axis=1).tolist(),
        "variance_ratio": _ratio_summary(real.mean, real.variance, mean, variance, tolerance),
    }


def compare(
    real: ConditioningStats,
    synthetic: ConditioningStats,
    *,
    shift: DomainShift | None = None,
    out_png: Path | None = None,
    n_points: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """The real/synthetic gap in conditioning space, before and (with ``shift``) after.

    "after" is analytic: the corrected synthetic mean and variance follow from the shift's
    per-element affine map. With ``out_png`` a figure is written: distance per position,
    per-position mean norms, a 2-D PCA of sample conditionings (stored samples when both
    files have some, else ``n_points`` Gaussian draws per population from the
    per-dimension stats, seeded by ``seed``) and the variance-ratio distribution.
    """
    check_pair(real, synthetic)
    tolerance = shift.tolerance if shift is not None else DEFAULT_TOLERANCE
    if shift is not None:
        check_pair(shift.real, synthetic)
        if shift.real.shape != real.shape or shift.real.encoder_digest != real.encoder_digest:
            raise ValueError("shift was built from stats of another shape or encoder")
    result: dict[str, Any] = {
        "shape": list(real.shape),
        "encoder_digest": real.encoder_digest,
        "real": {"count": real.count, "source": real.source, "sha256": real.checksum()},
        "synthetic": {
            "count": synthetic.count,
            "source": synthetic.source,
            "sha256": synthetic.checksum(),
        },
        "varying_positions": np.flatnonzero(varying_positions(real, synthetic, tolerance)).tolist(),
        "real_position_norms": np.linalg.norm(real.mean, axis=1).tolist(),
        "shift": None,
        "before": _gap(real, synthetic.mean, synthetic.variance, tolerance),
        "after": None,
    }
    if shift is not None:
        result["shift"] = shift.describe()
        corrected_mean, corrected_var = shift.corrected_stats(synthetic)
        result["after"] = _gap(real, corrected_mean, corrected_var, tolerance)
    if out_png is not None:
        result["projection"] = plot_compare(
            real,
            synthetic,
            shift,
            result,
            Path(out_png),
            n_points=n_points,
            seed=seed,
            tolerance=tolerance,
        )
        result["png"] = str(out_png)
    return result


def format_compare(result: dict[str, Any], *, top: int = 10) -> str:
    """A small text table of :func:`compare`'s result for the terminal."""
    before, after = result["before"], result["after"]
    lines = [
        f"real:      {result['real']['count']} conditionings  ({result['real']['source']})",
        f"synthetic: {result['synthetic']['count']} conditionings  "
        f"({result['synthetic']['source']})",
        f"shape {tuple(result['shape'])}, encoder {result['encoder_digest'][:12]}, "
        f"{len(result['varying_positions'])} varying positions",
    ]
    if result["shift"] is not None:
        shift = result["shift"]
        lines.append(
            f"shift: {shift['method']}, alpha={shift['alpha']:g}, positions={shift['positions']}"
        )
    lines.append("")

    def column(gap: dict[str, Any] | None, getter: Callable[[dict[str, Any]], float]) -> str:
        return f"{getter(gap):>12.4g}" if gap is not None else f"{'-':>12}"

    rows: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("mean distance (L2)", lambda gap: gap["mean_distance"]),
        ("relative distance", lambda gap: gap["relative_mean_distance"]),
        ("var_s/var_r median", lambda gap: gap["variance_ratio"]["median"]),
        ("var_s/var_r p05", lambda gap: gap["variance_ratio"]["p05"]),
        ("var_s/var_r p95", lambda gap: gap["variance_ratio"]["p95"]),
        ("mean |log10 ratio|", lambda gap: gap["variance_ratio"]["mean_abs_log10"]),
    ]
    lines.append(f"{'':<22}{'before':>12}{'after':>12}")
    for name, getter in rows:
        lines.append(f"{name:<22}{column(before, getter)}{column(after, getter)}")

    distances = np.asarray(before["mean_distance_per_position"])
    order = np.argsort(-distances, kind="stable")[:top]
    lines += ["", f"largest per-position gaps (top {len(order)} of {len(distances)}):"]
    lines.append(
        f"{'pos':>4}{'before':>12}{'after':>12}{'|mu_real|':>12}{'|mu_synth|':>12}{'|mu_corr|':>12}"
    )
    for position in order:
        after_distance = (
            f"{after['mean_distance_per_position'][position]:>12.4g}" if after else f"{'-':>12}"
        )
        corrected_norm = f"{after['position_norms'][position]:>12.4g}" if after else f"{'-':>12}"
        lines.append(
            f"{int(position):>4}{distances[position]:>12.4g}{after_distance}"
            f"{result['real_position_norms'][position]:>12.4g}"
            f"{before['position_norms'][position]:>12.4g}{corrected_norm}"
        )
    return "\n".join(lines)


def compare_files(
    real: str | Path,
    synthetic: str | Path,
    *,
    method: str,
    alpha: float,
    positions: str,
    png: str | Path | None,
) -> str:
    """``digi2real stats compare``: the gap before and after the correction, as text (and a
    plot in ``png``)."""
    real_stats = load_stats(real, expected_kind="real")
    synth_stats = load_stats(
        synthetic,
        expected_kind="synthetic",
        expected_encoder_digest=real_stats.meta["encoder_digest"],
    )
    shift = DomainShift(method, alpha, positions, real_stats, synth_stats)
    result = compare(real_stats, synth_stats, shift=shift, out_png=png)
    text = format_compare(result)
    if png is not None:
        text += f"\nplot: {png}"
    return text
