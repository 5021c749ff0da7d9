"""Reading a received data set's header, defensively.

Reading is tolerant where pydicom's is (PS3.5 quirks are warnings), but a data set that
cannot be parsed, is truncated, or nests sequences deeper than the configured limit is
refused with 0xC000 (Cannot Understand) before anything is stored.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from gateway.crypto.envelope import PositionedReader
from gateway.dicom import status as st
from gateway.errors import IngestError
from gateway.received import DECODE_ERRORS

_DEFER = 8192
_UNPARSEABLE: tuple[type[Exception], ...] = (InvalidDicomError, *DECODE_ERRORS)
_PREAMBLE = 128
_MAGIC = b"DICM"
_GROUP_LENGTH = 0x00020000
_GROUP_LENGTH_BYTES = 12  # (0002,0000) UL, Explicit VR Little Endian: tag, VR, length, value


def read_header(
    path: Path,
    *,
    max_depth: int,
    opener: Callable[[Path], BinaryIO] | None = None,
    transfer_syntax: str | None = None,
) -> Dataset:
    """Parse ``path`` (a DICOM file) keeping large values on disk; check it is whole.

    ``opener`` gives the file's plaintext as a seekable file object (the spool's verifying
    envelope reader, :meth:`gateway.spool.store.Spool.open_path`); the extent check is
    against the plaintext's length. Values over 8 KiB (Pixel Data among them) are deferred
    and never read: the reader is closed on return, so a later read of one fails with
    ValueError instead of bringing it into memory.

    ``transfer_syntax`` is for a file whose File Meta the node wrote itself (a received
    data set: the presentation context's transfer syntax, which its File Meta states): the
    data set is then read from the end of that group (its group length, read by pydicom)
    without pydicom's reading and checking of the rest of it, which took ~40 % of a small
    instance's parse. The data set is a plain ``Dataset`` then (no ``file_meta``). A file
    that does not begin as such a file (no preamble, no group length), or a deflated
    transfer syntax, is read by ``dcmread`` as any other.
    """
    try:
        if opener is None:
            size = path.stat().st_size
            ds: Dataset = dcmread(path, defer_size=_DEFER)
            _check(ds, size, max_depth)
        else:
            with opener(path) as fp:
                size = fp.seek(0, io.SEEK_END)
                fp.seek(0)
                ds = _read(fp, transfer_syntax)
                _check(ds, size, max_depth)
    except RecursionError as exc:
        raise IngestError(st.CANNOT_UNDERSTAND, "sequence-nesting-too-deep") from exc
    except IngestError:
        raise
    except _UNPARSEABLE as exc:
        raise IngestError(st.CANNOT_UNDERSTAND, "dataset-unparseable") from exc
    return ds


def _read(fp: BinaryIO, transfer_syntax: str | None) -> Dataset:
    """The data set of ``fp`` (at its start): after the File Meta the node wrote, in
    ``transfer_syntax``, where :func:`_data_set_start` finds it; else ``dcmread``'s."""
    syntax = UID(transfer_syntax) if transfer_syntax else None
    if (
        syntax is not None
        and syntax.is_transfer_syntax
        and syntax != DeflatedExplicitVRLittleEndian
    ):
        start = _data_set_start(fp)
        if start is not None:
            fp.seek(start)
            return read_dataset(
                fp, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=_DEFER
            )
        fp.seek(0)
    return dcmread(fp, defer_size=_DEFER)


def _data_set_start(fp: BinaryIO) -> int | None:
    """Where the data set begins: after the preamble, ``DICM`` and the File Meta group,
    whose length pydicom reads from its group length element; None when ``fp`` does not
    begin so."""
    if fp.read(_PREAMBLE + len(_MAGIC))[_PREAMBLE:] != _MAGIC:
        return None
    meta = read_dataset(fp, False, True, bytelength=_GROUP_LENGTH_BYTES)
    if _GROUP_LENGTH not in meta:
        return None
    length = meta[_GROUP_LENGTH].value
    if not isinstance(length, int):
        return None
    return _PREAMBLE + len(_MAGIC) + _GROUP_LENGTH_BYTES + length


class PrefixedReader(PositionedReader):
    """A file's plaintext served from its first bytes held in memory, ``open_file`` opened
    (once, lazily) only for a read that reaches past them.

    For a received data set whose start the receive buffer kept (the bytes written to the
    spool file, so both sources agree): the header of nearly every instance lies in the
    prefix, and parsing it costs no re-open and no decryption of the file's first segment.
    ``size`` is the whole plaintext's length. Reads after :meth:`close` raise ValueError.
    """

    def __init__(self, prefix: bytes, size: int, open_file: Callable[[], BinaryIO]) -> None:
        super().__init__()
        if len(prefix) > size:
            raise ValueError("prefix longer than the file")
        self._prefix = prefix
        self.size = size
        self._open_file = open_file
        self._file: BinaryIO | None = None
        self._pos = 0

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed reader")
        pos = self._pos
        end = self.size if size is None or size < 0 else min(self.size, pos + size)
        if end <= len(self._prefix) or pos >= self.size:  # in the prefix, or at the end
            self._pos = max(pos, end)
            return self._prefix[pos:end]
        if self._file is None:
            self._file = self._open_file()
        self._file.seek(pos)
        data = self._file.read(end - pos) if end > pos else b""
        self._pos = pos + len(data)
        return data

    def close(self) -> None:
        if not self.closed and self._file is not None:
            self._file.close()
        super().close()


def _raw_elements(ds: Dataset) -> Iterator[DataElement | RawDataElement]:
    """The elements of ``ds`` without reading deferred values (``Dataset.elements()`` would
    read them: a 100 MB Pixel Data into memory)."""
    for tag in sorted(ds.keys()):
        yield ds.get_item(tag, keep_deferred=True)


def _check(ds: Dataset, size: int, max_depth: int) -> None:
    """One walk over the elements, each checked before it is read further:

    * at the top level, a value must lie inside the file (a declared length past the end is
      a lie; deferred values are not read yet, and pydicom reads a short value without
      complaint);
    * sequences, and UN values of undefined length that pydicom reads as sequences, may
      nest at most ``max_depth`` deep.
    """
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        for elem in _raw_elements(current):
            undefined = False  # a raw value of undefined length
            if isinstance(elem, RawDataElement):
                undefined = elem.length == 0xFFFFFFFF
                if depth == 0 and not undefined and elem.value_tell + elem.length > size:
                    raise IngestError(st.CANNOT_UNDERSTAND, "dataset-truncated")
            vr = _vr_of(current, elem)
            if vr != "SQ" and not (undefined and vr in (None, "UN")):
                continue
            value = current[elem.tag].value
            if not isinstance(value, Sequence):  # pydicom 3's Sequence is not a list
                continue
            if depth + 1 > max_depth:
                raise IngestError(st.CANNOT_UNDERSTAND, "sequence-nesting-too-deep")
            for item in value:
                if isinstance(item, Dataset):
                    stack.append((item, depth + 1))


def _vr_of(ds: Dataset, elem: DataElement | RawDataElement) -> str | None:
    """The VR pydicom will give the value when it is read: an Implicit VR element has none
    yet, and a defined-length sequence in it must not escape the depth check."""
    if elem.VR is not None or not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
        return elem.VR
    if elem.tag.is_private:
        return ds[elem.tag].VR
    try:
        return dictionary_VR(elem.tag)
    except KeyError:
        return None
