"""De-identify one DICOM file into a folder: the seam the delivery worker and the CLI call.

This is the only module of :mod:`gateway.deid` that touches files other than its own data: it reads
the input, runs :func:`~gateway.deid.engine.deidentify`, writes the output to bytes, runs the leak
gate on those bytes and only then writes them (atomically) under ``out_dir``. Every failure raises
:class:`~gateway.errors.DeidError` (:class:`~gateway.errors.LeakError` for the gate) and leaves no
output file behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

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
    try:
        original = dcmread(BytesIO(data), force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DeidError(f"input does not parse as DICOM: {type(exc).__name__}") from None
    out, report = deidentify(original, profile, key)
    if profile.pixels is not None:
        pixel_report = clean_instance(original, out, profile, engine=ocr or default_engine())
        report.pixels = pixel_report.to_dict()
        if pixel_report.ocr_passed:
            report.method_codes.append(CLEAN_PIXEL_DATA_CODE)
    buf = BytesIO()
    try:
        out.save_as(buf, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - fail closed: an unwritable output never leaves
        raise DeidError(f"output cannot be encoded: {type(exc).__name__}") from None
    encoded = buf.getvalue()
    hits = leak_check(original, encoded, profile=profile)
    if hits:
        raise LeakError(hits)
    return encoded, str(out.SOPInstanceUID), report


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
        data = Path(src).read_bytes()
    except OSError as exc:
        raise DeidError(f"cannot read input: {exc.strerror}") from None
    encoded, uid, report = deidentify_bytes(data, profile, key, ocr=ocr)
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
