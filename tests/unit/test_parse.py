"""gateway.ingest.parse.read_header: whole files parse, broken or hostile ones answer 0xC000."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from gateway.dicom import file_meta
from gateway.dicom.status import CANNOT_UNDERSTAND
from gateway.errors import IngestError
from gateway.ingest import parse
from gateway.ingest.parse import PrefixedReader, read_header

CONTENT_SEQUENCE = 0x0040A730
ENCAPSULATED_DOCUMENT = 0x00420011
CODE_VALUE = 0x00080100
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
UNDEFINED = 0xFFFFFFFF


def _base(
    syntax: str = ExplicitVRLittleEndian, *, rows: int = 0, with_pixels: bool = False
) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CTImageStorage)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.PatientID = "P1"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if with_pixels:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = rows
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        arr = np.arange(rows * rows, dtype="<u2") % 4096
        ds.PixelData = arr.tobytes()
    return ds


def _save(ds: Dataset, path: Path, tail: bytes = b"") -> Path:
    """Write ``ds`` as a DICOM file, then raw element bytes (tags above the data set's)."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue() + tail)
    return path


def _element(tag: int, vr: bytes, value: bytes, *, explicit: bool, length: int = -1) -> bytes:
    n = len(value) if length < 0 else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<I", n) + value
    if vr in _LONG_VRS:
        return head + vr + b"\0\0" + struct.pack("<I", n) + value
    return head + vr + struct.pack("<H", n) + value


def _item(content: bytes, *, defined: bool) -> bytes:
    if defined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content
    return (
        struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED)
        + content
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    )


def _sequence(tag: int, items: list[bytes], *, explicit: bool, defined: bool) -> bytes:
    body = b"".join(items)
    if defined:
        return _element(tag, b"SQ", body, explicit=explicit)
    return _element(tag, b"SQ", body, explicit=explicit, length=UNDEFINED) + struct.pack(
        "<HHI", 0xFFFE, 0xE0DD, 0
    )


def _nested(depth: int, *, explicit: bool, defined: bool) -> bytes:
    """``depth`` Content Sequences, each the only element of its parent's one item."""
    content = _element(CODE_VALUE, b"SH", b"LEAF", explicit=explicit)
    for _ in range(depth):
        content = _sequence(
            CONTENT_SEQUENCE, [_item(content, defined=defined)], explicit=explicit, defined=defined
        )
    return content


def _depth_of(ds: Dataset) -> int:
    depth = 0
    current = ds
    while "ContentSequence" in current:
        current = current.ContentSequence[0]
        depth += 1
    assert current.CodeValue == "LEAF"
    return depth


def _read(path: Path, received: str | None = None, max_depth: int = 64) -> Dataset:
    """``read_header`` of ``path`` as a file, or, with ``received`` (its transfer syntax), as
    ingest reads a receive buffer: from the data set's start after its File Meta."""
    if received is None:
        return read_header(path, max_depth=max_depth)
    return read_header(
        path,
        max_depth=max_depth,
        opener=lambda p: BytesIO(p.read_bytes()),
        transfer_syntax=received,
    )


def _refused(path: Path, max_depth: int = 64, received: str | None = None) -> IngestError:
    with pytest.raises(IngestError) as info:
        _read(path, received, max_depth)
    assert info.value.status == CANNOT_UNDERSTAND
    return info.value


RECEIVED = [pytest.param(False, id="file"), pytest.param(True, id="received")]


SYNTAXES = [
    pytest.param(ExplicitVRLittleEndian, True, id="explicit"),
    pytest.param(ImplicitVRLittleEndian, False, id="implicit"),
]
LENGTHS = [pytest.param(True, id="defined"), pytest.param(False, id="undefined")]


# --- whole files --------------------------------------------------------------------------


@pytest.mark.parametrize(("syntax", "explicit"), SYNTAXES)
def test_good_file_parses(tmp_path: Path, syntax: str, explicit: bool) -> None:
    src = _base(syntax, rows=128, with_pixels=True)
    path = _save(src, tmp_path / "good.dcm")
    ds = read_header(path, max_depth=64)
    assert ds.SOPInstanceUID == src.SOPInstanceUID
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.Modality == "CT"
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.PixelData == src.PixelData  # deferred (32 KiB), read back from the file


def test_good_file_without_pixels_parses(tmp_path: Path) -> None:
    path = _save(_base(), tmp_path / "nopix.dcm")
    assert read_header(path, max_depth=64).PatientID == "P1"


# --- truncated ----------------------------------------------------------------------------


@pytest.mark.parametrize(("syntax", "explicit"), SYNTAXES)
@pytest.mark.parametrize("rows", [128, 32], ids=["deferred", "small"])
@pytest.mark.parametrize("cut", [1, 1000])
@pytest.mark.parametrize("received", RECEIVED)
def test_truncated_pixel_data_is_refused(
    tmp_path: Path, syntax: str, explicit: bool, rows: int, cut: int, received: bool
) -> None:
    path = _save(_base(syntax, rows=rows, with_pixels=True), tmp_path / "trunc.dcm")
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    err = _refused(path, received=syntax if received else None)
    assert "truncated" in err.reason or "unparseable" in err.reason


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on cut-off values
@pytest.mark.parametrize(("syntax", "explicit"), SYNTAXES)
@pytest.mark.parametrize("received", RECEIVED)
def test_any_cut_is_refused_with_0xC000_or_parses(
    tmp_path: Path, syntax: str, explicit: bool, received: bool
) -> None:
    """Cutting a file anywhere never leaks another exception; a cut inside a value refuses.

    (A cut exactly at, or inside the 8-byte header of, an element leaves a shorter but
    well-formed data set: pydicom stops there. Ingest then refuses missing attributes.)
    """
    path = _save(_base(syntax, rows=32, with_pixels=True), tmp_path / "cut.dcm")
    data = path.read_bytes()
    pixel_start = len(data) - 32 * 32 * 2
    refused = 0
    for end in range(132, len(data), 13):
        path.write_bytes(data[:end])
        try:
            _read(path, syntax if received else None)
        except IngestError as exc:
            assert exc.status == CANNOT_UNDERSTAND
            refused += 1
        else:
            assert end <= pixel_start, f"cut at {end} inside Pixel Data was accepted"
    assert refused > 0


@pytest.mark.parametrize(
    "content",
    [b"", b"not dicom at all", b"\0" * 128 + b"DICM\x02\x00\x00\x00UL\x04\x00\x10"],
    ids=["empty", "text", "cut-meta"],
)
@pytest.mark.parametrize("received", RECEIVED)
def test_garbage_is_refused(tmp_path: Path, content: bytes, received: bool) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(content)
    _refused(path, received=ExplicitVRLittleEndian if received else None)


# --- a receive buffer: the data set read after the node's own File Meta -------------------


def _received(ds: Dataset, syntax: str) -> bytes:
    """A receive buffer's bytes: preamble, ``DICM``, the File Meta the node writes for it
    (gateway.dicom.file_meta) and the data set as the sender encoded it."""
    body = Dataset()
    body.update(ds)  # its elements, not its file_meta
    buf = BytesIO()
    body.save_as(buf, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    meta = file_meta.encoded(ds.SOPClassUID, ds.SOPInstanceUID, syntax)
    return b"\0" * 128 + b"DICM" + meta + buf.getvalue()


@pytest.mark.parametrize(("syntax", "explicit"), SYNTAXES)
def test_received_data_set_is_read_after_the_file_meta_as_dcmread_reads_it(
    tmp_path: Path, syntax: str, explicit: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _base(syntax, rows=128, with_pixels=True)
    src.ImageComments = "x" * 6000  # past a prefix of 2 KiB
    path = tmp_path / "rx.dcm"
    path.write_bytes(_received(src, syntax))
    plain = read_header(path, max_depth=64)  # dcmread's
    with monkeypatch.context() as m:
        m.setattr(parse, "dcmread", None)  # not called: the File Meta is not read again
        got = _read(path, syntax)
        opened: list[int] = []
        prefixed = read_header(
            path,
            max_depth=64,
            opener=lambda _p: _prefixed(path, 2048, opened),
            transfer_syntax=syntax,
        )
    assert not hasattr(got, "file_meta")
    for ds in (got, prefixed):
        assert list(ds.keys()) == list(plain.keys())
        for tag in plain.keys():
            if tag != 0x7FE00010:  # deferred, not readable after the parse
                assert ds[tag].value == plain[tag].value
    assert opened == [1]


def test_received_deflated_data_set_is_read_by_dcmread(tmp_path: Path) -> None:
    """Deflated Explicit VR Little Endian is inflated by dcmread, not read after the meta."""
    src = _base(DeflatedExplicitVRLittleEndian)
    path = _save(src, tmp_path / "deflated.dcm")
    got = _read(path, DeflatedExplicitVRLittleEndian)
    assert got.StudyInstanceUID == src.StudyInstanceUID and got.PatientID == "P1"


@pytest.mark.parametrize(
    "content",
    [b"\0" * 132 + b"\x02\x00\x00\x00UL\x04\x00", b"\0" * 128 + b"DICX" + b"\0" * 40],
    ids=["cut-group-length", "no-magic"],
)
def test_received_buffer_not_beginning_as_a_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(content)
    _refused(path, received=ExplicitVRLittleEndian)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises((IngestError, OSError)):
        read_header(tmp_path / "absent.dcm", max_depth=64)


# --- sequence nesting ---------------------------------------------------------------------


@pytest.mark.parametrize(("syntax", "explicit"), SYNTAXES)
@pytest.mark.parametrize("defined", LENGTHS)
def test_300_deep_nesting_is_refused_not_a_recursion_error(
    tmp_path: Path, syntax: str, explicit: bool, defined: bool
) -> None:
    tail = _nested(300, explicit=explicit, defined=defined)
    path = _save(_base(syntax), tmp_path / "deep.dcm", tail)
    err = _refused(path)
    assert "deep" in err.reason


@pytest.mark.parametrize(("syntax", "explicit"), SYNTAXES)
@pytest.mark.parametrize("defined", LENGTHS)
def test_40_deep_nesting_passes_under_the_limit(
    tmp_path: Path, syntax: str, explicit: bool, defined: bool
) -> None:
    tail = _nested(40, explicit=explicit, defined=defined)
    path = _save(_base(syntax), tmp_path / "deep40.dcm", tail)
    ds = read_header(path, max_depth=64)
    assert _depth_of(ds) == 40
    assert read_header(path, max_depth=40) is not None  # the limit is inclusive


@pytest.mark.parametrize(("syntax", "explicit"), SYNTAXES)
@pytest.mark.parametrize("defined", LENGTHS)
def test_nesting_one_past_the_limit_is_refused(
    tmp_path: Path, syntax: str, explicit: bool, defined: bool
) -> None:
    tail = _nested(41, explicit=explicit, defined=defined)
    path = _save(_base(syntax), tmp_path / "deep41.dcm", tail)
    _refused(path, max_depth=40)


def test_pydicom_written_nesting_is_checked(tmp_path: Path) -> None:
    ds = _base()
    current = ds
    for _ in range(10):
        item = Dataset()
        current.ContentSequence = [item]
        current = item
    current.CodeValue = "LEAF"
    path = _save(ds, tmp_path / "pyd.dcm")
    assert _depth_of(read_header(path, max_depth=10)) == 10
    _refused(path, max_depth=9)


# --- deferred values inside sequences -----------------------------------------------------


@pytest.mark.parametrize(("syntax", "explicit"), SYNTAXES)
@pytest.mark.parametrize("defined", LENGTHS)
def test_large_value_inside_a_sequence_item_is_readable(
    tmp_path: Path, syntax: str, explicit: bool, defined: bool
) -> None:
    blob = bytes(range(256)) * 80  # 20 KiB, above the 8 KiB defer size
    inner = _element(ENCAPSULATED_DOCUMENT, b"OB", blob, explicit=explicit)
    nested_item = _item(
        _element(CODE_VALUE, b"SH", b"OUTER ", explicit=explicit)
        + _sequence(
            CONTENT_SEQUENCE, [_item(inner, defined=defined)], explicit=explicit, defined=defined
        ),
        defined=defined,
    )
    tail = _sequence(CONTENT_SEQUENCE, [nested_item], explicit=explicit, defined=defined)
    path = _save(_base(syntax), tmp_path / "ob.dcm", tail)
    ds = read_header(path, max_depth=64)
    outer = ds.ContentSequence[0]
    assert outer.CodeValue == "OUTER"
    assert bytes(outer.ContentSequence[0].EncapsulatedDocument) == blob


def test_large_value_inside_a_pydicom_written_sequence_is_readable(tmp_path: Path) -> None:
    blob = b"\x01\x02\x03\x04" * 5000
    ds = _base(rows=128, with_pixels=True)
    item = Dataset()
    item.EncapsulatedDocument = blob
    ds.ContentSequence = [item]
    path = _save(ds, tmp_path / "ob2.dcm")
    header = read_header(path, max_depth=64)
    assert header.ContentSequence[0].EncapsulatedDocument == blob
    assert header.PixelData == ds.PixelData


def test_truncated_large_value_inside_a_sequence_is_refused(tmp_path: Path) -> None:
    blob = b"\xab" * 20000
    inner = _element(ENCAPSULATED_DOCUMENT, b"OB", blob, explicit=True)
    tail = _sequence(CONTENT_SEQUENCE, [_item(inner, defined=True)], explicit=True, defined=True)
    path = _save(_base(), tmp_path / "obcut.dcm", tail)
    data = path.read_bytes()
    path.write_bytes(data[:-500])
    _refused(path)


# --- the header from a received data set's first bytes (PrefixedReader) ---------------


def _prefixed(path: Path, keep: int, opened: list[int]) -> PrefixedReader:
    data = path.read_bytes()

    def open_file() -> BytesIO:
        opened.append(1)
        return BytesIO(data)

    return PrefixedReader(data[:keep], len(data), open_file)


@pytest.mark.parametrize("keep", [0, 1, 131, 132, 500, 4096, 10**6])
def test_prefixed_reader_reads_what_the_file_holds(tmp_path: Path, keep: int) -> None:
    """Any read and seek gives the file's bytes, wherever the prefix ends."""
    path = _save(_base(rows=40, with_pixels=True), tmp_path / "f.dcm")
    data = path.read_bytes()
    opened: list[int] = []
    reader = _prefixed(path, keep, opened)
    assert reader.seek(0, 2) == len(data)
    got = []
    for start, n in [(0, 7), (3, 300), (keep - 2, 5), (len(data) - 10, 50), (len(data), 4)]:
        reader.seek(max(0, start))
        got.append(reader.read(n))
        assert reader.tell() == max(0, start) + len(got[-1])
    want = [data[max(0, a) : max(0, a) + n] for a, n in [(0, 7), (3, 300), (keep - 2, 5)]]
    assert got[:3] == want
    assert got[3] == data[-10:] and got[4] == b""
    reader.seek(0)
    assert reader.read() == data
    assert len(opened) == (0 if keep >= len(data) else 1)  # opened once, only when needed
    reader.close()
    with pytest.raises(ValueError):
        reader.read(1)


def test_header_within_the_prefix_never_opens_the_file(tmp_path: Path) -> None:
    path = _save(_base(rows=128, with_pixels=True), tmp_path / "f.dcm")  # Pixel Data deferred
    opened: list[int] = []
    ds = read_header(path, max_depth=64, opener=lambda _p: _prefixed(path, 2048, opened))
    assert ds.PatientID == "P1" and opened == []
    plain = read_header(path, max_depth=64)
    assert list(ds.keys()) == list(plain.keys())
    for name in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows"):
        assert ds[name].value == plain[name].value
    with pytest.raises(ValueError):  # the deferred Pixel Data is not read after the parse
        _ = ds.PixelData


def test_header_past_the_prefix_is_read_from_the_file(tmp_path: Path) -> None:
    """A header longer than the prefix (a 6 KB comment, a nested sequence) parses as from
    the file; a truncated value past the prefix is still refused."""
    ds = _base(rows=16, with_pixels=True)
    ds.ImageComments = "x" * 6000
    path = _save(ds, tmp_path / "f.dcm")
    opened: list[int] = []
    got = read_header(path, max_depth=64, opener=lambda _p: _prefixed(path, 600, opened))
    assert got.ImageComments == "x" * 6000 and opened == [1]
    data = path.read_bytes()
    cut = data[: data.index(b"xxxx") + 3000]
    with pytest.raises(IngestError) as err:
        read_header(
            path,
            max_depth=64,
            opener=lambda _p: PrefixedReader(cut[:600], len(cut), lambda: BytesIO(cut)),
        )
    assert err.value.status == CANNOT_UNDERSTAND
