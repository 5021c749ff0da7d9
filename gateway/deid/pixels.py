"""Clean Pixel Data (PS3.15 E.3.1): blank a rule's regions in every frame, re-encode losslessly.

Pure: data sets and arrays in, data sets and arrays out. Order of work:

1. :func:`check_geometry` reads Rows, Columns, SamplesPerPixel, NumberOfFrames, BitsAllocated
   (1, 8, 16 or 32), BitsStored, HighBit, PixelRepresentation and PhotometricInterpretation and
   compares them with the size of native Pixel Data (or the frame count of encapsulated data)
   *before* anything is decoded; a mismatch, an unknown value or a decoded size above the bound
   raises :class:`~gateway.errors.DeidError`, so garbage is refused rather than decoded.
2. :func:`decode` uses pydicom's pixel decoders (with the pylibjpeg plug-ins: JPEG baseline /
   extended / lossless, JPEG-LS, JPEG 2000, RLE). Lossless inputs are decoded without colour
   conversion (a YBR_FULL instance stays YBR_FULL, bit for bit; YBR_FULL_422 native data comes out
   as full-resolution YBR_FULL, the same values); lossy inputs are decoded to RGB.
3. :func:`blank` writes the fill value (black in the output's colour space) into the regions.
4. :func:`encode_into` writes the frames as Explicit VR Little Endian or RLE Lossless and sets
   PhotometricInterpretation, PlanarConfiguration, LossyImageCompression (01 stays 01; a lossy
   input becomes 01 with its method) and the transfer syntax so they say what the bytes are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import pack_bits
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from gateway.deid.pixel_rules import Rule
from gateway.errors import DeidError

NATIVE = frozenset(
    {
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    }
)
LOSSLESS_ENCAPSULATED = frozenset(
    {RLELossless, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless}
)
LOSSY = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
}
DECODABLE = NATIVE | LOSSLESS_ENCAPSULATED | frozenset(LOSSY)
_PHOTOMETRIC = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_RCT": 3,
    "YBR_ICT": 3,
}
MAX_FRAMES = 100_000


@dataclass(frozen=True)
class Geometry:
    rows: int
    columns: int
    samples: int
    frames: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    transfer_syntax: UID

    @property
    def decoded_bytes(self) -> int:
        per = max(1, self.bits_allocated // 8)
        return self.rows * self.columns * self.samples * self.frames * per

    @property
    def lossless(self) -> bool:
        return self.transfer_syntax not in LOSSY


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    v = ds.get(keyword, default)
    if v is None or v == "":
        if default is None:
            raise DeidError(f"pixel geometry: {keyword} missing")
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        raise DeidError(f"pixel geometry: {keyword} is not a number") from None


def check_geometry(ds: Dataset, *, max_pixel_bytes: int) -> Geometry:
    """The pixel geometry of ``ds``, checked against its Pixel Data before any decoding."""
    meta = getattr(ds, "file_meta", None)
    ts = UID(str(meta.get("TransferSyntaxUID", "") if meta is not None else "") or "")
    if not ts:
        ts = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
    if ts not in DECODABLE:
        raise DeidError(f"pixel data in transfer syntax {ts} cannot be decoded for cleaning")
    for kw in ("FloatPixelData", "DoubleFloatPixelData"):
        if kw in ds:
            raise DeidError(f"{kw} cannot be cleaned")
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    samples = _int(ds, "SamplesPerPixel", 1)
    frames = _int(ds, "NumberOfFrames", 1) or 1
    bits = _int(ds, "BitsAllocated")
    stored = _int(ds, "BitsStored", bits)
    high = _int(ds, "HighBit", stored - 1)
    signed = _int(ds, "PixelRepresentation", 0)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if not (1 <= rows <= 65535 and 1 <= columns <= 65535):
        raise DeidError(f"pixel geometry: Rows {rows} x Columns {columns} out of range")
    if not 1 <= frames <= MAX_FRAMES:
        raise DeidError(f"pixel geometry: NumberOfFrames {frames} out of range")
    if bits not in (1, 8, 16, 32):
        raise DeidError(f"pixel geometry: BitsAllocated {bits} not 1, 8, 16 or 32")
    if not 1 <= stored <= bits or high != stored - 1 or signed not in (0, 1):
        raise DeidError("pixel geometry: BitsStored / HighBit / PixelRepresentation inconsistent")
    if photometric not in _PHOTOMETRIC or _PHOTOMETRIC[photometric] != samples:
        raise DeidError(
            f"pixel geometry: PhotometricInterpretation {photometric!r} with "
            f"SamplesPerPixel {samples}"
        )
    if bits == 1 and (samples != 1 or ts not in NATIVE):
        raise DeidError("pixel geometry: 1-bit data must be native single-sample")
    g = Geometry(rows, columns, samples, frames, bits, stored, bool(signed), photometric, ts)
    if g.decoded_bytes > max_pixel_bytes:
        raise DeidError(
            f"pixel data of {g.decoded_bytes} decoded bytes is above the bound {max_pixel_bytes}"
        )
    elem = ds.get_item("PixelData")
    if elem is None or elem.value is None:
        raise DeidError("no Pixel Data to clean")
    size = len(elem.value)
    if ts in NATIVE:
        pixels = rows * columns * frames
        if photometric == "YBR_FULL_422":
            expected_bits = pixels * 2 * bits
        else:
            expected_bits = pixels * samples * bits
        expected = (expected_bits + 7) // 8
        if size not in (expected, expected + (expected & 1)):
            raise DeidError(
                f"pixel geometry: Pixel Data holds {size} bytes, the header implies {expected}"
            )
    else:
        try:
            count = sum(1 for _ in generate_frames(elem.value, number_of_frames=frames))
        except (ValueError, TypeError, KeyError) as exc:
            raise DeidError(
                f"encapsulated Pixel Data does not parse: {type(exc).__name__}"
            ) from None
        if count != frames:
            raise DeidError(f"encapsulated Pixel Data holds {count} frames, header says {frames}")
    return g


def decode(ds: Dataset, g: Geometry) -> tuple[NDArray[Any], str]:
    """All frames as (frames, rows, columns[, samples]) and the photometric of that array."""
    try:
        # pydicom annotates **kwargs as DecodeOptions itself; the options are its keys
        options: dict[str, Any] = {"as_rgb": not g.lossless}
        arr, info = get_decoder(g.transfer_syntax).as_array(ds, **options)
    except Exception as exc:  # noqa: BLE001 - codec errors of any kind: refuse, never pass through
        raise DeidError(
            f"pixel data in {g.transfer_syntax.name} cannot be decoded: {type(exc).__name__}"
        ) from None
    arr = arr.reshape((g.frames, g.rows, g.columns) + ((g.samples,) if g.samples > 1 else ()))
    photometric = str(info.get("photometric_interpretation", g.photometric))
    return arr, photometric


def keep_mask(ds: Dataset, rows: int, columns: int) -> NDArray[np.bool_]:
    """True inside the SequenceOfUltrasoundRegions rectangles (clipped); all False if none."""
    keep = np.zeros((rows, columns), dtype=bool)
    for item in ds.get("SequenceOfUltrasoundRegions", None) or []:
        try:
            x0, y0 = int(item.RegionLocationMinX0), int(item.RegionLocationMinY0)
            x1, y1 = int(item.RegionLocationMaxX1), int(item.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            raise DeidError("SequenceOfUltrasoundRegions item without a usable location") from None
        keep[max(0, y0) : max(0, y1 + 1), max(0, x0) : max(0, x1 + 1)] = True
    return keep


def fill_value(ds: Dataset, photometric: str, g: Geometry) -> Any:
    """Black in the output's colour space."""
    if photometric == "MONOCHROME1":
        return (1 << (g.bits_stored - 1)) - 1 if g.signed else (1 << g.bits_stored) - 1
    if photometric == "MONOCHROME2":
        return -(1 << (g.bits_stored - 1)) if g.signed else 0
    if photometric.startswith("YBR"):
        mid = 1 << (g.bits_stored - 1)
        return (0, mid, mid)
    if photometric == "PALETTE COLOR":
        return _darkest_palette_index(ds, g)
    return 0


def _darkest_palette_index(ds: Dataset, g: Geometry) -> int:
    n = min(1 << g.bits_stored, 65536)
    try:
        rgb = apply_color_lut(np.arange(n, dtype=np.uint16 if n > 256 else np.uint8), ds)
    except Exception:  # noqa: BLE001 - a broken palette: index 0, the conventional black
        return 0
    return int(np.argmin(rgb.astype(np.int64).sum(axis=-1)))


def blank(
    frames: NDArray[Any],
    boxes: list[tuple[int, int, int, int]],
    blank_mask: NDArray[np.bool_] | None,
    value: Any,
) -> None:
    """Write ``value`` into every frame's boxes (x0, y0, x1, y1) and where ``blank_mask`` is set."""
    for x0, y0, x1, y1 in boxes:
        if x1 > x0 and y1 > y0:
            frames[:, y0:y1, x0:x1] = value
    if blank_mask is not None and blank_mask.any():
        frames[:, blank_mask] = value


def rule_regions(
    rule: Rule, ds: Dataset, rows: int, columns: int
) -> tuple[list[tuple[int, int, int, int]], NDArray[np.bool_] | None]:
    """The boxes and the outside-of-ultrasound-regions mask a rule blanks on ``ds``."""
    boxes = [r.box(rows, columns) for r in rule.regions]
    mask = None
    if rule.keep_ultrasound_regions:
        keep = keep_mask(ds, rows, columns)
        if not keep.any():
            raise DeidError(
                f"rule {rule.name!r} keeps only ultrasound regions, and the instance has none"
            )
        mask = ~keep
    return boxes, mask


def encode_into(
    out: Dataset,
    frames: NDArray[Any],
    photometric: str,
    g: Geometry,
    original: Dataset,
    *,
    encode: str,
) -> None:
    """Write ``frames`` as ``out``'s Pixel Data and make its attributes tell the truth."""
    samples = g.samples
    for kw in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if kw in out:
            del out[kw]
    out.PhotometricInterpretation = photometric
    if samples > 1:
        out.PlanarConfiguration = 0
    elif "PlanarConfiguration" in out:
        del out.PlanarConfiguration
    if _was_lossy(original, g):
        out.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in out and g.transfer_syntax in LOSSY:
            out.LossyImageCompressionMethod = LOSSY[g.transfer_syntax]
    if g.bits_allocated == 1:
        data = pack_bits(frames.reshape(-1).astype(np.uint8))
    else:
        dtype = {8: "u1", 16: "u2", 32: "u4"}[g.bits_allocated]
        if g.signed:
            dtype = dtype.replace("u", "i")
        data = np.ascontiguousarray(frames.astype("<" + dtype, copy=False)).tobytes()
    if len(data) & 1:
        data += b"\x00"
    if g.transfer_syntax == ExplicitVRBigEndian:
        _to_little_endian(out)
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.PixelData = data
    out["PixelData"].VR = "OB" if g.bits_allocated <= 8 else "OW"
    if encode == "rle" and g.bits_allocated > 1:
        try:
            out.compress(RLELossless, frames.reshape(_shape(g)), encoding_plugin="pylibjpeg")
        except Exception as exc:  # noqa: BLE001 - an unencodable output never leaves
            raise DeidError(f"cleaned pixels cannot be RLE encoded: {type(exc).__name__}") from None


def _to_little_endian(ds: Dataset) -> None:
    """Decode every raw (big endian) element so the data set can be written little endian."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            for item in elem.value:
                item.set_original_encoding(False, True, item.original_character_set)
    ds.set_original_encoding(False, True, ds.original_character_set)


def _shape(g: Geometry) -> tuple[int, ...]:
    lead = (g.frames,) if g.frames > 1 else ()
    return lead + (g.rows, g.columns) + ((g.samples,) if g.samples > 1 else ())


def _was_lossy(original: Dataset, g: Geometry) -> bool:
    if str(original.get("LossyImageCompression", "") or "").strip() == "01":
        return True
    if g.transfer_syntax == JPEGLSNearLossless:
        return _jpegls_near(original) != 0
    if g.transfer_syntax == JPEG2000:
        return not _j2k_reversible(original)
    return g.transfer_syntax in LOSSY


def _first_frame(original: Dataset) -> bytes:
    try:
        return next(generate_frames(original.PixelData, number_of_frames=1))
    except (StopIteration, ValueError, TypeError):
        return b""


def _jpegls_near(original: Dataset) -> int:
    from pydicom.pixels.utils import _get_jpg_parameters

    near = _get_jpg_parameters(_first_frame(original)).get("lossy_error")
    return 1 if near is None else int(near)


def _j2k_reversible(original: Dataset) -> bool:
    """True when the first frame's COD segment names the reversible 5/3 wavelet."""
    data = _first_frame(original)
    at = data.find(b"\xff\x52", 2, 4096)
    if at < 0 or len(data) < at + 14:
        return False
    # COD: marker, Lcod(2), Scod(1), SGcod(4), SPcod: levels, cb w, cb h, cb style, transform
    return data[at + 13] == 1
