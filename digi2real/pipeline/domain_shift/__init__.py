"""Domain-gap correction of identity conditioning in Arc2Face's CLIP encoder space.

Arc2Face's text encoder maps an ArcFace vector to a (T, D) conditioning (77 x 768 for the
real weights). Conditioning computed from graphics renders sits in a different region of
that space than conditioning of real faces. The modules:

- ``stats``: streaming per-(position, dimension) statistics of encoder outputs
  (:class:`ConditioningStats`, float64 count / mean / M2 merged with Chan's formula, a
  bottom-k sample) and their ``.safetensors`` file; :func:`compute_stats`,
  :func:`merge_stats`, :func:`load_stats`, :func:`embedding_batches`;
- ``shift``: :class:`DomainShift`, which moves synthetic conditioning toward the real
  statistics (methods ``mean_shift`` and ``moment_match``, strength ``alpha``), and
  :func:`varying_positions`;
- ``compare``: the gap before and after the correction (:func:`compare`,
  :func:`format_compare`, :func:`compare_files`);
- ``plot``: the figure :func:`compare` writes with ``out_png``.

See docs/domain-shift.md for which parts are Digi2Real's idea and which are this project's
choices.
"""

from __future__ import annotations

from digi2real.pipeline.domain_shift.compare import compare, compare_files, format_compare
from digi2real.pipeline.domain_shift.shift import (
    DEFAULT_TOLERANCE,
    METHODS,
    POSITIONS,
    DomainShift,
    varying_positions,
)
from digi2real.pipeline.domain_shift.stats import (
    DEFAULT_MAX_SAMPLES,
    FORMAT_VERSION,
    ConditioningStats,
    compute_stats,
    embedding_batches,
    load_stats,
    merge_stats,
)

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "DEFAULT_TOLERANCE",
    "FORMAT_VERSION",
    "METHODS",
    "POSITIONS",
    "ConditioningStats",
    "DomainShift",
    "compare",
    "compare_files",
    "compute_stats",
    "embedding_batches",
    "format_compare",
    "load_stats",
    "merge_stats",
    "varying_positions",
]
