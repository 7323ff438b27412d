from __future__ import annotations

import shutil

import numpy as np

from digi2real.cli import main
from digi2real.data.embeddings import load_embeddings
from digi2real.weights.configs import TINY_ID_DIM


def test_embed_writes_unit_rows_with_identities_and_paths(
    tiny_weights, tiny_config, sample_dataset, tmp_path, capsys
):
    src = tmp_path / "src"
    shutil.copytree(sample_dataset / "0", src / "alice")
    shutil.copytree(sample_dataset / "1", src / "bob")
    (src / "bob" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "emb.npy"
    args = [
        "embed",
        str(src),
        "--out",
        str(out),
        "--weights",
        str(tiny_weights.root),
        "--preset",
        "tiny",
    ]
    assert main(args) == 0
    assert "8 embeddings (1 unusable files)" in capsys.readouterr().out
    data = load_embeddings(out)
    assert data.embeddings.shape == (8, TINY_ID_DIM)
    assert np.allclose(np.linalg.norm(data.embeddings, axis=1), 1, atol=1e-5)
    assert data.identities == ["alice"] * 4 + ["bob"] * 4
    assert data.paths[0] == "alice/0.png" and data.paths[-1] == "bob/3.png"
    # the same images through the conversion's face stack give the same vectors
    from digi2real.data.images import load_image
    from digi2real.face.stack import FaceStack

    faces = FaceStack(tiny_config(), tiny_weights, device="cpu")
    crop, _ = faces.align(load_image(src / "alice" / "0.png"))
    assert np.allclose(faces.embed(crop[None])[0], data.embeddings[0], atol=1e-5)
