from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest

from digi2real.data import fsio
from digi2real.data.fsio import OutputWriteError


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _failing(code: int):
    def fail(*_args: object, **_kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    return fail


def test_atomic_write_creates_parents_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    fsio.atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    fsio.atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert _leftovers(target.parent) == []


def test_temp_names_are_hidden_siblings_unique_per_attempt(tmp_path: Path) -> None:
    target = tmp_path / "shard-000001.tar"
    names = {fsio.temp_name(target) for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert name.parent == tmp_path
        assert name.name.startswith(".shard-000001.tar.") and name.name.endswith(".tmp")
        assert f".{os.getpid()}." in name.name


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.ENOSPC, "disk full while writing {}"),
        (errno.EDQUOT, "disk quota exceeded while writing {}"),
        (errno.EROFS, "output is read-only: {}"),
    ],
)
def test_write_failure_is_translated_and_leaves_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, message: str
) -> None:
    target = tmp_path / "out.bin"
    fsio.atomic_write_bytes(target, b"old")
    monkeypatch.setattr(fsio, "_write_all", _failing(code))
    with pytest.raises(OutputWriteError) as caught:
        fsio.atomic_write_bytes(target, b"new")
    error = caught.value
    assert str(error) == message.format(target)
    assert error.errno == code and error.filename == str(target)
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == code
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_read_only_at_create_is_translated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsio, "_open_exclusive", _failing(errno.EROFS))
    target = tmp_path / "x.json"
    with pytest.raises(OutputWriteError, match=f"output is read-only: {target}"):
        fsio.atomic_write_bytes(target, b"{}")
    assert not target.exists() and _leftovers(tmp_path) == []


def test_other_errors_pass_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsio, "_write_all", _failing(errno.EIO))
    with pytest.raises(OSError) as caught:
        fsio.atomic_write_bytes(tmp_path / "x", b"data")
    assert not isinstance(caught.value, OutputWriteError)
    assert caught.value.errno == errno.EIO
    assert _leftovers(tmp_path) == []


def test_output_write_error_survives_pickling() -> None:
    error = OutputWriteError(errno.ENOSPC, "disk full while writing /o/x", "/o/x")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is OutputWriteError
    assert (copy.errno, str(copy), copy.filename) == (errno.ENOSPC, str(error), "/o/x")


def test_atomic_open_commits_only_on_clean_exit(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    with fsio.atomic_open(target) as handle:
        handle.write(b"abc")
        handle.write(memoryview(b"def"))
        assert not target.exists()  # invisible until committed
        assert handle.tell() == 6
    assert target.read_bytes() == b"abcdef"

    with pytest.raises(RuntimeError, match="boom"), fsio.atomic_open(target) as handle:
        handle.write(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"abcdef"
    assert _leftovers(tmp_path) == []

    with pytest.raises(ValueError, match="mode 'wb' only"), fsio.atomic_open(target, "w"):
        pass


def test_atomic_file_publishes_in_chosen_order(tmp_path: Path) -> None:
    first = fsio.AtomicFile(tmp_path / "first")
    second = fsio.AtomicFile(tmp_path / "second")
    first.write(b"1")
    second.write(b"2")
    first.seek(0)
    first.write(b"9")  # patching bytes already written, as the RecordIO header does
    for handle in (first, second):
        handle.sync()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    second.commit()
    assert (tmp_path / "second").read_bytes() == b"2" and not (tmp_path / "first").exists()
    first.commit()
    assert (tmp_path / "first").read_bytes() == b"9"
    first.discard()  # after commit: keeps the file
    assert (tmp_path / "first").exists()
    with pytest.raises(ValueError, match="write after"):
        first.write(b"x")


def test_fault_after_partial_writes_discards_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fsio._write_all
    calls = []

    def third_fails(fileobj, data) -> None:  # type: ignore[no-untyped-def]
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fileobj, data)

    monkeypatch.setattr(fsio, "_write_all", third_fails)
    target = tmp_path / "big.bin"
    with pytest.raises(OutputWriteError, match="disk full"), fsio.atomic_open(target) as handle:
        for _ in range(5):
            handle.write(b"x" * 10)
    assert len(calls) == 3
    assert not target.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "a/b",
        "/",
        "a\\b",
        "nul\0",
        "tab\tname",
        "new\nline",
        "del\x7f",
        "c1\x85",
        "a" * 256,
        "é" * 128,
    ],
)
def test_safe_component_refuses(name: str) -> None:
    with pytest.raises(ValueError, match="unusable path component"):
        fsio.safe_component(name)


def test_safe_component_accepts_and_normalises() -> None:
    assert fsio.safe_component("Jane Doe") == "Jane Doe"
    assert fsio.safe_component("李小龙") == "李小龙"
    assert fsio.safe_component("...") == "..."
    assert fsio.safe_component("a" * 255) == "a" * 255
    decomposed = "Zoe\u0308"
    assert fsio.safe_component(decomposed) == "Zo\u00eb"
    assert len(fsio.safe_component("e\u0301" * 127).encode()) == 254


def test_safe_join_stays_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "out"
    (root / "images").mkdir(parents=True)
    assert fsio.safe_join(root, "images", "Zoe\u0308", "0001.jpg") == (
        root / "images" / "Zo\u00eb" / "0001.jpg"
    )
    with pytest.raises(ValueError):
        fsio.safe_join(root, "..", "escape")
    with pytest.raises(ValueError):
        fsio.safe_join(root, "images/../../escape")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "images" / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        fsio.safe_join(root, "images", "evil", "0000.jpg")
    # a symlink that stays inside the root is fine
    (root / "images" / "alias").symlink_to(root / "images", target_is_directory=True)
    assert fsio.safe_join(root, "images", "alias", "x.jpg") == root / "images" / "alias" / "x.jpg"


def test_make_dirs_translates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OutputWriteError, match="output is read-only"):
        fsio.make_dirs(tmp_path / "new")


def test_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "gone"
    target.write_bytes(b"x")
    fsio.remove(target)
    fsio.remove(target)  # already gone: fine
    assert not target.exists()
    target.write_bytes(b"x")
    monkeypatch.setattr(Path, "unlink", _failing(errno.EROFS))
    with pytest.raises(OutputWriteError, match="output is read-only"):
        fsio.remove(target)


def test_temp_names_are_recognised_and_swept(tmp_path):
    from digi2real.data import fsio

    target = tmp_path / "part.parquet"
    temp = fsio.temp_name(target)
    assert fsio.is_temp_name(temp.name) and not fsio.is_temp_name(target.name)
    temp.write_bytes(b"half")
    target.write_bytes(b"whole")
    assert fsio.remove_stale_temps(tmp_path) == 1
    assert not temp.exists() and target.read_bytes() == b"whole"
