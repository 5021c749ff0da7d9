"""Key files on disk: creation, permissions, refusal, rotation and rewrapping."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from gateway.crypto.envelope import EnvelopeWriter, decrypt_to, encrypt_bytes, read_header
from gateway.crypto.keys import (
    CURRENT_KEK,
    HPKE_HYBRID_KEY,
    HPKE_X25519_KEY,
    SIGNING_KEY,
    init_node_keys,
    keys_dir,
    load_hpke_hybrid_key,
    load_hpke_key,
    load_keyring,
    load_signing_key,
    rewrap,
    rotate,
)
from gateway.errors import CryptoError

SEG = 1024


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_private_files_and_is_idempotent(tmp_path: Path) -> None:
    first = init_node_keys(tmp_path)
    assert set(first.created) >= {CURRENT_KEK, SIGNING_KEY, HPKE_X25519_KEY, HPKE_HYBRID_KEY}
    assert first.existing == ()
    directory = keys_dir(tmp_path)
    assert mode(directory) == 0o700
    files = sorted(directory.iterdir())
    assert len(files) == 5
    assert all(mode(p) == 0o600 for p in files)
    before = {p.name: p.read_bytes() for p in files}
    second = init_node_keys(tmp_path)
    assert second.created == ()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    load_signing_key(tmp_path)
    load_hpke_key(tmp_path)
    load_hpke_hybrid_key(tmp_path)


def test_group_readable_key_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    init_node_keys(tmp_path, hybrid=False)
    path = keys_dir(tmp_path) / SIGNING_KEY
    path.chmod(0o644)
    with pytest.raises(CryptoError, match=str(path)) as info:
        load_signing_key(tmp_path)
    assert "0644" in str(info.value)
    kek_file = next(keys_dir(tmp_path).glob("kek-*.key"))
    kek_file.chmod(0o640)
    with pytest.raises(CryptoError, match=str(kek_file)):
        load_keyring(tmp_path)


def test_open_key_directory_and_symlinks_are_refused(tmp_path: Path) -> None:
    init_node_keys(tmp_path, hybrid=False)
    directory = keys_dir(tmp_path)
    directory.chmod(0o755)
    with pytest.raises(CryptoError, match="group/other"):
        load_keyring(tmp_path)
    directory.chmod(0o700)
    target = directory / HPKE_X25519_KEY
    moved = tmp_path / "elsewhere.key"
    target.rename(moved)
    target.symlink_to(moved)
    with pytest.raises(CryptoError, match=str(target)):
        load_hpke_key(tmp_path)


def test_missing_and_malformed_keys(tmp_path: Path) -> None:
    with pytest.raises(CryptoError, match="keys init"):
        load_keyring(tmp_path)
    init_node_keys(tmp_path, hybrid=False)
    with pytest.raises(CryptoError, match="missing"):
        load_hpke_hybrid_key(tmp_path)
    bad = keys_dir(tmp_path) / SIGNING_KEY
    bad.unlink()
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(CryptoError, match="PKCS#8"):
        load_signing_key(tmp_path)


def test_key_material_never_in_repr(tmp_path: Path) -> None:
    init_node_keys(tmp_path, hybrid=False)
    keyring = load_keyring(tmp_path)
    secret = keyring.current.secret
    assert secret.hex() not in repr(keyring) + repr(keyring.current)
    assert repr(secret) not in repr(keyring.current)


def test_rotation_old_and_new_envelopes_read_back(tmp_path: Path) -> None:
    init_node_keys(tmp_path, hybrid=False)
    old_ring = load_keyring(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    before = spool / "before.env"
    before.write_bytes(encrypt_bytes(b"before" * 1000, old_ring.current, segment_size=SEG))

    new_ring = rotate(tmp_path)
    assert new_ring.current.key_id != old_ring.current.key_id
    assert new_ring.key_ids == {old_ring.current.key_id, new_ring.current.key_id}
    assert load_keyring(tmp_path).current == new_ring.current
    after = spool / "after.env"
    with open(after, "wb") as f, EnvelopeWriter(f, new_ring.current, SEG) as w:
        w.write(b"after" * 1000)

    for path, data in ((before, b"before" * 1000), (after, b"after" * 1000)):
        out = io.BytesIO()
        decrypt_to(path, out, new_ring)
        assert out.getvalue() == data

    segments_before = before.read_bytes()[len(read_header(io.BytesIO(before.read_bytes())).raw) :]
    assert rewrap(before, new_ring) is True
    assert rewrap(before, new_ring) is False
    raw = before.read_bytes()
    header = read_header(io.BytesIO(raw))
    assert header.key_id == new_ring.current.key_id
    assert raw[len(header.raw) :] == segments_before

    # The rewrapped envelope opens with the new KEK alone, not with the old one.
    out = io.BytesIO()
    decrypt_to(before, out, new_ring.current)
    assert out.getvalue() == b"before" * 1000
    with pytest.raises(CryptoError):
        decrypt_to(before, io.BytesIO(), old_ring)
