"""digi2real: synthetic face renders to photorealistic identity-preserving training sets."""

from __future__ import annotations

from typing import Any

from digi2real.version import __version__

__all__ = ["Digi2Real", "Config", "__version__"]


def __getattr__(name: str) -> Any:
    # lazy: `import digi2real` stays light (no torch) until the API is used
    if name == "Digi2Real":
        from digi2real.api import Digi2Real

        return Digi2Real
    if name == "Config":
        from digi2real.config import Config

        return Config
    raise AttributeError(f"module 'digi2real' has no attribute {name!r}")
