"""Engine speed options must not change what is generated: overlapped post-processing, CUDA
OOM halving, torch.compile plumbing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import unit_rows

from digi2real.runner.engine import Engine
from digi2real.weights.configs import TINY_ID_DIM

STEPS = 3


def make_engine(tiny_weights, tiny_config, **overrides) -> Engine:
    torch.set_num_threads(1)
    config = tiny_config(**{"generation.steps": STEPS, **overrides})
    return Engine(config, tiny_weights, device="cpu")


@pytest.fixture(scope="module")
def engine(tiny_weights, tiny_config) -> Engine:
    return make_engine(tiny_weights, tiny_config, **{"generation.batch_size": 3})


def faces_equal(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.image, y.image)
        and np.array_equal(x.crop, y.crop)
        and np.array_equal(x.embedding, y.embedding)
        and x.jpeg == y.jpeg
        and x.reason == y.reason
        for x, y in zip(a, b, strict=True)
    )


def test_overlap_gives_the_same_bytes_as_the_serial_path(engine):
    targets, seeds = unit_rows(7, TINY_ID_DIM, seed=3), list(range(100, 107))
    engine.overlap = False
    serial = engine.generate(targets, seeds)
    engine.overlap = True
    overlapped = engine.generate(targets, seeds)
    assert len(serial) == 7 and all(f.jpeg for f in serial)
    assert faces_equal(serial, overlapped)
    # per batch post-processing equals post-processing everything at once
    whole = engine.postprocess([f.image for f in serial])
    assert faces_equal(serial, whole)
    # the overlapped path still ran in batches of 3 (3 + 3 + 1)
    assert engine.timings.batches[-3:] == [3, 3, 1]


def test_overlap_propagates_postprocess_errors(engine, monkeypatch):
    def broken(images):
        raise RuntimeError("embedder died")

    monkeypatch.setattr(engine, "postprocess", broken)
    engine.overlap = True
    with pytest.raises(RuntimeError, match="embedder died"):
        engine.generate(unit_rows(4, TINY_ID_DIM), [1, 2, 3, 4])


def test_cuda_oom_halves_the_batch_and_goes_on(tiny_weights, tiny_config, monkeypatch):
    engine = make_engine(tiny_weights, tiny_config, **{"generation.batch_size": 8})
    real = engine._generate_batch
    calls: list[int] = []

    def flaky(targets, seeds):
        calls.append(len(targets))
        if len(targets) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(targets, seeds)

    monkeypatch.setattr(engine, "_generate_batch", flaky)
    targets, seeds = unit_rows(9, TINY_ID_DIM, seed=1), list(range(7, 16))
    faces = engine.generate(targets, seeds)
    assert calls == [8, 4, 2, 2, 2, 2, 1] and engine.batch_size == 2
    assert len(engine.oom_events) == 2 and "batch 8" in engine.oom_events[0]
    # complete and in input order: each image equals the one made alone from its seed
    assert len(faces) == 9 and engine.timings.batches[-5:] == [2, 2, 2, 2, 1]
    monkeypatch.setattr(engine, "_generate_batch", real)
    for i in (0, 5, 8):
        alone = engine.generator(targets[i : i + 1], seeds=[seeds[i]]).images[0]
        assert np.abs(alone.astype(int) - faces[i].image.astype(int)).max() <= 2


def test_oom_at_batch_one_is_raised(tiny_weights, tiny_config, monkeypatch):
    engine = make_engine(tiny_weights, tiny_config, **{"generation.batch_size": 1})

    def always(targets, seeds):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(engine, "_generate_batch", always)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.generate(unit_rows(2, TINY_ID_DIM), [1, 2])


def test_mismatched_seeds_refused(engine):
    with pytest.raises(ValueError, match="3 targets but 2 seeds"):
        engine.generate(unit_rows(3, TINY_ID_DIM), [1, 2])


def test_compile_flag_reaches_the_generator(tiny_weights, tiny_config, monkeypatch):
    compiled: list[str] = []

    def fake_compile(self, *args, **kwargs):
        compiled.append(type(self).__name__)

    # plumbing only: the real compile is exercised (and timed) by `digi2real bench`
    monkeypatch.setattr(torch.nn.Module, "compile", fake_compile)
    plain = make_engine(tiny_weights, tiny_config)
    assert not plain.generator.compiled and compiled == []
    fast = make_engine(tiny_weights, tiny_config, **{"generation.compile": True})
    assert fast.generator.compiled
    assert compiled == ["UNet2DConditionModel", "Decoder"]


def test_channels_last_follows_the_config_and_sdpa_is_used(engine, tiny_weights, tiny_config):
    assert engine.generator.channels_last is False  # the tiny preset turns it off
    processors = engine.generator.attention_processors()
    assert processors == {"unet": ["AttnProcessor2_0"], "vae": ["AttnProcessor2_0"]}
    fast = make_engine(tiny_weights, tiny_config, **{"generation.channels_last": True})
    conv = fast.generator.unet.conv_in.weight
    assert fast.generator.channels_last and conv.is_contiguous(memory_format=torch.channels_last)


def test_overlap_config_default_is_on(engine):
    from digi2real.config import GenerationConfig

    assert GenerationConfig().overlap is True
    assert engine.overlap is engine.config.generation.overlap


def test_accepted_images_are_written_while_the_next_batch_diffuses(
    tiny_config, tmp_path, monkeypatch
):
    """The shard's image writes run on the post-processing thread, as each batch is judged,
    not after the whole shard has diffused."""
    import threading

    from digi2real.data.writers.imagefolder import ImageFolderWriter
    from digi2real.runner.convert import convert
    from digi2real.runner.engine import Engine

    events: list[tuple[str, str]] = []
    original_write = ImageFolderWriter.write
    original_batch = Engine._generate_batch

    def write(self, sample):
        events.append(("write", threading.current_thread().name))
        return original_write(self, sample)

    def diffuse(self, targets, seeds):
        events.append(("diffuse", threading.current_thread().name))
        return original_batch(self, targets, seeds)

    monkeypatch.setattr(ImageFolderWriter, "write", write)
    monkeypatch.setattr(Engine, "_generate_batch", diffuse)
    config = tiny_config(
        **{
            "source.identities": "first:2",
            "generation.steps": 2,
            "generation.batch_size": 2,
            "output.shard_size": 2,
        }
    )
    convert(config, tmp_path / "out", progress=False)
    writes = [i for i, (kind, _) in enumerate(events) if kind == "write"]
    diffusions = [i for i, (kind, _) in enumerate(events) if kind == "diffuse"]
    assert len(writes) == 8 and len(diffusions) == 4
    assert all(name.startswith("postprocess") for kind, name in events if kind == "write")
    assert writes[0] < diffusions[-1]  # the first images land before the last batch diffuses


def test_cuda_oom_during_a_conversion_is_reported_and_changes_nothing(
    tiny_config, tmp_path, monkeypatch
):
    import pyarrow.parquet as pq
    import torch

    from digi2real.runner.convert import convert
    from digi2real.runner.engine import Engine

    config = tiny_config(
        **{"source.identities": "first:2", "generation.steps": 2, "generation.batch_size": 4}
    )
    reference = convert(config, tmp_path / "ref", progress=False)
    assert reference.events == []
    original = Engine._generate_batch

    def tight_memory(self, targets, seeds):
        if len(targets) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, targets, seeds)

    monkeypatch.setattr(Engine, "_generate_batch", tight_memory)
    summary = convert(config, tmp_path / "oom", progress=False)
    assert any(
        "CUDA out of memory at batch 4; continuing with batch 2" in e for e in summary.events
    )
    assert summary.images == reference.images
    ref_rows = pq.read_table(tmp_path / "ref" / "manifest.parquet").to_pylist()
    rows = pq.read_table(tmp_path / "oom" / "manifest.parquet").to_pylist()
    assert [(r["key"], r["seed"]) for r in rows] == [(r["key"], r["seed"]) for r in ref_rows]
