"""Arc2Face's naive loop against this project's engine, side by side (``digi2real bench
--naive``):

* (a) naive: Arc2Face's README loop: one identity per ``StableDiffusionPipeline`` call,
  ``num_images_per_prompt=4``, ``prompt_embeds`` from one ArcFace vector (project_face_embs),
  fp16 on CUDA / fp32 on CPU, PIL output; then the same post-processing, serially;
* (b) engine: :class:`digi2real.runner.engine.Engine` (batches across identities, guidance in
  one UNet batch, dtype, SDPA, channels_last and torch.compile as configured, post-processing
  overlapped with the next batch's diffusion);

images/s, s/image, per-stage seconds, peak memory, achieved TFLOP/s and its fraction of the
device's matrix-product peak.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from digi2real.bench.measure import PeakMemory, StageClock, sync, unit_rows
from digi2real.bench.models import Setup
from digi2real.bench.options import BenchOptions
from digi2real.face.stack import FaceStack
from digi2real.runner.engine import Engine

logger = logging.getLogger(__name__)

NAIVE_IMAGES_PER_PROMPT = 4  # Arc2Face README


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


def time_paths(
    args: BenchOptions,
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
