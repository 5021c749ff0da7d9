"""pynetdicom's reads of spool files: the verified plaintext, and within one_reader() one
reader (one decryption) for a send's two opens of the same file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import dimse_messages, dsutils
from pynetdicom.dsutils import split_dataset

from gateway.crypto.keys import init_node_keys, load_keyring
from gateway.dicom import spool_io
from gateway.errors import IntegrityError
from gateway.spool.store import Spool
from tests.support.datasets import make_instance


@pytest.fixture
def spooled(tmp_path: Path) -> Iterator[tuple[Spool, Path, bytes]]:
    init_node_keys(tmp_path / "state", hybrid=False)
    spool = Spool(tmp_path / "spool", keyring=load_keyring(tmp_path / "state"))
    plain = make_instance(tmp_path / "in.dcm", Rows=64, Columns=64).read_bytes()
    path = spool.incoming / "x.dcm"
    spool.write_file(path, plain)
    opens: list[Path] = []
    real = spool.open_path

    def counting(p: Path) -> object:
        opens.append(p)
        return real(p)

    spool.open_path = counting  # type: ignore[method-assign]
    spool.opens = opens  # type: ignore[attr-defined]
    saved = (dimse_messages.__dict__.get("open"), dsutils.__dict__.get("open"))
    spool_io.install(spool)
    try:
        yield spool, path, plain
    finally:
        spool_io.install(None)
        for module, value in zip((dimse_messages, dsutils), saved, strict=True):
            if value is None:
                module.__dict__.pop("open", None)
            else:
                module.open = value  # type: ignore[attr-defined]


def _send_reads(path: Path) -> bytes:
    """What a send of ``path`` reads: split_dataset's File Meta, then the data set from its
    offset (as gateway.dicom.commands.send_file_store reads it)."""
    _meta, offset = split_dataset(path)
    with spool_io.open_plain(path) as f:
        f.seek(offset)
        return bytes(f.read())


def test_a_send_decrypts_the_file_once_within_one_reader(
    spooled: tuple[Spool, Path, bytes],
) -> None:
    spool, path, plain = spooled
    _meta, offset = split_dataset(path.parent.parent.parent / "in.dcm")  # the plaintext
    with spool_io.one_reader():
        data = _send_reads(path)
    assert data == plain[offset:]
    assert spool.opens == [path]  # type: ignore[attr-defined]


def test_without_one_reader_each_open_is_its_own(spooled: tuple[Spool, Path, bytes]) -> None:
    spool, path, plain = spooled
    data = _send_reads(path)
    assert plain.endswith(data)
    assert spool.opens == [path, path]  # type: ignore[attr-defined]


def test_the_shared_reader_is_closed_with_the_block(spooled: tuple[Spool, Path, bytes]) -> None:
    _spool, path, _plain = spooled
    with spool_io.one_reader():
        f = spool_io.open_plain(path)
        f.close()  # the caller's close leaves the shared reader open ...
        with pytest.raises(ValueError):
            f.read(1)
        g = spool_io.open_plain(path)
        assert g.read(4) != b""  # ... for the next open, from the start
        shared = spool_io._scope.readers[path]
    assert shared.closed  # ... and the block's end closes it


def test_a_tampered_file_still_fails_within_one_reader(
    spooled: tuple[Spool, Path, bytes],
) -> None:
    _spool, path, _plain = spooled
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 1
    path.write_bytes(bytes(raw))
    with spool_io.one_reader(), pytest.raises(IntegrityError):
        _send_reads(path)


def test_holds_only_paths_inside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    inside = [spool.root / "objects" / "ab" / "x.dcm", f"{spool.root}/incoming/y", spool.root]
    outside = [
        tmp_path / "spool2" / "x.dcm",  # a sibling whose name starts with the spool's
        spool.root / ".." / "spool2" / "x.dcm",
        f"{spool.root}/objects/../../etc/passwd",
        tmp_path / "x.dcm",
        42,
        "bad\0path",
    ]
    assert all(spool.holds(p) for p in inside)  # type: ignore[arg-type]
    assert not any(spool.holds(p) for p in outside)  # type: ignore[arg-type]
