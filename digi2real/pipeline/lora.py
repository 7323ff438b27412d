"""LoRA fusion: a LoRA file merged into the UNet's weights once, at load.

The file is read as diffusers reads it (``StableDiffusionLoraLoaderMixin.lora_state_dict``: the
kohya/A1111 ``lora_unet_...`` keys with ``.alpha`` entries are converted there), loaded into the
UNet through peft (``load_lora_into_unet``), fused (``fuse_lora``: W + scale * alpha/rank * up @
down) and the peft wrappers removed (``unload_lora``), so the UNet is a plain
``UNet2DConditionModel`` again: same classes, same cost per call, nothing hand-merged.

Fusion runs in float32 whatever the run's dtype (the caller casts afterwards), so a half-precision
run rounds the fused weight once instead of adding two rounded terms.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

ADAPTER_NAME = "digi2real"
KEY_FORMATS = ("kohya", "diffusers", "peft")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file's UNet layers as diffusers reads them."""

    path: Path
    key_format: str  # kohya | diffusers | peft: how the file itself spells its keys
    state_dict: dict[str, torch.Tensor]  # diffusers' key naming after conversion
    network_alphas: dict[str, float] | None
    layers: int  # UNet layers the file adapts


def key_format(keys: list[str]) -> str:
    """How a LoRA file spells its keys: ``kohya`` (``lora_unet_down_blocks_0_..`` with
    ``lora_down``/``lora_up``/``alpha``), ``diffusers`` (``unet.down_blocks.0...lora.down``) or
    ``peft`` (``...lora_A``/``lora_B``)."""
    if keys and all(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if any(".lora.down." in k or ".lora.up." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers"
    raise ValueError(
        "not a LoRA file diffusers reads: expected kohya keys (lora_unet_..., lora_down/lora_up), "
        f"diffusers keys (unet....lora.down/up) or peft keys (lora_A/lora_B); first keys: "
        f"{sorted(keys)[:3]}"
    )


def read_lora(path: str | Path) -> LoraFile:
    """Read a ``.safetensors`` LoRA (no pickles: a LoRA is data) for the UNet."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA {path}: only .safetensors files are read (no pickles)")
    raw = load_file(str(path))
    fmt = key_format(list(raw))
    text_keys = [k for k in raw if k.startswith(_TEXT_ENCODER_PREFIXES)]
    if text_keys:
        # Arc2Face's text encoder is its own fine-tune: a LoRA trained on SD-1.5's CLIP would
        # not fit it, and digi2real adapts the UNet only.
        raise ValueError(
            f"LoRA {path} adapts the text encoder too ({len(text_keys)} keys such as "
            f"{text_keys[0]!r}); digi2real fuses UNet LoRAs only"
        )
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(raw)
    down = [k for k in state if k.endswith(("lora.down.weight", "lora_A.weight"))]
    if not down:
        raise ValueError(f"LoRA {path} holds no UNet layers")
    return LoraFile(path, fmt, state, alphas, len(down))


def _adapted_layers(unet: Any) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(module, BaseTunerLayer) for module in unet.modules())


def load_unfused(unet: Any, lora: LoraFile) -> Any:
    """``unet`` with the LoRA as separate peft layers (not fused): the reference that fusion is
    checked against. Every layer the file names must be found in the UNet."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    StableDiffusionLoraLoaderMixin.load_lora_into_unet(
        dict(lora.state_dict), lora.network_alphas, unet, adapter_name=ADAPTER_NAME
    )
    found = _adapted_layers(unet)
    if found != lora.layers:
        raise ValueError(
            f"LoRA {lora.path} names {lora.layers} UNet layers but {found} were found in this "
            "UNet: made for another architecture?"
        )
    return unet


def fuse_lora(unet: Any, lora: LoraFile, *, scale: float = 1.0) -> Any:
    """Merge ``lora`` into ``unet`` (in place, float32) and remove the peft layers."""
    if unet.dtype != torch.float32:
        raise ValueError(f"fuse LoRAs into a float32 UNet (got {unet.dtype}); cast afterwards")
    load_unfused(unet, lora)
    unet.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER_NAME])
    unet.unload_lora()
    if _adapted_layers(unet):
        raise RuntimeError("peft layers left in the UNet after unload_lora()")
    logger.info(
        "fused LoRA %s (%s keys, %d layers, scale %g)",
        lora.path,
        lora.key_format,
        lora.layers,
        scale,
    )
    return unet
