"""The model configs of both profiles: the real one's (public configs of Arc2Face / SD-1.5,
also used to build the full-size architecture with random weights for benchmarks) and the
tiny one's (same classes, small sizes)."""

from __future__ import annotations

from typing import Any

REAL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

REAL_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

REAL_ENCODER_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}

# madebyollin/taesd's config.json (diffusers AutoencoderTiny): decodes SD-1.5's scaled latents
REAL_TAESD_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderTiny",
    "act_fn": "relu",
    "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "upsampling_scaling_factor": 2,
}

# The UNet layers the SD-1.5 LCM-LoRA adapts (diffusers' LCM-LoRA distillation script's
# target modules): attention projections, feed-forward, transformer in/out projections and
# the ResNet convolutions, as suffixes of diffusers module names.
LORA_TARGET_SUFFIXES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
# The public files' key formats (read by diffusers either way): LCM-LoRA in the kohya/A1111
# layout (``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` /
# ``.alpha``), TCD-LoRA as saved by diffusers' ``save_lora_weights`` (``unet.<module>.lora.down
# .weight`` / ``.lora.up.weight``, no alphas).
LORA_KEY_FORMATS = {"lcm": "kohya", "tcd": "diffusers"}

SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

REAL_FACE_CONFIG: dict[str, Any] = {
    "recognizer": {
        "file": "arcface.onnx",
        "input_size": 112,
        "color": "RGB",
        "mean": [127.5, 127.5, 127.5],
        "std": [127.5, 127.5, 127.5],
    },
    "detector": {
        "file": "det_10g.onnx",
        "kind": "scrfd",
        "input_size": 640,
        "score_threshold": 0.5,
        "nms_threshold": 0.4,
        "pad_ratio": 1.0,
    },
}

TINY_UNET_CONFIG: dict[str, Any] = {
    **REAL_UNET_CONFIG,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
    "sample_size": 8,
}

TINY_VAE_CONFIG: dict[str, Any] = {
    **REAL_VAE_CONFIG,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}

TINY_ENCODER_CONFIG: dict[str, Any] = {
    **REAL_ENCODER_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 64,
}

TINY_TAESD_CONFIG: dict[str, Any] = {
    **REAL_TAESD_CONFIG,
    "decoder_block_out_channels": [8, 8, 8, 8],
    "encoder_block_out_channels": [8, 8, 8, 8],
    "num_decoder_blocks": [1, 1, 1, 1],
    "num_encoder_blocks": [1, 1, 1, 1],
}
TINY_LORA_RANK = 4
TINY_LORA_ALPHA = 2.0  # != rank, so alpha/rank scaling is exercised (kohya files carry alphas)

# The tiny recognizer's width, and so the identity vector the tiny encoder reads (at most its
# hidden size). Unrelated images land at cosine ~N(0, 1/dim) after a random projection; on the
# demo's outputs, projection seeds that make two of its six identities collide (centroid
# cosine >= 0.6) were 15-18% at 16 dimensions, 1-2% at 32 and none of 300 at 64 (measured
# when the tiny recognizer became a projection).
TINY_ID_DIM = 64
TINY_DETECTOR_SIZE = 160

CLIP_TOKENIZER_CONFIG: dict[str, Any] = {
    "add_prefix_space": False,
    "bos_token": "<|startoftext|>",
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}

CLIP_SPECIAL_TOKENS: dict[str, Any] = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}
