"""The 128-byte preamble of a DICOM file (PS3.10 7.1) on the way out (FAULTS A18).

The preamble is free for applications, so a file can be a DICOM file and an executable (an
ELF or PE header there: CVE-2019-11687). The node keeps what it received as it came (in the
encrypted spool) but never passes a preamble on: de-identified output is written with a zero
preamble, DIMSE carries none, and what is sealed for a peer is read through
:class:`ZeroPreambleReader`.
"""

from __future__ import annotations

from typing import BinaryIO

PREAMBLE = 128
_MAGIC = b"DICM"


class ZeroPreambleReader:
    """Reads ``src`` with the preamble zeroed when ``src`` is a DICOM file (``DICM`` at 128);
    anything else is passed through unchanged."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        head = b""
        while len(head) < PREAMBLE + len(_MAGIC):
            chunk = src.read(PREAMBLE + len(_MAGIC) - len(head))
            if not chunk:
                break
            head += chunk
        if head[PREAMBLE:] == _MAGIC:
            head = bytes(PREAMBLE) + head[PREAMBLE:]
        self._head = head

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size is None or size < 0:
                out, self._head = self._head + self._src.read(), b""
                return out
            out, self._head = self._head[:size], self._head[size:]
            if len(out) < size:
                out += self._src.read(size - len(out))
            return out
        return self._src.read(size)
