"""The real CLIP tokenizer files, built offline from the BPE vocabulary open_clip ships."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from digi2real.data import fsio
from digi2real.weights.configs import CLIP_SPECIAL_TOKENS, CLIP_TOKENIZER_CONFIG
from digi2real.weights.manifest import write_json


def clip_bpe_path() -> Path:
    """The CLIP BPE vocabulary open_clip ships, found without importing open_clip (whose
    imports want torchvision/timm)."""
    try:
        dist = importlib.metadata.distribution("open_clip_torch")
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            "the tiny profile needs the real CLIP BPE vocabulary that open_clip_torch ships: "
            "`pip install --no-deps open_clip_torch==3.3.0`"
        ) from error
    for file in dist.files or []:
        if file.name == "bpe_simple_vocab_16e6.txt.gz":
            return Path(str(dist.locate_file(file)))
    raise FileNotFoundError(
        "open_clip_torch is installed but bpe_simple_vocab_16e6.txt.gz is not in it"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (printable bytes map to
    themselves, the rest to code points from 256 up, in byte order)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def write_clip_tokenizer(directory: Path) -> None:
    """vocab.json/merges.txt of the real CLIP tokenizer, built from the BPE merges the way CLIP
    builds its vocabulary (byte tokens, their ``</w>`` forms, merges, then the two specials)."""
    import gzip

    with gzip.open(clip_bpe_path()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    fsio.atomic_write_bytes(
        directory / "vocab.json",
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False).encode("utf-8"),
    )
    fsio.atomic_write_bytes(
        directory / "merges.txt",
        ("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n").encode("utf-8"),
    )
    write_json(directory / "tokenizer_config.json", CLIP_TOKENIZER_CONFIG)
    write_json(directory / "special_tokens_map.json", CLIP_SPECIAL_TOKENS)
