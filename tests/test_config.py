from __future__ import annotations

import pytest

from digi2real.config import Config, flatten, output_differences


@pytest.mark.parametrize("name", ["default", "fast", "fast20", "fast15", "fast4", "tiny"])
def test_presets_load(name):
    config = Config.preset_named(name)
    assert config.preset == name


def test_unknown_preset_and_field_name_valid_choices():
    with pytest.raises(ValueError, match="valid: default, fast, fast15, fast20, fast4, tiny"):
        Config.preset_named("nope")
    with pytest.raises(ValueError, match="unknown config field.*stepz"):
        Config.from_dict({"generation": {"stepz": 3}})
    with pytest.raises(ValueError, match="unknown config field"):
        Config().override({"generation.nope": 1})


def test_paper_preset_requires_stats_with_a_how_to():
    config = Config.preset_named("default").override({"source.root": "x"})
    with pytest.raises(ValueError, match="digi2real stats real"):
        config.validate()
    ok = config.override({"shift.method": "none", "shift.alpha": 0.0, "shift.required": False})
    ok.validate()


@pytest.mark.parametrize(
    "override, match",
    [
        ({"output.formats": ["webdataset"]}, "must include 'imagefolder'"),
        (
            {"output.formats": ["imagefolder", "tfrecord"]},
            "output.formats = 'tfrecord': must be one of: 'imagefolder', 'webdataset' or",
        ),
        ({"generation.dtype": "float8"}, "generation.dtype = 'float8': must be one of"),
        ({"filter.threshold": 2.0}, r"filter.threshold = 2.0: must be <= 1"),
        ({"generation.steps": 0}, "generation.steps = 0: must be >= 1"),
        ({"shift.alpha": -1.0}, "shift.alpha = -1.0: must be >= 0"),
    ],
)
def test_validation_names_the_value(override, match):
    with pytest.raises(ValueError, match=match):
        Config.preset_named("tiny").override(override).validate()


def test_free_and_output_changing_fields():
    base = flatten(Config.preset_named("tiny").to_dict())
    free = flatten(
        Config.preset_named("tiny")
        .override({"generation.batch_size": 1, "run.devices": "0,1"})
        .to_dict()
    )
    assert output_differences(base, free) == []
    changed = flatten(
        Config.preset_named("tiny").override({"generation.steps": 3, "run.seed": 9}).to_dict()
    )
    diffs = output_differences(base, changed)
    assert any(d.startswith("generation.steps") for d in diffs) and any(
        d.startswith("run.seed") for d in diffs
    )


def test_yaml_roundtrip(tmp_path):
    import yaml

    config = Config.preset_named("fast")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert Config.from_yaml(path) == config


# -- typed values: every way a value can be wrong names the field, the value and what is allowed


BAD_VALUES = [
    ("generation", "guidance", "3", "must be a number"),
    ("generation", "channels_last", "no", "must be true or false"),
    ("output", "formats", "imagefolder", "must be a list"),
    ("generation", "steps", -4, "must be >= 1"),
    ("generation", "steps", 2.5, "must be an integer"),
    ("generation", "batch_size", True, "must be an integer"),
    ("shift", "alpha", float("nan"), "must be a finite number"),
    ("filter", "threshold", float("inf"), "must be a finite number"),
    ("interpolation", "slerp_t", [0.9, 0.1], "lo <= hi"),
    ("interpolation", "mix", {"source": 0.0, "slerp": 0.0}, "positive share"),
    ("interpolation", "mix", {"nope": 1.0}, "must be one of"),
    ("report", "mean", [127.5, 127.5], "must have 3 items"),
    ("output", "jpeg_quality", 101, "must be <= 100"),
    ("run", "runner", "spark", "must be one of: 'local' or 'ray'"),
    ("source", "identities", 3, "must be text"),
]


@pytest.mark.parametrize("section, field, value, allowed", BAD_VALUES)
def test_bad_yaml_value_names_file_field_value_and_what_is_allowed(
    tmp_path, section, field, value, allowed
):
    import yaml

    from digi2real.config import ConfigError

    data = Config.preset_named("tiny").to_dict()
    data[section][field] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    message = str(info.value)
    assert str(path) in message and f"{section}.{field} = " in message and allowed in message


def test_python_overrides_are_checked_the_same_way():
    from digi2real.config import ConfigError

    with pytest.raises(ConfigError, match=r"generation.guidance = '3': must be a number"):
        Config().override({"generation.guidance": "3"})
    with pytest.raises(ConfigError, match=r"--steps: generation.steps = -1"):
        Config().override({"generation.steps": -1}, labels={"generation.steps": "--steps"})


def test_unknown_preset_is_a_config_error():
    from digi2real.config import ConfigError

    with pytest.raises(ConfigError, match="unknown preset 'paper'; valid: default"):
        Config.preset_named("paper")


def test_defaults_survive_the_round_trip_unchanged():
    for name in ("default", "fast", "tiny"):
        config = Config.preset_named(name)
        assert Config.from_dict(config.to_dict()) == config
        assert isinstance(config.generation.guidance, float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"generation.sampler": "lcm"}, "needs its distilled LoRA: set generation.lora = 'lcm'"),
        (
            {"generation.sampler": "lcm", "generation.lora": "lcm", "generation.steps": 9},
            "takes 1-8 steps",
        ),
        (
            {"generation.sampler": "tcd", "generation.lora": "tcd", "generation.guidance": 3.0},
            "takes guidance 1.0-2.0",
        ),
        (
            {"generation.sampler": "tcd", "generation.lora": "lcm", "generation.steps": 4},
            "distilled for sampler 'lcm'",
        ),
        ({"generation.lora": "lcm"}, "few-step distillation: use it with generation.sampler"),
    ],
)
def test_few_step_combinations_are_refused(override, message):
    config = Config.preset_named("tiny").override({"generation.guidance": 1.0, **override})
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_few_step_preset_and_a_user_lora_validate():
    fast4 = Config.preset_named("fast4").validate()
    gen = fast4.generation
    assert (gen.sampler, gen.steps, gen.guidance, gen.lora, gen.decoder) == (
        "lcm",
        4,
        1.0,
        "lcm",
        "tiny",
    )
    # any LoRA file with the paper's sampler (a style LoRA, say) is the user's choice
    Config.preset_named("tiny").override({"generation.lora": "style.safetensors"}).validate()


def test_fields_an_older_out_predates_are_no_difference_at_their_defaults():
    new = flatten(Config.preset_named("tiny").to_dict())
    old = {k: v for k, v in new.items() if k not in ("generation.decoder", "generation.lora_scale")}
    assert output_differences(old, new) == []
    changed = {**new, "generation.decoder": "tiny"}
    assert output_differences(old, changed) == ["generation.decoder: None -> 'tiny'"]
