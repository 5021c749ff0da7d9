"""A minimal walk of an encoded Explicit VR Little Endian file, for the leak gate.

``searched_values(data)`` lists (path, VR, value bytes) of every element at every depth (file
meta as ``meta/...``, sequence items as ``(gggg,eeee)[i]/...``; pixel data, which the gate does
not search, left out) in file order, without pydicom's data sets: the leak gate reads the
engine's output once per instance and pydicom's reader costs more than the search. It knows
only what the engine writes; anything else (another transfer syntax, a VR it does not know, a
UN or undefined length other than a sequence's or encapsulated pixel data's, group 0002
outside the file meta, a length that runs past its container, trailing bytes) returns None,
and the gate parses the output with pydicom instead: never a shortcut to "clean".
"""

from __future__ import annotations

import struct

_HEAD = struct.Struct("<HH2s")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ITEM = struct.Struct("<HHI")
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UR"})
_LONG_VRS = _LONG_VRS | {b"UT", b"UV"}
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT"}
    | {b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
_EXPLICIT_LE = b"1.2.840.10008.1.2.1"
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset({_PIXEL_DATA, 0x7FE00008, 0x7FE00009})  # (float, double) pixel data

Found = list[tuple[str, str, bytes]]


class _Unknown(Exception):
    """Something this walk does not handle: the caller falls back to pydicom."""


def searched_values(data: bytes, transfer_syntaxes: frozenset[bytes]) -> Found | None:
    """(path, VR, value) of every non-sequence element of ``data``, or None (see module doc).

    ``transfer_syntaxes``: the Explicit VR Little Endian syntaxes accepted (encoded, no
    padding), besides Explicit VR Little Endian itself.
    """
    try:
        return _walk_file(data, transfer_syntaxes)
    except (_Unknown, struct.error, IndexError, UnicodeDecodeError):
        return None


def _walk_file(data: bytes, syntaxes: frozenset[bytes]) -> Found:
    if len(data) < 132 or data[128:132] != b"DICM":
        raise _Unknown
    found: Found = []
    pos = 132
    end = len(data)
    ts: bytes | None = None
    while pos < end and _U16.unpack_from(data, pos)[0] == 0x0002:
        tag, vr, length, pos = _header(data, pos, end)
        if length == _UNDEFINED or vr == "SQ":
            raise _Unknown
        value = data[pos : pos + length]
        pos += length
        if tag == 0x00020010:
            ts = value.rstrip(b"\x00 ")
        found.append((_path("meta/", tag), vr, value))
    if ts is None or (ts != _EXPLICIT_LE and ts not in syntaxes):
        raise _Unknown
    pos = _walk(data, pos, end, "", found, top=True)
    if pos != end:
        raise _Unknown
    return found


def _header(data: bytes, pos: int, end: int) -> tuple[int, str, int, int]:
    group, elem, raw_vr = _HEAD.unpack_from(data, pos)
    if raw_vr in _SHORT_VRS:
        length = _U16.unpack_from(data, pos + 6)[0]
        pos += 8
    elif raw_vr in _LONG_VRS:
        length = _U32.unpack_from(data, pos + 8)[0]
        pos += 12
    else:
        raise _Unknown  # UN and anything unknown: pydicom decides
    if length != _UNDEFINED and pos + length > end:
        raise _Unknown
    return group << 16 | elem, raw_vr.decode("ascii"), length, pos


def _path(prefix: str, tag: int) -> str:
    return f"{prefix}({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _walk(data: bytes, pos: int, end: int, prefix: str, found: Found, *, top: bool) -> int:
    """Elements from ``pos`` up to ``end`` or, in an undefined-length item, its delimiter."""
    while pos < end:
        group = _U16.unpack_from(data, pos)[0]
        if group == 0xFFFE:
            if top:
                raise _Unknown
            return pos  # an item delimiter: the caller checks it
        if group == 0x0002:
            raise _Unknown
        tag, vr, length, pos = _header(data, pos, end)
        path = _path(prefix, tag)
        if vr == "SQ":
            pos = _sequence(data, pos, end, length, path, found)
            continue
        if length == _UNDEFINED:
            if tag != _PIXEL_DATA:
                raise _Unknown
            pos = _fragments(data, pos, end)
            continue
        if tag not in _PIXEL_TAGS:  # pixel data is never searched: not copied either
            found.append((path, vr, data[pos : pos + length]))
        pos += length
    return pos


def _sequence(data: bytes, pos: int, end: int, length: int, path: str, found: Found) -> int:
    stop = end if length == _UNDEFINED else pos + length
    index = 0
    while pos < stop:
        group, elem, item_length = _ITEM.unpack_from(data, pos)
        pos += 8
        if group != 0xFFFE:
            raise _Unknown
        if elem == 0xE0DD:  # sequence delimiter
            if length != _UNDEFINED or item_length != 0:
                raise _Unknown
            return pos
        if elem != 0xE000:
            raise _Unknown
        prefix = f"{path}[{index}]/"
        index += 1
        if item_length == _UNDEFINED:
            pos = _walk(data, pos, stop, prefix, found, top=False)
            group, elem, zero = _ITEM.unpack_from(data, pos)
            if (group, elem, zero) != (0xFFFE, 0xE00D, 0):
                raise _Unknown
            pos += 8
        else:
            item_end = pos + item_length
            if item_end > stop:
                raise _Unknown
            if _walk(data, pos, item_end, prefix, found, top=True) != item_end:
                raise _Unknown
            pos = item_end
    if length == _UNDEFINED or pos != stop:
        raise _Unknown  # no delimiter, or items running past the sequence's length
    return pos


def _fragments(data: bytes, pos: int, end: int) -> int:
    """Skip encapsulated pixel data: items up to the sequence delimiter."""
    while True:
        group, elem, length = _ITEM.unpack_from(data, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000) or length == _UNDEFINED or pos + length > end:
            raise _Unknown
        pos += length
