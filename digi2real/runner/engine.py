"""One model copy: face detection/alignment/embedding + the Arc2Face generator, built from a
weights dir and a config. Runners build one Engine per worker.

:meth:`Engine.generate` overlaps post-processing (detect, align, embed, JPEG; CPU work) of
diffusion batch k with the diffusion of batch k+1 on one background thread, so the accelerator
does not wait on the CPU. Every post-processing step is per image (the recognizer's rows do not
depend on the batch they run in), so the overlapped and the serial path give identical bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from digi2real.config import Config
from digi2real.device import resolve_dtype
from digi2real.face.stack import FaceStack, GeneratedFace
from digi2real.pipeline.domain_shift import DomainShift
from digi2real.pipeline.generate import Arc2FaceGenerator, SamplerSettings, parse_dtype
from digi2real.weights import WeightsDir, open_weights

logger = logging.getLogger(__name__)


@dataclass
class EngineTimings:
    """Wall seconds accumulated by :meth:`Engine.generate` (for benchmarks and logs)."""

    diffusion: float = 0.0  # encode + denoise + decode, on the calling thread
    postprocess: float = 0.0  # detect/align/embed/JPEG, wherever it ran
    waiting: float = 0.0  # the calling thread blocked on post-processing (not hidden)
    images: int = 0
    batches: list[int] = field(default_factory=list)  # batch sizes actually run


class Engine(FaceStack):
    """A :class:`FaceStack` plus the Arc2Face generator."""

    def __init__(
        self,
        config: Config,
        weights: WeightsDir,
        *,
        device: str = "auto",
        generator: Arc2FaceGenerator | None = None,
        shift: DomainShift | None = None,
    ) -> None:
        """``generator``: an already built generator (benchmarks build the full-size
        architecture in memory); by default it is loaded from ``weights``. ``shift``: the
        config's domain shift when the caller has loaded it already."""
        super().__init__(config, weights, device=device)
        self.dtype = resolve_dtype(config.generation.dtype, self.device)
        if shift is None:
            shift = DomainShift.from_config(config.shift, weights.file_digest("encoder"))
        self.shift = shift
        self.settings = SamplerSettings(
            config.generation.sampler, config.generation.steps, config.generation.guidance
        )
        gen = config.generation
        if generator is None:
            generator = Arc2FaceGenerator.from_weights(
                weights,
                id_dim=self.id_dim,
                device=self.device,
                dtype=self.dtype,
                settings=self.settings,
                shift=shift,
                lora=weights.lora_file(gen.lora) if gen.lora else None,
                lora_scale=gen.lora_scale,
                decoder=gen.decoder,
            )
        else:
            generator.settings = self.settings
        self.generator = generator
        # channels_last measured faster per call on CPU as well (docs/performance.md)
        self.generator.optimize(
            channels_last=config.generation.channels_last, compile=config.generation.compile
        )
        self.batch_size = config.generation.batch_size
        self.overlap = config.generation.overlap
        self.oom_events: list[str] = []
        self.timings = EngineTimings()

    @classmethod
    def from_config(
        cls, config: Config, *, device: str = "auto", shift: DomainShift | None = None
    ) -> Engine:
        if config.weights is None:
            raise ValueError("config.weights is not set: pass --weights DIR")
        return cls(config, open_weights(config.weights), device=device, shift=shift)

    def to(self, device: str) -> Engine:
        """Every model on ``device``, in the dtype the config asks for there (float32 on CPU)."""
        super().to(device)
        self.dtype = resolve_dtype(self.config.generation.dtype, self.device)
        self.generator.to(self.device, parse_dtype(self.dtype))
        return self

    # -- generation -------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "sampler": self.settings.sampler,
            "steps": self.settings.steps,
            "guidance": self.settings.guidance,
            "dtype": self.dtype,
            "shift_method": self.config.shift.method if self.shift else "none",
            "shift_alpha": float(self.config.shift.alpha) if self.shift else 0.0,
            "init_strength": float(self.config.generation.init_strength),
            "lora_digest": self.generator.lora.sha256 if self.generator.lora else None,
            "decoder": self.generator.decoder_name,
            "weights_digest": self.weights.digest,
        }

    def _generate_batch(
        self,
        targets: np.ndarray,
        seeds: list[int],
        init_images: np.ndarray | None = None,
        strength: float = 0.0,
    ) -> np.ndarray:
        if init_images is None:
            return self.generator(targets, seeds=seeds).images
        return self.generator(targets, seeds=seeds, image=init_images, strength=strength).images

    def _diffuse(
        self,
        targets: np.ndarray,
        seeds: list[int],
        start: int,
        init_images: Sequence[Callable[[], np.ndarray]] | None = None,
        strength: float = 0.0,
    ) -> np.ndarray | None:
        """One batch from ``start``; None after a CUDA OOM (the batch size is halved)."""
        size = min(self.batch_size, len(targets) - start)
        begin = time.perf_counter()
        window = slice(start, start + size)
        try:
            if init_images is None:
                batch = self._generate_batch(targets[window], seeds[window])
            else:
                inits = np.stack([load() for load in init_images[window]])
                batch = self._generate_batch(targets[window], seeds[window], inits, strength)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            torch.cuda.empty_cache()
            self.batch_size = max(1, size // 2)
            event = f"CUDA out of memory at batch {size}; continuing with batch {self.batch_size}"
            logger.warning(event)
            self.oom_events.append(event)
            return None
        self.timings.diffusion += time.perf_counter() - begin
        self.timings.batches.append(size)
        return batch

    def _timed_postprocess(
        self,
        images: list[np.ndarray],
        offset: int = 0,
        on_faces: Callable[[int, list[GeneratedFace]], None] | None = None,
    ) -> list[GeneratedFace]:
        begin = time.perf_counter()
        faces = self.postprocess(images)
        if on_faces is not None:
            on_faces(offset, faces)
        self.timings.postprocess += time.perf_counter() - begin
        return faces

    def generate(
        self,
        targets: np.ndarray,
        seeds: list[int],
        on_faces: Callable[[int, list[GeneratedFace]], None] | None = None,
        init_images: Sequence[Callable[[], np.ndarray]] | None = None,
        strength: float = 0.0,
    ) -> list[GeneratedFace]:
        """Generate, align, embed and encode, in input order; batches of ``batch_size``, halved
        on CUDA OOM. Post-processing of a batch overlaps the next batch's diffusion unless
        ``generation.overlap`` is false. ``on_faces(offset, faces)`` is called as each batch
        is post-processed (on the post-processing thread): the shard writes accepted images
        there, so writing overlaps diffusion too. ``init_images``: one loader per target of
        its init image (render-guided, ``strength`` > 0), called when its batch runs, so a
        shard's renders at 512x512 are never all in memory."""
        if len(targets) != len(seeds):
            raise ValueError(f"{len(targets)} targets but {len(seeds)} seeds")
        if init_images is not None and len(init_images) != len(targets):
            raise ValueError(f"{len(targets)} targets but {len(init_images)} init images")
        results: list[GeneratedFace] = []
        pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="postprocess")
            if (self.overlap)
            else None
        )
        in_flight: Future[list[GeneratedFace]] | None = None
        try:
            start = 0
            while start < len(targets):
                batch = self._diffuse(targets, seeds, start, init_images, strength)
                if batch is None:
                    continue
                start += len(batch)
                offset = start - len(batch)
                if pool is None:
                    results.extend(self._timed_postprocess(list(batch), offset, on_faces))
                    continue
                # one batch in flight: post-processing k overlaps diffusion k+1, and host
                # memory holds at most two batches of images
                if in_flight is not None:
                    results.extend(self._collect(in_flight))
                in_flight = pool.submit(self._timed_postprocess, list(batch), offset, on_faces)
            if in_flight is not None:
                results.extend(self._collect(in_flight))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self.timings.images += len(results)
        return results

    def _collect(self, future: Future[list[GeneratedFace]]) -> list[GeneratedFace]:
        begin = time.perf_counter()
        faces = future.result()
        self.timings.waiting += time.perf_counter() - begin
        return faces
