"""Attribute control end to end on the tiny profile: labelled sources read, --where and
--balance choose the renders, labels carried into every output and writer, hostile options
refused before anything runs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from labelled_fixtures import make_facesynthetics, make_synthface
from PIL import Image

from digi2real.cli import main
from digi2real.data import attributes as attrs
from digi2real.data import layout
from digi2real.data.labelled import read_mask
from digi2real.data.layout import OutLayout
from digi2real.face import landmarks as geometry
from digi2real.runner.convert import convert
from digi2real.runner.plan import ConfigMismatchError

YAWS = [-60.0, -40.0, -5.0, 5.0, 40.0, 60.0]  # per identity: two renders in each yaw:3 bin
SIZE = 160


@pytest.fixture(scope="module")
def synthface(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("labelled") / "synth_face"
    truth = make_synthface(root, identities=2, frames=len(YAWS), size=SIZE, yaws=YAWS)
    return root, truth


def _run(tiny_config, source: Path, out: Path, **overrides) -> pq.ParquetFile:
    config = tiny_config(source, **{"generation.steps": 2, "filter.max_attempts": 1, **overrides})
    convert(config, out, progress=False)
    return pq.read_table(OutLayout(out).manifest).to_pylist()


def test_where_keeps_exactly_the_satisfying_renders(tiny_config, synthface, tmp_path):
    source, truth = synthface
    rows = _run(
        tiny_config,
        source,
        tmp_path / "out",
        **{
            "attributes.where": "abs(yaw) > 30",
            "interpolation.mix": {"source": 1.0},
            "interpolation.outputs_per_identity": 8,
        },
    )
    satisfying = {path for path, t in truth.items() if abs(t["yaw"]) > 30}
    assert len(satisfying) == 8
    used = {path for row in rows for path in row["source_paths"]}
    assert used == satisfying  # every satisfying render seeds an output, no other one does
    for row in rows:
        assert row["attributes_from"] in satisfying
        assert row["yaw"] == pytest.approx(truth[row["attributes_from"]]["yaw"], abs=1e-6)
        assert row["pitch"] == pytest.approx(truth[row["attributes_from"]]["pitch"], abs=1e-6)


def test_where_with_mixed_targets_never_mixes_in_an_excluded_render(
    tiny_config, synthface, tmp_path
):
    source, truth = synthface
    rows = _run(
        tiny_config,
        source,
        tmp_path / "out",
        **{"attributes.where": "yaw < 0", "interpolation.outputs_per_identity": 6},
    )
    assert {row["interp_kind"] for row in rows} >= {"slerp"}
    assert all(truth[p]["yaw"] < 0 for row in rows for p in row["source_paths"])


def test_balance_spreads_each_identity_over_the_bins(tiny_config, synthface, tmp_path):
    source, _ = synthface
    out = tmp_path / "out"
    rows = _run(
        tiny_config,
        source,
        out,
        **{"attributes.balance": "yaw:3", "interpolation.outputs_per_identity": 7},
    )
    record = yaml.safe_load(OutLayout(out).config.read_text())["attributes"]
    edges = tuple(record["edges"])
    assert edges == pytest.approx((-60.0, -20.0, 20.0, 60.0))
    for identity in {row["identity"] for row in rows}:
        yaws = [row["yaw"] for row in rows if row["identity"] == identity]
        counts = np.bincount(attrs.bin_index(np.array(yaws), edges), minlength=3)
        assert len(yaws) == 7 and counts.max() - counts.min() <= 1, counts
    # balance is an output-changing field: another spec on this OUT is refused
    with pytest.raises(ConfigMismatchError, match="attributes.balance"):
        _run(tiny_config, source, out, **{"attributes.balance": "yaw:2"})


@pytest.fixture(scope="module")
def carried(tiny_config, synthface, tmp_path_factory) -> Path:
    source, _ = synthface
    out = tmp_path_factory.mktemp("carried") / "out"
    _run(
        tiny_config,
        source,
        out,
        **{
            "generation.init_strength": 0.5,
            "interpolation.outputs_per_identity": 3,
            "output.formats": ["imagefolder", "webdataset", "recordio"],
        },
    )
    return out


def test_carried_landmarks_and_masks_are_the_recorded_warp_of_the_render(carried, synthface):
    source, truth = synthface
    rows = pq.read_table(OutLayout(carried).manifest).to_pylist()
    assert rows
    for row in rows:
        render = row["attributes_from"]
        assert render == row["init_path"]
        matrix = np.asarray(row["label_matrix"]).reshape(2, 3)
        expected = geometry.apply(matrix, truth[render]["landmarks"])
        np.testing.assert_allclose(np.asarray(row["landmarks"]), expected, atol=1e-4)
        seg = render.replace("img_", "segm_parts_").replace(".jpg", ".png")
        with Image.open(carried / row["path"]) as image:
            size = image.size
        mask = np.asarray(Image.open(carried / layout.sidecar_of(row["path"], "_seg.png")))
        want = geometry.warp_mask(read_mask(source, seg), matrix, size)
        np.testing.assert_array_equal(mask, want)
        assert mask.shape == size[::-1] and set(np.unique(mask)) <= {*range(13), 255}
        assert (mask != geometry.IGNORE).any() and (mask > 0).any()  # the face is there
        sidecar = json.loads((carried / layout.sidecar_of(row["path"], ".json")).read_text())
        assert sidecar["yaw"] == row["yaw"] and sidecar["landmarks"] == row["landmarks"]


def test_attributes_reach_webdataset_and_recordio_keeps_its_label(carried):
    rows = {row["key"]: row for row in pq.read_table(OutLayout(carried).manifest).to_pylist()}
    members: dict[str, bytes] = {}
    for tar_path in sorted((carried / layout.WEBDATASET).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                members[member.name] = tar.extractfile(member).read()
    for key, row in rows.items():
        meta = json.loads(members[f"{key}.json"])
        assert meta["yaw"] == row["yaw"] and meta["landmarks"] == row["landmarks"]
        assert meta["attributes_from"] == row["attributes_from"]
        mask = members[f"{key}.seg.png"]
        assert mask == (carried / layout.sidecar_of(row["path"], "_seg.png")).read_bytes()
        Image.open(io.BytesIO(mask)).verify()
    assert (carried / layout.RECORDIO / layout.RECORDIO_DATA).stat().st_size > 0


def test_datasets_load_dataset_gives_typed_attribute_features(carried, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    dataset = datasets.load_dataset(str(carried), split="train")
    manifest = pq.read_table(OutLayout(carried).manifest)
    assert dataset.num_rows == manifest.num_rows
    features = dataset.features
    assert features["yaw"] == datasets.Value("float64")
    assert features["identity"] == datasets.Value("string")
    assert "landmarks" in features and "image" in features
    by_path = {row["path"]: row for row in manifest.to_pylist()}
    plain = dataset.cast_column("image", datasets.Image(decode=False))
    for row in plain:
        image_path = Path(row["image"]["path"])
        key = image_path.relative_to(image_path.parents[2]).as_posix()
        assert row["yaw"] == by_path[key]["yaw"] and row["label"] == by_path[key]["label"]


def test_no_geometry_from_noise(tiny_config, synthface, tmp_path):
    source, _ = synthface
    rows = _run(tiny_config, source, tmp_path / "out")
    assert "yaw" in rows[0] and "landmarks" not in rows[0] and "label_matrix" not in rows[0]
    assert not any((tmp_path / "out" / layout.ANNOTATIONS).rglob("*_seg.png"))


def test_a_bad_label_file_is_an_error_row_and_the_rest_converts(tiny_config, tmp_path):
    source = tmp_path / "synth_face"
    make_synthface(source, identities=2, frames=2, size=SIZE)
    (source / "metadata_0000000_000.json").unlink()
    (source / "metadata_0000001_001.json").write_text('{"head_pose": [[1, 0], [0, 1]]}')
    out = tmp_path / "out"
    rows = _run(tiny_config, source, out)
    errors = pq.read_table(OutLayout(out).errors).to_pylist()
    by_path = {row["path"]: row for row in errors}
    assert by_path["img_0000000_000.jpg"]["stage"] == "labels"
    assert "metadata_0000000_000.json" in by_path["img_0000000_000.jpg"]["reason"]
    assert by_path["img_0000001_001.jpg"]["stage"] == "labels"
    used = {p for row in rows for p in row["source_paths"]}
    assert used == {"img_0000000_001.jpg", "img_0000001_000.jpg"}


def test_facesynthetics_frames_are_identities_with_carried_landmarks(tiny_config, tmp_path):
    source = tmp_path / "dataset_100"
    truth = make_facesynthetics(source, count=3, size=SIZE)
    out = tmp_path / "out"
    rows = _run(
        tiny_config,
        source,
        out,
        **{"generation.init_strength": 0.4, "interpolation.outputs_per_identity": 2},
    )
    assert sorted({row["identity"] for row in rows}) == sorted(truth)
    for row in rows:
        matrix = np.asarray(row["label_matrix"]).reshape(2, 3)
        stem = row["identity"]
        np.testing.assert_allclose(
            np.asarray(row["landmarks"]), geometry.apply(matrix, truth[stem]), atol=1e-4
        )
        assert (out / layout.sidecar_of(row["path"], "_seg.png")).is_file()


def test_attribute_table_on_identity_folders(tiny_config, sample_dataset, tmp_path):
    files = sorted(p.relative_to(sample_dataset).as_posix() for p in sample_dataset.rglob("*.png"))
    table = tmp_path / "attributes.csv"
    lines = ["path,age,glasses"]
    lines += [f"{f},{20 + i},{'true' if i % 2 else 'false'}" for i, f in enumerate(files)]
    lines.append("nobody/0.png,50,true")
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rows = _run(
        tiny_config,
        None,
        out,
        **{"source.attributes": str(table), "attributes.where": "glasses and age >= 22"},
    )
    ages = {f: 20 + i for i, f in enumerate(files)}
    assert rows and all(row["glasses"] and row["age"] >= 22 for row in rows)
    assert all(ages[p] >= 22 and ages[p] % 2 for row in rows for p in row["source_paths"])
    record = yaml.safe_load(OutLayout(out).config.read_text())["attributes"]
    assert record["table"]["rows_without_image"] == 1
    assert record["table"]["images_without_row"] == 0


def test_estimates_are_cached_and_balance_needs_edges_for_them(
    tiny_config, sample_dataset, tmp_path
):
    out = tmp_path / "out"
    rows = _run(
        tiny_config,
        None,
        out,
        **{
            "attributes.balance": "brightness_est:0,60,120,255",
            "interpolation.outputs_per_identity": 3,
        },
    )
    assert rows and all(0 <= row["brightness_est"] <= 255 for row in rows)
    assert all(row["sharpness_est"] >= 0 for row in rows)
    assert all(row["yaw_est"] is None for row in rows)  # the tiny detector finds no face
    assert all(row["age_est"] is None for row in rows)  # the tiny profile has genderage
    caches = list((OutLayout(out).state / layout.CACHE).glob("*-estimates.parquet"))
    assert caches
    with pytest.raises(attrs.AttributeSpecError, match="give the bin edges"):
        _run(tiny_config, None, tmp_path / "other", **{"attributes.balance": "yaw_est:3"})


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('touch pwned')",
        "open('/etc/passwd').read() == 'x'",
        "yaw.__class__ == 1",
        "[x for x in ()] == 1",
        "lambda: 1",
        "1 if yaw else 2",
    ],
)
def test_a_hostile_where_exits_2_and_nothing_runs(
    tiny_weights, synthface, tmp_path, capsys, monkeypatch, expression
):
    monkeypatch.chdir(tmp_path)
    source, _ = synthface
    out = tmp_path / "out"
    argv = ["convert", str(source), str(out), "--weights", str(tiny_weights.root), "-q"]
    assert main([*argv, "--where", expression]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "pwned").exists()


def test_an_unknown_attribute_exits_2_before_planning(tiny_weights, synthface, tmp_path, capsys):
    source, _ = synthface
    out = tmp_path / "out"
    argv = ["convert", str(source), str(out), "--weights", str(tiny_weights.root), "-q"]
    assert main([*argv, "--where", "yawn > 3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'yaw'" in err and not (OutLayout(out).run_json).exists()


# -- Python -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def d2r(tiny_weights):
    from digi2real import Digi2Real

    return Digi2Real.from_pretrained(tiny_weights.root, overrides={"generation.steps": 2})


def test_augment_where_and_balance_on_given_attributes(d2r, synthface):
    source, truth = synthface
    images = sorted(p for p in source.glob("img_0000000_*.jpg"))
    given = {str(p): {"yaw": truth[p.name]["yaw"]} for p in images}
    result = d2r.augment(
        images, num_images=6, where="yaw > -50", balance="yaw:-50,-20,20,60", attributes=given
    )
    assert len(result.images) == 6
    for item in result.images:
        meta = item.metadata
        assert meta["yaw"] > -50 and meta["attributes_from"] in given
        assert given[meta["attributes_from"]]["yaw"] == meta["yaw"]
        assert "brightness_est" in meta and "yaw_est" in meta
        assert all(given[p]["yaw"] > -50 for p in meta["source_paths"])
    bins = attrs.bin_index(np.array([i.metadata["yaw"] for i in result.images]), (-50, -20, 20, 60))
    assert np.bincount(bins, minlength=3).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="no image satisfies"):
        d2r.augment(images, num_images=2, where="yaw > 100", attributes=given)
    with pytest.raises(ValueError, match="pass images"):
        d2r.augment(np.eye(2, 64, dtype=np.float32), num_images=2, where="yaw_est > 0")


def test_convert_from_python_with_where(d2r, synthface, tmp_path):
    source, truth = synthface
    out = tmp_path / "out"
    d2r.convert(source, out, where="yaw > 0", progress=False)
    rows = pq.read_table(OutLayout(out).manifest).to_pylist()
    assert rows and all(truth[p]["yaw"] > 0 for row in rows for p in row["source_paths"])


def test_an_identity_with_no_satisfying_render_is_a_select_row(tiny_config, tmp_path):
    source = tmp_path / "synth_face"
    make_synthface(source, identities=2, frames=2, size=SIZE, yaws=[-50, -40, 10, 20])
    out = tmp_path / "out"
    rows = _run(tiny_config, source, out, **{"attributes.where": "yaw > 0"})
    assert {row["identity"] for row in rows} == {"0000001"}
    (error,) = pq.read_table(OutLayout(out).errors).to_pylist()
    assert error["identity"] == "0000000" and error["stage"] == "select"


def test_generation_frame_writes_the_model_resolution_with_labels_in_it(
    tiny_config, synthface, tmp_path
):
    source, truth = synthface
    out = tmp_path / "out"
    rows = _run(
        tiny_config,
        source,
        out,
        **{
            "generation.init_strength": 0.5,
            "output.frame": "generation",
            "interpolation.outputs_per_identity": 2,
        },
    )
    for row in rows:
        with Image.open(out / row["path"]) as image:
            assert image.size[0] == image.size[1] != 112
            size = image.size[0]
        # the render -> generation frame map alone: the tiny fallback centre-crops and resizes
        scale = size / SIZE
        matrix = np.asarray(row["label_matrix"]).reshape(2, 3)
        np.testing.assert_allclose(
            matrix, [[scale, 0, scale / 2 - 0.5], [0, scale, scale / 2 - 0.5]]
        )
        np.testing.assert_allclose(
            row["landmarks"],
            geometry.apply(matrix, truth[row["attributes_from"]]["landmarks"]),
            atol=1e-4,
        )


def test_embed_and_stats_read_a_labelled_layouts_renders_only(tiny_config, synthface):
    from digi2real.face.images import embed_dataset, source_images
    from digi2real.face.stack import FaceStack

    source, truth = synthface
    assert sorted(p.name for p in source_images(source)) == sorted(truth)  # no mask, no JSON
    embeddings, errors = embed_dataset(FaceStack.from_config(tiny_config(source)), source)
    assert errors == 0 and sorted(set(embeddings.identities)) == ["0000000", "0000001"]
    assert sorted(embeddings.paths) == sorted(truth)


def test_a_resume_reuses_the_cached_estimates(tiny_config, tmp_path, monkeypatch):
    import digi2real.face.estimates as estimates

    out = tmp_path / "out"
    options = {"attributes.estimate": True, "interpolation.outputs_per_identity": 2}
    first = _run(tiny_config, None, out, **options)
    paths = OutLayout(out)
    for shard in sorted(paths.committed()):
        (paths.shard(shard) / layout.MANIFEST).unlink()  # as if killed before committing

    def no_second_estimate(*args, **kwargs):
        raise AssertionError("estimates must come from the shard's cache")

    monkeypatch.setattr(estimates, "estimate_attributes", no_second_estimate)
    assert _run(tiny_config, None, out, **options) == first


def test_annotations_and_images_metadata_are_owned():
    identities = {"0000001"}
    assert layout.is_owned_name("annotations/0000001/0003.json", identities)
    assert layout.is_owned_name("annotations/0000001/0003_seg.png", identities)
    assert layout.is_owned_name("images/metadata.parquet", identities)
    assert not layout.is_owned_name("annotations/0000001/notes.json", identities)
    assert not layout.is_owned_name("annotations/other/0003.json", identities)
    assert not layout.is_owned_name("images/0000001/0003_seg.png", identities)
    assert layout.image_of("0000001/0003_seg.png") == "0000001/0003.jpg"
    assert layout.sidecar_of("images/a b/0003.jpg", ".json") == "annotations/a b/0003.json"
