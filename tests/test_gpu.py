"""Every CUDA-only path, on a CUDA device (marker ``gpu``: skipped where torch sees none;
``scripts/gpu_check.sh`` runs them on a lent GPU machine).

- a tiny-profile conversion on ``cuda`` (float32, and fp16 / bf16) against the CPU one;
- ``--devices all`` (one in-process worker per GPU, several processes with several GPUs);
- CUDA OOM halving, provoked for real: the allowed memory capped between what a batch and half
  of it need, on the tiny architecture run at 512x512, and reported in the run's summary;
- the pinned-memory upload of the initial noise and the uint8 readback through a pinned buffer
  (``Arc2FaceGenerator.prepare_latents`` / ``decode``);
- per-call fp16 / bf16 / channels_last error against fp32 (`digi2real bench --variants`);
- the Ray runner with ``num_gpus=1`` actors (skipped without Ray).

Tolerances, fixed from CPU measurements before any GPU ran them: on this tiny profile (2
steps), generating in bf16 instead of fp32 on CPU moved the decoded output JPEGs by at most 13
grey levels (mean 1.44) and fp16 by at most 12 (mean 1.15): JPEG quantisation turns a one-level
pixel change into several; the embeddings kept a cosine above 0.99998. CUDA in float32 rounds
convolutions to TF32 (PyTorch's default for cuDNN: a 10-bit mantissa, as fp16's), so the CUDA
conversion must stay within fp16's reach: mean <= 2 grey levels, max <= 24, cosine >= 0.999.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scale_helpers import CONVERT_FIELDS, convert_argv, make_source

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
JPEG_MEAN_GREY = 2.0
JPEG_MAX_GREY = 24
MIN_COSINE = 0.999
# fp16 / bf16 conversions: three times what bf16 gave on CPU (mean 1.44); a half-precision
# path that is broken (NaN, wrong scaling) lands far beyond it
HALF_JPEG_MEAN_GREY = 4.5
MANIFEST_FIELDS = ("key", "identity", "label", "path", "index", "attempt", "seed")


# -- helpers -----------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> None:
    from digi2real.cli import main

    assert main(argv) == 0, argv


def decode(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(path.read_bytes())) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def compare(got: Path, want: Path) -> dict[str, Any]:
    """Same rows (keys, seeds, paths), then how far the images and embeddings moved."""
    import pyarrow.parquet as pq

    rows = pq.read_table(got / "manifest.parquet").to_pylist()
    ref = pq.read_table(want / "manifest.parquet").to_pylist()
    assert [tuple(r[f] for f in MANIFEST_FIELDS) for r in rows] == [
        tuple(r[f] for f in MANIFEST_FIELDS) for r in ref
    ]
    diff = np.stack([np.abs(decode(got / r["path"]) - decode(want / r["path"])) for r in ref])
    a = np.load(got / ".digi2real" / "outputs.npy").astype(np.float64)
    b = np.load(want / ".digi2real" / "outputs.npy").astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {
        "rows": len(rows),
        "max_grey": int(diff.max()),
        "mean_grey": float(diff.mean()),
        "min_cosine": float(cosine.min()),
        "dtypes": sorted({r["dtype"] for r in rows}),
    }


def assert_close_to_cpu(stats: dict[str, Any]) -> None:
    assert stats["rows"] > 0
    assert stats["mean_grey"] <= JPEG_MEAN_GREY, stats
    assert stats["max_grey"] <= JPEG_MAX_GREY, stats
    assert stats["min_cosine"] >= MIN_COSINE, stats


def environment(out: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["environment"]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory, sample_dataset) -> Path:
    return make_source(tmp_path_factory.mktemp("gpu-source") / "src", sample_dataset)


@pytest.fixture(scope="module")
def cpu_out(tmp_path_factory, source, tiny_weights) -> Path:
    """The reference: the same conversion on CPU."""
    out = tmp_path_factory.mktemp("gpu-cpu") / "out"
    run_cli(convert_argv(source, out, tiny_weights.root, "--device", "cpu"))
    return out


@pytest.fixture(scope="module")
def generators(tiny_weights) -> tuple[Any, Any]:
    """The tiny generator on CPU and on CUDA, float32."""
    from digi2real.pipeline.generate import Arc2FaceGenerator
    from digi2real.weights.configs import TINY_ID_DIM

    return tuple(
        Arc2FaceGenerator.from_weights(tiny_weights, id_dim=TINY_ID_DIM, device=device)
        for device in ("cpu", "cuda")
    )


# -- conversions -------------------------------------------------------------------------------


def test_conversion_on_cuda_matches_the_cpu_one(cpu_out, source, tiny_weights, tmp_path):
    out = tmp_path / "cuda"
    run_cli(convert_argv(source, out, tiny_weights.root, "--device", "cuda"))
    stats = compare(out, cpu_out)
    assert stats["dtypes"] == ["float32"]  # the tiny preset's dtype, kept on CUDA
    assert_close_to_cpu(stats)
    env = environment(out)
    assert env["device"] == "cuda" and env["cuda_device"], env


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_conversion_on_cuda(cpu_out, source, tiny_weights, tmp_path, dtype):
    out = tmp_path / dtype
    run_cli(convert_argv(source, out, tiny_weights.root, "--device", "cuda", "--dtype", dtype))
    stats = compare(out, cpu_out)
    assert stats["dtypes"] == [dtype]  # resolve_dtype keeps it on CUDA (CPU runs are float32)
    assert stats["mean_grey"] <= HALF_JPEG_MEAN_GREY, stats
    assert stats["min_cosine"] >= MIN_COSINE, stats


def test_devices_all_runs_on_every_gpu(cpu_out, source, tiny_weights, tmp_path):
    out = tmp_path / "all"
    run_cli(convert_argv(source, out, tiny_weights.root, "--devices", "all"))
    assert_close_to_cpu(compare(out, cpu_out))
    env = environment(out)
    assert env["placement"]["run.devices"] == "all"
    assert env["device"].startswith("cuda"), env


def test_ray_runs_num_gpus_1_actors(cpu_out, source, tiny_config, tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import torch

    from digi2real.runner.convert import convert
    from digi2real.runner.ray import placement

    config = tiny_config(source, **CONVERT_FIELDS, **{"run.runner": "ray", "run.device": "cuda"})
    gpus = torch.cuda.device_count()
    ray.init(address="local", num_cpus=4, num_gpus=gpus, include_dashboard=False)
    try:
        where = placement(config, ray.cluster_resources(), 3)
        assert where.gpu and where.actors == min(gpus, 3)
        summary = convert(config, tmp_path / "ray", progress=False)
    finally:
        ray.shutdown()
    assert summary.images > 0
    assert_close_to_cpu(compare(tmp_path / "ray", cpu_out))


# -- CUDA OOM ----------------------------------------------------------------------------------


def test_cuda_oom_halves_the_batch_and_the_summary_says_so(tiny_config, tiny_weights, tmp_path):
    """A real ``torch.cuda.OutOfMemoryError``: the memory this process may take is capped
    halfway between what batch 16 and batch 32 need, measured first on the same engine."""
    import pyarrow.parquet as pq
    import torch
    from helpers import unit_rows

    from digi2real.runner.convert import convert
    from digi2real.runner.engine import Engine

    config = tiny_config(
        **{
            "run.device": "cuda",
            "generation.steps": 2,
            "generation.batch_size": 32,
            "interpolation.outputs_per_identity": 8,
            # the whole sample in one shard: 48 targets (6 usable identities x 8, measured on
            # CPU), so the first batch is a full 32
            "output.shard_size": 8,
        }
    )
    engine = Engine(config, tiny_weights, device="cuda")
    gen = engine.generator
    # The tiny architecture run at 512x512 (its UNet and VAE take any latent size): a batch's
    # activations (hundreds of MiB) then dwarf the allocator's rounding (2-20 MiB blocks), so
    # a cap between two batch sizes' needs separates them without doubt.
    gen.latent_size = 64
    gen.resolution = gen.latent_size * gen.vae_scale_factor
    ids = unit_rows(32, engine.id_dim, seed=5)

    def peak_reserved(batch: int) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        gen(ids[:batch], seeds=list(range(batch)))
        torch.cuda.synchronize()
        # the per-process fraction caps reserved memory (what the allocator took from CUDA)
        return torch.cuda.max_memory_reserved()

    half, full = peak_reserved(16), peak_reserved(32)
    assert full > half * 1.2, f"batch 32 needs {full} B, batch 16 {half} B: too close to cap"
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((half + full) / 2 / total)
    try:
        summary = convert(config, tmp_path / "oom", progress=False, engine=engine)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert any(
        "CUDA out of memory at batch 32; continuing with batch 16" in e for e in summary.events
    ), summary.events
    rows = pq.read_table(tmp_path / "oom" / "manifest.parquet").to_pylist()
    assert summary.images == len(rows) > 32 and summary.rejected == 0  # nothing lost to it
    assert engine.batch_size == 16
    assert engine.timings.batches[0] == max(engine.timings.batches) == 16


# -- pinned memory -----------------------------------------------------------------------------


def test_prepare_latents_uploads_through_pinned_memory(generators, monkeypatch):
    import torch

    cpu, cuda = generators
    pinned: list[bool] = []
    original = torch.Tensor.pin_memory

    def spy(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = original(self, *args, **kwargs)
        pinned.append(result.is_pinned())
        return result

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    seeds = list(range(100, 164))
    got = cuda.prepare_latents(seeds=seeds, init_noise_sigma=2.5)
    assert pinned == [True]
    assert got.device.type == "cuda" and got.dtype == torch.float32
    want = cpu.prepare_latents(seeds=seeds, init_noise_sigma=2.5)
    # a copy (asynchronous, from page-locked memory), no arithmetic: bit for bit
    assert torch.equal(got.cpu(), want)


def test_decode_reads_back_uint8_through_a_pinned_buffer(generators, monkeypatch):
    import torch

    cpu, cuda = generators
    buffers: list[tuple[torch.dtype, bool]] = []
    original = torch.empty

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        result = original(*args, **kwargs)
        if kwargs.get("pin_memory"):
            buffers.append((result.dtype, result.is_pinned()))
        return result

    size = cuda.latent_size
    latents = torch.randn(
        4, cuda.latent_channels, size, size, generator=torch.Generator().manual_seed(3)
    )
    from digi2real.bench.checks import tf32_off  # full fp32 on CUDA: CPU-level rounding

    with tf32_off(), torch.no_grad():
        monkeypatch.setattr(torch, "empty", spy)
        got = cuda.decode(latents.to("cuda"))
        monkeypatch.setattr(torch, "empty", original)
        first = got.copy()
        want = cpu.decode(latents)
        assert buffers == [(torch.uint8, True)]
        assert got.dtype == np.uint8 and got.shape == want.shape
        assert want.shape == (4, cuda.resolution, cuda.resolution, 3)
        # both round half to even after the same arithmetic in fp32: at most one level apart
        assert np.abs(got.astype(np.int16) - want).max() <= 1
        # the pinned buffer belongs to the returned array: the next decode leaves it alone
        cuda.decode(torch.randn_like(latents).to("cuda"))
    np.testing.assert_array_equal(got, first)


# -- per-call precision ------------------------------------------------------------------------


def test_half_precision_per_call_error_within_tolerance(generators, tiny_config, tiny_weights):
    """`digi2real bench --variants`'s check on CUDA: UNet and VAE decode in fp16 / bf16 (and fp32
    channels_last) against fp32 with TF32 off; bars 20 unit roundoffs (1e-4 same dtype)."""
    import torch

    from digi2real.bench import checks
    from digi2real.bench.models import Setup
    from digi2real.weights.configs import REAL_TAESD_CONFIG

    _, cuda = generators
    setup = Setup(
        profile="tiny",
        device=torch.device("cuda"),
        dtype="float32",
        naive_dtype="float32",
        generator=cuda,
        config=tiny_config(**{"run.device": "cuda"}),
        face_weights=tiny_weights,
        taesd=None,
        taesd_config=REAL_TAESD_CONFIG,
    )
    rows = {
        r["variant"]: r
        for r in checks.measure_variants(setup, ["channels_last", "fp16", "bf16"], 2, 1)
    }
    assert set(rows) == {"fp32 eager (reference)", "channels_last", "fp16", "bf16"}
    for name in ("channels_last", "fp16", "bf16"):
        row = rows[name]
        assert "error" not in row, row
        assert row["passed"], row
    assert rows["fp16"]["dtype"] == "float16" and rows["bf16"]["dtype"] == "bfloat16"
    assert rows["fp16"]["tolerance"] == checks.TOL_HALF[torch.float16]
