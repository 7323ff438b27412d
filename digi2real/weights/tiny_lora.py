"""Random-weight LoRA files for the tiny profile, in the key layouts of the public files.

Each adapted layer gets a ``down`` (rank x in [x kh x kw]) and an ``up`` (out x rank [x 1 x 1])
matrix, as kohya's and diffusers' LoRA layers for linear and convolution layers are shaped;
the kohya layout adds an ``alpha`` per layer (the fused update is alpha/rank * up @ down).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from digi2real.weights.configs import LORA_TARGET_SUFFIXES

KEY_LAYOUTS = ("kohya", "diffusers")
_STD = 0.02


def lora_targets(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a SD-1.5 LCM-LoRA adapts, in module order."""
    return [
        (name, module)
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
        and any(name == s or name.endswith("." + s) for s in LORA_TARGET_SUFFIXES)
    ]


def _pair(module: nn.Module, rank: int, generator: torch.Generator) -> tuple[Any, Any]:
    if isinstance(module, nn.Linear):
        down_shape: tuple[int, ...] = (rank, module.in_features)
        up_shape: tuple[int, ...] = (module.out_features, rank)
    else:
        assert isinstance(module, nn.Conv2d)
        down_shape = (rank, module.in_channels, *module.kernel_size)
        up_shape = (module.out_channels, rank, 1, 1)
    down = torch.randn(down_shape, generator=generator) * _STD
    up = torch.randn(up_shape, generator=generator) * _STD
    return down, up


def random_lora(
    unet: nn.Module, *, layout: str, rank: int, alpha: float, seed: int
) -> dict[str, torch.Tensor]:
    """A LoRA for ``unet``'s architecture with seeded random weights, keys in ``layout``."""
    if layout not in KEY_LAYOUTS:
        raise ValueError(f"unknown LoRA key layout {layout!r}; valid: {', '.join(KEY_LAYOUTS)}")
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in lora_targets(unet):
        down, up = _pair(module, rank, generator)
        if layout == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = down
            state[f"{key}.lora_up.weight"] = up
            state[f"{key}.alpha"] = torch.tensor(float(alpha))
        else:
            state[f"unet.{name}.lora.down.weight"] = down
            state[f"unet.{name}.lora.up.weight"] = up
    return {k: v.contiguous() for k, v in state.items()}
