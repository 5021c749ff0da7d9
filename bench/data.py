"""Benchmark data sets, generated once per size and cached under the work folder.

* ``ct``: one CT study of 512x512 16-bit slices (500 at scale 1, ~513 KB each);
* ``small``: one MR study of 64x64 16-bit images (2,000 at scale 1, ~11 KB each);
* ``multiframe``: one multi-frame secondary-capture image of 512x512 16-bit frames
  (200 frames, ~100 MB, at scale 1).

Pixels are random (incompressible) so no receiver gains from a lucky encoding.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import (
    CTImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    generate_uid,
)

from tests.support.datasets import build_instance

FULL_SIZES: dict[str, int] = {"ct": 500, "small": 2000, "multiframe": 200}
"""Instances (ct, small) or frames (multiframe) at ``--scale 1``."""


@dataclass(frozen=True)
class DataSet:
    name: str
    description: str
    files: tuple[Path, ...]
    total_bytes: int

    @property
    def instances(self) -> int:
        return len(self.files)

    @property
    def mean_kib(self) -> float:
        return self.total_bytes / max(1, self.instances) / 1024

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "instances": self.instances,
            "total_bytes": self.total_bytes,
            "mean_instance_kib": round(self.mean_kib, 1),
        }


def scaled(name: str, scale: float) -> int:
    return max(1, round(FULL_SIZES[name] * scale))


def _write_series(
    out: Path, n: int, *, sop_class: str, modality: str, rows: int, cols: int, seed: int
) -> None:
    study = generate_uid()
    series = generate_uid()
    for i in range(1, n + 1):
        ds = build_instance(
            sop_class_uid=sop_class,
            modality=modality,
            study_uid=study,
            series_uid=series,
            instance_number=i,
            rows=rows,
            cols=cols,
            seed=seed * 1_000_003 + i,
            patient_id=f"BENCH-{modality}",
            patient_name=f"Bench^{modality}",
        )
        ds.save_as(out / f"{modality}{i:05d}.dcm", enforce_file_format=True)


def _write_ct(out: Path, n: int) -> None:
    _write_series(out, n, sop_class=CTImageStorage, modality="CT", rows=512, cols=512, seed=11)


def _write_small(out: Path, n: int) -> None:
    _write_series(out, n, sop_class=MRImageStorage, modality="MR", rows=64, cols=64, seed=12)


def _write_multiframe(out: Path, frames: int) -> None:
    ds = build_instance(
        sop_class_uid=MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        modality="OT",
        rows=512,
        cols=512,
        patient_id="BENCH-MF",
        patient_name="Bench^Multiframe",
        ConversionType="SYN",
    )
    ds.NumberOfFrames = frames
    rng = np.random.default_rng(13)
    ds.PixelData = rng.integers(0, 4096, size=(frames, 512, 512), dtype=np.uint16).tobytes()
    ds.save_as(out / "MF00001.dcm", enforce_file_format=True)


_WRITERS: dict[str, tuple[Callable[[Path, int], None], str]] = {
    "ct": (_write_ct, "CT 512x512 16-bit, one study"),
    "small": (_write_small, "MR 64x64 16-bit, one study"),
    "multiframe": (_write_multiframe, "one multi-frame image, 512x512 16-bit frames"),
}


def ensure(name: str, scale: float, cache: Path) -> DataSet:
    """The data set ``name`` at ``scale``, generating it under ``cache`` if needed."""
    count = scaled(name, scale)
    folder = cache / f"{name}-{count}"
    marker = folder / "complete.json"
    if not marker.exists():
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        writer, _ = _WRITERS[name]
        writer(folder, count)
        marker.write_text(json.dumps({"name": name, "count": count}))
    files = tuple(sorted(folder.glob("*.dcm")))
    description = _WRITERS[name][1]
    if name == "multiframe":
        description += f", {count} frames"
    return DataSet(name, description, files, sum(f.stat().st_size for f in files))
