"""Quality checks of the speed options: per-call relative error of each option against fp32
(``--variants``) and full trajectories on the tiny profile (``--trajectories``)."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from digi2real.bench.measure import sync, unit_rows
from digi2real.bench.models import Setup
from digi2real.bench.options import VARIANTS
from digi2real.pipeline.generate import Arc2FaceGenerator, SamplerSettings

# "half" is the device's half type (fp16 on CUDA, bf16 on CPU); these name one explicitly
HALF_VARIANTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Per-call relative error bars against fp32 (||fast - ref|| / ||ref||, random inputs).
TOL_SAME_DTYPE = 1e-4  # channels_last / compile in fp32: only float reassociation
# fp16/bf16: 20 unit roundoffs (2^-11 for fp16, 2^-8 for bf16), rounding accumulated through
# the network's normalised layers; fixed before measuring, not fitted to the results
TOL_HALF = {torch.float16: 20 * 2.0**-11, torch.bfloat16: 20 * 2.0**-8}
# Full trajectories on tiny, max grey levels (0..255) between two engine settings.
TOL_TRAJECTORY_SAME_DTYPE = 2  # batch size / overlap / channels_last / compile


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """Full fp32 matrix products and convolutions for the per-call checks: cuDNN convolutions
    default to TF32 (10-bit mantissa) on CUDA, which would put the fp32 reference itself
    about 1e-3 off, above the 1e-4 bar of the same-dtype options."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(fast: torch.Tensor, ref: torch.Tensor) -> float:
    fast, ref = fast.double().cpu(), ref.double().cpu()
    return float(torch.linalg.vector_norm(fast - ref) / torch.linalg.vector_norm(ref))


def half_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16  # CPU kernels exist for bf16 (AMX/AVX512-BF16 where present)


def measure_variants(
    setup: Setup, variants: list[str], batch: int, repeats: int
) -> list[dict[str, Any]]:
    """Per-call UNet and VAE-decode seconds and relative error against fp32, eager, for each
    speed option alone (on fp32 copies of the models; inputs random, seeded; TF32 off)."""
    with tf32_off():
        return _measure_variants(setup, variants, batch, repeats)


def _measure_variants(
    setup: Setup, variants: list[str], batch: int, repeats: int
) -> list[dict[str, Any]]:

    gen = setup.generator
    device = setup.device
    size = gen.latent_size
    rng = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, gen.latent_channels, size, size, generator=rng)
    context = torch.randn(batch, *gen.encoder.sequence_shape, generator=rng)
    timestep = torch.tensor(500)
    # the full-size models are GBs: copy only when the generator is not fp32 already
    fp32 = gen.dtype == torch.float32
    unet32 = gen.unet if fp32 else copy.deepcopy(gen.unet).float()
    vae32 = gen.vae if fp32 else copy.deepcopy(gen.vae).float()

    def call(unet: Any, vae: Any, dtype: torch.dtype, fmt: torch.memory_format):
        x = latents.to(device, dtype).contiguous(memory_format=fmt)
        c = context.to(device, dtype)
        with torch.inference_mode():
            noise = unet(x, timestep.to(device), encoder_hidden_states=c).sample
            image = vae.decode(x / vae.config.scaling_factor).sample
        return noise, image

    def timed(unet: Any, vae: Any, dtype: torch.dtype, fmt: torch.memory_format):
        out = call(unet, vae, dtype, fmt)  # warm-up (and compilation)
        t_unet = t_vae = 0.0
        x = latents.to(device, dtype).contiguous(memory_format=fmt)
        c = context.to(device, dtype)
        with torch.inference_mode():
            for _ in range(repeats):
                sync(device)
                begin = time.perf_counter()
                unet(x, timestep.to(device), encoder_hidden_states=c)
                sync(device)
                t_unet += time.perf_counter() - begin
                vae.decode(x / vae.config.scaling_factor)
                sync(device)
                t_vae += time.perf_counter() - begin
        return out, t_unet / repeats, (t_vae - t_unet) / repeats

    (ref_noise, ref_image), base_unet, base_vae = timed(
        unet32, vae32, torch.float32, torch.contiguous_format
    )
    rows = [
        {
            "variant": "fp32 eager (reference)",
            "unet_s": base_unet,
            "vae_decode_s": base_vae,
            "unet_rel_error": 0.0,
            "vae_rel_error": 0.0,
            "tolerance": 0.0,
            "passed": True,
        }
    ]
    for variant in variants:
        unet, vae = copy.deepcopy(unet32), copy.deepcopy(vae32)
        dtype, fmt, tolerance = torch.float32, torch.contiguous_format, TOL_SAME_DTYPE
        if variant == "channels_last":
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
            fmt = torch.channels_last
        elif variant == "half" or variant in HALF_VARIANTS:
            dtype = HALF_VARIANTS.get(variant) or half_dtype(device)
            tolerance = TOL_HALF[dtype]
            unet.to(dtype)
            vae.to(dtype)
        elif variant == "compile":
            unet.compile(dynamic=False)
            vae.decoder.compile(dynamic=False)
        else:
            raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
        try:
            (noise, image), t_unet, t_vae = timed(unet, vae, dtype, fmt)
        except Exception as error:  # noqa: BLE001 - a variant that cannot run is a result
            rows.append({"variant": variant, "error": f"{type(error).__name__}: {error}"[:300]})
            continue
        unet_error, vae_error = relative_error(noise, ref_noise), relative_error(image, ref_image)
        rows.append(
            {
                "variant": variant,
                "dtype": str(dtype).removeprefix("torch."),
                "unet_s": t_unet,
                "vae_decode_s": t_vae,
                "unet_speedup": base_unet / t_unet,
                "vae_speedup": base_vae / t_vae,
                "unet_rel_error": unet_error,
                "vae_rel_error": vae_error,
                "tolerance": tolerance,
                "passed": unet_error <= tolerance and vae_error <= tolerance,
            }
        )
        del unet, vae
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def trajectory_checks(setup: Setup, steps: int, count: int) -> list[dict[str, Any]]:
    """Full trajectories on the tiny profile: max grey-level difference between engine settings
    (batching, channels_last, compile: same dtype, tolerance 2 levels) and the cost of
    fewer-step presets and half precision (reported, no bar: random weights say nothing
    about visual quality)."""
    gen = setup.generator
    ids = unit_rows(count, gen.encoder.id_dim, seed=11)
    seeds = list(range(1000, 1000 + count))
    settings = SamplerSettings(steps=steps, guidance=setup.config.generation.guidance)

    def run(g: Arc2FaceGenerator, batch: int, settings: SamplerSettings) -> np.ndarray:
        parts = [
            g(ids[i : i + batch], seeds=seeds[i : i + batch], settings=settings).images
            for i in range(0, count, batch)
        ]
        return np.concatenate(parts).astype(np.int16)

    reference = run(gen, 1, settings)
    rows = []

    def add(name: str, images: np.ndarray, tolerance: int | None) -> None:
        diff = np.abs(images - reference)
        rows.append(
            {
                "check": name,
                "max_grey_levels": int(diff.max()),
                "mean_grey_levels": float(diff.mean()),
                "tolerance": tolerance,
                "passed": None if tolerance is None else bool(diff.max() <= tolerance),
            }
        )

    add(f"batch {count} vs batch 1", run(gen, count, settings), TOL_TRAJECTORY_SAME_DTYPE)

    variant = copy.deepcopy(gen)
    variant.optimize(channels_last=True)
    add("channels_last", run(variant, count, settings), TOL_TRAJECTORY_SAME_DTYPE)
    half = copy.deepcopy(gen)
    half.unet.to(half_dtype(setup.device))
    half.vae.to(half_dtype(setup.device))
    half.encoder.text_encoder.to(half_dtype(setup.device))
    add(f"{str(half_dtype(setup.device)).removeprefix('torch.')}", run(half, count, settings), None)
    for fewer in (20, 15):
        if fewer < steps:
            few = SamplerSettings(steps=fewer, guidance=settings.guidance)
            add(f"preset: {fewer} steps vs {steps}", run(gen, count, few), None)
    return rows


def compiled_trajectory(setup: Setup, steps: int, count: int) -> dict[str, Any]:

    gen = setup.generator
    ids = unit_rows(count, gen.encoder.id_dim, seed=11)
    seeds = list(range(1000, 1000 + count))
    settings = SamplerSettings(steps=steps, guidance=setup.config.generation.guidance)
    reference = gen(ids, seeds=seeds, settings=settings).images.astype(np.int16)
    compiled = copy.deepcopy(gen)
    compiled.optimize(compile=True)
    begin = time.perf_counter()
    try:
        images = compiled(ids, seeds=seeds, settings=settings).images.astype(np.int16)
    except Exception as error:  # noqa: BLE001 - an unusable compiler is a result
        return {"check": "compile", "error": f"{type(error).__name__}: {error}"[:300]}
    diff = np.abs(images - reference)
    return {
        "check": "compile",
        "max_grey_levels": int(diff.max()),
        "mean_grey_levels": float(diff.mean()),
        "tolerance": TOL_TRAJECTORY_SAME_DTYPE,
        "passed": bool(diff.max() <= TOL_TRAJECTORY_SAME_DTYPE),
        "first_call_s": time.perf_counter() - begin,
    }
