"""Attribute plumbing without models: tables, balance specs and bins, balanced plans, and the
landmark geometry that carries labels."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from digi2real.config import Config, ConfigError, InterpolationConfig
from digi2real.data import attributes as attrs
from digi2real.face import landmarks as geometry
from digi2real.pipeline.interpolate import init_source, plan_identity

# -- the --attributes table ------------------------------------------------------------------


def _landmarks(seed: int = 0, count: int = 70) -> np.ndarray:
    return np.random.default_rng(seed).uniform(10, 100, size=(count, 2))


def test_table_csv_reads_types_landmarks_and_counts(tmp_path: Path) -> None:
    table = tmp_path / "attrs.csv"
    points = _landmarks()
    table.write_text(
        "path,yaw,glasses,hair,landmarks\n"
        f'a/1.png,35.5,true,short,"{json.dumps(points.tolist())}"\n'
        "./a/2.png,-10,false,,\n"
        "b/9.png,,true,long,\n",
        encoding="utf-8",
    )
    read = attrs.read_attribute_table(table)
    assert read.columns == {"yaw": pa.float64(), "glasses": pa.bool_(), "hair": pa.string()}
    assert read.rows["a/1.png"] == {"yaw": 35.5, "glasses": True, "hair": "short"}
    assert read.rows["a/2.png"] == {"yaw": -10.0, "glasses": False}
    np.testing.assert_allclose(read.landmarks["a/1.png"], points)
    matched = attrs.match_table(read, ["a/1.png", "a/2.png", "a/3.png"])
    assert matched.counts == {
        "rows": 3,
        "matched": 2,
        "rows_without_image": 1,
        "images_without_row": 1,
    }
    assert set(matched.rows) == {"a/1.png", "a/2.png"}


def test_table_parquet_and_jsonl(tmp_path: Path) -> None:
    pq.write_table(pa.table({"path": ["x.png"], "age": [31]}), tmp_path / "t.parquet")
    assert attrs.read_attribute_table(tmp_path / "t.parquet").rows == {"x.png": {"age": 31}}
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"path": "x.png", "age": 31.5, "landmarks": _landmarks(1, 68).tolist()}) + "\n",
        encoding="utf-8",
    )
    read = attrs.read_attribute_table(tmp_path / "t.jsonl")
    assert read.rows == {"x.png": {"age": 31.5}}
    assert read.landmarks["x.png"].shape == (68, 2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,yaw\na.png,1\n", "no 'path' column"),
        ("path,identity\na.png,x\n", "'identity' is a name digi2real's outputs already use"),
        ("path,yaw_est\na.png,1\n", "'yaw_est' ends in '_est'"),
        ("path,yaw\na.png,1\na.png,2\n", "appear twice"),
        ('path,landmarks\na.png,"[[1, 2]]"\n', "landmarks must be 68 or 70"),
        ('path,landmarks\na.png,"not json"\n', "not a JSON list"),
        ("path,bad name\na.png,1\n", "not a plain name"),
    ],
)
def test_table_errors_name_the_column(tmp_path: Path, text: str, message: str) -> None:
    table = tmp_path / "t.csv"
    table.write_text(text, encoding="utf-8")
    with pytest.raises(attrs.AttributeSpecError, match=message) as error:
        attrs.read_attribute_table(table)
    assert "\n" not in str(error.value)


def test_table_list_column_is_a_type_error_naming_it(tmp_path: Path) -> None:
    pq.write_table(pa.table({"path": ["a.png"], "tags": [[1, 2]]}), tmp_path / "t.parquet")
    with pytest.raises(attrs.AttributeSpecError, match="column 'tags' holds"):
        attrs.read_attribute_table(tmp_path / "t.parquet")


def test_table_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "t.xlsx").write_bytes(b"x")
    with pytest.raises(attrs.AttributeSpecError, match="unknown format"):
        attrs.read_attribute_table(tmp_path / "t.xlsx")


def test_source_attributes_round_trip_through_parquet() -> None:
    source = attrs.SourceAttributes(
        {"yaw": pa.float64(), "hair": pa.string()},
        {"a.png": {"yaw": 3.0, "hair": "x"}, "b.png": {"yaw": -1.0}},
        {"a.png": _landmarks()},
        {"a.png": "a_seg.png"},
        "table",
        {"matched": 2},
    )
    back = attrs.SourceAttributes.from_table(source.to_table())
    assert back.columns == source.columns and back.rows == source.rows
    assert back.segmentation == source.segmentation and back.origin == "table"
    assert back.counts == {"matched": 2}
    np.testing.assert_array_equal(back.landmarks["a.png"], source.landmarks["a.png"])


# -- --balance -------------------------------------------------------------------------------


def test_balance_parse() -> None:
    assert attrs.Balance.parse("yaw") == attrs.Balance("yaw", bins=3)
    assert attrs.Balance.parse("yaw:5") == attrs.Balance("yaw", bins=5)
    assert attrs.Balance.parse("yaw_est:-90,-30,30,90").edges == (-90.0, -30.0, 30.0, 90.0)
    for bad in ("yaw:1", "yaw:x", "1yaw:3", "yaw:3,2,1", "yaw:0,nan,1", "yaw:1000", "__x__.y:3"):
        with pytest.raises(attrs.AttributeSpecError):
            attrs.Balance.parse(bad)


def test_bins_equal_width_last_closed_outside_is_none() -> None:
    edges = attrs.Balance("yaw", bins=3).resolve(np.array([-60.0, 0.0, 30.0, np.nan]))
    assert edges == pytest.approx((-60.0, -30.0, 0.0, 30.0))
    index = attrs.bin_index(np.array([-60.0, -30.0, -0.1, 0.0, 30.0, 31.0, np.nan]), edges)
    assert index.tolist() == [0, 1, 1, 2, 2, -1, -1]
    assert attrs.bin_labels(edges) == ["[-60, -30)", "[-30, 0)", "[0, 30]"]
    with pytest.raises(attrs.AttributeSpecError, match="same value"):
        attrs.Balance("yaw", bins=3).resolve(np.array([1.0, 1.0]))


def _unit(k: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(k, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("outputs", [5, 9, 20])
def test_balanced_plan_spreads_dominant_renders_over_bins(outputs: int) -> None:
    embeddings = _unit(7)
    bins = np.array([0, 0, 0, 0, 1, 2, -1])  # bin 0 crowded, one render in no bin
    config = InterpolationConfig(outputs_per_identity=outputs)
    targets = plan_identity("id", embeddings, config, 3, bins)
    dominant = [t.sources[init_source(t)] for t in targets]
    counts = np.bincount(bins[dominant], minlength=3)
    assert counts.max() - counts.min() <= 1
    assert 6 not in dominant  # a render in no bin never dominates
    for target in targets:  # embeddings recomputed from the rewritten sources
        assert len(set(target.sources)) == len(target.sources)
        if target.kind == "source":
            np.testing.assert_array_equal(target.embedding, embeddings[target.sources[0]])
        assert np.linalg.norm(target.embedding) == pytest.approx(1.0, abs=1e-5)
    # deterministic, and the same plan as without bins when nothing is balanced
    assert [t.sources for t in plan_identity("id", embeddings, config, 3, bins)] == [
        t.sources for t in targets
    ]
    plain = plan_identity("id", embeddings, config, 3)
    unbalanced = plan_identity("id", embeddings, config, 3, np.full(7, -1))
    assert [t.sources for t in plain] == [t.sources for t in unbalanced]


# -- config ----------------------------------------------------------------------------------


def test_geometry_carry_at_strength_zero_is_refused_with_why() -> None:
    config = Config().override({"attributes.geometry": "carry"})
    with pytest.raises(ConfigError, match="keeps no geometry"):
        config.validate()
    assert (
        Config()
        .override({"attributes.geometry": "carry", "generation.init_strength": 0.5})
        ._attribute_problems()
        == []
    )


def test_control_estimates_when_named_and_fields() -> None:
    config = Config().override({"attributes.where": "abs(yaw_est) < 30"})
    control = attrs.resolve_control(config, attrs.SourceAttributes())
    assert control.active and control.estimates and not control.geometry
    names = [f.name for f in control.fields()]
    assert names[:6] == list(attrs.ESTIMATES)
    assert attrs.LANDMARKS not in names
    assert attrs.resolve_control(Config(), attrs.SourceAttributes()).fields() == []
    with pytest.raises(Exception, match="estimate is 'yaw_est'"):
        attrs.resolve_control(
            Config().override({"attributes.where": "yaw > 3"}), attrs.SourceAttributes()
        )


# -- geometry --------------------------------------------------------------------------------


def test_resize_matrix_is_cv2_resize_convention() -> None:
    image = np.zeros((112, 112), np.uint8)
    image[40, 70] = 255
    big = cv2.resize(image, (448, 448), interpolation=cv2.INTER_CUBIC)
    peak = np.unravel_index(np.argmax(big), big.shape)
    mapped = geometry.apply(geometry.resize_matrix((112, 112), (448, 448)), [[70, 40]])[0]
    # the bright pixel's centre maps to the centre of its 4x4 block
    assert mapped == pytest.approx([281.5, 161.5])
    assert abs(peak[1] - mapped[0]) <= 0.5 and abs(peak[0] - mapped[1]) <= 0.5


def test_compose_apply_and_mask_warp() -> None:
    a = np.array([[2.0, 0.0, 1.0], [0.0, 2.0, -3.0]])
    b = np.array([[0.0, -1.0, 10.0], [1.0, 0.0, 0.0]])
    points = _landmarks()
    np.testing.assert_allclose(
        geometry.apply(geometry.compose(a, b), points),
        geometry.apply(b, geometry.apply(a, points)),
    )
    mask = np.zeros((20, 20), np.uint8)
    mask[5:10, 5:10] = 3
    shifted = geometry.warp_mask(mask, geometry.crop_matrix(2, 1), (20, 20))
    assert (shifted[4:9, 3:8] == 3).all() and (shifted[:, 18:] == geometry.IGNORE).all()
    assert set(np.unique(shifted)) <= {0, 3, 255}


def test_five_points_and_nme() -> None:
    points = _landmarks()
    five = geometry.five_points(points)
    np.testing.assert_array_equal(five[0], points[69])  # image-left eye: subject's right pupil
    np.testing.assert_array_equal(five[2], points[30])
    assert geometry.nme(five, points) == 0.0
    interpupil = np.linalg.norm(points[68] - points[69])
    assert geometry.nme(five + [interpupil * 0.1, 0.0], points) == pytest.approx(10.0)
    sixty_eight = geometry.five_points(points[:68])
    np.testing.assert_allclose(sixty_eight[1], points[42:48].mean(axis=0))


def test_model_estimates_need_their_model() -> None:
    config = Config().override({"attributes.where": "age_est > 30"})
    with pytest.raises(attrs.AttributeSpecError, match="--with genderage"):
        attrs.resolve_control(config, attrs.SourceAttributes(), models=("landmarks3d",))
    control = attrs.resolve_control(config, attrs.SourceAttributes(), models=("genderage",))
    assert control.estimate_names == [*attrs.ESTIMATES, "age_est", "gender_est"]
    assert attrs.estimates_wanted(config)
    assert not attrs.estimates_wanted(Config().override({"attributes.where": "yaw > 1"}))
    plain = attrs.resolve_control(
        Config().override({"attributes.estimate": True}), attrs.SourceAttributes(), models=()
    )
    assert plain.estimate_names == list(attrs.ESTIMATES)
