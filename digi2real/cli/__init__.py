"""The ``digi2real`` command: one module per command group, each mapping its flags onto the
config and calling one library function; ``main`` assembles them."""

from digi2real.cli.main import main

__all__ = ["main"]
