"""The encrypted spool: plaintext digests, reads through the Spool, and keys rotate."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from gateway.cli_keys import _rewrap_spool
from gateway.crypto import keys as node_keys
from gateway.crypto.envelope import EnvelopeWriter, read_header
from gateway.errors import IntegrityError
from gateway.spool.store import Spool


def _put(spool: Spool, data: bytes) -> str:
    assert spool.keyring is not None
    temp = spool.incoming / os.urandom(8).hex()
    with temp.open("wb") as f, EnvelopeWriter(f, spool.keyring.current, 1024) as writer:
        writer.write(data)
    size, sha = spool.digest(temp)
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    return spool.commit(temp, size=size, sha256=sha).key


def _key_id(path: Path) -> str:
    with path.open("rb") as f:
        return read_header(f).key_id


def test_written_before_and_after_rotation_reads_back(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node_keys.init_node_keys(state, hybrid=False)
    spool = Spool(tmp_path / "spool", keyring=node_keys.load_keyring(state))
    old_id = spool.keyring.current.key_id if spool.keyring else ""
    before = os.urandom(5000)
    key_before = _put(spool, before)
    with spool.open(key_before) as f:
        assert f.read() == before

    keyring = node_keys.rotate(state)
    assert keyring.current.key_id != old_id
    assert _rewrap_spool(tmp_path / "spool", keyring) == 1
    assert _key_id(spool.path_of(key_before)) == keyring.current.key_id
    assert _rewrap_spool(tmp_path / "spool", keyring) == 0  # idempotent

    # a node still holding the old keyring reloads it on an unknown key id
    stale = Spool(
        tmp_path / "spool",
        keyring=spool.keyring,
        reload_keyring=lambda: node_keys.load_keyring(state),
    )
    with stale.open(key_before) as f:
        assert f.read() == before

    fresh = Spool(tmp_path / "spool", keyring=node_keys.load_keyring(state))
    after = os.urandom(3000)
    key_after = _put(fresh, after)
    assert _key_id(fresh.path_of(key_after)) == keyring.current.key_id
    with fresh.open(key_before) as f:
        f.seek(1000)
        assert f.read(10) == before[1000:1010]
    with fresh.open(key_after) as f:
        assert f.read() == after


def test_spool_reads_fail_on_tampering(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node_keys.init_node_keys(state, hybrid=False)
    spool = Spool(tmp_path / "spool", keyring=node_keys.load_keyring(state))
    key = _put(spool, os.urandom(4000))
    path = spool.path_of(key)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        spool.digest(path)
    path.write_bytes(bytes(raw[:-5]))
    with pytest.raises(IntegrityError):
        spool.open(key)


def test_write_file_is_an_envelope(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node_keys.init_node_keys(state, hybrid=False)
    spool = Spool(tmp_path / "spool", keyring=node_keys.load_keyring(state))
    target = spool.root / "outgoing" / "x.dcm"
    target.parent.mkdir(parents=True)
    spool.write_file(target, b"DICM" * 100)
    assert b"DICM" not in target.read_bytes()
    assert spool.holds(target) and not spool.holds(tmp_path / "elsewhere")
    with spool.open_path(target) as f:
        assert f.read() == b"DICM" * 100
    read_header(io.BytesIO(target.read_bytes()))


@pytest.mark.parametrize("durable, syncs", [(True, 2), (False, 0)])
def test_write_file_fsyncs_only_when_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool, syncs: int
) -> None:
    """Prepared delivery files (durable=False: removed at start, never read after a crash)
    skip the file and folder fsyncs; they are still encrypted and written atomically."""
    state = tmp_path / "state"
    node_keys.init_node_keys(state, hybrid=False)
    spool = Spool(tmp_path / "spool", keyring=node_keys.load_keyring(state))
    target = spool.root / "outgoing" / "x.dcm"
    target.parent.mkdir(parents=True)
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    spool.write_file(target, b"DICM" * 100, durable=durable)
    assert len(calls) == syncs
    assert b"DICM" not in target.read_bytes()
    with spool.open_path(target) as f:
        assert f.read() == b"DICM" * 100
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]  # no temporary left
