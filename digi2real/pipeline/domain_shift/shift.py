"""The correction itself: :class:`DomainShift` moves synthetic conditioning toward real
statistics (``mean_shift`` / ``moment_match``, on ``all`` or only ``varying`` positions, with
strength ``alpha``), as a per-element affine map computed once in float64.

:func:`varying_positions` finds the token positions that differ between identities; the
pair checks refuse real/synthetic stats that do not belong together.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digi2real.config import SHIFT_METHODS, SHIFT_POSITIONS, ShiftConfig
from digi2real.pipeline.domain_shift.stats import ConditioningStats, load_stats

logger = logging.getLogger(__name__)

# "none" is the config's off switch, not a method a DomainShift can apply.
METHODS = tuple(method for method in SHIFT_METHODS if method != "none")
POSITIONS = SHIFT_POSITIONS
# A standard deviation at or below TOLERANCE * max(1, |mean|) counts as zero: the constant
# prompt prefix of a causal encoder differs between machines and batch sizes only by
# floating-point noise, which must neither mark it "varying" nor blow up a variance ratio.
DEFAULT_TOLERANCE = 1e-4


def negligible_std(std: np.ndarray, mean: np.ndarray, tolerance: float) -> np.ndarray:
    """Where a standard deviation counts as zero: at most ``tolerance * max(1, |mean|)``."""
    return std <= tolerance * np.maximum(1.0, np.abs(mean))


def varying_positions(
    real: ConditioningStats,
    synthetic: ConditioningStats,
    tolerance: float = DEFAULT_TOLERANCE,
) -> np.ndarray:
    """(T,) bool: token positions whose conditioning differs between identities.

    A position varies when any dimension's real or synthetic standard deviation exceeds
    ``tolerance * max(1, |mean|)``. In a causal encoder the prompt prefix before the id
    token is identical for everyone and does not vary.
    """
    check_pair(real, synthetic)
    real_varies = ~negligible_std(real.std, real.mean, tolerance)
    synthetic_varies = ~negligible_std(synthetic.std, synthetic.mean, tolerance)
    return (real_varies | synthetic_varies).any(axis=1)


def check_pair(real: ConditioningStats, synthetic: ConditioningStats) -> None:
    """Refuse stats that are not non-empty real then synthetic of one shape and encoder."""
    if real.kind != "real" or synthetic.kind != "synthetic":
        raise ValueError(
            f"expected real then synthetic stats, got {real.kind!r} ({real.source}) and "
            f"{synthetic.kind!r} ({synthetic.source})"
        )
    if real.shape != synthetic.shape:
        raise ValueError(
            f"real stats have shape {real.shape} but synthetic stats {synthetic.shape}"
        )
    if real.encoder_digest != synthetic.encoder_digest:
        raise ValueError(
            f"real stats ({real.source}) are of encoder {real.encoder_digest} but synthetic "
            f"stats ({synthetic.source}) of encoder {synthetic.encoder_digest}"
        )
    if real.count == 0 or synthetic.count == 0:
        raise ValueError("real and synthetic stats must both be non-empty")


@dataclass(frozen=True)
class DomainShift:
    """Moves synthetic identity conditioning toward real-face statistics.

    ``mean_shift``:   c' = c + alpha * (mu_real - mu_synth)
    ``moment_match``: m  = mu_real + (c - mu_synth) * sigma_real / sigma_synth
                      c' = c + alpha * (m - c)

    Both are per-(position, dimension) affine maps ``c' = c * scale + offset``, computed
    once in float64 at construction (later changes to the stats objects are not seen).
    Where the synthetic standard deviation is zero or tiny (at most
    ``tolerance * max(1, |mu_synth|)``) the ratio sigma_real / sigma_synth is taken as 1,
    so such elements are mean-shifted instead of producing NaN or inf.

    ``positions="varying"`` corrects only token positions whose conditioning differs
    between identities (see :func:`varying_positions`); the others are returned
    bit-for-bit. ``alpha = 0`` returns the input tensor itself. Apply to the identity
    conditioning only, never to the empty-prompt branch of classifier-free guidance.
    """

    method: str
    alpha: float
    positions: str
    real: ConditioningStats
    synthetic: ConditioningStats
    tolerance: float = DEFAULT_TOLERANCE
    _scale: np.ndarray = field(init=False, repr=False, compare=False)
    _offset: np.ndarray = field(init=False, repr=False, compare=False)
    _mask: np.ndarray = field(init=False, repr=False, compare=False)
    _device_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown shift method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.positions not in POSITIONS:
            raise ValueError(
                f"unknown shift positions {self.positions!r}; valid: {', '.join(POSITIONS)}"
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):
            raise ValueError(f"alpha must be a number, got {self.alpha!r}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be finite and >= 0, got {self.alpha}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"tolerance must be finite and >= 0, got {self.tolerance}")
        object.__setattr__(self, "alpha", float(self.alpha))  # numpy scalars -> JSON-able
        check_pair(self.real, self.synthetic)

        alpha = self.alpha
        mu_real, mu_synth = self.real.mean, self.synthetic.mean
        if self.method == "mean_shift":
            scale = np.ones(self.real.shape)
            offset = alpha * (mu_real - mu_synth)
        else:
            std_synth = self.synthetic.std
            tiny = negligible_std(std_synth, mu_synth, self.tolerance)
            ratio = np.where(tiny, 1.0, self.real.std / np.where(tiny, 1.0, std_synth))
            # c + alpha * (mu_r + (c - mu_s) * r - c), regrouped as c * scale + offset.
            scale = 1.0 + alpha * (ratio - 1.0)
            offset = alpha * (mu_real - mu_synth * ratio)
        if self.positions == "varying":
            mask = varying_positions(self.real, self.synthetic, self.tolerance)
        else:
            mask = np.ones(self.real.shape[0], dtype=bool)
        scale = np.where(mask[:, None], scale, 1.0)
        offset = np.where(mask[:, None], offset, 0.0)
        object.__setattr__(self, "_scale", scale)
        object.__setattr__(self, "_offset", offset)
        object.__setattr__(self, "_mask", mask)
        logger.debug(
            "domain shift %s alpha=%g on %d/%d positions",
            self.method,
            alpha,
            int(mask.sum()),
            mask.size,
        )

    @classmethod
    def from_files(
        cls,
        method: str,
        alpha: float,
        positions: str,
        real_path: str | Path,
        synthetic_path: str | Path,
        encoder_digest: str,
        *,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> DomainShift:
        """Load both stats files, refusing any not computed with ``encoder_digest``."""
        real = load_stats(real_path, expected_encoder_digest=encoder_digest, expected_kind="real")
        synthetic = load_stats(
            synthetic_path, expected_encoder_digest=encoder_digest, expected_kind="synthetic"
        )
        return cls(method, alpha, positions, real, synthetic, tolerance=tolerance)

    @classmethod
    def from_config(cls, shift: ShiftConfig, encoder_digest: str) -> DomainShift | None:
        """The shift a config's ``shift`` section asks for, or None when it is off."""
        if not shift.enabled:
            return None
        if shift.real_stats is None or shift.synthetic_stats is None:
            raise ValueError("shift.real_stats and shift.synthetic_stats must both be set")
        return cls.from_files(
            shift.method,
            shift.alpha,
            shift.positions,
            shift.real_stats,
            shift.synthetic_stats,
            encoder_digest,
        )

    @property
    def position_mask(self) -> np.ndarray:
        """(T,) bool: positions this shift changes."""
        return self._mask.copy()

    def corrected_stats(
        self, synthetic: ConditioningStats | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and population variance (T, D), float64, of a synthetic population after
        the shift (by default the population the shift was estimated on)."""
        synthetic = self.synthetic if synthetic is None else synthetic
        mean = synthetic.mean * self._scale + self._offset
        variance = synthetic.variance * np.square(self._scale)
        return mean, variance

    def _coefficients(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (device, dtype)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = (
                torch.from_numpy(self._scale).to(device=device, dtype=dtype),
                torch.from_numpy(self._offset).to(device=device, dtype=dtype),
                torch.from_numpy(self._mask).to(device=device).view(1, -1, 1),
            )
            self._device_cache[key] = cached
        return cached

    def apply(self, cond: torch.Tensor) -> torch.Tensor:
        """Correct a (B, T, D) identity conditioning; returns a tensor of ``cond``'s dtype.

        Computed on ``cond``'s device in float32 (float64 when ``cond`` is float64).
        """
        if not isinstance(cond, torch.Tensor) or not cond.is_floating_point():
            raise ValueError(f"cond must be a floating-point torch.Tensor, got {type(cond)}")
        if cond.ndim != 3 or tuple(cond.shape[1:]) != self.real.shape:
            raise ValueError(
                f"cond has shape {tuple(cond.shape)}, but the stats expect "
                f"(B, {self.real.shape[0]}, {self.real.shape[1]})"
            )
        if self.alpha == 0:
            return cond
        compute_dtype = torch.promote_types(cond.dtype, torch.float32)
        scale, offset, mask = self._coefficients(cond.device, compute_dtype)
        work = cond.to(compute_dtype)
        # mean_shift's scale is exactly 1: skip the multiply.
        out = work + offset if self.method == "mean_shift" else torch.addcmul(offset, work, scale)
        if not self._mask.all():
            out = torch.where(mask, out, work)
        return out.to(cond.dtype)

    def __call__(self, cond: torch.Tensor) -> torch.Tensor:
        return self.apply(cond)

    def describe(self) -> dict[str, Any]:
        """What went into the correction, for manifests and config.yaml (JSON-able)."""
        return {
            "method": self.method,
            "alpha": self.alpha,
            "positions": self.positions,
            "tolerance": self.tolerance,
            "encoder_digest": self.real.encoder_digest,
            "real_stats_sha256": self.real.checksum(),
            "synthetic_stats_sha256": self.synthetic.checksum(),
            "real_count": self.real.count,
            "synthetic_count": self.synthetic.count,
            "corrected_positions": int(self._mask.sum()),
        }
