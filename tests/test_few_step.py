"""The cost levers of issue 17: LoRA fusion through diffusers/peft, the few-step samplers
(LCM, TCD), guidance 1 without a guidance batch, the TAESD decoder, and preset fast4 end to end
on the tiny profile."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import unit_rows
from safetensors.torch import load_file, save_file

from digi2real.cli import main
from digi2real.pipeline.generate import Arc2FaceGenerator, SamplerSettings
from digi2real.pipeline.lora import fuse_lora, key_format, load_unfused, read_lora
from digi2real.runner.convert import convert
from digi2real.runner.plan import ConfigMismatchError
from digi2real.weights import sha256_file
from digi2real.weights.configs import TINY_ID_DIM, TINY_LORA_ALPHA, TINY_LORA_RANK

LCM = SamplerSettings("lcm", 4, 1.0)
pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def fresh_unet(tiny_weights):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_weights.unet).eval()


def unet_call(unet, seed=0):
    rng = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, generator=rng)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=rng)
    with torch.no_grad():
        return unet(latents, torch.tensor(500), encoder_hidden_states=context).sample


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


# -- LoRA -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("group", "fmt"), [("lcm", "kohya"), ("tcd", "diffusers")])
def test_tiny_loras_use_the_public_files_key_formats(tiny_weights, group, fmt):
    path = tiny_weights.lora_file(group)
    assert key_format(list(load_file(path))) == fmt
    lora = read_lora(path)
    assert lora.key_format == fmt and lora.layers > 50  # attention, ff and ResNet layers


@pytest.mark.parametrize("group", ["lcm", "tcd"])
def test_fused_unet_equals_the_unfused_lora(tiny_weights, group):
    """Fusion is W + scale * alpha/rank * up @ down folded into W: the same function as peft's
    separate LoRA layers, up to float32 reassociation (bar: 1e-5 relative)."""
    lora = read_lora(tiny_weights.lora_file(group))
    base = unet_call(fresh_unet(tiny_weights))
    unfused = unet_call(load_unfused(fresh_unet(tiny_weights), lora))
    fused_unet = fuse_lora(fresh_unet(tiny_weights), lora)
    fused = unet_call(fused_unet)
    assert relative_error(fused, unfused) < 1e-5
    assert relative_error(fused, base) > 1e-3  # the LoRA did something
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in fused_unet.modules())
    assert type(fused_unet).__name__ == "UNet2DConditionModel"


@pytest.mark.parametrize(("group", "alpha"), [("lcm", TINY_LORA_ALPHA), ("tcd", None)])
def test_one_fused_layer_equals_the_update_computed_by_hand(tiny_weights, group, alpha):
    raw = load_file(tiny_weights.lora_file(group))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    if group == "lcm":
        key = "lora_unet_" + name.replace(".", "_")
        down, up = raw[f"{key}.lora_down.weight"], raw[f"{key}.lora_up.weight"]
        assert float(raw[f"{key}.alpha"]) == alpha
    else:
        down, up = raw[f"unet.{name}.lora.down.weight"], raw[f"unet.{name}.lora.up.weight"]
    factor = (alpha if alpha is not None else TINY_LORA_RANK) / TINY_LORA_RANK
    scale = 0.7
    unet = fresh_unet(tiny_weights)
    weight = unet.get_submodule(name).weight.detach().clone()
    fused = fuse_lora(unet, read_lora(tiny_weights.lora_file(group)), scale=scale)
    by_hand = weight + scale * factor * (up @ down)
    torch.testing.assert_close(fused.get_submodule(name).weight, by_hand, rtol=1e-6, atol=1e-7)


def test_peft_key_format_loads_too(tiny_weights, tmp_path):
    """lora_A/lora_B keys (peft's own layout) are read as diffusers reads them."""
    raw = load_file(tiny_weights.lora_file("tcd"))
    peft_keys = {
        k.replace(".lora.down.weight", ".lora_A.weight").replace(
            ".lora.up.weight", ".lora_B.weight"
        ): v
        for k, v in raw.items()
    }
    path = tmp_path / "peft.safetensors"
    save_file(peft_keys, path)
    lora = read_lora(path)
    assert lora.key_format == "peft"
    reference = unet_call(
        fuse_lora(fresh_unet(tiny_weights), read_lora(tiny_weights.lora_file("tcd")))
    )
    assert relative_error(unet_call(fuse_lora(fresh_unet(tiny_weights), lora)), reference) < 1e-6


def test_unusable_lora_files_are_refused(tiny_weights, tmp_path):
    raw = load_file(tiny_weights.lora_file("lcm"))
    with_te = {**raw, "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}
    save_file(with_te, tmp_path / "te.safetensors")
    with pytest.raises(ValueError, match="adapts the text encoder"):
        read_lora(tmp_path / "te.safetensors")
    save_file({"weight": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a LoRA file"):
        read_lora(tmp_path / "plain.safetensors")
    shutil.copyfile(tiny_weights.lora_file("lcm"), tmp_path / "lora.bin")
    with pytest.raises(ValueError, match="only .safetensors"):
        read_lora(tmp_path / "lora.bin")
    # made for a wider UNet: its layers are not this UNet's
    wide = {k: torch.cat([v, v]) if k.endswith("lora_up.weight") else v for k, v in raw.items()}
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(Exception, match="size mismatch|shape"):
        fuse_lora(fresh_unet(tiny_weights), read_lora(tmp_path / "wide.safetensors"))


# -- samplers, guidance, decoder --------------------------------------------------------------


@pytest.fixture(scope="module")
def lcm_generator(tiny_weights):
    torch.set_num_threads(1)
    return Arc2FaceGenerator.from_weights(
        tiny_weights,
        id_dim=TINY_ID_DIM,
        lora=tiny_weights.lora_file("lcm"),
        decoder="tiny",
        settings=LCM,
    )


def unet_batches(generator, call):
    sizes = []
    handle = generator.unet.register_forward_pre_hook(lambda _m, args: sizes.append(len(args[0])))
    try:
        call()
    finally:
        handle.remove()
    return sizes


def test_guidance_one_runs_the_unet_once_per_step_on_the_batch(lcm_generator):
    ids = unit_rows(3, TINY_ID_DIM, seed=1)
    assert unet_batches(lcm_generator, lambda: lcm_generator(ids, seeds=[1, 2, 3])) == [3] * 4
    guided = SamplerSettings("lcm", 4, 1.5)
    sizes = unet_batches(
        lcm_generator, lambda: lcm_generator(ids, seeds=[1, 2, 3], settings=guided)
    )
    assert sizes == [6] * 4


def test_stochastic_sampler_noise_is_per_image(lcm_generator):
    """LCM draws noise at every step but the last: from each image's own generator, so an
    image does not depend on its batch (float rounding of batched kernels aside)."""
    ids = unit_rows(3, TINY_ID_DIM, seed=2)
    seeds = [21, 22, 23]
    batch = lcm_generator(ids, seeds=seeds).images
    assert np.array_equal(batch, lcm_generator(ids, seeds=seeds).images)
    for i in range(3):
        single = lcm_generator(ids[i : i + 1], seeds=[seeds[i]]).images[0]
        assert np.abs(single.astype(int) - batch[i].astype(int)).max() <= 2
    other = lcm_generator(ids[:1], seeds=[99]).images[0]
    assert not np.array_equal(other, batch[0])
    with pytest.raises(ValueError, match="draws noise at every step"):
        lcm_generator(ids[:1], latents=lcm_generator.prepare_latents(seeds=[1]))


def test_tcd_runs_and_differs_from_lcm(tiny_weights, lcm_generator):
    tcd = Arc2FaceGenerator.from_weights(
        tiny_weights, id_dim=TINY_ID_DIM, lora=tiny_weights.lora_file("tcd"), decoder="tiny"
    )
    ids = unit_rows(2, TINY_ID_DIM, seed=3)
    images = tcd(ids, seeds=[1, 2], settings=SamplerSettings("tcd", 4, 1.0)).images
    assert images.shape == (2, 64, 64, 3)
    assert not np.array_equal(images, lcm_generator(ids, seeds=[1, 2]).images)


def test_few_step_sampler_without_its_lora_is_refused(tiny_weights):
    plain = Arc2FaceGenerator.from_weights(tiny_weights, id_dim=TINY_ID_DIM)
    with pytest.raises(ValueError, match="needs its distilled LoRA"):
        plain(unit_rows(1, TINY_ID_DIM), seeds=[1], settings=LCM)


def test_tiny_decoder_decodes_instead_of_the_vae(tiny_weights, lcm_generator):
    assert lcm_generator.decoder_name == "tiny"
    assert lcm_generator.decoder is lcm_generator.tiny_decoder
    calls = []
    handle = lcm_generator.tiny_decoder.decoder.register_forward_hook(lambda *a: calls.append(1))
    vae_calls = []
    vae_handle = lcm_generator.vae.decoder.register_forward_hook(lambda *a: vae_calls.append(1))
    try:
        lcm_generator(unit_rows(2, TINY_ID_DIM), seeds=[1, 2])
    finally:
        handle.remove()
        vae_handle.remove()
    assert calls == [1] and vae_calls == []
    with pytest.raises(ValueError, match="unknown decoder"):
        Arc2FaceGenerator.from_weights(tiny_weights, id_dim=TINY_ID_DIM, decoder="taesd")


# -- fast4 end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast4_source(tmp_path_factory, sample_dataset):
    root = tmp_path_factory.mktemp("fast4") / "src"
    for name in ("0", "1", "2"):
        shutil.copytree(sample_dataset / name, root / name)
    return root


def fast4_argv(src, out, weights, *extra):
    from scale_helpers import convert_argv

    # the scale tests' small conversion (3 identities x 3 images, shards of 1, 3 formats),
    # under preset fast4 at its own 4 steps
    return convert_argv(src, out, weights, "--preset", "fast4", "--steps", "4", *extra)


@pytest.fixture(scope="module")
def fast4_out(fast4_source, tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("fast4-out") / "out"
    assert main(fast4_argv(fast4_source, out, tiny_weights.root)) == 0
    return out


def test_fast4_records_sampler_lora_and_decoder(fast4_out, tiny_weights):
    rows = pq.read_table(fast4_out / "manifest.parquet").to_pylist()
    assert len(rows) == 9
    lora_sha = sha256_file(tiny_weights.lora_file("lcm"))
    for row in rows:
        assert (row["sampler"], row["steps"], row["guidance"]) == ("lcm", 4, 1.0)
        assert row["lora_digest"] == lora_sha and row["decoder"] == "tiny"
    record = yaml.safe_load((fast4_out / "config.yaml").read_text())
    assert record["lora"] == {"name": "lcm", "component": "lcm", "sha256": lora_sha, "scale": 1.0}
    assert record["config"]["generation"]["decoder"] == "tiny"
    used = {f["path"] for f in record["weights"]["files"]}
    assert "lcm-lora/pytorch_lora_weights.safetensors" in used and "taesd/config.json" in used
    assert "tcd-lora/pytorch_lora_weights.safetensors" not in used  # not used by this run
    card = (fast4_out / "DATASET_CARD.md").read_text()
    assert "| sampler | lcm, 4 steps, guidance 1.0 |" in card
    assert f"`lcm` (sha256 {lora_sha[:16]}" in card and "| decoder | tiny |" in card
    assert "lcm-lora: `lcm-lora/pytorch_lora_weights.safetensors`" in card


def test_fast4_is_deterministic_across_batch_sizes_and_workers(
    fast4_out, fast4_source, tiny_weights, tmp_path
):
    from scale_helpers import assert_same_output, cli

    two = tmp_path / "two-workers"
    run = cli(fast4_argv(fast4_source, two, tiny_weights.root, "--devices", "cpux2"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_output(two, fast4_out)
    one = tmp_path / "batch-1"
    assert main(fast4_argv(fast4_source, one, tiny_weights.root, "--batch-size", "1")) == 0
    rows = pq.read_table(fast4_out / "manifest.parquet").to_pylist()
    again = pq.read_table(one / "manifest.parquet").to_pylist()
    assert [(r["key"], r["seed"]) for r in rows] == [(r["key"], r["seed"]) for r in again]
    from PIL import Image

    for row in rows:  # batched kernels round differently; the JPEGs stay within half a level
        a = np.asarray(Image.open(fast4_out / row["path"]), dtype=int)
        b = np.asarray(Image.open(one / row["path"]), dtype=int)
        assert np.abs(a - b).mean() < 0.5


@pytest.mark.parametrize(
    ("flag", "field"),
    [(("--decoder", "vae"), "generation.decoder"), (("--lora-scale", "0.5"), "lora_scale")],
)
def test_changing_decoder_or_lora_on_an_existing_out_is_refused(
    fast4_out, fast4_source, tiny_weights, flag, field, capsys
):
    assert main(fast4_argv(fast4_source, fast4_out, tiny_weights.root, *flag)) == 2
    assert field in capsys.readouterr().err


def test_a_different_lora_file_is_refused_by_its_digest(fast4_source, tiny_weights, tmp_path):
    from digi2real.api import resolve_config

    lora = tmp_path / "mine.safetensors"
    shutil.copyfile(tiny_weights.lora_file("lcm"), lora)
    config = resolve_config(preset="fast4", weights_dir=tiny_weights.root).override(
        {
            "weights": str(tiny_weights.root),
            "source.root": str(fast4_source),
            "generation.lora": str(lora),
            "interpolation.outputs_per_identity": 1,
        }
    )
    out = tmp_path / "out"
    convert(config, out, progress=False)
    record = yaml.safe_load((out / "config.yaml").read_text())
    assert record["lora"]["name"] == "mine.safetensors" and record["lora"]["component"] is None
    assert any(f["component"] == "lora (user file)" for f in record["weights"]["files"])
    # the same path, other bytes: the LoRA's digest refuses it
    raw = load_file(lora)
    save_file({k: v * 2 for k, v in raw.items()}, lora)
    with pytest.raises(ConfigMismatchError, match="lora_sha256"):
        convert(config, out, progress=False)
    # moving the file keeps the run resumable (the path is the host's, the digest decides)
    moved = tmp_path / "elsewhere.safetensors"
    save_file(raw, moved)
    convert(config.override({"generation.lora": str(moved)}), out, progress=False)


def test_preset_on_the_tiny_profile_is_said_in_the_log(fast4_source, tiny_weights, caplog):
    from digi2real.api import resolve_config

    config = resolve_config(preset="fast4", weights_dir=tiny_weights.root)
    assert (config.filter.threshold, config.filter.fallback) == (-1.0, "center_crop")
    assert not config.generation.compile
    assert "tiny profile (random weights)" in caplog.text
    real = resolve_config(preset="fast4", weights_dir=fast4_source)  # not a weights dir
    assert real.filter.threshold == 0.4 and real.generation.compile


def test_dry_run_uses_a_measured_rate_and_says_which(
    fast4_out, fast4_source, tiny_weights, tmp_path, capsys
):
    bench = {
        "format": 1,
        "kind": "digi2real-bench",
        "device": {"type": "cpu", "name": "test CPU"},
        "modes": [
            {
                "mode": "fast4",
                "settings": {
                    "sampler": "lcm",
                    "steps": 4,
                    "guidance": 1.0,
                    "decoder": "tiny",
                    "dtype": "float32",
                    "batch_size": 8,
                    "compile": False,
                },
                "method": "end-to-end",
                "images_per_s": 2.5,
            }
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    argv = fast4_argv(fast4_source, fast4_out, tiny_weights.root, "--dry-run", "--bench", str(path))
    assert main(argv) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line)
    # the OUT's own committed shards measured the attempts per target (every image accepted)
    assert lines["attempts_per_target"].strip() == "1.000"
    assert "measured on 9 targets" in lines["attempts_per_target_source"]
    # 3 identities x 3 targets x 1.0 attempts / 2.5 images/s
    assert float(lines["estimated_gpu_hours"]) == pytest.approx(9 / 2.5 / 3600, abs=5e-4)
    assert str(path) in lines["estimated_gpu_hours_source"]
    assert "measured at batch 8, this run uses 32" in lines["estimated_gpu_hours_source"]
    # another preset's settings: no rate for them in the file, and no number is made up
    default = [*fast4_argv(fast4_source, tmp_path / "new", tiny_weights.root, "--dry-run")]
    default[default.index("fast4")] = "fast20"
    assert main([*default, "--bench", str(path)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line)
    assert lines["estimated_gpu_hours"].strip() == "unknown"
    assert "digi2real bench --modes fast20" in lines["estimated_gpu_hours_source"]
    assert lines["attempts_per_target_source"].startswith("assumed")


def test_a_few_step_sampler_without_its_lora_is_a_usage_error(
    fast4_source, tiny_weights, tmp_path, capsys
):
    from scale_helpers import convert_argv

    argv = convert_argv(fast4_source, tmp_path / "out", tiny_weights.root, "--sampler", "lcm")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs its distilled LoRA" in err and "--with lcm" in err
    assert not (tmp_path / "out").exists()  # refused before any work
