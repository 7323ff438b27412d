"""Nothing a user made is ever deleted (issue 23, data loss): ``--overwrite`` deletes only what
digi2real wrote, a re-run leaves foreign files alone, and an OUT overlapping the source (or
holding another input) is refused before any work, with or without ``--overwrite``."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import pytest
from helpers import fingerprint, tiny_convert

from digi2real.cli import main
from digi2real.data import layout, ownership
from digi2real.data.store import ObjectPath

EXIT_USAGE = 2


@pytest.fixture(scope="module")
def src(tmp_path_factory, sample_dataset) -> Path:
    root = tmp_path_factory.mktemp("own") / "src"
    for name in ("0", "1"):
        shutil.copytree(sample_dataset / name, root / name)
    return root


@pytest.fixture(scope="module")
def argv(tiny_weights):
    return partial(tiny_convert, tiny_weights.root)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, src, argv) -> Path:
    """One finished conversion, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("own_done") / "out"
    assert main(argv(src, out)) == 0
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def test_overwrite_refuses_foreign_files_and_names_them(finished, src, argv, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    (out / "notes.txt").write_text("my notes")
    (out / "images" / "0" / "favourite.jpg").write_bytes(b"mine")
    before = fingerprint(out)
    assert main(argv(src, out, "--overwrite")) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "notes.txt" in err and "images/0/favourite.jpg" in err
    assert "--delete-foreign-files" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert fingerprint(out) == before  # refused before anything was deleted


def test_overwrite_deletes_only_what_digi2real_wrote(finished, src, argv, tmp_path):
    """With foreign files moved out, --overwrite starts over; a different identity selection
    then writes a different set of images and no stale image of the old plan survives."""
    out = copy_of(finished, tmp_path)
    stale = out / "images" / "1" / "0000.jpg"
    assert stale.is_file()
    assert main(argv(src, out, "--overwrite", "--identities", "first:1")) == 0
    assert not stale.exists() and not (out / "images" / "1").exists()
    assert (out / "images" / "0" / "0000.jpg").is_file()


def test_delete_foreign_files_is_explicit(finished, src, argv, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "notes.txt").write_text("my notes")
    assert main(argv(src, out, "--delete-foreign-files")) == EXIT_USAGE  # not without --overwrite
    assert (out / "notes.txt").is_file()
    assert main(argv(src, out, "--overwrite", "--delete-foreign-files")) == 0
    assert not (out / "notes.txt").exists()
    assert (out / layout.MANIFEST).is_file()


def test_source_inside_out_is_refused_and_kept(finished, argv, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    inner = out / "src"
    shutil.copytree(finished / "images", inner)  # a dataset in ImageFolder layout
    before = fingerprint(out)
    for extra in ((), ("--overwrite",), ("--overwrite", "--delete-foreign-files")):
        assert main(argv(inner, out, *extra)) == EXIT_USAGE
        assert "inside OUT" in capsys.readouterr().err
        assert fingerprint(out) == before


def test_out_as_its_own_source_is_refused(finished, argv, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = fingerprint(out)
    for extra in ((), ("--overwrite",)):
        assert main(argv(out, out, *extra)) == EXIT_USAGE
        assert "same folder" in capsys.readouterr().err
    # the same folder through a symbolic link is the same folder
    link = tmp_path / "link"
    link.symlink_to(out)
    assert main(argv(link, out, "--overwrite")) == EXIT_USAGE
    assert fingerprint(out) == before


def test_out_inside_source_is_refused(src, argv, tmp_path, capsys):
    root = tmp_path / "src"
    shutil.copytree(src, root)
    before = fingerprint(root)
    for extra in ((), ("--overwrite",)):
        assert main(argv(root, root / "out", *extra)) == EXIT_USAGE
        assert "inside the source dataset" in capsys.readouterr().err
    assert fingerprint(root) == before


def test_inputs_inside_out_are_refused(finished, src, argv, tiny_weights, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    weights = out / "my-weights"
    shutil.copytree(tiny_weights.root, weights)
    before = fingerprint(out)
    command = argv(src, out, "--overwrite")
    command[command.index("--weights") + 1] = str(weights)
    assert main(command) == EXIT_USAGE
    assert "--weights" in capsys.readouterr().err
    assert fingerprint(out) == before


def test_rerun_leaves_foreign_files_and_removes_its_own_orphans(
    finished, src, argv, tmp_path, caplog
):
    out = copy_of(finished, tmp_path)
    mine = {
        out / "images" / "notes.txt": b"notes",
        out / "images" / "0" / "mine.jpg": b"mine",
        out / "images" / "someone" / "0000.jpg": b"not a planned identity",
        out / "originals" / "x.png": b"x",
        out / "wds" / "my.tar": b"tar",
        out / "report" / "contact_mine.png": b"png",
    }
    for path, data in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    orphan = out / "images" / "0" / "0042.jpg"  # a digi2real name with no manifest row
    shutil.copy(out / "images" / "0" / "0000.jpg", orphan)
    # the shard is redone: its commit marker goes, so the run finalises again
    (out / ".digi2real" / "shards" / "000000" / "manifest.parquet").unlink()
    (out / "manifest.parquet").unlink()
    with caplog.at_level("WARNING"):
        assert main(argv(src, out)) == 0
    for path, data in mine.items():
        assert path.read_bytes() == data, path
    assert not orphan.exists()
    assert "did not write were left alone" in caplog.text and "images/0/mine.jpg" in caplog.text


def test_rerun_through_a_symlinked_images_folder(finished, src, argv, tmp_path):
    out = copy_of(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (out / "images").rename(elsewhere)
    (out / "images").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "0" / "keep.jpg").write_bytes(b"mine")
    (out / "manifest.parquet").unlink()
    assert main(argv(src, out)) == 0
    assert (elsewhere / "0" / "keep.jpg").read_bytes() == b"mine"
    assert (out / "images").is_symlink()


def test_overwrite_on_a_symlinked_out_clears_its_target(finished, src, argv, tmp_path):
    target = copy_of(finished, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    assert main(argv(src, link, "--overwrite", "--identities", "first:1")) == 0
    assert link.is_symlink()
    assert not (target / "images" / "1").exists()  # the old output went from where it was
    assert (target / "images" / "0" / "0000.jpg").is_file()
    assert (target / layout.MANIFEST).is_file()


def test_a_new_out_holding_user_files_is_refused(src, argv, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my own readme")
    for extra in ((), ("--overwrite",)):
        assert main(argv(src, out, *extra)) == EXIT_USAGE
        assert "README.md" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "my own readme"
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]


# -- the ownership rule itself --------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "owned"),
    [
        ("manifest.parquet", True),
        ("README.md", True),
        (".digi2real/anything/at/all", True),
        ("images/a/0000.jpg", True),
        ("images/a/12345.jpg", True),
        ("images/a/.0000.jpg.12.0123456789ab.tmp", True),
        ("originals/a/0001.jpg", True),
        ("wds/shard-000003.tar", True),
        ("rec/train.idx", True),
        ("report/contact_007.png", True),
        ("report/features_gallery.npz", True),
        ("notes.txt", False),
        ("images/a/mine.jpg", False),
        ("images/a/001.jpg", False),
        ("images/b/0000.jpg", False),  # b is not a planned identity
        ("images/a/sub/0000.jpg", False),
        ("images/0000.jpg", False),
        ("wds/my.tar", False),
        ("report/contact_mine.png", False),
        ("mine/.x.12.0123456789ab.tmp", False),
    ],
)
def test_is_owned(relative, owned):
    assert ownership.is_owned(relative, frozenset({"a"})) is owned


def test_inside_on_urls_and_paths(tmp_path):
    bucket = ObjectPath("s3", "bucket/data")
    assert ownership.inside(ObjectPath("s3", "bucket/data/out"), bucket)
    assert not ownership.inside(ObjectPath("s3", "bucket/database"), bucket)
    assert not ownership.inside(ObjectPath("gs", "bucket/data/out"), bucket)
    assert not ownership.inside(tmp_path, bucket)
    with pytest.raises(ownership.OverlapError, match="same folder"):
        ownership.check_apart(bucket, bucket, {})
    with pytest.raises(ownership.OverlapError, match="inside OUT"):
        ownership.check_apart(bucket, bucket / "src", {})
    with pytest.raises(ownership.OverlapError, match="shift.real_stats"):
        ownership.check_apart(bucket, None, {"shift.real_stats": bucket / "r.stats"})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert ownership.inside(tmp_path / "b" / "x", tmp_path / "a")


def test_clear_on_a_store_deletes_only_owned_objects(s3, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from digi2real.data.store import location

    out = location(s3.bucket("ownership") + "/out")
    plan = tmp_path / "plan.parquet"
    pq.write_table(pa.table({"shard": [0], "identity": ["a"], "files": [["a/0.png"]]}), plan)
    key = out.key
    s3.fs.pipe_file(f"{key}/.digi2real/run.json", b"{}")
    s3.fs.pipe_file(f"{key}/.digi2real/plan.parquet", plan.read_bytes())
    s3.fs.pipe_file(f"{key}/images/a/0000.jpg", b"jpg")
    s3.fs.pipe_file(f"{key}/manifest.parquet", b"m")
    s3.fs.pipe_file(f"{key}/notes.txt", b"mine")
    with pytest.raises(ownership.ForeignFilesError, match="notes.txt"):
        ownership.clear(out)
    assert len(s3.keys(str(out))) == 5
    s3.fs.rm(f"{key}/notes.txt")
    assert ownership.clear(out) == 4
    assert s3.keys(str(out)) == []
