"""The generation stages, in order: ``interpolate`` (targets on the unit sphere within each
identity), ``conditioning`` (ArcFace vector -> Arc2Face's CLIP encoder output),
``domain_shift`` (the synthetic-to-real correction in that space), ``generate`` (the Arc2Face
diffusion stage) and ``identity_filter`` (keep an output only if it keeps its identity)."""
