"""Write the conditioning of fixed vectors on the tiny profile, to compare transformers majors.

    python scripts/conditioning_fingerprint.py WEIGHTS_DIR out5.npy   # env with transformers 5.x
    other-env/bin/python scripts/conditioning_fingerprint.py WEIGHTS_DIR out4.npy  # 4.x
    python -c "import numpy as n; print(abs(n.load('out5.npy') - n.load('out4.npy')).max())"

An env with transformers 4.57 also needs huggingface_hub<1 and a diffusers of that era
(0.35.x); see docs/architecture.md for the result.
"""

from __future__ import annotations

import argparse

import numpy as np
import transformers

from digi2real.pipeline.conditioning import IdentityEncoder
from digi2real.weights import open_weights
from digi2real.weights.configs import TINY_ID_DIM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights")
    parser.add_argument("out")
    args = parser.parse_args()
    weights = open_weights(args.weights)
    encoder = IdentityEncoder.from_weights(
        weights, id_dim=TINY_ID_DIM if weights.profile == "tiny" else 512
    )
    vectors = np.random.default_rng(0).normal(size=(4, encoder.id_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cond = encoder.encode(vectors).float().numpy()
    np.save(args.out, cond)
    print(f"transformers {transformers.__version__}: {cond.shape} -> {args.out}")


if __name__ == "__main__":
    main()
