"""De-identify one DICOM file into a folder: the seam the delivery worker and the CLI call.

This is the only module of :mod:`gateway.deid` that touches files other than its own data: it reads
the input, runs :func:`~gateway.deid.engine.deidentify`, writes the output to bytes, runs the leak
gate on those bytes and only then writes them (atomically) under ``out_dir``. Every failure raises
:class:`~gateway.errors.DeidError` (:class:`~gateway.errors.LeakError` for the gate) and leaves no
output file behind.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.tag import tag_in_exception
from pydicom.uid import DeflatedExplicitVRLittleEndian

from gateway.deid.burned_in import CLEAN_PIXEL_DATA_CODE, clean_instance
from gateway.deid.engine import Report, deidentify
from gateway.deid.keys import ProjectKey
from gateway.deid.leak import leak_check
from gateway.deid.ocr import OcrEngine, default_engine
from gateway.deid.profiles import Profile
from gateway.errors import DeidError, LeakError


@dataclass(frozen=True)
class DeidResult:
    path: Path  # the de-identified file, named by its new SOP Instance UID
    sop_instance_uid: str
    report: Report


def deidentify_bytes(
    data: bytes, profile: Profile, key: ProjectKey, *, ocr: OcrEngine | None = None
) -> tuple[bytes, str, Report]:
    """De-identify an encoded instance; return (output bytes, new SOP Instance UID, report).

    With a profile that has Clean Pixel Data (``[pixels]``), burned-in text is cleaned and
    checked by OCR (``ocr``, default: the process's shared engine) before the output is written.
    """
    return _deidentify_source(BytesIO(data), profile, key, ocr)


def _deidentify_source(
    src: BinaryIO | str, profile: Profile, key: ProjectKey, ocr: OcrEngine | None
) -> tuple[bytes, str, Report]:
    try:
        original = dcmread(src, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DeidError(f"input does not parse as DICOM: {type(exc).__name__}") from None
    out, report = deidentify(original, profile, key)
    if profile.pixels is not None:
        pixel_report = clean_instance(original, out, profile, engine=ocr or default_engine())
        report.pixels = pixel_report.to_dict()
        if pixel_report.ocr_passed:
            report.method_codes.append(CLEAN_PIXEL_DATA_CODE)
    try:
        encoded = encode(out)
    except Exception as exc:  # noqa: BLE001 - fail closed: an unwritable output never leaves
        raise DeidError(f"output cannot be encoded: {type(exc).__name__}") from None
    hits = leak_check(original, encoded, profile=profile)
    if hits:
        raise LeakError(hits)
    return encoded, str(out.SOPInstanceUID), report


def encode(out: Dataset) -> bytes:
    """The DICOM file of the engine's output (preamble, rebuilt file meta, data set).

    What ``save_as(enforce_file_format=True)`` writes, without its deep copy of the file meta
    (the engine's meta is new and ours to complete): the data set in its transfer syntax's
    encoding, native pixel data with its length, encapsulated with an undefined one. A deflated
    or private transfer syntax goes through ``save_as``.
    """
    meta = out.file_meta
    ts = meta.get("TransferSyntaxUID")
    if (
        ts is None
        or ts.is_private
        or not ts.is_transfer_syntax
        or ts == DeflatedExplicitVRLittleEndian
    ):
        buf = BytesIO()
        out.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = ts.is_implicit_VR, ts.is_little_endian
    preamble = out.preamble
    fp.write(preamble if preamble is not None and len(preamble) == 128 else b"\x00" * 128)
    fp.write(b"DICM")
    meta_bytes = _meta_bytes(meta)
    if meta_bytes is None:
        write_file_meta_info(fp, meta, enforce_standard=True)  # validates the meta
    else:
        fp.write(meta_bytes)
    pixels = out.get_item(0x7FE00010)
    if pixels is not None and not (
        isinstance(pixels, RawDataElement)
        and pixels.VR in ("OB", "OW")
        and (pixels.length == UNDEFINED_LENGTH) == bool(ts.is_compressed)
    ):
        out["PixelData"].is_undefined_length = ts.is_compressed
    if (ts.is_implicit_VR, ts.is_little_endian) == (False, True) == out.original_encoding and (
        out.original_character_set == out._character_set
    ):
        chunks = _explicit_le_chunks(out)
        if chunks is not None:
            return b"".join([fp.getvalue(), *chunks])
    write_dataset(fp, out)
    return bytes(fp.getvalue())


UNDEFINED_LENGTH = 0xFFFFFFFF
_META_REQUIRED = (0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012)


def _meta_bytes(meta: Dataset) -> bytes | None:
    """The engine's file meta (PS3.10 7.1) in Explicit VR Little Endian with its group length:
    what ``write_file_meta_info(enforce_standard=True)`` writes for it, or None (then that
    writes it) when an element is not a plain ASCII UI, SH or OB value or one is missing."""
    body: list[bytes] = []
    present = set()
    for tag in sorted(meta.keys()):
        if tag == 0x00020000:
            continue
        elem = meta.get_item(tag)
        if elem is None or isinstance(elem, RawDataElement) or tag >> 16 != 2:
            return None
        vr, value = elem.VR, elem.value
        if vr == "OB" and isinstance(value, bytes):
            data = value + b"\x00" * (len(value) & 1)
            body.append(_LONG.pack(2, tag & 0xFFFF, b"OB", len(data)) + data)
        elif vr in ("UI", "SH") and isinstance(value, str) and value.isascii() and value:
            data = value.encode("ascii")
            data += (b"\x00" if vr == "UI" else b" ") * (len(data) & 1)
            if len(data) > 64:
                return None
            body.append(_SHORT.pack(2, tag & 0xFFFF, vr.encode("ascii"), len(data)) + data)
        else:
            return None
        present.add(int(tag))
    if any(t not in present for t in _META_REQUIRED):
        return None
    joined = b"".join(body)
    return _SHORT.pack(2, 0, b"UL", 4) + struct.pack("<I", len(joined)) + joined


_LENGTH_32 = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)


def _explicit_le_chunks(ds: Dataset) -> list[bytes] | None:
    """``write_dataset`` of a data set read in Explicit VR Little Endian, to the same encoding.

    Elements still as read (raw, defined length, a two-letter VR, a value that fits its length
    field) are copied with their header rebuilt, the bytes pydicom's writer would produce for
    them; every other element (new values, sequences, undefined lengths) goes through
    ``write_data_element``. The value bytes are joined once (pixel data copied once).
    """
    chunks: list[bytes] = []
    encoding = ds.get("SpecificCharacterSet", default_encoding)
    for tag, elem in sorted(ds._dict.items()):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # retired group lengths are not written (PS3.5 7.2)
        if isinstance(elem, RawDataElement) and elem.value is None:
            elem = ds.get_item(tag)  # no value (deferred or empty): as get_item does
        if elem is None:
            continue
        vr = elem.VR
        value = elem.value
        if (
            isinstance(elem, RawDataElement)
            and isinstance(value, bytes)
            and vr is not None
            and len(vr) == 2
            and elem.length != UNDEFINED_LENGTH
        ):
            n = len(value)
            if vr in _LENGTH_32:
                head = _LONG.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), n)
                chunks += (head, value)
                continue
            if n <= 0xFFFF:
                chunks += (_SHORT.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), n), value)
                continue
        if vr is None or len(vr) != 2:
            return None  # an ambiguous or unknown VR: pydicom's write_dataset resolves it
        data = _plain_text(value, vr) if vr in _PLAIN_TEXT_VRS else None
        if data is not None:
            n = len(data)
            if vr in _LENGTH_32:
                chunks += (_LONG.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), n), data)
                continue
            if n <= 0xFFFF:
                chunks += (_SHORT.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), n), data)
                continue
        buf = DicomBytesIO()
        buf.is_implicit_VR, buf.is_little_endian = False, True
        with tag_in_exception(tag):
            write_data_element(buf, elem, encoding)
        chunks.append(buf.getvalue())
    return chunks


# VRs pydicom writes as their text joined by backslashes, padded to even length with a space
# (UI: NUL), in the data set's character set (the same bytes for ASCII text)
_PLAIN_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)


def _plain_text(value: object, vr: str) -> bytes | None:
    """The bytes pydicom writes for a new text value of ``vr``, or None when it is not plain
    ASCII text (numbers, dates as objects, non-ASCII: pydicom writes those)."""
    if value is None:
        return b""
    if isinstance(value, str):
        text = value
    elif isinstance(value, MultiValue | list) and value and all(isinstance(v, str) for v in value):
        text = "\\".join(value)
    else:
        return None
    if not text.isascii():
        return None
    data = text.encode("ascii")
    if len(data) & 1:
        data += b"\x00" if vr == "UI" else b" "
    return data


_LONG = struct.Struct("<HH2s2xI")
_SHORT = struct.Struct("<HH2sH")


def deidentify_file(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    profile: Profile,
    key: ProjectKey,
    *,
    ocr: OcrEngine | None = None,
) -> DeidResult:
    """De-identify the file ``src`` into ``out_dir/<new SOP Instance UID>.dcm``."""
    try:
        source = Path(src).open("rb")
    except OSError as exc:
        raise DeidError(f"cannot read input: {exc.strerror}") from None
    with source:  # read by pydicom from the file: no copy of the whole file in memory first
        encoded, uid, report = _deidentify_source(source, profile, key, ocr)
    target_dir = Path(out_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{uid}.dcm"
    fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=".deid-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encoded)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DeidError(f"cannot write output to {target_dir}: {exc.strerror}") from None
    return DeidResult(target, uid, report)
