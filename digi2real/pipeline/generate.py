"""The Arc2Face diffusion stage on diffusers.

Reads as the stages of diffusers' StableDiffusionPipeline — ``check_inputs`` -> encode id
(+ domain shift) -> prepare latents -> denoise -> decode — each a small method that also takes a
precomputed input (``cond``, ``latents``, per-image ``seeds``/``generators``).

Each image's initial noise comes from its own CPU ``torch.Generator`` (CUDA generators draw
different numbers), so an image does not depend on which batch it was generated in; the
stochastic few-step samplers (LCM, TCD) draw each step's noise from the same generator.

The cost levers (docs/performance.md): ``sampler`` ``lcm``/``tcd`` with their distilled LoRA
fused into the UNet at load (:mod:`digi2real.pipeline.lora`) take 1-8 steps; guidance 1 runs
the UNet once per step instead of on a doubled batch; ``decoder="tiny"`` decodes with TAESD
(``AutoencoderTiny``) instead of SD-1.5's VAE.

Speed options (:meth:`Arc2FaceGenerator.optimize`): channels_last weights and activations and
``torch.compile`` of the UNet and the VAE decoder; attention goes through PyTorch's
``scaled_dot_product_attention`` (diffusers' default ``AttnProcessor2_0``, checked by
:meth:`Arc2FaceGenerator.attention_processors`). docs/performance.md says what each buys.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from digi2real.config import DECODERS, DTYPES, SAMPLERS
from digi2real.pipeline import samplers
from digi2real.pipeline.conditioning import IdentityEncoder

if TYPE_CHECKING:
    from digi2real.pipeline.domain_shift import DomainShift
    from digi2real.weights import WeightsDir

logger = logging.getLogger(__name__)

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def parse_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return TORCH_DTYPES[name]


@dataclass(frozen=True)
class SamplerSettings:
    sampler: str = "dpmsolver++"
    steps: int = 25
    guidance: float = 3.0

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be in 1..1000, got {self.steps}")
        if not math.isfinite(self.guidance) or self.guidance < 1.0:
            raise ValueError(f"guidance must be a finite number >= 1, got {self.guidance}")


@dataclass
class GenerationOutput:
    """Images plus what produced them, row-aligned."""

    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    seeds: list[int | None]
    settings: SamplerSettings
    dtype: str
    extras: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.settings), "dtype": self.dtype}


@dataclass(frozen=True)
class FusedLora:
    """The LoRA fused into a generator's UNet at load."""

    path: str
    sha256: str
    scale: float
    key_format: str


class Arc2FaceGenerator:
    """UNet + VAE (or TAESD) + a sampler, driven by an :class:`IdentityEncoder`.

    ``tiny_decoder``: an ``AutoencoderTiny`` (TAESD) that decodes instead of the VAE (the VAE
    still encodes init images). ``lora``: what was fused into ``unet`` (None: nothing)."""

    def __init__(
        self,
        unet: Any,
        vae: Any,
        encoder: IdentityEncoder,
        scheduler_config: dict[str, Any],
        *,
        settings: SamplerSettings | None = None,
        tiny_decoder: Any = None,
        lora: FusedLora | None = None,
    ) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.tiny_decoder = None if tiny_decoder is None else tiny_decoder.eval()
        if self.tiny_decoder is not None:
            self.tiny_decoder.requires_grad_(False)
        self.lora = lora
        self.encoder = encoder
        self.scheduler_config = dict(scheduler_config)
        self.settings = settings or SamplerSettings()
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if tiny_decoder is not None:
            tiny_factor = 2 ** (len(tiny_decoder.config.decoder_block_out_channels) - 1)
            if tiny_factor != self.vae_scale_factor:
                raise ValueError(
                    f"tiny decoder upsamples x{tiny_factor}, the VAE x{self.vae_scale_factor}: "
                    "weights from different profiles?"
                )
        self.latent_channels = int(unet.config.in_channels)
        self.latent_size = int(unet.config.sample_size)
        self.resolution = self.latent_size * self.vae_scale_factor
        self.compiled = False
        self.channels_last = False
        if unet.config.cross_attention_dim != encoder.hidden_size:
            raise ValueError(
                f"UNet cross_attention_dim {unet.config.cross_attention_dim} != encoder width "
                f"{encoder.hidden_size}: weights from different profiles?"
            )

    @classmethod
    def from_weights(
        cls,
        weights: WeightsDir,
        *,
        id_dim: int,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        settings: SamplerSettings | None = None,
        shift: DomainShift | None = None,
        lora: str | Path | None = None,
        lora_scale: float = 1.0,
        decoder: str = "vae",
    ) -> Arc2FaceGenerator:
        """``lora``: a LoRA file fused into the UNet (``WeightsDir.lora_file`` resolves a
        component name); ``decoder``: ``vae`` or ``tiny`` (the dir's TAESD)."""
        import json

        from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

        from digi2real.pipeline.lora import fuse_lora, read_lora
        from digi2real.weights import sha256_file

        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")
        torch_dtype = parse_dtype(dtype)
        fused = None
        if lora is None:
            unet = UNet2DConditionModel.from_pretrained(weights.unet, torch_dtype=torch_dtype)
        else:
            lora_file = read_lora(lora)
            unet = UNet2DConditionModel.from_pretrained(weights.unet, torch_dtype=torch.float32)
            unet = fuse_lora(unet, lora_file, scale=lora_scale)
            if torch_dtype != torch.float32:
                unet = unet.to(torch_dtype)
            fused = FusedLora(str(lora), sha256_file(lora), lora_scale, lora_file.key_format)
        vae = AutoencoderKL.from_pretrained(weights.vae, torch_dtype=torch_dtype)
        tiny = None
        if decoder == "tiny":
            tiny = AutoencoderTiny.from_pretrained(weights.taesd, torch_dtype=torch_dtype)
            tiny = tiny.to(device)
        encoder = IdentityEncoder.from_weights(
            weights, id_dim=id_dim, device=device, dtype=torch_dtype, shift=shift
        )
        scheduler_config = json.loads(
            (weights.scheduler / "scheduler_config.json").read_text(encoding="utf-8")
        )
        return cls(
            unet.to(device),
            vae.to(device),
            encoder,
            scheduler_config,
            settings=settings,
            tiny_decoder=tiny,
            lora=fused,
        )

    # -- properties ------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in TORCH_DTYPES.items()}[self.dtype]

    @property
    def decoder(self) -> Any:
        """The model that turns latents into pixels: TAESD when loaded, else the VAE."""
        return self.tiny_decoder if self.tiny_decoder is not None else self.vae

    @property
    def decoder_name(self) -> str:
        return "vae" if self.tiny_decoder is None else "tiny"

    def _modules(self) -> list[Any]:
        extra = [] if self.tiny_decoder is None else [self.tiny_decoder]
        return [self.unet, self.vae, self.encoder.text_encoder, *extra]

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Arc2FaceGenerator:
        """UNet, VAE, TAESD and text encoder on ``device`` (and in ``dtype``)."""
        for module in self._modules():
            module.to(device=device, dtype=dtype)
        self.encoder.clear_cache()
        return self

    def attention_processors(self) -> dict[str, list[str]]:
        """Attention processor class names of the UNet and the VAE (expect ``AttnProcessor2_0``:
        PyTorch SDPA, flash/memory-efficient kernels on CUDA)."""
        return {
            name: sorted({type(p).__name__ for p in model.attn_processors.values()})
            for name, model in (("unet", self.unet), ("vae", self.vae))
        }  # TAESD has no attention

    def optimize(self, *, channels_last: bool = False, compile: bool = False) -> None:
        """Apply the speed options in place. Neither changes the arithmetic beyond float
        reassociation; the tolerances are in docs/performance.md (``digi2real bench --variants`` checks)."""
        if channels_last and not self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.decoder.to(memory_format=torch.channels_last)
            self.channels_last = True
        if compile and not self.compiled:
            # Module.compile() compiles in place: the object, its config and its parameters
            # stay the same, so nothing downstream sees an OptimizedModule wrapper.
            self.unet.compile(dynamic=False)
            self.decoder.decoder.compile(dynamic=False)
            self.compiled = True

    def make_scheduler(self, steps: int, sampler: str | None = None) -> Any:
        """The scheduler of ``sampler`` (default: the settings') set to ``steps``."""
        return samplers.make_scheduler(
            sampler or self.settings.sampler, self.scheduler_config, steps, self.device
        )

    # -- stages ----------------------------------------------------------------------------

    def check_inputs(
        self,
        id_embeds: np.ndarray | torch.Tensor | None,
        cond: torch.Tensor | None,
        seeds: Sequence[int] | None,
        generators: Sequence[torch.Generator] | None,
        latents: torch.Tensor | None,
        image: np.ndarray | None = None,
        strength: float = 0.0,
    ) -> int:
        if (id_embeds is None) == (cond is None):
            raise ValueError("pass exactly one of id_embeds or cond")
        if cond is not None:
            expected = self.encoder.sequence_shape
            if cond.ndim != 3 or tuple(cond.shape[1:]) != expected:
                raise ValueError(
                    f"cond must have shape (N, {expected[0]}, {expected[1]}), got {tuple(cond.shape)}"
                )
            n = int(cond.shape[0])
        else:
            n = len(id_embeds)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("empty batch: nothing to generate")
        given = [x is not None for x in (seeds, generators, latents)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of seeds, generators or latents")
        for name, value in (("seeds", seeds), ("generators", generators)):
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for a batch of {n}")
        if latents is not None:
            shape = (n, self.latent_channels, self.latent_size, self.latent_size)
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if (image is not None) != (strength > 0):
            raise ValueError("pass init images together with a strength > 0 (and only then)")
        if image is not None:
            if latents is not None:
                raise ValueError("pass init images or latents, not both")
            shape = (n, self.resolution, self.resolution, 3)
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
                raise ValueError("init images must be a uint8 numpy array (N, H, W, 3) RGB")
            if tuple(image.shape) != shape:
                raise ValueError(f"init images must have shape {shape}, got {image.shape}")
        return n

    def encode(self, id_embeds: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(id_embeds)

    def prepare_latents(
        self,
        *,
        seeds: Sequence[int] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        init_noise_sigma: float = 1.0,
    ) -> torch.Tensor:
        if generators is None:
            assert seeds is not None
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        shape = (1, self.latent_channels, self.latent_size, self.latent_size)
        noise = torch.cat(
            [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
        )
        noise = noise * init_noise_sigma
        if self.device.type == "cuda":
            # page-locked source: the copy is a DMA that does not stall the host thread
            return noise.pin_memory().to(self.device, self.dtype, non_blocking=True)
        return noise.to(self.device, self.dtype)

    def init_timesteps(self, scheduler: Any, strength: float) -> Any:
        """The timesteps an init image is denoised over (diffusers' img2img): the last
        ``int(steps * strength)`` of the schedule. The scheduler is told where it starts."""
        steps = len(scheduler.timesteps) // scheduler.order
        start = steps - min(int(steps * strength), steps)
        scheduler.set_begin_index(start * scheduler.order)
        return scheduler.timesteps[start * scheduler.order :]

    def encode_images(self, image: np.ndarray) -> torch.Tensor:
        """(N, R, R, 3) uint8 RGB -> (N, C, h, w) latents: the VAE posterior's mean, scaled
        (deterministic: the randomness of img2img is the noise, from each image's generator)."""
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2)
        pixels = pixels.to(self.device, self.vae.dtype) / 127.5 - 1.0
        latents = self.vae.encode(pixels).latent_dist.mean
        return (latents * self.vae.config.scaling_factor).to(self.dtype)

    def noise_images(
        self, latents: torch.Tensor, noise: torch.Tensor, scheduler: Any, timesteps: Any
    ) -> torch.Tensor:
        """Init latents noised to the first of ``timesteps`` (none left: the init as it is,
        i.e. the VAE round trip)."""
        if len(timesteps) == 0:
            return latents
        return scheduler.add_noise(latents, noise, timesteps[:1].repeat(len(latents)))

    def denoise(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        scheduler: Any,
        guidance: float,
        timesteps: Any = None,
        *,
        sampler: str | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Guidance > 1: the empty-prompt and identity branches in one doubled UNet batch per
        step; guidance 1 is the identity branch alone (the same prediction, half the work).
        ``generators``: each image's, for samplers whose steps draw noise."""
        sampler = sampler or self.settings.sampler
        n = latents.shape[0]
        cond = cond.to(self.device, self.dtype)
        guided = guidance > 1.0
        if guided:
            uncond = self.encoder.encode_empty().to(self.device, self.dtype).expand(n, -1, -1)
            context = torch.cat([uncond, cond])
        else:
            context = cond
        for t in scheduler.timesteps if timesteps is None else timesteps:
            batch = torch.cat([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(batch, t)
            noise = self.unet(model_input, t, encoder_hidden_states=context).sample
            if guided:
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + guidance * (noise_cond - noise_uncond)
            latents = samplers.step(sampler, scheduler, noise, t, latents, generators)
        return latents

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        # Both decoders take SD's scaled latents divided by their own scaling factor (TAESD's
        # is 1: it was trained on scaled latents) and return pixels in [-1, 1].
        decoder = self.decoder
        scaled = latents / decoder.config.scaling_factor
        image = decoder.decode(scaled.to(decoder.dtype)).sample
        image = (image / 2 + 0.5).clamp(0, 1)
        if image.device.type == "cuda":
            # Quantise on the device and copy uint8 (4x fewer bytes than float32) through a
            # pinned buffer; torch.round and numpy's round both round half to even.
            pixels = (image.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels)
            return host.numpy()
        array = image.permute(0, 2, 3, 1).float().cpu().numpy()
        return (array * 255).round().astype(np.uint8)

    @torch.no_grad()
    def __call__(
        self,
        id_embeds: np.ndarray | torch.Tensor | None = None,
        *,
        cond: torch.Tensor | None = None,
        seeds: Sequence[int] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        image: np.ndarray | None = None,
        strength: float = 0.0,
        settings: SamplerSettings | None = None,
    ) -> GenerationOutput:
        """``image``/``strength``: start each image's diffusion from its init image (uint8
        RGB at the generation resolution) encoded by the VAE and noised with the image's own
        generator to the timestep ``strength`` selects, then denoise the rest of the schedule
        (diffusers' img2img). Without them, text-to-image from pure noise."""
        settings = settings or self.settings
        self.check_inputs(id_embeds, cond, seeds, generators, latents, image, strength)
        if settings.sampler in samplers.STOCHASTIC and self.lora is None:
            raise ValueError(
                f"sampler {settings.sampler!r} needs its distilled LoRA fused into the UNet "
                "(generation.lora); this generator has none"
            )
        if cond is None:
            cond = self.encode(id_embeds)  # type: ignore[arg-type]
        if seeds is not None:
            # one generator per image for its whole trajectory: the initial noise, then the
            # noise of each step of a stochastic sampler
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        scheduler = self.make_scheduler(settings.steps, settings.sampler)
        timesteps = None
        if image is not None:
            timesteps = self.init_timesteps(scheduler, strength)
            noise = self.prepare_latents(generators=generators)
            latents = self.noise_images(self.encode_images(image), noise, scheduler, timesteps)
        elif latents is None:
            latents = self.prepare_latents(
                generators=generators,
                init_noise_sigma=float(scheduler.init_noise_sigma),
            )
        else:
            latents = latents.to(self.device, self.dtype)
        latents = self.denoise(
            latents,
            cond,
            scheduler,
            settings.guidance,
            timesteps,
            sampler=settings.sampler,
            generators=generators,
        )
        images = self.decode(latents)
        return GenerationOutput(
            images=images,
            seeds=list(seeds) if seeds is not None else [None] * len(images),
            settings=settings,
            dtype=self.dtype_name,
        )
