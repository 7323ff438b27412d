"""The samplers of the generation stage: the diffusers scheduler each name builds, and how a
step is taken.

- ``dpmsolver++``: DPM-Solver++ (2M), deterministic: the paper's sampler, 25 steps.
- ``lcm``: diffusers' ``LCMScheduler`` for a UNet with the LCM-LoRA fused (1-8 steps).
- ``tcd``: diffusers' ``TCDScheduler`` for a UNet with the TCD-LoRA fused (1-8 steps).

LCM and TCD draw fresh noise at every step but the last. It comes from each image's own CPU
generator (the one that drew its initial noise), so an image does not depend on the batch it
ran in, as for DPM-Solver++.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from digi2real.config import SAMPLERS

SCHEDULERS = {
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}
# Samplers whose step adds noise: they need per-image generators for the whole trajectory.
STOCHASTIC = frozenset({"lcm", "tcd"})
# TCD's gamma (``eta`` in diffusers): the share of each step's noise that is drawn afresh.
# 0.3 is what the TCD authors and diffusers' pipeline use by default.
TCD_ETA = 0.3


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return name


def make_scheduler(
    name: str, scheduler_config: dict[str, Any], steps: int, device: torch.device
) -> Any:
    """The scheduler of sampler ``name`` from SD-1.5's scheduler config, set to ``steps``."""
    import diffusers

    check_sampler(name)
    cls = getattr(diffusers, SCHEDULERS[name])
    # SD-1.5's config is PNDM's: keep the fields this scheduler has (the rest it would ignore,
    # with a warning per call)
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in scheduler_config.items() if k in accepted}
    if name == "dpmsolver++":
        scheduler = cls.from_config(config, algorithm_type="dpmsolver++")
    else:
        scheduler = cls.from_config(config)
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def step(
    name: str,
    scheduler: Any,
    noise_pred: torch.Tensor,
    timestep: Any,
    latents: torch.Tensor,
    generators: Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """One scheduler step; ``generators`` (one per image) feed the stochastic samplers."""
    if name not in STOCHASTIC:
        return scheduler.step(noise_pred, timestep, latents).prev_sample
    if generators is None:
        raise ValueError(
            f"sampler {name!r} draws noise at every step: pass seeds or generators (one per "
            "image) so that each image's noise is its own"
        )
    extra = {"eta": TCD_ETA} if name == "tcd" else {}
    return scheduler.step(
        noise_pred, timestep, latents, generator=list(generators), **extra
    ).prev_sample
