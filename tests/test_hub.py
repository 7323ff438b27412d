"""A converted OUT is a Hugging Face dataset as it is: `datasets.load_dataset` reads every
image with its identity label, and README.md is a Hub dataset card with YAML metadata."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from digi2real.data.layout import OutLayout

# names whose sorted order differs between case-sensitive, case-folded and byte order
NAMES = ["Zoë", "alice", "Bob", "émile"]


@pytest.fixture(scope="module")
def converted(tiny_config, sample_dataset, tmp_path_factory) -> Path:
    from digi2real.runner.convert import convert

    root = tmp_path_factory.mktemp("hub")
    source = root / "src"
    originals = sorted(p for p in sample_dataset.iterdir() if p.is_dir())
    for name, folder in zip(NAMES, originals, strict=False):
        shutil.copytree(folder, source / name)
    out = root / "out"
    convert(
        tiny_config(
            source,
            **{
                "generation.steps": 2,
                "interpolation.outputs_per_identity": 2,
                "source.license": "DigiFace-1M Research Use of Data Agreement (non-commercial)",
            },
        ),
        out,
        progress=False,
    )
    return out


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def _rows_by_path(dataset) -> dict[str, str]:
    import datasets

    plain = dataset.cast_column("image", datasets.Image(decode=False))
    names = dataset.features["label"].names
    return {
        Path(row["image"]["path"]).relative_to(Path(row["image"]["path"]).parents[2]).as_posix(): (
            names[row["label"]],
            row["label"],
        )
        for row in plain
    }


@pytest.mark.parametrize("how", ["imagefolder", "folder"])
def test_load_dataset_returns_every_manifest_row_with_its_label(converted, how):
    datasets = pytest.importorskip("datasets")

    paths = OutLayout(converted)
    if how == "imagefolder":
        dataset = datasets.load_dataset("imagefolder", data_dir=str(paths.images), split="train")
    else:  # the folder itself, through README.md's data_files
        dataset = datasets.load_dataset(str(converted), split="train")
    manifest = pq.read_table(paths.manifest).to_pylist()
    loaded = _rows_by_path(dataset)
    assert len(loaded) == len(manifest) == dataset.num_rows > 0
    for row in manifest:
        name, label = loaded[row["path"]]
        assert name == row["identity"] and label == row["label"], row["path"]
    assert sorted({row["identity"] for row in manifest}) == dataset.features["label"].names


def test_readme_is_a_hub_dataset_card(converted):
    paths = OutLayout(converted)
    text = paths.hub_card.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["license"] == "other" and "non-commercial" in metadata["license_name"]
    assert metadata["task_categories"] == ["image-classification"]
    assert metadata["size_categories"] == ["n<1K"]
    assert metadata["configs"][0]["data_files"][0]["path"] == "images/**/*.jpg"
    body = text.split("---\n", 2)[2]
    assert "NON-COMMERCIAL USE ONLY" in body and 'load_dataset("imagefolder"' in body
    # the card beside it is the same text without the Hub's parts
    assert paths.card.read_text(encoding="utf-8").strip() in body
