from __future__ import annotations

import pytest

from digi2real.config import Config, flatten, output_differences


@pytest.mark.parametrize("name", ["default", "fast", "fast20", "fast15", "tiny"])
def test_presets_load(name):
    config = Config.preset_named(name)
    assert config.preset == name


def test_unknown_preset_and_field_name_valid_choices():
    with pytest.raises(ValueError, match="valid: default, fast, fast15, fast20, tiny"):
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
            "valid: imagefolder, webdataset, recordio",
        ),
        ({"generation.dtype": "float8"}, "unknown generation.dtype"),
        ({"filter.threshold": 2.0}, "cosine"),
        ({"generation.steps": 0}, "positive integer"),
        ({"shift.alpha": -1.0}, "alpha"),
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
