"""Weights: the manifest of every file a real run needs, download, verify, model configs, and
the tiny profile.

``manifest`` (package manifest, a dir's ``manifest.json``, :func:`open_weights`,
:func:`verify`), ``fetch`` (:func:`download` from Hugging Face, resumable), ``configs`` (model configs of both
profiles), ``face_config`` (``face.json``: each face model's preprocessing), ``tokenizer``
(the real CLIP tokenizer, offline), ``tiny`` and ``tiny_face`` (the tiny profile).
Nothing here runs at conversion time except :func:`open_weights` (reads, never fetches).
"""

from __future__ import annotations

from typing import Any

from digi2real.weights.manifest import (
    DIR_MANIFEST,
    PROFILES,
    VerifyResult,
    WeightsDir,
    default_weights_dir,
    load_package_manifest,
    open_weights,
    parse_groups,
    sha256_file,
    verify,
)

__all__ = [
    "DIR_MANIFEST",
    "PROFILES",
    "NoNetworkError",
    "VerifyResult",
    "WeightsDir",
    "build_tiny",
    "convert_bin_to_safetensors",
    "default_weights_dir",
    "download",
    "ensure_tiny",
    "load_package_manifest",
    "open_weights",
    "parse_groups",
    "sha256_file",
    "verify",
]

_LAZY = {
    "download": "digi2real.weights.fetch",
    "convert_bin_to_safetensors": "digi2real.weights.fetch",
    "NoNetworkError": "digi2real.weights.fetch",
    "build_tiny": "digi2real.weights.tiny",
    "ensure_tiny": "digi2real.weights.tiny",
}


def __getattr__(name: str) -> Any:
    # download and the tiny builder pull in huggingface_hub / torch: imported when used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
