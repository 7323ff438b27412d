"""The tiny profile: the real layout, classes and configs, random seeded weights, small sizes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from digi2real.data import fsio
from digi2real.weights.configs import (
    LORA_KEY_FORMATS,
    REAL_FACE_CONFIG,
    SD15_SCHEDULER_CONFIG,
    TINY_DETECTOR_SIZE,
    TINY_ENCODER_CONFIG,
    TINY_ID_DIM,
    TINY_LORA_ALPHA,
    TINY_LORA_RANK,
    TINY_TAESD_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
)
from digi2real.weights.face_config import FACE_CONFIG
from digi2real.weights.manifest import (
    DIR_MANIFEST,
    WeightsDir,
    default_weights_dir,
    entry_for,
    load_package_manifest,
    open_weights,
    write_dir_manifest,
    write_json,
)
from digi2real.weights.tokenizer import write_clip_tokenizer

logger = logging.getLogger(__name__)


def build_tiny(root: str | Path, *, seed: int = 0, force: bool = False) -> WeightsDir:
    """Build the tiny profile in ``root`` (seconds, a few MB): every file of the real profile,
    the optional components (LCM-LoRA, TCD-LoRA, TAESD, the 3D landmark and gender/age models)
    included."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from safetensors.torch import save
    from transformers import CLIPTextConfig, CLIPTextModel

    from digi2real.weights.tiny_face import (
        export_tiny_detector,
        export_tiny_genderage,
        export_tiny_landmark_3d,
        export_tiny_recognizer,
    )
    from digi2real.weights.tiny_lora import random_lora

    root = Path(root).expanduser()
    if (root / DIR_MANIFEST).exists() and not force:
        raise FileExistsError(f"{root} already holds weights; pass force=True (--force) to rebuild")
    root.mkdir(parents=True, exist_ok=True)

    def model_config(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**model_config(TINY_UNET_CONFIG))
        vae = AutoencoderKL(**model_config(TINY_VAE_CONFIG))
        encoder_config = {k: v for k, v in TINY_ENCODER_CONFIG.items() if k != "architectures"}
        encoder = CLIPTextModel(CLIPTextConfig(**encoder_config))
        taesd = AutoencoderTiny(**model_config(TINY_TAESD_CONFIG))
    del generator
    for name, model, config in (
        ("arc2face", unet, TINY_UNET_CONFIG),
        ("vae", vae, TINY_VAE_CONFIG),
        ("taesd", taesd, TINY_TAESD_CONFIG),
    ):
        write_json(root / name / "config.json", config)
        fsio.atomic_write_bytes(
            root / name / "diffusion_pytorch_model.safetensors",
            save({k: v.contiguous() for k, v in model.state_dict().items()}),
        )
    write_json(root / "encoder" / "config.json", TINY_ENCODER_CONFIG)
    # The real Arc2Face checkpoint was saved by transformers 4 ("text_model." prefix); keep
    # that layout so the tiny profile exercises the same loading path.
    state = {
        (k if k.startswith("text_model.") else f"text_model.{k}"): v.contiguous()
        for k, v in encoder.state_dict().items()
    }
    fsio.atomic_write_bytes(
        root / "encoder" / "model.safetensors", save(state, metadata={"format": "pt"})
    )
    write_clip_tokenizer(root / "tokenizer")
    write_json(root / "scheduler" / "scheduler_config.json", SD15_SCHEDULER_CONFIG)
    export_tiny_recognizer(root / "arcface.onnx", dim=TINY_ID_DIM, input_size=112, seed=seed)
    package = {e["path"]: e for e in load_package_manifest()["files"]}
    # the detector every new user downloads (buffalo_l's), not its hand-placed stand-in
    [detector] = [
        p
        for p, e in package.items()
        if e["component"] == "detector" and not e.get("alternative_to")
    ]
    export_tiny_detector(root / detector, input_size=TINY_DETECTOR_SIZE, seed=seed)
    # buffalo_l's attribute models: built always, like the other optional components (~40 KB,
    # milliseconds)
    for group, export in (
        ("landmarks3d", export_tiny_landmark_3d),
        ("genderage", export_tiny_genderage),
    ):
        [rel] = [p for p, e in package.items() if e.get("optional") == group]
        export(root / rel, seed=seed)
    for offset, (group, layout) in enumerate(sorted(LORA_KEY_FORMATS.items()), start=1):
        [rel] = [
            p
            for p, e in package.items()
            if e.get("optional") == group and p.endswith(".safetensors")
        ]
        state = random_lora(
            unet, layout=layout, rank=TINY_LORA_RANK, alpha=TINY_LORA_ALPHA, seed=seed + offset
        )
        fsio.atomic_write_bytes(root / rel, save(state))
    face = json.loads(json.dumps(REAL_FACE_CONFIG))
    face["detector"]["input_size"] = TINY_DETECTOR_SIZE
    write_json(root / FACE_CONFIG, face)

    tiny_license = {
        "license": "Apache-2.0 (random weights, digi2real tiny profile)",
        "commercial": True,
    }
    entries = []
    for rel, meta in package.items():
        if meta.get("alternative_to"):
            continue
        entries.append(
            entry_for(
                root,
                rel,
                {
                    "component": meta["component"],
                    **({"optional": meta["optional"]} if meta.get("optional") else {}),
                    "source": {"type": "tiny", "seed": seed},
                    "license_url": None,
                    **tiny_license,
                },
            )
        )
    entries.append(
        entry_for(
            root,
            FACE_CONFIG,
            {"component": "face-config", "source": {"type": "tiny"}, **tiny_license},
        )
    )
    write_dir_manifest(root, "tiny", entries)
    logger.info("tiny weights profile built in %s", root)
    return open_weights(root)


def ensure_tiny(root: str | Path | None = None) -> WeightsDir:
    """Open the tiny profile at ``root`` (default location if None), building it if absent."""
    root = Path(root).expanduser() if root is not None else default_weights_dir("tiny")
    if (root / DIR_MANIFEST).is_file():
        return open_weights(root)
    return build_tiny(root)
