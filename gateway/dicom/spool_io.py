"""Plaintext of the encrypted spool at the pynetdicom boundary.

Spool files are envelopes (:mod:`gateway.crypto.envelope`). pynetdicom sends a data set from
a file by opening the path itself: ``dimse_messages`` calls the builtin ``open(path, "rb")``,
seeks to the end for the length and reads chunks, and ``Association.send_c_store`` calls
``dsutils.split_dataset(path)``, which also opens the path, for the file meta and the data
set's offset. Neither takes a file object, so :func:`install` gives those two modules (and
only them) a module-level ``open`` that returns the spool's seekable, verifying plaintext
reader for a path inside the spool and is the builtin ``open`` for anything else. A module
global shadows the builtin for that module's own code alone; nothing else in the process
sees it. StoreSCU, C-MOVE/C-GET sub-operations and the decompression fallback
(:func:`open_plain`) all read through it, so corrupted bytes raise IntegrityError instead
of being sent.

Sending one file, pynetdicom opens it twice: ``split_dataset`` for the File Meta, then the
data set's fragments. Each open of an envelope decrypts and verifies its final segment (a CT
instance's only one, ~0.35 ms for 513 KB). Within :func:`one_reader` the opens of one spool
file on that thread share one reader, so its segments are decrypted and verified once.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from pynetdicom import dimse_messages, dsutils

from gateway.spool.store import Spool

_spool: Spool | None = None
_scope = threading.local()  # .readers: the open readers of the thread's one_reader()


def install(spool: Spool | None) -> None:
    """Route pynetdicom's reads of files inside ``spool`` through its plaintext reader."""
    global _spool
    _spool = spool
    dimse_messages.open = _open  # type: ignore[attr-defined]
    dsutils.open = _open  # type: ignore[attr-defined]


def _in_spool(file: object) -> Spool | None:
    spool = _spool
    if spool is None or spool.keyring is None or not isinstance(file, str | os.PathLike):
        return None
    return spool if spool.holds(file) else None


def _open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    spool = _in_spool(file) if mode == "rb" and not args and not kwargs else None
    if spool is None:
        return builtins.open(file, mode, *args, **kwargs)
    return _reader(spool, Path(file))


def open_plain(path: Path) -> BinaryIO:
    """The plaintext of ``path``: a spool file decrypted and verified, any other file as is."""
    spool = _in_spool(path)
    return builtins.open(path, "rb") if spool is None else _reader(spool, path)


@contextlib.contextmanager
def one_reader() -> Iterator[None]:
    """Within: the opens of one spool file on this thread share one reader (see the
    module's doc), closed when the block ends. For one send at a time."""
    readers: dict[Path, BinaryIO] = {}
    _scope.readers = readers
    try:
        yield
    finally:
        _scope.readers = None
        for reader in readers.values():
            reader.close()


def _reader(spool: Spool, path: Path) -> BinaryIO:
    readers: dict[Path, BinaryIO] | None = getattr(_scope, "readers", None)
    if readers is None:
        return spool.open_path(path)
    reader = readers.get(path)
    if reader is None:
        reader = readers[path] = spool.open_path(path)
    reader.seek(0)
    return cast(BinaryIO, _Shared(reader))


class _Shared(io.RawIOBase):
    """A reader :func:`one_reader` shares: closing it leaves the reader open."""

    def __init__(self, reader: BinaryIO) -> None:
        super().__init__()
        self._reader = reader

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed reader")
        return self._reader.read(-1 if size is None else size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("seek on a closed reader")
        return self._reader.seek(offset, whence)

    def tell(self) -> int:
        return self._reader.tell()
