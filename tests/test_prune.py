from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_report import COLLIDING, LEAKING, NAMES, SyntheticOut, make_synthetic_out

from digi2real.analysis.prune import identities_to_drop, prune
from digi2real.analysis.report import build_report


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture()
def reported(tmp_path: Path) -> SyntheticOut:
    synthetic = make_synthetic_out(tmp_path)
    build_report(synthetic.out, gallery=synthetic.gallery, html=True)
    return synthetic


def test_prune_drops_collider_and_leak_and_renumbers(reported: SyntheticOut, tmp_path: Path):
    before = _tree_digest(reported.out)
    dest = tmp_path / "clean"
    table = prune(reported.out, dest, drop_collisions=True, drop_leaks=True)
    assert _tree_digest(reported.out) == before

    dropped = {COLLIDING[1], LEAKING[0]}  # the higher label of the pair, and the leak
    remaining = [name for name in NAMES if name not in dropped]
    manifest = pq.read_table(dest / "manifest.parquet")
    assert manifest.equals(table)
    assert sorted(set(manifest.column("identity").to_pylist())) == remaining
    new_label = {name: label for label, name in enumerate(remaining)}
    identities = manifest.column("identity").to_pylist()
    assert manifest.column("label").to_pylist() == [new_label[n] for n in identities]
    assert sorted(set(manifest.column("label").to_pylist())) == list(range(len(remaining)))
    assert manifest.column("key").to_pylist()[-1] == f"{len(remaining) - 1:07d}_0003"
    assert (dest / "labels.csv").read_text() == "label,identity\n" + "".join(
        f"{label},{name}\n" for name, label in new_label.items()
    )

    kept_rows = [row for row, name in enumerate(reported.identities) if name not in dropped]
    outputs = np.load(dest / ".digi2real" / "outputs.npy")
    targets = np.load(dest / ".digi2real" / "targets.npy")
    np.testing.assert_array_equal(outputs, reported.outputs[kept_rows])
    np.testing.assert_array_equal(targets, reported.targets[kept_rows])
    for relative in manifest.column("path").to_pylist():
        assert (dest / relative).read_bytes() == (reported.out / relative).read_bytes()
    assert not (dest / "images" / COLLIDING[1]).exists()
    rejected = pq.read_table(dest / "rejected.parquet").column("identity").to_pylist()
    assert rejected == ["id_03"]  # id_05's rejection row goes with it
    assert (dest / "config.yaml").read_bytes() == (reported.out / "config.yaml").read_bytes()


def test_prune_collisions_only_and_keys_only(reported: SyntheticOut, tmp_path: Path) -> None:
    before = _tree_digest(reported.out)
    table = prune(reported.out, tmp_path / "a", drop_collisions=True, drop_leaks=False)
    assert set(table.column("identity").to_pylist()) == set(NAMES) - {COLLIDING[1]}

    table = prune(
        reported.out, tmp_path / "keys", drop_collisions=False, drop_leaks=True, keys_only=True
    )
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["kept_keys.txt"]
    keys = (tmp_path / "keys" / "kept_keys.txt").read_text().splitlines()
    original = pq.read_table(reported.out / "manifest.parquet").to_pylist()
    assert keys == [row["key"] for row in original if row["identity"] != LEAKING[0]]
    assert table.column("key").to_pylist() == keys
    assert _tree_digest(reported.out) == before


def test_prune_refuses_unsafe_requests(reported: SyntheticOut, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        prune(reported.out, reported.out / "clean", drop_collisions=True, drop_leaks=False)
    with pytest.raises(ValueError, match="nothing to prune"):
        prune(reported.out, tmp_path / "x", drop_collisions=False, drop_leaks=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        prune(reported.out, tmp_path / "busy", drop_collisions=True, drop_leaks=False)
    no_gallery = build_report(reported.out)
    with pytest.raises(ValueError, match="gallery"):
        prune(
            reported.out, tmp_path / "y", drop_collisions=False, drop_leaks=True, report=no_gallery
        )


def _pair(a: tuple[int, str], b: tuple[int, str], score: float = 0.9) -> dict:
    return {"a": a[1], "label_a": a[0], "b": b[1], "label_b": b[0], "score": score}


def test_collision_chains_keep_the_lowest_label_and_what_no_longer_collides() -> None:
    a, b, c, d, e = (0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e")
    report = {
        "separation": {"collisions": [_pair(a, b), _pair(b, c), _pair(d, e), _pair(a, e)]},
        "leakage": {"leaks": [{"identity": "d", "gallery_identity": "g", "score": 0.7}]},
    }
    assert set(identities_to_drop(report, drop_collisions=True, drop_leaks=False)) == {"b", "e"}
    both = identities_to_drop(report, drop_collisions=True, drop_leaks=True)
    assert set(both) == {"b", "d", "e"} and "leaks" in both["d"]
    assert "collides with a" in both["b"]
