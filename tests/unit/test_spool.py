"""gateway.spool.store: durable commits under our own keys, and housekeeping."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.errors import SpoolError, SpoolFullError
from gateway.spool.store import Spool


def _incoming(spool: Spool, data: bytes, name: str = "rx.tmp") -> Path:
    path = spool.incoming / name
    path.write_bytes(data)
    return path


def test_layout_is_created(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert spool.incoming.is_dir()
    assert spool.objects.is_dir()
    Spool(tmp_path / "spool")  # idempotent


def test_prefix_folders_exist_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    assert sorted(p.name for p in spool.objects.iterdir()) == [f"{i:02x}" for i in range(256)]
    # a commit into a folder that has gone missing still makes it
    data = b"DICM" * 10
    temp = _incoming(spool, data)
    size, sha = spool.digest(temp)
    key_folder = spool.objects / "ab"
    key_folder.rmdir()
    import gateway.spool.store as store

    monkeypatch.setattr(store, "new_id", lambda: "ab" + "0" * 30)
    obj = spool.commit(temp, size=size, sha256=sha)
    assert obj.path.parent == key_folder and obj.path.read_bytes() == data


def test_digest(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks
    path = _incoming(spool, data)
    assert spool.digest(path) == (len(data), hashlib.sha256(data).hexdigest())
    empty = _incoming(spool, b"", "empty")
    assert spool.digest(empty) == (0, hashlib.sha256(b"").hexdigest())


def test_commit_renames_into_objects(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = b"DICM" * 100
    temp = _incoming(spool, data)
    size, sha = spool.digest(temp)
    obj = spool.commit(temp, size=size, sha256=sha)
    assert not temp.exists()
    assert len(obj.key) == 32 and all(c in "0123456789abcdef" for c in obj.key)
    assert obj.path == spool.objects / obj.key[:2] / f"{obj.key}.dcm"
    assert obj.path.read_bytes() == data
    assert (obj.size, obj.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert spool.path_of(obj.key) == obj.path
    assert spool.exists(obj.key)
    assert list(spool.keys()) == [obj.key]
    assert list(spool.incoming.iterdir()) == []


def test_commits_get_distinct_keys(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    keys = set()
    for i in range(20):
        temp = _incoming(spool, bytes([i]) * 10)
        keys.add(spool.commit(temp, size=10, sha256="x").key)
    assert len(keys) == 20
    assert set(spool.keys()) == keys


def test_commit_of_a_missing_file_is_a_spool_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(SpoolError):
        spool.commit(spool.incoming / "gone", size=0, sha256="")


def test_delete(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    obj = spool.commit(_incoming(spool, b"x"), size=1, sha256="")
    spool.delete(obj.key)
    assert not spool.exists(obj.key)
    spool.delete(obj.key)  # deleting twice is fine


@pytest.mark.parametrize(
    "key",
    [
        "",
        "abc",
        "0" * 31,
        "0" * 33,
        "A" * 32,  # upper case is not ours
        "../" + "0" * 29,
        "0" * 30 + "/x",
        "g" * 32,
        "0" * 31 + "\n",
        "0" * 31 + "/",
    ],
)
def test_path_of_rejects_malformed_keys(tmp_path: Path, key: str) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(SpoolError):
        spool.path_of(key)
    with pytest.raises(SpoolError):
        spool.exists(key)
    with pytest.raises(SpoolError):
        spool.delete(key)


def test_remove_orphans(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    objs = [spool.commit(_incoming(spool, bytes([i])), size=1, sha256="") for i in range(5)]
    known = [objs[0].key, objs[3].key, "f" * 32]  # a known key without a file is harmless
    stray = spool.objects / "zz"
    stray.mkdir()
    (stray / "notes.txt").write_text("not an object")
    asked: list[list[str]] = []

    def indexed(keys: list[str]) -> set[str]:
        asked.append(keys)
        return set(known) & set(keys)

    assert spool.remove_orphans(indexed) == 3
    assert set(spool.keys()) == {objs[0].key, objs[3].key}
    assert (stray / "notes.txt").exists()  # only .dcm files are ours to remove
    # asked one folder at a time, never for a folder without objects
    assert all(len({k[:2] for k in keys}) == 1 for keys in asked)
    assert sorted(k for keys in asked for k in keys) == sorted(o.key for o in objs)
    assert spool.remove_orphans(indexed) == 0


def test_sweep_incoming(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    old = _incoming(spool, b"old", "old")
    new = _incoming(spool, b"new", "new")
    os.utime(old, (1000.0, 1000.0))
    os.utime(new, (1500.0, 1500.0))
    assert spool.sweep_incoming(older_than=600, now=1599.0) == 0
    assert spool.sweep_incoming(older_than=600, now=1600.0) == 1  # age >= older_than
    assert not old.exists()
    assert new.exists()
    assert spool.sweep_incoming(older_than=600, now=2100.0) == 1
    assert not new.exists()
    assert spool.sweep_incoming(older_than=600, now=9999.0) == 0


def test_sweep_incoming_leaves_committed_objects_alone(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    obj = spool.commit(_incoming(spool, b"x"), size=1, sha256="")
    os.utime(obj.path, (0.0, 0.0))
    assert spool.sweep_incoming(older_than=1, now=1e10) == 0
    assert spool.exists(obj.key)


def test_check_space(tmp_path: Path) -> None:
    Spool(tmp_path, min_free_bytes=0).check_space()
    with pytest.raises(SpoolFullError):
        Spool(tmp_path, min_free_bytes=1 << 62).check_space()


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The spool's opens, fsyncs and closes, in order."""
    calls: list[str] = []
    for name in ("open", "fsync", "close"):
        original = getattr(os, name)

        def record(*args: object, _name: str = name, _original: object = original) -> object:
            calls.append(_name)
            return _original(*args)  # type: ignore[operator]

        monkeypatch.setattr(os, name, record)
    return calls


def test_prepared_syncs_make_only_the_fsync_when_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call a prepared sync gives makes one system call, the fsync: a caller that hands
    work to another thread just before it waits for the disk at once (any other system
    call would let that thread take the interpreter lock first)."""
    spool = Spool(tmp_path)
    temp = _incoming(spool, b"DICM" * 10)
    calls = _recording(monkeypatch)
    with spool.file_sync(temp) as fsync:
        assert calls == ["open"]
        fsync()
        assert calls == ["open", "fsync"]
    assert calls == ["open", "fsync", "close"]
    obj = spool.name(temp, size=40, sha256="")
    calls.clear()
    with spool.name_sync(obj) as fsync:
        assert calls == ["open"]
        fsync()
        assert calls == ["open", "fsync"]
    assert calls == ["open", "fsync", "close"]
    assert spool.healthy and obj.path.read_bytes() == b"DICM" * 10


def test_a_failed_folder_fsync_removes_the_file_and_tells_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    heard: list[str] = []
    spool = Spool(tmp_path)
    spool.on_health = lambda healthy, reason: heard.append(f"health {healthy}")
    obj = spool.name(_incoming(spool, b"x"), size=1, sha256="")

    def eio(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with spool.name_sync(obj, failed=lambda error: heard.append("failed")) as fsync:
        monkeypatch.setattr(os, "fsync", eio)
        with pytest.raises(SpoolError, match="fsync of a spool folder failed: EIO"):
            fsync()
    assert heard == ["failed", "health False"]  # the caller first (its transaction waits)
    assert not obj.path.exists() and not spool.healthy


def test_a_folder_that_does_not_open_is_a_failed_folder_fsync(tmp_path: Path) -> None:
    heard: list[str] = []
    spool = Spool(tmp_path)
    obj = spool.name(_incoming(spool, b"x"), size=1, sha256="")
    gone = replace(obj, path=tmp_path / "no-such-folder" / obj.path.name)
    with pytest.raises(SpoolError, match="fsync of a spool folder failed: ENOENT"):
        with spool.name_sync(gone, failed=lambda error: heard.append("failed")):
            pass  # pragma: no cover - entering raised
    assert heard == ["failed"] and not spool.healthy
