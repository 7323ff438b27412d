"""Images/s and FLOPs per image of the presets a user chooses between for cost.

Two ways to time a mode:

* ``end-to-end``: :class:`~digi2real.runner.engine.Engine` generates ``mode_images`` images
  (batches, guidance batch, decode, post-processing overlapped) after a warm-up: what a
  conversion sees, and what ``convert --dry-run`` prefers;
* ``composed``: one UNet call at the mode's UNet batch (doubled with guidance), one decode and
  one encode at its batch, each timed on its own (best of ``repeats``), composed into seconds
  per image: steps x UNet + decode + encode, per image of the batch. Post-processing is not in
  it. On a CPU the full-size architecture's end-to-end run of the paper preset would take hours;
  its calls take seconds.

A mode's few-step sampler (lcm, tcd) times the UNet without fusing its LoRA: a fused LoRA leaves
the architecture, and so the cost per call, as it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from digi2real.bench.measure import sync, unit_rows
from digi2real.bench.models import Setup, flops_per_image
from digi2real.bench.options import BenchOptions
from digi2real.config import Config
from digi2real.device import resolve_dtype
from digi2real.pipeline.generate import FusedLora, parse_dtype
from digi2real.pipeline.samplers import STOCHASTIC
from digi2real.runner.engine import Engine

logger = logging.getLogger(__name__)

# stands in for a fused LoRA while a few-step mode is timed (same architecture, same cost)
UNFUSED = FusedLora("(bench: not fused, same architecture)", "", 1.0, "none")


@dataclass
class Mode:
    name: str
    config: Config  # the preset, with the bench's batch size / dtype / compile applied
    settings: dict[str, Any]  # what the result file records (runner.cost reads it)


def load_modes(options: BenchOptions, setup: Setup) -> list[Mode]:
    """The presets of ``options.modes`` at the bench's batch size and dtype (each preset's own
    where not given; on a CPU float32, compile off, and batch 1 when composed)."""
    device = setup.device.type
    composed = options.resolved_method == "composed"
    modes = []
    for name in options.modes:
        preset = Config.preset_named(name)
        gen = preset.generation
        batch = options.batch_size or (1 if composed and device == "cpu" else gen.batch_size)
        dtype = resolve_dtype(options.mode_dtype or gen.dtype, device)
        wanted = gen.compile if options.mode_compile is None else options.mode_compile == "on"
        # inductor on a CPU takes minutes per shape and is not how anyone converts
        compile_flag = wanted and device == "cuda"
        settings = {
            "sampler": gen.sampler,
            "steps": gen.steps,
            "guidance": gen.guidance,
            "decoder": gen.decoder,
            "lora": gen.lora,
            "dtype": dtype,
            "batch_size": batch,
            "compile": compile_flag,
            "channels_last": gen.channels_last and not options.no_channels_last,
        }
        config = preset.override(
            {
                "weights": str(setup.face_weights.root),
                "generation.batch_size": batch,
                "generation.dtype": dtype,
                "generation.compile": compile_flag,
                "generation.channels_last": settings["channels_last"],
                "filter.fallback": setup.config.filter.fallback,
                "filter.threshold": -1.0,  # every image counts: the bench times generation
                "run.device": str(setup.device),
                # the shift is a few vector operations per conditioning, and needs statistics
                "shift.method": "none",
                "shift.alpha": 0.0,
                "shift.required": False,
            },
            where=f"bench mode {name}",
        )
        modes.append(Mode(name, config, settings))
    return modes


def mode_flops(flops: dict[str, float], mode: Mode) -> float:
    s = mode.settings
    return flops_per_image(flops, s["steps"], s["guidance"], s["decoder"])


class _Plugged:
    """The generator set up for one mode (dtype, decoder, sampler's LoRA stand-in), restored
    after."""

    def __init__(self, setup: Setup, mode: Mode) -> None:
        self.setup, self.mode = setup, mode

    def __enter__(self) -> Any:
        gen, s = self.setup.generator, self.mode.settings
        self.saved = gen.tiny_decoder, gen.lora
        dtype = parse_dtype(s["dtype"])
        gen.to(self.setup.device, dtype)
        if s["decoder"] == "tiny":
            taesd = self.setup.taesd.to(self.setup.device, dtype)
            if gen.channels_last:
                taesd.to(memory_format=torch.channels_last)
            gen.tiny_decoder = taesd
        else:
            gen.tiny_decoder = None
        if s["sampler"] in STOCHASTIC and gen.lora is None:
            gen.lora = UNFUSED
        return gen

    def __exit__(self, *exc: object) -> None:
        gen = self.setup.generator
        gen.tiny_decoder, gen.lora = self.saved


def can_time(setup: Setup, mode: Mode) -> str | None:
    """Why ``mode`` cannot be timed here (None: it can)."""
    if mode.settings["decoder"] == "tiny" and setup.taesd is None:
        return "no TAESD in the weights dir (`weights download --with taesd`)"
    return None


def time_end_to_end(setup: Setup, mode: Mode, images: int, seed: int) -> dict[str, Any]:
    """The engine on ``images`` distinct targets, after one warm-up batch."""
    with _Plugged(setup, mode) as gen:
        engine = Engine(mode.config, setup.face_weights, device=str(setup.device), generator=gen)
        targets = unit_rows(images, gen.encoder.id_dim, seed=seed)
        batch = mode.settings["batch_size"]
        warm = min(batch, images)
        engine.generate(targets[:warm], list(range(warm)))
        sync(setup.device)
        begin = time.perf_counter()
        faces = engine.generate(targets, list(range(images)))
        sync(setup.device)
        wall = time.perf_counter() - begin
    return {
        "method": "end-to-end",
        "images": len(faces),
        "wall_s": wall,
        "images_per_s": len(faces) / wall,
        "s_per_image": wall / len(faces),
        "oom_events": list(engine.oom_events),
    }


class CallTimer:
    """Seconds of single model calls, measured once per (call, batch, dtype) and reused by
    every mode that needs them."""

    def __init__(self, setup: Setup, repeats: int) -> None:
        self.setup, self.repeats = setup, repeats
        self.seconds: dict[tuple[str, int, str], float] = {}

    def _best(self, call: Any) -> float:
        device = self.setup.device
        with torch.inference_mode():
            call()  # warm-up (first-call allocations, kernel selection)
            best = float("inf")
            for _ in range(self.repeats):
                sync(device)
                begin = time.perf_counter()
                call()
                sync(device)
                best = min(best, time.perf_counter() - begin)
        return best

    def time(self, kind: str, batch: int, gen: Any) -> float:
        key = (kind, batch, str(gen.dtype))
        if key in self.seconds:
            return self.seconds[key]
        device, dtype = self.setup.device, gen.dtype
        rng = torch.Generator().manual_seed(0)
        size = gen.latent_size
        latents = torch.randn(batch, gen.latent_channels, size, size, generator=rng)
        latents = latents.to(device, dtype)
        if gen.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        if kind == "unet":
            context = torch.randn(batch, *gen.encoder.sequence_shape, generator=rng)
            context = context.to(device, dtype)
            timestep = torch.tensor(500, device=device)
            seconds = self._best(lambda: gen.unet(latents, timestep, encoder_hidden_states=context))
        elif kind == "encode":
            ids = unit_rows(batch, gen.encoder.id_dim, seed=0)
            seconds = self._best(lambda: gen.encoder.encode(ids))
        else:
            decoder = gen.decoder  # the mode's: VAE or TAESD
            seconds = self._best(lambda: decoder.decode(latents / decoder.config.scaling_factor))
        logger.info("%s at batch %d (%s): %.3f s per call", kind, batch, dtype, seconds)
        self.seconds[key] = seconds
        return seconds


def time_composed(setup: Setup, mode: Mode, timer: CallTimer) -> dict[str, Any]:
    """Seconds per image composed from measured UNet, decode and encode calls."""
    s = mode.settings
    batch = s["batch_size"]
    branches = 2 if s["guidance"] > 1.0 else 1
    with _Plugged(setup, mode) as gen:
        unet = timer.time("unet", batch * branches, gen)
        decode = timer.time(f"decode-{s['decoder']}", batch, gen)
        encode = timer.time("encode", batch, gen)
    per_image = (s["steps"] * unet + decode + encode) / batch
    return {
        "method": "composed",
        "images_per_s": 1.0 / per_image,
        "s_per_image": per_image,
        "calls": {
            "unet": {"batch": batch * branches, "s": unet, "per_image": s["steps"] * branches},
            "decode": {"decoder": s["decoder"], "batch": batch, "s": decode},
            "encode": {"batch": batch, "s": encode},
        },
        "composition": f"({s['steps']} x UNet[b{batch * branches}] + decode + encode) / {batch}",
    }


def run_modes(
    options: BenchOptions, setup: Setup, flops: dict[str, float], save: Any
) -> list[dict[str, Any]]:
    """Each mode's FLOPs per image and measured rate, in ``options.modes`` order; ``save`` is
    called after each (a run stopped at a time limit keeps what it measured)."""
    method = options.resolved_method
    timer = CallTimer(setup, options.repeats)
    rows: list[dict[str, Any]] = []
    for mode in load_modes(options, setup):
        row: dict[str, Any] = {
            "mode": mode.name,
            "settings": mode.settings,
            "flops_per_image": mode_flops(flops, mode),
            "method": method,
        }
        reason = can_time(setup, mode)
        if reason is not None:
            row["skipped"] = reason
        else:
            logger.info("mode %s (%s)", mode.name, method)
            if method == "end-to-end":
                row.update(time_end_to_end(setup, mode, options.mode_images, options.seed))
            else:
                row.update(time_composed(setup, mode, timer))
        rows.append(row)
        save()
    return rows


def ratios(rows: list[dict[str, Any]], base: str = "default") -> dict[str, dict[str, float]]:
    """Each mode against ``base``: FLOPs per image and measured seconds per image."""
    reference = next((r for r in rows if r["mode"] == base), None)
    if reference is None:
        return {}
    out = {}
    for row in rows:
        entry = {"flops": row["flops_per_image"] / reference["flops_per_image"]}
        if row.get("s_per_image") and reference.get("s_per_image"):
            entry["time"] = row["s_per_image"] / reference["s_per_image"]
        out[row["mode"]] = entry
    return out
