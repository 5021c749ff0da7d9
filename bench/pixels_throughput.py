"""Clean Pixel Data throughput on this machine (printed, never asserted).

    .venv/bin/python -m bench.pixels_throughput [frames]

For 640x480 and 1024x768 frames, RGB and MONOCHROME2 (8-bit, uncompressed cines made of real
ultrasound frames: pydicom-data's US1_UNCR for 640x480, deid-data's RGB_IMAGE for 1024x768,
their brightest channel for mono; a speckle field is far slower to OCR than an empty one):
frames/s of masking (geometry check, decode, blank the rule's band, re-encode; ocr = "off")
and of masking plus the OCR check of every frame (ocr = "verify", one tesseract, scale 2).
Runs the code the delivery worker runs (:func:`gateway.deid.deidentify_bytes`), on one core.
"""

from __future__ import annotations

import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

from gateway.deid import ProjectKey, deidentify_bytes, generate_secret_file
from gateway.deid.ocr import OcrEngine
from gateway.deid.profiles import parse_profile

RULE = """
[[rule]]
name = "bench"
match = { attribute = "Manufacturer", equals = "Bench" }
regions = [{ top = 106 }]
"""


def _sample(rows: int) -> np.ndarray:
    import os

    import deid_data
    import pydicom
    from pydicom.data import get_testdata_file

    if rows == 480:
        path = get_testdata_file("US1_UNCR.dcm")
    else:
        path = os.path.join(os.path.dirname(deid_data.__file__), "data/ultrasounds/RGB_IMAGE.dcm")
    return np.asarray(pydicom.dcmread(path).pixel_array)


def cine(frames: int, rows: int, columns: int, rgb: bool) -> bytes:
    frame = _sample(rows)
    if not rgb:
        frame = frame.max(axis=-1)
    arr = np.repeat(frame[None], frames, axis=0)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.Manufacturer = "Bench"
    ds.PatientName = "DOE^JANE"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr.tobytes()
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


SHAPES = ((480, 640), (768, 1024))


def measure(frames: int, *, repeat: int = 1, log: Any = None) -> list[dict[str, Any]]:
    """frames/s of masking and of masking + OCR for every frame shape and kind, ``repeat``
    times each (one row per shape, kind and repetition)."""
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "rules").mkdir()
        (root / "rules" / "bench.toml").write_text(RULE)
        generate_secret_file(root / "secret")
        key = ProjectKey.from_file(root / "secret")
        profiles = {}
        for mode in ("off", "verify"):
            text = (
                f'name = "bench"\n[pixels]\nrules = "{root / "rules"}"\nocr = "{mode}"\n'
                f"ocr_all_frames_up_to = {frames}\n"
            )
            profiles[mode] = parse_profile(text, path=str(root / "bench.toml"))
        engine = OcrEngine()
        for rows, columns in SHAPES:
            for rgb in (True, False):
                data = cine(frames, rows, columns, rgb)
                for mode in ("off", "verify"):
                    deidentify_bytes(data, profiles[mode], key, ocr=engine)  # warm
                for rep in range(repeat):
                    rates = []
                    for mode in ("off", "verify"):
                        n = 3 if mode == "off" else 1
                        t = time.perf_counter()
                        c = time.process_time()
                        for _ in range(n):
                            deidentify_bytes(data, profiles[mode], key, ocr=engine)
                        rates.append(
                            (
                                n * frames / (time.perf_counter() - t),
                                1000 * (time.process_time() - c) / (n * frames),
                            )
                        )
                    row = {
                        "frame": f"{columns}x{rows}",
                        "kind": "RGB" if rgb else "mono",
                        "frames": frames,
                        "masking_frames_per_s": rates[0][0],
                        "masking_cpu_ms_per_frame": rates[0][1],
                        "masking_ocr_frames_per_s": rates[1][0],
                        "masking_ocr_cpu_ms_per_frame": rates[1][1],
                    }
                    if log is not None:
                        log(
                            f"pixels {row['frame']:>9} {row['kind']:>4} rep {rep + 1}: "
                            f"{rates[0][0]:8.1f} f/s masking, {rates[1][0]:6.2f} f/s with OCR"
                        )
                    out.append(row)
    return out


def main() -> None:
    frames = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    print(f"{'frame':>10} {'kind':>5} {'masking f/s':>12} {'masking+OCR f/s':>16}")
    for row in measure(frames):
        print(
            f"{row['frame']:>10} {row['kind']:>5} {row['masking_frames_per_s']:>12.1f} "
            f"{row['masking_ocr_frames_per_s']:>16.2f}"
        )


if __name__ == "__main__":
    main()
