"""digi2real: synthetic face renders to photorealistic identity-preserving training sets."""

__version__ = "0.1.0"
