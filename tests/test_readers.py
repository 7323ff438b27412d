from __future__ import annotations

import importlib.util
import os
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digi2real.data import readers
from digi2real.data.images import ImageError, load_image
from digi2real.data.readers import (
    ErrorRow,
    IdentitySelection,
    IdentitySource,
    apply_min_images,
    error_row_for,
    layout_is_aligned,
    natural_key,
    scan_dataset,
)
from digi2real.sample import digiface_root

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)
    return path


def _identity(root: Path, name: str, files: list[str]) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        if file.lower().endswith((".png", ".jpg", ".jpeg")):
            _png(folder / file)
        else:
            (folder / file).write_text("not an image")
    return folder


def _rows_by_path(rows: list[ErrorRow]) -> dict[str, ErrorRow]:
    return {row.path: row for row in rows}


def test_natural_sort() -> None:
    names = ["10.png", "2.png", "1.png", "a10.png", "a2.png", "b.png", "02.png", "A1.png"]
    ordered = sorted(names, key=natural_key)
    assert ordered.index("2.png") < ordered.index("10.png")
    assert ordered.index("a2.png") < ordered.index("a10.png")
    assert ordered.index("02.png") < ordered.index("10.png")
    assert ordered == sorted(reversed(names), key=natural_key)  # total order: input order free


def test_scan_basic_layout_and_ordering(tmp_path: Path) -> None:
    for name in ["b", "a", "10", "2"]:
        _identity(tmp_path, name, ["10.png", "2.png", "1.jpg", "notes.txt", ".hidden.png"])
    sources, rows = scan_dataset(tmp_path)
    assert [source.name for source in sources] == ["10", "2", "a", "b"]  # str order
    assert [path.name for path in sources[0].files] == ["1.jpg", "2.png", "10.png"]
    assert all(path.parent == tmp_path / source.name for source in sources for path in source.files)
    assert rows == []


def test_empty_and_non_image_only_folders_are_rows(tmp_path: Path) -> None:
    _identity(tmp_path, "ok", ["0.png"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs_only").mkdir()
    (tmp_path / "docs_only" / "readme.txt").write_text("x")
    sources, rows = scan_dataset(tmp_path)
    assert [source.name for source in sources] == ["ok"]
    by_path = _rows_by_path(rows)
    assert by_path["empty"].reason == "no image files"
    assert by_path["docs_only"].identity == "docs_only"
    assert all(row.stage == "scan" for row in rows)


def test_unicode_and_space_names_are_kept(tmp_path: Path) -> None:
    nfd = unicodedata.normalize("NFD", "José Álvarez")
    _identity(tmp_path, nfd, ["0.png"])
    _identity(tmp_path, "名前 with space", ["0.png"])
    sources, rows = scan_dataset(tmp_path)
    assert rows == []
    names = [source.name for source in sources]
    assert names == sorted(["José Álvarez", "名前 with space"])
    jose = sources[names.index("José Álvarez")]
    assert jose.folder == nfd and jose.files[0].exists()  # on-disk path kept for reading


def test_nfc_collisions_are_all_skipped(tmp_path: Path) -> None:
    _identity(tmp_path, unicodedata.normalize("NFC", "é"), ["0.png"])
    _identity(tmp_path, unicodedata.normalize("NFD", "é"), ["0.png"])
    _identity(tmp_path, "z", ["0.png"])
    sources, rows = scan_dataset(tmp_path)
    assert [source.name for source in sources] == ["z"]
    assert len(rows) == 2 and all("collides" in row.reason for row in rows)


def test_case_collisions_only_when_case_insensitive(tmp_path: Path) -> None:
    _identity(tmp_path, "Alice", ["0.png"])
    _identity(tmp_path, "alice", ["0.png"])
    sources, rows = scan_dataset(tmp_path)
    assert [source.name for source in sources] == ["Alice", "alice"] and rows == []
    sources, rows = scan_dataset(tmp_path, case_insensitive=True)
    assert sources == [] and {row.path for row in rows} == {"Alice", "alice"}


def test_hostile_names_are_rows_not_crashes(tmp_path: Path) -> None:
    _identity(tmp_path, "good", ["0.png", "bad\nname.png"])
    _identity(tmp_path, "tab\there", ["0.png"])
    _identity(tmp_path, "back\\slash", ["0.png"])
    _identity(tmp_path, "   ", ["0.png"])
    _identity(tmp_path, "..dots", ["0.png"])  # hidden: ignored
    try:
        os.mkdir(os.fsencode(tmp_path) + b"/latin1-\xe9")
        _png(Path(os.fsdecode(os.fsencode(tmp_path) + b"/latin1-\xe9/0.png")))
        undecodable = True
    except (OSError, UnicodeError):
        undecodable = False
    sources, rows = scan_dataset(tmp_path)
    assert [source.name for source in sources] == ["good"]
    assert [path.name for path in sources[0].files] == ["0.png"]
    reasons = {row.path: row.reason for row in rows}
    assert "control characters" in reasons["tab\there"]
    assert "backslash" in reasons["back\\slash"]
    assert "blank" in reasons["   "]
    assert "control characters" in reasons["good/bad\nname.png"]
    if undecodable:
        assert "UTF-8" in reasons["latin1-\\xe9"]
    for row in rows:
        row.path.encode("utf-8")  # every row is writable as UTF-8 (parquet)


def test_symlinks_inside_outside_and_loops(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = _png(tmp_path / "outside" / "secret.png")
    (tmp_path / "outside_dir").mkdir()
    _png(tmp_path / "outside_dir" / "0.png")
    person = _identity(root, "person", ["0.png"])
    (person / "1.png").symlink_to(person / "0.png")  # inside root: fine
    (person / "2.png").symlink_to(outside)
    (person / "3.png").symlink_to(person / "3.png")  # loop on itself
    (person / "4.png").symlink_to(person / "5.png")
    (person / "5.png").symlink_to(person / "4.png")  # two-step loop
    (person / "6.png").symlink_to(person / "missing.png")
    (root / "escape").symlink_to(tmp_path / "outside_dir", target_is_directory=True)
    (root / "alias").symlink_to(person, target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")
    sources, rows = scan_dataset(root)
    assert [source.name for source in sources] == ["alias", "person"]
    assert [path.name for path in sources[1].files] == ["0.png", "1.png"]
    reasons = {row.path: row.reason for row in rows}
    assert reasons["person/2.png"] == "symlink resolves outside the dataset root"
    assert reasons["person/3.png"] == "symlink loop"
    assert reasons["person/4.png"] == reasons["person/5.png"] == "symlink loop"
    assert reasons["person/6.png"] == "broken symlink"
    assert reasons["escape"] == "symlink resolves outside the dataset root"
    assert reasons["loop"] == "symlink loop"
    resolved_root = root.resolve()
    for source in sources:
        for path in source.files:
            assert path.resolve().is_relative_to(resolved_root)


def test_root_files_nested_folders_and_litter(tmp_path: Path) -> None:
    _identity(tmp_path, "p", ["0.png"])
    _png(tmp_path / "p" / "sub" / "0.png")
    _png(tmp_path / "stray.png")
    (tmp_path / "README.md").write_text("about")
    _identity(tmp_path, "__MACOSX", ["._0.png"])
    _identity(tmp_path, ".cache", ["0.png"])
    sources, rows = scan_dataset(tmp_path)
    assert [source.name for source in sources] == ["p"]
    reasons = {row.path: (row.identity, row.reason) for row in rows}
    assert reasons == {
        "stray.png": ("", "image outside identity folder"),
        "p/sub": ("p", "nested folder ignored"),
    }


def test_extensions_are_case_insensitive_and_configurable(tmp_path: Path) -> None:
    _identity(tmp_path, "p", ["0.PNG", "1.Jpeg", "2.gif"])
    sources, _ = scan_dataset(tmp_path)
    assert [path.name for path in sources[0].files] == ["0.PNG", "1.Jpeg"]
    sources, _ = scan_dataset(tmp_path, extensions=["gif"])
    assert [path.name for path in sources[0].files] == ["2.gif"]
    with pytest.raises(ValueError, match="extensions"):
        scan_dataset(tmp_path, extensions=[])


def test_root_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_dataset(tmp_path / "missing")
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(NotADirectoryError):
        scan_dataset(file)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, IdentitySelection()),
        ("all", IdentitySelection()),
        ("3", IdentitySelection(kind="first", count=3)),
        ("first:3", IdentitySelection(kind="first", count=3)),
        ("1:4", IdentitySelection(kind="range", start=1, stop=4)),
        ("2:", IdentitySelection(kind="range", start=2)),
        (":2", IdentitySelection(kind="range", stop=2)),
        ("names:b, a", IdentitySelection(kind="names", names=("b", "a"))),
    ],
)
def test_selection_specs(spec: str | None, expected: IdentitySelection) -> None:
    selection = IdentitySelection.from_spec(spec)
    assert selection == expected
    assert IdentitySelection.from_spec(selection.to_spec()) == selection


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("abc", "'abc' is not an integer"),
        ("first:0", "N >= 1"),
        ("0", "N >= 1"),
        ("5:2", "5:2 is empty"),
        ("-1:3", "start must be >= 0"),
        ("x:3", "'x' is not an integer"),
        ("names:", "empty name"),
        ("names:a,,b", "empty name"),
        ("names:a,a", "names twice: 'a'"),
    ],
)
def test_selection_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IdentitySelection.from_spec(spec)


def test_selection_file(tmp_path: Path) -> None:
    listing = tmp_path / "ids.txt"
    listing.write_text("# wanted\nb\n\n  c  \n", encoding="utf-8")
    for spec in (f"@{listing}", f"file:{listing}"):
        assert IdentitySelection.from_spec(spec).names == ("b", "c")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        IdentitySelection.from_spec(f"@{tmp_path / 'nope.txt'}")
    (tmp_path / "blank.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no names"):
        IdentitySelection.from_spec(f"@{tmp_path / 'blank.txt'}")


def test_selection_applied_by_scan(tmp_path: Path) -> None:
    for name in ["d", "a", "c", "b", "e"]:
        _identity(tmp_path, name, ["0.png"])

    def names(spec: str) -> list[str]:
        return [source.name for source in scan_dataset(tmp_path, select=spec)[0]]

    assert names("all") == ["a", "b", "c", "d", "e"]
    assert names("2") == ["a", "b"]
    assert names("1:3") == ["b", "c"]
    assert names("3:") == ["d", "e"]
    assert names("10") == ["a", "b", "c", "d", "e"]
    assert names("names:e,a") == ["a", "e"]  # always sorted order
    with pytest.raises(ValueError, match=r"2 selected identities not in the dataset: 'x', 'y'"):
        names("names:a,y,x")


def test_explicit_name_of_a_skipped_identity_is_not_unknown(tmp_path: Path) -> None:
    _identity(tmp_path, "a", ["0.png"])
    (tmp_path / "empty").mkdir()
    _identity(tmp_path, "tab\tname", ["0.png"])
    selection = IdentitySelection.of_names(["a", "empty", "tab\tname"])
    sources, rows = scan_dataset(tmp_path, select=selection)
    assert [source.name for source in sources] == ["a"]
    assert {row.path for row in rows} == {"empty", "tab\tname"}


def test_unselected_folders_are_not_listed(tmp_path: Path, monkeypatch) -> None:
    for index in range(30):
        _identity(tmp_path, f"id{index:02d}", ["0.png"])
    listed: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path):
        listed.append(os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(readers.os, "scandir", counting_scandir)
    sources, _ = scan_dataset(tmp_path, select=IdentitySelection.range(5, 7))
    assert [source.name for source in sources] == ["id05", "id06"]
    assert len(listed) == 3  # the root, then the two selected folders


def test_workers_do_not_change_the_result(tmp_path: Path) -> None:
    for index in range(12):
        _identity(tmp_path, f"p{index}", [f"{n}.png" for n in range(3)])
    (tmp_path / "empty").mkdir()
    assert scan_dataset(tmp_path, workers=4) == scan_dataset(tmp_path)
    with pytest.raises(ValueError, match="workers"):
        scan_dataset(tmp_path, workers=0)


def test_apply_min_images() -> None:
    sources = [
        IdentitySource("a", [Path("a/0.png")]),
        IdentitySource("b", [Path("b/0.png"), Path("b/1.png")]),
    ]
    kept, rows = apply_min_images(sources, {"a": 1, "b": 2}, 2)
    assert [source.name for source in kept] == ["b"]
    assert rows == [ErrorRow("a", "a", "read", "too few usable images (1 < 2)")]
    kept, rows = apply_min_images(sources, {"a": 1, "b": 2}, 1)
    assert len(kept) == 2 and rows == []
    with pytest.raises(ValueError, match="lacks identities: 'b'"):
        apply_min_images(sources, {"a": 1}, 1)
    with pytest.raises(ValueError, match="min_images"):
        apply_min_images(sources, {"a": 1, "b": 2}, 0)


def test_decode_failures_become_rows_relative_to_root(tmp_path: Path) -> None:
    folder = _identity(tmp_path, "p", ["0.png"])
    (folder / "1.png").write_bytes(b"")
    sources, rows = scan_dataset(tmp_path)
    assert rows == [] and len(sources[0].files) == 2
    failures = []
    for path in sources[0].files:
        try:
            load_image(path)
        except ImageError as error:
            failures.append(error_row_for(error, root=tmp_path, identity="p", shard=3))
    assert failures == [ErrorRow("p/1.png", "p", "read", "empty file", 3)]


def test_layouts() -> None:
    assert layout_is_aligned("digiface") and not layout_is_aligned("imagefolder")
    with pytest.raises(ValueError, match="valid: digiface, imagefolder"):
        layout_is_aligned("lfw")


def _load_make_sample(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "scripts/make_sample.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    monkeypatch.setitem(sys.modules, "make_sample", module)
    spec.loader.exec_module(module)
    return module


def test_bundled_sample_is_reproducible_and_scannable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = digiface_root()
    bundled_files = sorted(p.relative_to(bundled) for p in bundled.rglob("*") if p.is_file())
    assert sum((bundled / p).stat().st_size for p in bundled_files) < 200 * 1024
    make_sample = _load_make_sample(monkeypatch)
    written = make_sample.make_sample(tmp_path)
    assert [p.relative_to(tmp_path) for p in written] == bundled_files
    for relative in bundled_files:
        fresh = load_image(tmp_path / relative)
        np.testing.assert_array_equal(fresh, load_image(bundled / relative), err_msg=str(relative))
        assert (tmp_path / relative).read_bytes() == (bundled / relative).read_bytes(), (
            f"{relative}: same pixels, different PNG bytes (another zlib?); "
            "regenerate with scripts/make_sample.py"
        )

    sources, rows = scan_dataset(bundled)
    assert rows == [] and len(sources) >= 4
    assert all(len(source.files) >= 3 for source in sources)
    first = load_image(sources[0].files[0])
    assert first.shape == (112, 112, 3)
    # Identities differ more between each other than renders of one identity do.
    means = [np.mean([load_image(p).astype(float) for p in s.files], axis=0) for s in sources]
    within = np.mean([np.abs(load_image(p) - means[0]).mean() for p in sources[0].files])
    between = np.abs(means[0] - means[1]).mean()
    assert between > within
