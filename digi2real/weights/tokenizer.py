"""The real CLIP tokenizer files, built offline from CLIP's BPE vocabulary.

The vocabulary ships in this package (``bpe_simple_vocab_16e6.txt.gz``, OpenAI CLIP's file,
MIT: ``bpe_simple_vocab_16e6.LICENSE.txt`` beside it) and is checked against its sha256 before
use, so the tokenizer files built from it are the same bytes on every install.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from digi2real.data import fsio
from digi2real.weights.configs import CLIP_SPECIAL_TOKENS, CLIP_TOKENIZER_CONFIG
from digi2real.weights.manifest import write_json

CLIP_BPE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def read_clip_bpe(path: Path = CLIP_BPE) -> list[str]:
    """The lines of CLIP's BPE vocabulary, after checking the compressed file's sha256."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"CLIP's BPE vocabulary {path.name} is missing from the digi2real package "
            f"({path}); reinstall digi2real"
        ) from error
    actual = hashlib.sha256(data).hexdigest()
    if actual != CLIP_BPE_SHA256:
        raise ValueError(
            f"{path} has sha256 {actual}, expected {CLIP_BPE_SHA256}: the packaged CLIP "
            "vocabulary was altered; reinstall digi2real"
        )
    return gzip.decompress(data).decode("utf-8").split("\n")


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
    lines = read_clip_bpe()
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
