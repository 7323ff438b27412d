"""Generation benchmark: Arc2Face's naive loop against this project's engine, side by side.

Profiles::

    tiny         the tiny profile (random weights, 64x64), built into a temp dir: CPU, seconds
    full-random  the full-size Arc2Face architecture (weights.REAL_*_CONFIG) with random weights,
                 built in memory: FLOPs and speed do not depend on the weight values
    real         an existing weights dir (--weights DIR)

One run measures, at the same settings (25 steps DPM-Solver++, guidance 3.0 by default):

* (a) naive: Arc2Face's README loop: one identity per ``StableDiffusionPipeline`` call,
  ``num_images_per_prompt=4``, ``prompt_embeds`` from one ArcFace vector (project_face_embs),
  fp16 on CUDA / fp32 on CPU, PIL output; then the same post-processing, serially;
* (b) engine: :class:`digi2real.runner.engine.Engine` (batches across identities, guidance in
  one UNet batch, dtype, SDPA, channels_last and torch.compile as configured, post-processing
  overlapped with the next batch's diffusion);

images/s, s/image, per-stage seconds (encode, denoise, decode, post-process), peak memory
(``torch.cuda.max_memory_allocated`` or peak RSS on CPU), achieved TFLOP/s (FLOPs counted once
per model call with ``FlopCounterMode`` on the meta device, then scaled) and its fraction of the
device's matrix-product peak measured in the same run. Plus quality checks (per-call relative
error of each speed option against fp32; full trajectories on tiny), the embedding stage
throughput of an R100-sized ArcFace network, and the peak RSS of planning a 1M-image run.

    .venv/bin/python scripts/bench.py --profile tiny
    python scripts/bench.py --profile full-random --device cuda --images 64 --json bench.json

``--engine-dtypes float16 bfloat16`` times the engine at each dtype (one model copy, converted
in place after the naive loop); ``--variants fp16 bf16`` checks each per call. The JSON is
rewritten after every section (``"complete": false`` until the end), so a run stopped at a
time limit keeps what it measured (scripts/gpu_check.py reads it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digi2real.config import Config
from digi2real.face.stack import FaceStack
from digi2real.pipeline.generate import Arc2FaceGenerator, SamplerSettings
from digi2real.runner.engine import Engine

logger = logging.getLogger("bench")

PROFILES = ("tiny", "full-random", "real")
EMBED_ARCHS = {"r100": (3, 13, 30, 3), "r50": (3, 4, 14, 3), "r18": (2, 2, 2, 2)}
VARIANTS = ("channels_last", "half", "fp16", "bf16", "compile")
# "half" is the device's half type (fp16 on CUDA, bf16 on CPU); these name one explicitly
HALF_VARIANTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
NAIVE_IMAGES_PER_PROMPT = 4  # Arc2Face README
# Per-call relative error bars against fp32 (||fast - ref|| / ||ref||, random inputs).
TOL_SAME_DTYPE = 1e-4  # channels_last / compile in fp32: only float reassociation
# fp16/bf16: 20 unit roundoffs (2^-11 for fp16, 2^-8 for bf16), rounding accumulated through
# the network's normalised layers; fixed before measuring, not fitted to the results
TOL_HALF = {torch.float16: 20 * 2.0**-11, torch.bfloat16: 20 * 2.0**-8}
# Full trajectories on tiny, max grey levels (0..255) between two engine settings.
TOL_TRAJECTORY_SAME_DTYPE = 2  # batch size / overlap / channels_last / compile
STAGES = ("encode", "denoise", "decode", "postprocess")


# -- small measuring tools ---------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mb() -> dict[str, float]:
    """Current and peak (since the last :func:`reset_peak_rss`) resident set, MiB."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return {"rss_mb": values.get("VmRSS", 0.0), "peak_rss_mb": values.get("VmHWM", 0.0)}


def reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


class PeakMemory:
    """Peak GPU memory allocated by torch, or peak RSS on CPU, over a ``with`` block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = rss_mb()["peak_rss_mb"]


class StageClock:
    """Wall seconds per stage; synchronises the device at stage boundaries."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._open: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        sync(self.device)
        begin = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] += time.perf_counter() - begin

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed

    def hook(self, name: str, module: torch.nn.Module) -> list[Any]:
        """Forward hooks timing every call of ``module`` (eager modules only)."""

        def before(*_: Any) -> None:
            sync(self.device)
            self._open[name] = time.perf_counter()

        def after(*_: Any) -> None:
            sync(self.device)
            self.seconds[name] += time.perf_counter() - self._open.pop(name)

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def matmul_peak_tflops(device: torch.device, seconds: float = 2.0) -> dict[str, Any]:
    """Measured throughput of one large matrix product: bf16 (fp16 if unsupported) on CUDA,
    fp32 on CPU: the denominator of 'fraction of peak'."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        n = 8192
    else:
        dtype, n = torch.float32, 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    # best of several short windows: a shared host's other load only ever slows a window down
    best = 0.0
    for _ in range(5):
        iterations, begin = 0, time.perf_counter()
        while time.perf_counter() - begin < seconds / 5:
            for _ in range(5):
                a @ b
            sync(device)
            iterations += 5
        best = max(best, 2 * n**3 * iterations / (time.perf_counter() - begin) / 1e12)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "tflops": best,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }


# -- models ------------------------------------------------------------------------------------


def _config_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def count_flops(generator: Arc2FaceGenerator) -> dict[str, float]:
    """FLOPs of one UNet forward, one VAE decode and one encoder pass at batch 1, counted on
    meta-device copies of the same architectures (nothing runs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextModel

    size = generator.latent_size
    encoder = generator.encoder
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_config_kwargs(dict(generator.unet.config)))
        vae = AutoencoderKL(**_config_kwargs(dict(generator.vae.config)))
        text = CLIPTextModel(encoder.text_encoder.config)
    latents = torch.zeros(1, generator.latent_channels, size, size, device="meta")
    context = torch.zeros(1, *encoder.sequence_shape, device="meta")
    flops = {}
    with FlopCounterMode(display=False) as counter:
        unet(latents, torch.tensor(10, device="meta"), encoder_hidden_states=context)
    flops["unet_forward"] = float(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        vae.decode(latents)
    flops["vae_decode"] = float(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        text(input_ids=encoder.input_ids.to("meta"))
    flops["encoder"] = float(counter.get_total_flops())
    return flops


def flops_per_image(flops: dict[str, float], steps: int) -> float:
    """Useful work of one image: 2 UNet samples (guidance) per step, one decode, one encode."""
    return 2 * steps * flops["unet_forward"] + flops["vae_decode"] + flops["encoder"]


def full_random_generator(
    device: torch.device, dtype: torch.dtype, tokenizer_dir: Path, seed: int = 0
) -> Arc2FaceGenerator:
    """The full-size Arc2Face UNet / SD-1.5 VAE / CLIP-L text encoder, random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from digi2real.pipeline.conditioning import IdentityEncoder
    from digi2real.weights.configs import (
        REAL_ENCODER_CONFIG,
        REAL_UNET_CONFIG,
        REAL_VAE_CONFIG,
        SD15_SCHEDULER_CONFIG,
    )
    from digi2real.weights.tokenizer import write_clip_tokenizer

    write_clip_tokenizer(tokenizer_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_config_kwargs(REAL_UNET_CONFIG))
        vae = AutoencoderKL(**_config_kwargs(REAL_VAE_CONFIG))
        text = CLIPTextModel(CLIPTextConfig(**_config_kwargs(REAL_ENCODER_CONFIG)))
    text = text.to(device, dtype)
    encoder = IdentityEncoder(text, CLIPTokenizer.from_pretrained(tokenizer_dir), id_dim=512)
    return Arc2FaceGenerator(
        unet.to(device, dtype), vae.to(device, dtype), encoder, dict(SD15_SCHEDULER_CONFIG)
    )


@dataclass
class Setup:
    profile: str
    device: torch.device
    dtype: str  # the engine's dtype
    naive_dtype: str
    generator: Arc2FaceGenerator  # shared by both paths (naive runs first, before optimize())
    config: Config
    face_weights: Any  # WeightsDir whose face models post-process
    notes: list[str] = field(default_factory=list)


def build_setup(args: argparse.Namespace, workdir: Path) -> Setup:
    from digi2real.weights import build_tiny, open_weights

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = args.dtype or ("float16" if cuda else "float32")
    naive_dtype = "float16" if cuda else "float32"  # Arc2Face README: fp16 on the GPU
    if dtype != naive_dtype:
        raise ValueError(
            f"--dtype {dtype}: the naive loop runs {naive_dtype} on {device.type} and both paths "
            f"share one model copy; use --dtype {naive_dtype} (time other dtypes with "
            "--engine-dtypes, per call with --variants)"
        )
    notes = []
    if args.profile == "real":
        if args.weights is None:
            raise ValueError("--profile real needs --weights DIR")
        face_weights = open_weights(args.weights)
        generator = None
    else:
        face_weights = build_tiny(workdir / "tiny")
        generator = None
        if args.profile == "full-random":
            generator = full_random_generator(
                device, getattr(torch, dtype), workdir / "tokenizer", seed=args.seed
            )
            notes.append(
                "post-processing uses the tiny profile's detector (finds nothing; centre-crop "
                "fallback) and recognizer: detection/embedding cost of real models is in the "
                "'embedding' section, not in the post-process column"
            )
    fallback = "none" if args.profile == "real" else "center_crop"
    config = Config().override(
        {
            "weights": str(face_weights.root),
            "generation.steps": args.steps,
            "generation.guidance": args.guidance,
            "generation.dtype": dtype,
            "generation.batch_size": args.batch_sizes[0],
            "generation.compile": args.compile,
            "generation.channels_last": not args.no_channels_last,
            "filter.fallback": fallback,
            "run.device": str(device),
        }
    )
    if generator is None:
        face_stack = FaceStack(config, face_weights, device=str(device))
        generator = Arc2FaceGenerator.from_weights(
            face_weights, id_dim=face_stack.id_dim, device=device, dtype=dtype
        )
    return Setup(args.profile, device, dtype, naive_dtype, generator, config, face_weights, notes)


# -- the two paths -----------------------------------------------------------------------------


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def path_result(
    name: str,
    images: int,
    wall: float,
    clock: StageClock,
    memory: PeakMemory,
    work_per_image: float,
    peak_tflops: float,
    **extra: Any,
) -> dict[str, Any]:
    tflops = work_per_image * images / wall / 1e12
    return {
        "path": name,
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "s_per_image": wall / images,
        "stages_s": dict(clock.seconds),
        "peak_memory_mb": memory.peak_mb,
        "memory_kind": memory.kind,
        "achieved_tflops": tflops,
        "fraction_of_peak": tflops / peak_tflops,
        **extra,
    }


def run_naive(
    setup: Setup, ids: np.ndarray, face: FaceStack, work: float, peak: float
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Arc2Face's README loop, one identity per pipeline call, then serial post-processing."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    gen = setup.generator
    config = {k: v for k, v in gen.scheduler_config.items() if not k.startswith("_")}
    scheduler = DPMSolverMultistepScheduler.from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline(
            vae=gen.vae,
            text_encoder=gen.encoder.text_encoder,
            tokenizer=gen.encoder.tokenizer,
            unet=gen.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    # one untimed call at the timed calls' shapes (2 steps: each step has the same shapes), as
    # the engine gets: CUDA kernel loading, cuDNN/cuBLAS handles and first-call allocations
    # would otherwise be charged to the naive loop alone and inflate the speedup
    with torch.inference_mode():
        warm = pipe(
            prompt_embeds=gen.encoder.encode(ids[:1]),
            num_inference_steps=2,
            guidance_scale=setup.config.generation.guidance,
            num_images_per_prompt=NAIVE_IMAGES_PER_PROMPT,
        ).images
    face.postprocess([np.asarray(image) for image in warm])
    sync(setup.device)
    clock = StageClock(setup.device)
    hooks = clock.hook("encode", gen.encoder.text_encoder) + clock.hook("denoise", gen.unet)
    hooks += clock.hook("decode", gen.vae.decoder)
    images: list[np.ndarray] = []
    try:
        with PeakMemory(setup.device) as memory, torch.inference_mode():
            sync(setup.device)
            begin = time.perf_counter()
            for row in ids:
                # project_face_embs: one vector -> (1, 77, D); the hook above times it
                prompt_embeds = gen.encoder.encode(row[None])
                out = pipe(
                    prompt_embeds=prompt_embeds,
                    num_inference_steps=setup.config.generation.steps,
                    guidance_scale=setup.config.generation.guidance,
                    num_images_per_prompt=NAIVE_IMAGES_PER_PROMPT,
                ).images
                arrays = [np.asarray(image) for image in out]
                with clock.stage("postprocess"):
                    face.postprocess(arrays)
                images.extend(arrays)
            sync(setup.device)
            wall = time.perf_counter() - begin
    finally:
        for handle in hooks:
            handle.remove()
    result = path_result(
        "naive",
        len(images),
        wall,
        clock,
        memory,
        work,
        peak,
        batch=NAIVE_IMAGES_PER_PROMPT,
        dtype=setup.naive_dtype,
    )
    return result, images


def run_engine(
    engine: Engine, ids: np.ndarray, device: torch.device, work: float, peak: float
) -> tuple[dict[str, Any], list[np.ndarray]]:
    gen = engine.generator
    clock = StageClock(device)
    originals = gen.encode, gen.denoise, gen.decode
    gen.encode = clock.wrap("encode", gen.encode)  # type: ignore[method-assign]
    gen.denoise = clock.wrap("denoise", gen.denoise)  # type: ignore[method-assign]
    gen.decode = clock.wrap("decode", gen.decode)  # type: ignore[method-assign]
    seeds = list(range(len(ids)))
    engine.timings = type(engine.timings)()
    try:
        with PeakMemory(device) as memory:
            sync(device)
            begin = time.perf_counter()
            faces = engine.generate(ids, seeds)
            sync(device)
            wall = time.perf_counter() - begin
    finally:
        del gen.encode, gen.denoise, gen.decode
    assert (gen.encode, gen.denoise, gen.decode) == originals
    clock.seconds["postprocess"] = engine.timings.postprocess
    exposed = max(0.0, wall - engine.timings.diffusion)
    result = path_result(
        "engine",
        len(faces),
        wall,
        clock,
        memory,
        work,
        peak,
        batch=engine.batch_size,
        dtype=gen.dtype_name,  # the generator's own: --engine-dtypes converts it in place
        compile=gen.compiled,
        channels_last=gen.channels_last,
        overlap=engine.overlap,
        postprocess_exposed_s=exposed,
        non_diffusion_fraction=exposed / wall,
        oom_events=list(engine.oom_events),
    )
    return result, [f.image for f in faces]


# -- quality and options -----------------------------------------------------------------------


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
    import copy

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
    import copy

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
    import copy

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


# -- embedding stage ---------------------------------------------------------------------------


def embedding_throughput(
    arch: str, device: torch.device, batch: int, seconds: float, onnx: bool, workdir: Path
) -> dict[str, Any]:
    """Aligned faces/s of an IResNet (R100 = arcface.onnx's size) with random weights."""
    from digi2real.evaluate.backbones import IResNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = IResNet(EMBED_ARCHS[arch]).eval()
    faces = torch.randn(batch, 3, 112, 112)
    result: dict[str, Any] = {"arch": arch, "batch": batch}

    def rate(run: Callable[[], Any]) -> float:
        run()
        count, begin = 0, time.perf_counter()
        while True:
            run()
            count += batch
            elapsed = time.perf_counter() - begin
            if elapsed >= seconds:
                return count / elapsed

    if device.type == "cuda":
        torch_model = model.to(device, torch.float16).to(memory_format=torch.channels_last)
        x = faces.to(device, torch.float16).contiguous(memory_format=torch.channels_last)

        def torch_run() -> None:
            with torch.inference_mode():
                torch_model(x)
            torch.cuda.synchronize(device)

        result["torch"] = {
            "runtime": "torch CUDA fp16 channels_last",
            "faces_per_s": rate(torch_run),
        }
    else:
        threads = torch.get_num_threads()

        def torch_run() -> None:
            with torch.inference_mode():
                model(faces)

        per_s = rate(torch_run)
        result["torch"] = {
            "runtime": f"torch CPU fp32, {threads} threads",
            "faces_per_s": per_s,
            "faces_per_s_per_core": per_s / threads,
        }
    if onnx:
        result["onnxruntime"] = onnx_throughput(model.float().cpu(), faces, workdir, rate)
    return result


def onnx_throughput(
    model: torch.nn.Module, faces: torch.Tensor, workdir: Path, rate: Callable[..., float]
) -> dict[str, Any]:
    import onnxruntime as ort

    from digi2real.face.session import make_session

    path = workdir / "iresnet.onnx"
    begin = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            model,
            (faces[:2],),
            dynamo=True,
            input_names=["input"],
            output_names=["embedding"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
            external_data=False,
            optimize=True,
        )
    program.save(str(path))
    export_s = time.perf_counter() - begin
    blob = faces.numpy()
    cores = os.cpu_count() or 1
    rows = {}
    for threads in sorted({1, cores}):
        session = make_session(path, "cpu", intra_op_threads=threads)
        name = session.get_inputs()[0].name
        per_s = rate(lambda s=session, n=name: s.run(None, {n: blob}))
        rows[f"{threads}_threads"] = {"faces_per_s": per_s, "faces_per_s_per_core": per_s / threads}
    return {
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "providers": session.get_providers(),
        "export_s": export_s,
        **rows,
    }


# -- planning memory ---------------------------------------------------------------------------


def plan_memory_child(images: int, per_identity: int, shard_size: int) -> dict[str, Any]:
    """Runs in a fresh process: plan ``images`` fake files as the runner does (Plan ->
    plan_table -> plan.parquet bytes -> load_plan) and report the peak RSS."""
    from digi2real.data import fsio
    from digi2real.data.layout import OutLayout
    from digi2real.data.manifest import error_table, parquet_bytes, write_parquet
    from digi2real.data.readers import IdentitySource
    from digi2real.runner import plan as plan_module

    baseline = rss_mb()["rss_mb"]
    begin = time.perf_counter()
    root = Path("/data/digiface")
    identities = math.ceil(images / per_identity)
    sources = [
        IdentitySource(f"{i:06d}", [root / f"{i:06d}" / f"{k}.png" for k in range(per_identity)])
        for i in range(identities)
    ]
    shards = [sources[i : i + shard_size] for i in range(0, len(sources), shard_size)]
    plan = plan_module.Plan(root, shards, [])
    built = rss_mb()["rss_mb"]
    table = plan_module.plan_table(plan)
    data = parquet_bytes(table)
    del table, plan, shards, sources
    with tempfile.TemporaryDirectory() as tmp:
        paths = OutLayout(tmp)
        fsio.atomic_write_bytes(paths.plan, data)
        write_parquet(paths.plan_errors, error_table([]))
        config = Config().override({"source.root": str(root)})
        loaded = plan_module.load_plan(Path(tmp), config)
        assert loaded.num_images == identities * per_identity
    return {
        "images": identities * per_identity,
        "identities": identities,
        "plan_parquet_mb": len(data) / 2**20,
        "baseline_rss_mb": baseline,
        "rss_after_plan_objects_mb": built,
        "peak_rss_mb": rss_mb()["peak_rss_mb"],
        "seconds": time.perf_counter() - begin,
        "target_mb": 2048,
        "passed": rss_mb()["peak_rss_mb"] < 2048,
    }


def plan_memory(images: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--plan-child", str(images)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"images": images, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(headers, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "pass" if value else "FAIL"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000 or abs(value) < 10 ** -(digits - 1):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def paths_table(paths: list[dict[str, Any]]) -> str:
    rows = []
    naive = paths[0]
    metrics = [
        ("images", "images"),
        ("batch", "batch"),
        ("dtype", "dtype"),
        ("compile", "compile"),
        ("wall s", "wall_s"),
        ("images/s", "images_per_s"),
        ("s/image", "s_per_image"),
        *[(f"{s} s", s) for s in STAGES],
        ("postprocess exposed s", "postprocess_exposed_s"),
        ("peak memory MiB", "peak_memory_mb"),
        ("achieved TFLOP/s", "achieved_tflops"),
        ("fraction of peak", "fraction_of_peak"),
    ]
    for label, key in metrics:
        row = [label]
        for path in paths:
            value = path["stages_s"][key] if key in STAGES else path.get(key)
            if key == "postprocess_exposed_s" and path["path"] == "naive":
                value = path["stages_s"]["postprocess"]
            if key == "compile" and isinstance(value, bool):
                value = "on" if value else "off"  # fmt() would print a bool as pass/FAIL
            row.append(fmt(value))
        rows.append(row)
    rows.append(
        ["speedup vs naive"] + [fmt(p["images_per_s"] / naive["images_per_s"]) for p in paths]
    )
    return table(["metric", *[p["path"] + f" (b{p['batch']})" for p in paths]], rows)


def render(report: dict[str, Any]) -> str:
    out = []
    head = report["run"]
    out.append(
        f"digi2real bench: profile {head['profile']}, device {head['device_name']}, "
        f"{head['resolution']}x{head['resolution']}, {head['steps']} steps, guidance "
        f"{head['guidance']}, matmul peak {fmt(report['peak']['tflops'])} TFLOP/s "
        f"({report['peak']['dtype']}), {fmt(report['flops_per_image'] / 1e12)} TFLOP/image"
    )
    out.append(paths_table(report["paths"]) if report.get("paths") else "(no paths timed)")
    if report.get("variants"):
        rows = [
            [
                v["variant"],
                fmt(v.get("unet_s")),
                fmt(v.get("vae_decode_s")),
                fmt(v.get("unet_speedup")),
                fmt(v.get("vae_speedup")),
                fmt(v.get("unet_rel_error")),
                fmt(v.get("vae_rel_error")),
                fmt(v.get("tolerance")),
                fmt(v.get("passed")) if "error" not in v else v["error"][:60],
            ]
            for v in report["variants"]
        ]
        out.append(
            "\nper-call speed options (batch "
            f"{report['variant_batch']}), relative error against fp32 (TF32 off):\n"
            + table(
                ["variant", "UNet s", "VAE s", "UNet x", "VAE x", "UNet err", "VAE err", "tol", ""],
                rows,
            )
        )
    if report.get("trajectories"):
        rows = [
            [
                t["check"],
                fmt(t.get("max_grey_levels")),
                fmt(t.get("mean_grey_levels")),
                fmt(t.get("tolerance")),
                fmt(t.get("passed")) if "error" not in t else t["error"][:60],
            ]
            for t in report["trajectories"]
        ]
        out.append(
            "\nfull trajectories (max/mean grey levels vs fp32 batch 1):\n"
            + table(["check", "max", "mean", "tol", ""], rows)
        )
    embed = report.get("embedding")
    if embed:
        lines = [
            f"\nembedding stage, IResNet {embed['arch']} (random weights), batch {embed['batch']}:"
        ]
        for key in ("torch", "onnxruntime"):
            if key not in embed:
                continue
            entry = embed[key]
            if key == "torch":
                lines.append(
                    f"  {entry['runtime']}: {fmt(entry['faces_per_s'])} faces/s"
                    + (
                        f" ({fmt(entry['faces_per_s_per_core'])} per core)"
                        if "faces_per_s_per_core" in entry
                        else ""
                    )
                )
            else:
                for name, value in entry.items():
                    if name.endswith("_threads"):
                        lines.append(
                            f"  {entry['runtime']}, {name.replace('_', ' ')}: "
                            f"{fmt(value['faces_per_s'])} faces/s "
                            f"({fmt(value['faces_per_s_per_core'])} per core)"
                        )
        out.append("\n".join(lines))
    plan = report.get("plan_memory")
    if plan:
        if "error" in plan:
            out.append(f"\nplanning memory: failed: {plan['error']}")
        else:
            out.append(
                f"\nplanning memory: {plan['images']:,} images in {plan['identities']:,} "
                f"identities: peak RSS {fmt(plan['peak_rss_mb'])} MiB (target < 2048: "
                f"{fmt(plan['passed'])}), plan.parquet {fmt(plan['plan_parquet_mb'])} MiB, "
                f"{fmt(plan['seconds'])} s"
            )
    for note in report["run"]["notes"]:
        out.append(f"note: {note}")
    return "\n".join(out)


# -- main --------------------------------------------------------------------------------------


def write_report(path: Path, report: dict[str, Any]) -> None:
    # whole or not at all: a reader (scripts/gpu_check.py) may read it after a kill
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temp, path)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def time_paths(
    args: argparse.Namespace,
    setup: Setup,
    face: FaceStack,
    ids: np.ndarray,
    work: float,
    peak: float,
    report: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """(a) the naive loop, then (b) the engine at each dtype and batch size, into ``report``."""
    gen, device = setup.generator, setup.device
    count = len(ids) * NAIVE_IMAGES_PER_PROMPT
    logger.info("naive loop: %d identities x %d images", len(ids), NAIVE_IMAGES_PER_PROMPT)
    naive, naive_images = run_naive(setup, ids, face, work, peak)
    paths = [naive]
    report["paths"] = paths
    save()
    # the engine's targets: as many as the naive loop made images, every one distinct
    targets = unit_rows(count, gen.encoder.id_dim, seed=args.seed + 1)
    engine = Engine(setup.config, setup.face_weights, device=str(device), generator=gen)
    dtypes = args.engine_dtypes or [setup.dtype]
    for dtype in dtypes:
        # after the naive loop, so one model copy serves every dtype (converted in place;
        # compile, if on, recompiles for the new dtype in the warm-up below)
        gen.to(device, getattr(torch, dtype))
        for batch in args.batch_sizes:
            engine.batch_size = batch
            # warm-up at every batch shape the timed run will see (compile specialises on it)
            for size in sorted({min(batch, count), count % batch} - {0}):
                engine.generate(targets[:size], list(range(size)))
            result, images = run_engine(engine, targets, device, work, peak)
            result["path"] = f"engine b{batch}" + (f" {dtype}" if len(dtypes) > 1 else "")
            paths.append(result)
            save()
    report["images_produced"] = {
        "naive": len(naive_images),
        "engine": len(images),
        "naive_shape": list(naive_images[0].shape),
        "engine_shape": list(images[0].shape),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="digi2real-bench-") as tmp:
        workdir = Path(tmp)
        setup = build_setup(args, workdir)
        device = setup.device
        gen = setup.generator
        logger.info("counting FLOPs")
        flops = count_flops(gen)
        work = flops_per_image(flops, args.steps)
        peak_info = matmul_peak_tflops(device)
        peak = peak_info["tflops"]
        face = FaceStack(setup.config, setup.face_weights, device=str(device))
        identities = math.ceil(args.images / NAIVE_IMAGES_PER_PROMPT)
        count = identities * NAIVE_IMAGES_PER_PROMPT
        ids = unit_rows(identities, gen.encoder.id_dim, seed=args.seed)
        report: dict[str, Any] = {
            "run": {
                "profile": args.profile,
                "device": str(device),
                "device_name": device_name(device),
                "torch": torch.__version__,
                "resolution": gen.resolution,
                "steps": args.steps,
                "guidance": args.guidance,
                "images": count,
                "threads": torch.get_num_threads(),
                "attention": gen.attention_processors(),
                "notes": setup.notes,
            },
            "flops": flops,
            "flops_per_image": work,
            "peak": peak_info,
            "complete": False,
        }
        # written after each section too: a run stopped at a time limit keeps what it measured
        save = (lambda: write_report(args.json, report)) if args.json else (lambda: None)
        save()
        if args.variants and not args.skip_variants:
            report["variant_batch"] = args.variant_batch
            report["variant_tf32"] = False
            logger.info("per-call speed options")
            report["variants"] = measure_variants(
                setup, args.variants, args.variant_batch, args.repeats
            )
            save()
        if args.profile == "tiny" and not args.skip_trajectories:
            logger.info("trajectories")
            report["trajectories"] = trajectory_checks(setup, args.steps, 4)
            if "compile" in args.variants:
                report["trajectories"].append(compiled_trajectory(setup, args.steps, 4))
            save()
        if not args.skip_paths:
            time_paths(args, setup, face, ids, work, peak, report, save)
        if not args.skip_embedding:
            logger.info("embedding stage")
            report["embedding"] = embedding_throughput(
                args.embed_arch,
                device,
                args.embed_batch,
                args.embed_seconds,
                not args.no_onnx,
                workdir,
            )
        if args.plan_images:
            logger.info("planning memory")
            report["plan_memory"] = plan_memory(args.plan_images)
    report["complete"] = True
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="tiny")
    parser.add_argument("--weights", type=Path, help="weights dir (--profile real)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--images", type=int, default=16, help="images per path")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[16], help="engine batch sizes to time"
    )
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--compile", action="store_true", help="generation.compile for (b)")
    parser.add_argument(
        "--engine-dtypes",
        nargs="+",
        choices=("float32", "float16", "bfloat16"),
        help="time the engine at each of these dtypes, the model converted in place after the "
        "naive loop (default: --dtype only); rows are then named 'engine bN DTYPE'",
    )
    parser.add_argument(
        "--no-channels-last", action="store_true", help="generation.channels_last off (CUDA)"
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=VARIANTS,
        default=None,
        help="per-call speed options to time against fp32 (default: channels_last half; "
        "compile takes a minute or more to compile on CPU)",
    )
    parser.add_argument("--variant-batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-variants", action="store_true")
    parser.add_argument(
        "--skip-paths", action="store_true", help="no naive loop or engine run (checks only)"
    )
    parser.add_argument("--skip-trajectories", action="store_true")
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument("--embed-arch", choices=sorted(EMBED_ARCHS), default="r100")
    parser.add_argument("--embed-batch", type=int, default=None)
    parser.add_argument("--embed-seconds", type=float, default=2.0)
    parser.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime export")
    parser.add_argument("--plan-images", type=int, default=1_000_000, help="0 to skip")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--plan-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = ["channels_last", "half"]
    if args.embed_batch is None:
        args.embed_batch = 256 if args.device.startswith("cuda") else 16
    for name in ("images", "steps", "variant_batch", "repeats", "embed_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan_child:
        print(json.dumps(plan_memory_child(args.plan_child, 12, 64)))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    report = run(args)
    print(render(report))
    if args.json:
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
