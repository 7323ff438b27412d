from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from digi2real.analysis.card import write_dataset_card
from digi2real.analysis.report import build_report, source_report
from digi2real.data.embeddings import EmbeddingSet, load_embeddings, save_embeddings
from digi2real.data.layout import CARD as CARD_NAME

DIM = 64
IMAGES_PER_IDENTITY = 4
NAMES = [f"id_{n:02d}" for n in range(8)]
GALLERY_NAMES = [f"real_{n}" for n in range(5)]
COLLIDING = ("id_02", "id_05")  # id_05 is built around id_02's centre
LEAKING = ("id_06", "real_3")  # id_06 is built around a gallery identity's centre
DUPLICATE_IDENTITY = "id_01"  # its images 0 and 1 are nearly the same
SOURCE_GONE = "id_07"


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class SyntheticOut:
    out: Path
    source: Path
    gallery: Path
    outputs: np.ndarray
    targets: np.ndarray
    identities: list[str]  # per row


def make_synthetic_out(root: Path, *, seed: int = 0) -> SyntheticOut:
    """A converted-dataset folder with planted collision, leak and near duplicate."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((DIM, len(NAMES) + len(GALLERY_NAMES))))
    centres = {name: basis[:, n] for n, name in enumerate(NAMES + GALLERY_NAMES)}
    centres[COLLIDING[1]] = _unit(centres[COLLIDING[0]] + 0.05 * rng.standard_normal(DIM) / 8)
    centres[LEAKING[0]] = centres[LEAKING[1]]

    def images_around(centre: np.ndarray, count: int) -> np.ndarray:
        noise = _unit(rng.standard_normal((count, DIM))) * 0.6
        return _unit(centre[None, :] + noise)

    out, source = root / "OUT", root / "source"
    outputs, targets, rows = [], [], []
    for label, name in enumerate(NAMES):
        images = images_around(centres[name], IMAGES_PER_IDENTITY)
        if name == DUPLICATE_IDENTITY:
            images[1] = _unit(images[0] + 0.01 * rng.standard_normal(DIM) / 8)
        wanted = _unit(images + _unit(rng.standard_normal(images.shape)) * 0.3)
        outputs.append(images)
        targets.append(wanted)
        (source / name).mkdir(parents=True)
        for n in range(3):
            colour = (40 * label % 255, 80 * n, 200)
            Image.new("RGB", (112, 112), colour).save(source / name / f"{n}.png")
        (out / "images" / name).mkdir(parents=True)
        for k in range(IMAGES_PER_IDENTITY):
            relative = f"images/{name}/{k:04d}.jpg"
            Image.new("RGB", (64, 64), (200, 30 * k, 20 * label)).save(out / relative)
            rows.append(
                {
                    "key": f"{label:07d}_{k:04d}",
                    "identity": name,
                    "label": label,
                    "path": relative,
                    "index": k,
                    "attempt": 0,
                    "seed": 1000 * label + k,
                    "interp_kind": "slerp",
                    "source_paths": [f"{name}/{k % 3}.png", f"{name}/{(k + 1) % 3}.png"],
                    "interp_weights": [0.5, 0.5],
                    "sampler": "dpmpp",
                    "steps": 25,
                    "guidance": 3.0,
                    "dtype": "float32",
                    "shift_method": "mean",
                    "shift_alpha": 0.0,
                    "similarity": float(images[k] @ wanted[k]),
                    "shard": 0,
                    "weights_digest": "0" * 16,
                    "version": "0.1.0",
                }
            )
    shutil.rmtree(source / SOURCE_GONE)
    outputs_array, targets_array = np.concatenate(outputs), np.concatenate(targets)
    pq.write_table(pa.Table.from_pylist(rows), out / "manifest.parquet")
    (out / ".digi2real").mkdir()
    np.save(out / ".digi2real" / "outputs.npy", outputs_array)
    np.save(out / ".digi2real" / "targets.npy", targets_array)
    (out / "labels.csv").write_text(
        "label,identity\n" + "".join(f"{n},{name}\n" for n, name in enumerate(NAMES))
    )
    config = {
        "source": {"root": str(source), "license": None},
        "weights": {"dir": str(root / "weights"), "digest": "0" * 16},
        "seed": 0,
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    pq.write_table(
        pa.table({"identity": ["id_03", COLLIDING[1]], "reason": ["below threshold"] * 2}),
        out / "rejected.parquet",
    )
    pq.write_table(
        pa.table({"path": ["x/1.png"], "identity": ["x"], "stage": ["read"], "reason": ["bad"]}),
        out / "errors.parquet",
    )
    gallery_rows, gallery_ids = [], []
    for name in GALLERY_NAMES:
        gallery_rows.append(images_around(centres[name], 3))
        gallery_ids += [name] * 3
    gallery = save_embeddings(
        root / "gallery.npy", np.concatenate(gallery_rows), identities=gallery_ids
    )
    identities = [row["identity"] for row in rows]
    return SyntheticOut(out, source, gallery, outputs_array, targets_array, identities)


@pytest.fixture()
def synthetic(tmp_path: Path) -> SyntheticOut:
    return make_synthetic_out(tmp_path)


def test_report_lists_exactly_the_planted_problems(synthetic: SyntheticOut) -> None:
    report = build_report(synthetic.out, gallery=synthetic.gallery, identities_per_sheet=3)

    collisions = report["separation"]["collisions"]
    assert [(c["a"], c["b"]) for c in collisions] == [COLLIDING]
    assert [(c["label_a"], c["label_b"]) for c in collisions] == [(2, 5)]
    assert collisions[0]["score"] > 0.9

    leaks = report["leakage"]["leaks"]
    assert [(leak["identity"], leak["gallery_identity"]) for leak in leaks] == [LEAKING]
    assert set(leaks[0]["matched"]) == {"centroid", "image"}
    assert leaks[0]["image"].startswith("0000006_")

    duplicates = report["diversity"]["near_duplicates"]
    assert [(d["identity"], d["a"], d["b"]) for d in duplicates] == [
        (DUPLICATE_IDENTITY, "0000001_0000", "0000001_0001")
    ]


def test_report_figures_match_brute_force(synthetic: SyntheticOut) -> None:
    report = build_report(synthetic.out)
    names = np.asarray(synthetic.identities)
    centroids = {name: synthetic.outputs[names == name].sum(0) for name in NAMES}
    centroids = {name: c / np.linalg.norm(c) for name, c in centroids.items()}
    by_name = {row["identity"]: row for row in report["identities"]}
    assert list(by_name) == NAMES
    for name in NAMES:
        members = synthetic.outputs[names == name]
        to_centroid = members @ centroids[name]
        to_target = np.einsum("nd,nd->n", members, synthetic.targets[names == name])
        others = [centroids[other] @ centroids[name] for other in NAMES if other != name]
        gram = members @ members.T
        pairs = gram[np.triu_indices(len(members), 1)]
        row = by_name[name]
        assert row["images"] == IMAGES_PER_IDENTITY
        assert row["mean_to_centroid"] == pytest.approx(to_centroid.mean(), abs=1e-5)
        assert row["min_to_centroid"] == pytest.approx(to_centroid.min(), abs=1e-5)
        assert row["mean_to_target"] == pytest.approx(to_target.mean(), abs=1e-5)
        assert row["nearest_score"] == pytest.approx(max(others), abs=1e-5)
        assert row["diversity"] == pytest.approx(1 - pairs.mean(), abs=1e-5)
    counts = report["counts"]
    assert (counts["images"], counts["identities"]) == (len(names), len(NAMES))
    assert (counts["rejected"], counts["errors"]) == (2, 1)
    consistency = report["consistency"]["identity_mean_to_target"]
    assert consistency["count"] == len(NAMES)
    assert sum(report["histogram"]["intra"]) == len(names)
    assert sum(report["histogram"]["inter"]) == len(NAMES)
    assert report["leakage"] is None
    on_disk = json.loads((synthetic.out / "report" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))


def test_report_pictures_and_html(synthetic: SyntheticOut) -> None:
    report = build_report(synthetic.out, html=True, identities_per_sheet=3)
    folder = synthetic.out / "report"
    sheets = report["contact_sheets"]
    assert sheets == ["contact_000.png", "contact_001.png", "contact_002.png"]
    for name in ["similarity_hist.png", *sheets]:
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.width > 200
    page = (folder / "index.html").read_text()
    for name in ["similarity_hist.png", *sheets]:
        assert f"src='{name}'" in page
    assert "id_02" in page and "id_05" in page

    first = (folder / "report.json").read_bytes()
    build_report(synthetic.out, html=True, embed_images=True, contact_identities=2)
    assert (folder / "report.json").read_bytes() != first  # fewer sheets listed
    assert sorted(p.name for p in folder.glob("contact_*.png")) == ["contact_000.png"]
    page = (folder / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "src='contact_000.png'" not in page


def test_contact_sheet_shows_sources_and_survives_missing_source(
    synthetic: SyntheticOut,
) -> None:
    sheet = synthetic.out / "report" / "contact_000.png"
    build_report(synthetic.out, contact_identities=1)
    with Image.open(sheet) as image:
        pixels = np.asarray(image.convert("RGB"))
    # id_02 leads (collisions come first); its 0.png render is solid (40 * 2, 0, 200).
    source_colour = np.array([80, 0, 200])
    assert (np.abs(pixels.astype(int) - source_colour).sum(-1) < 6).sum() > 100 * 100

    shutil.rmtree(synthetic.source)
    report = build_report(synthetic.out, contact_identities=len(NAMES))
    assert len(report["contact_sheets"]) == 1
    with Image.open(sheet) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert (np.abs(pixels.astype(int) - source_colour).sum(-1) < 6).sum() == 0


def test_report_is_deterministic(synthetic: SyntheticOut) -> None:
    build_report(synthetic.out, gallery=synthetic.gallery, html=True)
    first = (synthetic.out / "report" / "report.json").read_bytes()
    build_report(synthetic.out, gallery=synthetic.gallery, html=True)
    assert (synthetic.out / "report" / "report.json").read_bytes() == first


def test_gallery_folder_goes_through_the_embedder(synthetic: SyntheticOut, tmp_path: Path) -> None:
    folder = tmp_path / "real_faces"
    folder.mkdir()
    with pytest.raises(ValueError, match="gallery_embedder"):
        build_report(synthetic.out, gallery=folder)
    seen: list[Path] = []

    def embedder(path: Path) -> EmbeddingSet:
        seen.append(path)
        return load_embeddings(synthetic.gallery)

    report = build_report(synthetic.out, gallery=folder, gallery_embedder=embedder)
    assert seen == [folder]
    assert [leak["identity"] for leak in report["leakage"]["leaks"]] == [LEAKING[0]]


def test_report_rejects_bad_inputs(synthetic: SyntheticOut, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="collision_threshold"):
        build_report(synthetic.out, collision_threshold=1.5)
    with pytest.raises(FileNotFoundError, match="manifest"):
        build_report(tmp_path / "nowhere")
    np.save(synthetic.out / ".digi2real" / "targets.npy", synthetic.targets[:-1])
    with pytest.raises(ValueError, match="rows"):
        build_report(synthetic.out)


def test_source_report_flags_near_duplicate_source_identities() -> None:
    rng = np.random.default_rng(1)
    centres = _unit(rng.standard_normal((6, DIM)))
    centres[4] = _unit(centres[1] + 0.02 * rng.standard_normal(DIM))
    embeddings = _unit(np.repeat(centres, 5, axis=0) + 0.03 * rng.standard_normal((30, DIM)))
    names = [f"src_{n}" for n in range(6) for _ in range(5)]
    result = source_report(embeddings, names, threshold=0.7)
    assert [(c["a"], c["b"]) for c in result["collisions"]] == [("src_1", "src_4")]
    assert (result["identities"], result["images"]) == (6, 30)
    assert result["nearest_other"]["max"] > 0.9


# ---------------------------------------------------------------------------- dataset card


def _weights(commercial: bool) -> dict:
    return {
        "profile": "real",
        "files": [
            {
                "path": "arc2face/diffusion_pytorch_model.safetensors",
                "component": "unet",
                "license": "MIT",
                "license_url": "https://example.org/arc2face",
                "commercial": True,
            },
            {
                "path": "arcface.onnx",
                "component": "recognizer",
                "license": "InsightFace weights",
                "license_url": "https://example.org/insightface",
                "commercial": commercial,
            },
        ],
    }


def _card(tmp_path: Path, *, commercial: bool, config: dict, source_license: str | None) -> str:
    path = write_dataset_card(
        tmp_path,
        config=config,
        counts={"images": 32, "identities": 8},
        report=None,
        weights_manifest=_weights(commercial),
        source_license=source_license,
    )
    assert path == tmp_path / CARD_NAME
    return path.read_text()


def test_card_flags_non_commercial_at_the_top(tmp_path: Path) -> None:
    config = {"source": {"root": "/data/faces"}, "environment": {"host": "box-17"}}
    card = _card(tmp_path, commercial=False, config=config, source_license="CC-BY-4.0")
    head = card.splitlines()[:3]
    assert any("NON-COMMERCIAL" in line and "recognizer" in line for line in head)
    assert "https://example.org/insightface" in card
    assert "box-17" not in card and "/data/faces" not in card  # host-dependent parts left out

    card = _card(tmp_path, commercial=True, config=config, source_license="CC-BY-4.0")
    assert "non-commercial" not in card.lower()
    assert "| source dataset | CC-BY-4.0 |" in card


def test_card_names_digiface_licence_when_none_given(tmp_path: Path) -> None:
    config = {"source": {"root": "/datasets/DigiFace1M/aligned", "license": None}}
    card = _card(tmp_path, commercial=True, config=config, source_license=None)
    top = "\n".join(card.splitlines()[:3])
    assert "NON-COMMERCIAL" in top and "DigiFace-1M Research Use of Data Agreement" in top
    other = _card(
        tmp_path, commercial=True, config={"source": {"root": "/x/y"}}, source_license=None
    )
    assert "NON-COMMERCIAL" not in other and "not recorded" in other


def test_card_carries_report_headline_and_is_deterministic(synthetic: SyntheticOut) -> None:
    report = build_report(synthetic.out, gallery=synthetic.gallery)
    config = yaml.safe_load((synthetic.out / "config.yaml").read_text())
    kwargs = dict(
        config=config,
        counts=report["counts"],
        report=report,
        weights_manifest=_weights(True),
        source_license="CC-BY-4.0",
    )
    first = write_dataset_card(synthetic.out, **kwargs).read_bytes()
    assert write_dataset_card(synthetic.out, **kwargs).read_bytes() == first
    text = first.decode()
    assert "| identity collisions (centroid cosine >= 0.6000) | 1 |" in text
    assert "identities leaking into gallery `gallery.npy`" in text
    assert "| images_per_identity | median 4.0000 (min 4.0000, max 4.0000) |" in text
