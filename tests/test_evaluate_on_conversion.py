"""`evaluate train` on a real (tiny-profile) conversion, from ImageFolder and from RecordIO."""

from __future__ import annotations

import pytest

from digi2real.cli import main


@pytest.fixture(scope="module")
def converted(tiny_config, tmp_path_factory):
    from digi2real.runner.convert import convert

    out = tmp_path_factory.mktemp("ev") / "out"
    config = tiny_config(**{"generation.steps": 2, "output.formats": ["imagefolder", "recordio"]})
    convert(config, out, progress=False)
    return out


@pytest.mark.parametrize("data_format", ["imagefolder", "rec"])
def test_train_a_short_epoch_on_the_demo_output(converted, tmp_path, data_format):
    from digi2real.evaluate.train import load_checkpoint

    ckpt = tmp_path / "ckpt"
    args = ["evaluate", "train", str(converted), "--out", str(ckpt), "--backbone", "small"]
    args += [
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--format",
        data_format,
        "--no-progress",
    ]
    assert main(args) == 0
    state = load_checkpoint(ckpt / "checkpoint.pt")
    assert state["epoch"] == 1 and state["step"] == 3  # 24 images / batch 8
    assert (ckpt / "backbone.safetensors").is_file()
