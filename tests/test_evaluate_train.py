from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from digi2real.cli.evaluate import add_train_arguments, config_from_args
from digi2real.evaluate.backbones import get_backbone
from digi2real.evaluate.data import ImageFolderFaces, open_dataset
from digi2real.evaluate.losses import MarginHead, arcface_target
from digi2real.evaluate.train import LRSchedule, TrainConfig, load_checkpoint, train
from digi2real.evaluate.verify import load_backbone

REPO = Path(__file__).resolve().parents[1]
IDENTITIES = ("alice", "bob", "carol", "dave")
PER_IDENTITY = 6
BATCH = 4
STEPS_PER_EPOCH = len(IDENTITIES) * PER_IDENTITY // BATCH


def make_out(root: Path) -> Path:
    """A converted-dataset fixture: images/<identity>/<k>.jpg, labels.csv, manifest.parquet."""
    rng = np.random.default_rng(0)
    rows = []
    for label, identity in enumerate(IDENTITIES):
        folder = root / "images" / identity
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, (112, 112, 3))
        for k in range(PER_IDENTITY):
            pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{k:04d}.jpg", quality=90)
            rows.append(
                {
                    "key": f"{label:07d}_{k:04d}",
                    "identity": identity,
                    "label": label,
                    "path": f"images/{identity}/{k:04d}.jpg",
                }
            )
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "identity"])
        writer.writerows(enumerate(IDENTITIES))
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return root


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_out(tmp_path_factory.mktemp("OUT"))


def small_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "backbone": "small",
        "epochs": 2,
        "batch_size": BATCH,
        "lr": 0.02,
        "num_workers": 0,
        "threads": 1,
        "progress": False,
        "seed": 7,
    }
    values.update(overrides)
    return TrainConfig(data=str(data), out=str(out), **values)  # type: ignore[arg-type]


def assert_same_tensors(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.fixture(scope="module")
def reference_run(out_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 2-epoch run to compare resumed runs against."""
    ckpt = tmp_path_factory.mktemp("reference")
    result = train(small_config(out_dir, ckpt))
    assert result.finished
    return load_checkpoint(ckpt / "checkpoint.pt")


def test_dataset_reads_labels_and_normalises(out_dir: Path) -> None:
    dataset = ImageFolderFaces(out_dir, seed=1, flip=False)
    assert len(dataset) == len(IDENTITIES) * PER_IDENTITY and dataset.num_classes == 4
    image, label = dataset[PER_IDENTITY + 2]
    assert label == 1 and image.shape == (3, 112, 112) and image.dtype == torch.float32
    with Image.open(out_dir / "images" / "bob" / "0002.jpg") as raw:
        pixels = np.asarray(raw.convert("RGB"), dtype=np.float32)
    expected = (pixels.transpose(2, 0, 1) - 127.5) / 127.5
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-6)


def test_flip_depends_only_on_seed_epoch_index(out_dir: Path) -> None:
    a = ImageFolderFaces(out_dir, seed=3)
    b = ImageFolderFaces(out_dir, seed=3)
    plain = ImageFolderFaces(out_dir, flip=False)
    flips = []
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for index in range(4):
            image = a[index][0]
            assert torch.equal(image, b[index][0])
            flipped = torch.equal(image, plain[index][0].flip(-1))
            assert flipped or torch.equal(image, plain[index][0])
            flips.append(flipped)
    assert any(flips) and not all(flips)


def test_manifest_label_mismatch_is_refused(tmp_path: Path) -> None:
    root = make_out(tmp_path / "OUT")
    (root / "labels.csv").write_text("label,identity\n0,bob\n1,alice\n2,carol\n3,dave\n")
    with pytest.raises(ValueError, match="labels.csv says"):
        ImageFolderFaces(root)


def test_unknown_format_and_missing_rec(tmp_path: Path, out_dir: Path) -> None:
    with pytest.raises(ValueError, match="valid choices"):
        open_dataset(out_dir, "lmdb")
    try:
        import digi2real.data.writers.recordio  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="recordio"):
            open_dataset(out_dir, "rec")


def test_iresnet_layout_matches_arcface_torch() -> None:
    model = get_backbone("iresnet50").eval()
    state = model.state_dict()
    # arcface_torch names: 3-4-14-3 blocks, 7x7x512 -> 512 FC, frozen BN1d scale.
    assert "layer3.13.conv2.weight" in state and "layer3.14.conv2.weight" not in state
    assert state["fc.weight"].shape == (512, 512 * 7 * 7)
    assert not model.features.weight.requires_grad
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 112, 112)).shape == (1, 512)
    assert "layer2.1.bn1.weight" in get_backbone("iresnet18").state_dict()
    with pytest.raises(ValueError, match="valid choices"):
        get_backbone("resnet50")


def test_arcface_margin_and_threshold() -> None:
    margin = 0.5
    theta = torch.tensor([0.3, 1.0, math.pi - 0.2])
    out = arcface_target(torch.cos(theta), margin)
    assert torch.allclose(out[:2], torch.cos(theta[:2] + margin), atol=1e-6)
    # Past pi - m, cos(theta + m) would rise again; the linear fallback keeps it falling.
    fallback = math.cos(math.pi - 0.2) - math.sin(math.pi - margin) * margin
    assert out[2].item() == pytest.approx(fallback, abs=1e-6)
    easy = arcface_target(torch.cos(theta), margin, easy_margin=True)
    assert easy[2].item() == pytest.approx(math.cos(math.pi - 0.2), abs=1e-6)


@pytest.mark.parametrize("loss", ["arcface", "cosface"])
def test_margin_head_logits(loss: str) -> None:
    torch.manual_seed(0)
    head = MarginHead(8, 5, loss)
    embeddings = torch.randn(3, 8)
    labels = torch.tensor([0, 4, 2])
    logits = head.logits(embeddings, labels)
    cosine = (
        torch.nn.functional.normalize(embeddings) @ torch.nn.functional.normalize(head.weight).T
    )
    rows = torch.arange(3)
    target = cosine[rows, labels]
    expected = arcface_target(target, 0.5) if loss == "arcface" else target - 0.35
    assert torch.allclose(logits[rows, labels], 64 * expected, atol=1e-4)
    others = torch.ones_like(cosine, dtype=torch.bool)
    others[rows, labels] = False
    assert torch.allclose(logits[others], 64 * cosine[others], atol=1e-4)
    head(embeddings, labels).backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


def test_schedules() -> None:
    poly = LRSchedule("poly", total_steps=100, warmup_steps=10, steps_per_epoch=10)
    assert poly(0) == pytest.approx(0.1) and poly(9) == pytest.approx(1.0)
    assert poly(10) == pytest.approx(1.0) and poly(55) == pytest.approx(0.5**2)
    assert poly(99) < 1e-3
    step = LRSchedule("step", 100, 0, 10, milestones=(3, 6), gamma=0.1)
    assert [step(s) for s in (29, 30, 59, 60)] == pytest.approx([1, 0.1, 0.1, 0.01])


def test_cli_flags_map_onto_config(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        ["OUT", "--out", str(tmp_path), "--backbone", "iresnet18", "--loss", "cosface"]
        + ["--schedule", "step", "--milestones", "12,20,24", "--amp", "--batch-size", "256"]
    )
    config = config_from_args(args)
    assert config.milestones == (12, 20, 24) and config.amp and config.batch_size == 256
    assert config.loss == "cosface" and config.backbone == "iresnet18"
    with pytest.raises(ValueError, match="valid"):
        TrainConfig(data="OUT", out="x", loss="sphereface")


def test_train_writes_checkpoint_and_backbone(out_dir: Path, tmp_path: Path) -> None:
    result = train(small_config(out_dir, tmp_path, epochs=1, loss="cosface"))
    assert result.finished and result.step == STEPS_PER_EPOCH and result.epoch == 1
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (STEPS_PER_EPOCH, 1, 0)
    assert {"optimizer", "scheduler", "scaler", "rng", "head"} <= state.keys()
    assert state["head"]["weight"].shape == (len(IDENTITIES), 512)
    initial = get_backbone("small").state_dict()
    assert not torch.equal(initial["conv1.weight"], state["backbone"]["conv1.weight"])
    model = load_backbone(tmp_path).eval()
    assert_same_tensors(model.state_dict(), state["backbone"])
    assert (tmp_path / "train_config.json").is_file()


def test_amp_bf16_on_cpu_runs(out_dir: Path, tmp_path: Path) -> None:
    result = train(small_config(out_dir, tmp_path, epochs=1, amp=True, max_steps=2))
    assert result.step == 2 and not result.finished
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["backbone"].values() if v.is_floating_point())


def test_step_limit_then_resume_equals_uninterrupted(
    out_dir: Path, tmp_path: Path, reference_run: dict
) -> None:
    first = train(small_config(out_dir, tmp_path, max_steps=4))
    assert (first.step, first.epoch, first.finished) == (4, 0, False)
    stopped = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (stopped["step"], stopped["step_in_epoch"]) == (4, 4)
    assert load_backbone(tmp_path) is not None  # only checkpoint.pt exists yet

    second = train(small_config(out_dir, tmp_path))
    assert second.finished and second.step == 2 * STEPS_PER_EPOCH
    final = load_checkpoint(tmp_path / "checkpoint.pt")
    assert_same_tensors(final["backbone"], reference_run["backbone"])
    assert_same_tensors(final["head"], reference_run["head"])
    assert final["scheduler"]["last_epoch"] == reference_run["scheduler"]["last_epoch"]


def test_resume_refuses_changed_settings(out_dir: Path, tmp_path: Path) -> None:
    train(small_config(out_dir, tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="lr"):
        train(small_config(out_dir, tmp_path, lr=0.5))
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(small_config(out_dir, tmp_path / "empty", resume=True))


def _cli(out_dir: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        str(out_dir),
        "--out",
        str(ckpt),
        "--backbone",
        "small",
        "--epochs",
        "2",
        "--batch-size",
        str(BATCH),
        "--lr",
        "0.02",
        "--workers",
        "0",
        "--threads",
        "1",
        "--seed",
        "7",
        "--no-progress",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_sigkill_after_checkpoint_then_resume(
    out_dir: Path, tmp_path: Path, reference_run: dict
) -> None:
    command = [sys.executable, "-m", "digi2real", "evaluate", "train"]
    command += _cli(out_dir, tmp_path, "--checkpoint-every", "1")
    process = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoint = tmp_path / "checkpoint.pt"
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)
    assert checkpoint.exists(), stderr.decode()[-2000:]
    killed_at = load_checkpoint(checkpoint)["step"]
    assert 1 <= killed_at < 2 * STEPS_PER_EPOCH, "the run ended before it could be killed"

    result = train(small_config(out_dir, tmp_path))
    assert result.finished and result.step == 2 * STEPS_PER_EPOCH
    final = load_checkpoint(checkpoint)
    assert_same_tensors(final["backbone"], reference_run["backbone"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_torchrun_two_processes_gloo(out_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "digi2real", "evaluate", "train"]
    command += _cli(out_dir, tmp_path, "--epochs", "1")
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    per_rank_steps = len(IDENTITIES) * PER_IDENTITY // 2 // BATCH
    assert state["world_size"] == 2 and state["step"] == per_rank_steps
    assert (tmp_path / "backbone.safetensors").is_file()
    # A different process count would change the batches: resuming that way is refused.
    with pytest.raises(ValueError, match="world_size"):
        train(small_config(out_dir, tmp_path, epochs=1))
