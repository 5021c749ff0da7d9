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
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Any, BinaryIO

from pynetdicom import dimse_messages, dsutils

from gateway.spool.store import Spool

_spool: Spool | None = None


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
    return spool.open_path(Path(file))


def open_plain(path: Path) -> BinaryIO:
    """The plaintext of ``path``: a spool file decrypted and verified, any other file as is."""
    spool = _in_spool(path)
    return builtins.open(path, "rb") if spool is None else spool.open_path(path)
