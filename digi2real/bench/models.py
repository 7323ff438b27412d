"""The models a benchmark runs: the full-size architecture with random weights (FLOPs and
speed do not depend on weight values), a weights dir (real or tiny), and their FLOP counts on
meta-device copies."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from digi2real.config import Config
from digi2real.face.stack import FaceStack
from digi2real.pipeline.generate import Arc2FaceGenerator
from digi2real.weights.configs import REAL_TAESD_CONFIG

if TYPE_CHECKING:
    from digi2real.bench.options import BenchOptions

PROFILES = ("tiny", "full-random", "real")


def _config_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def count_flops(generator: Arc2FaceGenerator, taesd_config: dict[str, Any]) -> dict[str, float]:
    """:func:`architecture_flops` of ``generator``'s models (and the given TAESD)."""
    encoder = generator.encoder
    return architecture_flops(
        unet=dict(generator.unet.config),
        vae=dict(generator.vae.config),
        taesd=taesd_config,
        encoder=encoder.text_encoder.config.to_dict(),
        input_ids=encoder.input_ids,
    )


def architecture_flops(
    *,
    unet: dict[str, Any],
    vae: dict[str, Any],
    taesd: dict[str, Any],
    encoder: dict[str, Any],
    input_ids: torch.Tensor,
) -> dict[str, float]:
    """FLOPs of one UNet forward, one VAE decode, one TAESD decode and one encoder pass at
    batch 1, counted on meta-device copies of these architectures (nothing runs, no weights
    needed; a fused LoRA leaves the architecture as it is). Matrix products and convolutions,
    2 FLOPs per multiply-add (``torch.utils.flop_counter``)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**_config_kwargs(unet)),
            "vae": AutoencoderKL(**_config_kwargs(vae)),
            "taesd": AutoencoderTiny(**_config_kwargs(taesd)),
            "text": CLIPTextModel(CLIPTextConfig(**_config_kwargs(encoder))),
        }
    size = int(unet["sample_size"])
    latents = torch.zeros(1, int(unet["in_channels"]), size, size, device="meta")
    context = torch.zeros(1, input_ids.shape[-1], int(unet["cross_attention_dim"]), device="meta")
    calls = {
        "unet_forward": lambda: models["unet"](
            latents, torch.tensor(10, device="meta"), encoder_hidden_states=context
        ),
        "vae_decode": lambda: models["vae"].decode(latents),
        "taesd_decode": lambda: models["taesd"].decode(latents),
        "encoder": lambda: models["text"](input_ids=input_ids.to("meta")),
    }
    flops = {}
    for name, call in calls.items():
        with FlopCounterMode(display=False) as counter:
            call()
        flops[name] = float(counter.get_total_flops())
    return flops


def flops_per_image(
    flops: dict[str, float], steps: int, guidance: float = 3.0, decoder: str = "vae"
) -> float:
    """Useful work of one image: per step one UNet sample per branch (two with guidance > 1:
    the empty-prompt and the identity branch), one decode, one encode."""
    branches = 2 if guidance > 1.0 else 1
    decode = flops["taesd_decode"] if decoder == "tiny" else flops["vae_decode"]
    return branches * steps * flops["unet_forward"] + decode + flops["encoder"]


def full_random_generator(
    device: torch.device, dtype: torch.dtype, tokenizer_dir: Path, seed: int = 0
) -> tuple[Arc2FaceGenerator, Any]:
    """The full-size Arc2Face UNet / SD-1.5 VAE / CLIP-L text encoder as a generator, and
    TAESD, random weights."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from digi2real.pipeline.conditioning import IdentityEncoder
    from digi2real.weights.configs import (
        REAL_ENCODER_CONFIG,
        REAL_TAESD_CONFIG,
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
        taesd = AutoencoderTiny(**_config_kwargs(REAL_TAESD_CONFIG))
        text = CLIPTextModel(CLIPTextConfig(**_config_kwargs(REAL_ENCODER_CONFIG)))
    text = text.to(device, dtype)
    encoder = IdentityEncoder(text, CLIPTokenizer.from_pretrained(tokenizer_dir), id_dim=512)
    # TAESD waits beside the generator: a mode with the tiny decoder plugs it in
    taesd = taesd.to(device, dtype).eval().requires_grad_(False)
    generator = Arc2FaceGenerator(
        unet.to(device, dtype), vae.to(device, dtype), encoder, dict(SD15_SCHEDULER_CONFIG)
    )
    return generator, taesd


@dataclass
class Setup:
    profile: str
    device: torch.device
    dtype: str  # the engine's dtype
    naive_dtype: str
    generator: Arc2FaceGenerator  # shared by both paths (naive runs first, before optimize())
    config: Config
    face_weights: Any  # WeightsDir whose face models post-process
    taesd: Any  # AutoencoderTiny for the modes with the tiny decoder (None: not available)
    taesd_config: dict[str, Any]  # the TAESD architecture of this profile (FLOP counts)
    notes: list[str] = field(default_factory=list)


def build_setup(args: BenchOptions, workdir: Path) -> Setup:
    from digi2real.weights import build_tiny, open_weights

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = args.dtype or ("float16" if cuda else "float32")
    naive_dtype = "float16" if cuda else "float32"  # Arc2Face README: fp16 on the GPU
    if args.naive and dtype != naive_dtype:
        raise ValueError(
            f"--dtype {dtype}: the naive loop runs {naive_dtype} on {device.type} and both paths "
            f"share one model copy; use --dtype {naive_dtype} (time other dtypes with "
            "--engine-dtypes, per call with --variants)"
        )
    notes = []
    generator, taesd = None, None
    if args.profile == "real":
        if args.weights is None:
            raise ValueError("--profile real needs --weights DIR")
        face_weights = open_weights(args.weights)
    else:
        face_weights = build_tiny(workdir / "tiny")
        if args.profile == "full-random":
            generator, taesd = full_random_generator(
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
    taesd_config = dict(REAL_TAESD_CONFIG)
    if generator is None:
        face_stack = FaceStack(config, face_weights, device=str(device))
        generator = Arc2FaceGenerator.from_weights(
            face_weights, id_dim=face_stack.id_dim, device=device, dtype=dtype
        )
        if face_weights.has("taesd"):
            from diffusers import AutoencoderTiny

            taesd = AutoencoderTiny.from_pretrained(
                face_weights.taesd, torch_dtype=getattr(torch, dtype)
            )
            taesd = taesd.to(device).eval().requires_grad_(False)
            taesd_config = json.loads((face_weights.taesd / "config.json").read_text("utf-8"))
        else:
            notes.append(
                f"{face_weights.root} has no TAESD (`weights download --with taesd`): modes "
                "with the tiny decoder are not timed and their FLOPs use TAESD's public config"
            )
    return Setup(
        profile=args.profile,
        device=device,
        dtype=dtype,
        naive_dtype=naive_dtype,
        generator=generator,
        config=config,
        face_weights=face_weights,
        taesd=taesd,
        taesd_config=taesd_config,
        notes=notes,
    )
