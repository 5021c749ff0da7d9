"""One de-identification run, in its own process pinned to one CPU (scenario 3's worker).

    python -m bench.deid_tools TOOL CPU LIST OUT_DIR

Reads every file named in LIST (one path a line), de-identifies it with TOOL and writes the
result under OUT_DIR, then prints one JSON object: instances, seconds (the loop over the
files: read + de-identify + write, nothing else), cpu_seconds, setup_seconds (imports, profile
or recipe loading, before the clock starts), peak_rss_mib and written (files in OUT_DIR).

Tools, each at its defaults:

* ``node-basic-file``: :func:`gateway.deid.deidentify_file` with ``basic``, the path of
  ``dicom-gateway deid`` (leak gate on the encoded output, then an atomic write with fsync);
* ``node-basic-gate``: :func:`gateway.deid.deidentify_bytes` (leak gate) and a plain write
  (no fsync, as the peers write): the delivery worker's path, which writes its prepared
  file without fsync too (encrypted, in ``spool/outgoing/``);
* ``node-basic-nogate``: ``dcmread`` + :func:`gateway.deid.deidentify` + ``save_as``;
* ``dicognito``: ``dicognito.anonymizer.Anonymizer()`` (one per run, as its CLI does), then
  ``save_as`` named by the new SOP Instance UID;
* ``pydicom-deid``: pydicom/deid's default recipe (``DeidRecipe()``, loaded once), per file
  ``get_identifiers`` then ``replace_identifiers(save=True, output_folder=OUT_DIR)``.

After the clock stops, every output is checked not to hold the original PatientID bytes (a
tool that leaves it in place fails the run rather than report a figure).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

TOOLS = ("node-basic-file", "node-basic-gate", "node-basic-nogate", "dicognito", "pydicom-deid")

Step = Callable[[Path], None]


def _node(kind: str, out: Path) -> Step:
    from pydicom import dcmread

    from gateway.deid import (
        ProjectKey,
        deidentify,
        deidentify_bytes,
        deidentify_file,
        load_profile,
    )

    profile = load_profile("basic")
    key = ProjectKey(b"bench-deid-project-secret-32-bytes-long!")

    def file_step(src: Path) -> None:
        deidentify_file(src, out, profile, key)

    def gate_step(src: Path) -> None:
        encoded, uid, _ = deidentify_bytes(src.read_bytes(), profile, key)
        (out / f"{uid}.dcm").write_bytes(encoded)

    def nogate_step(src: Path) -> None:
        ds, _ = deidentify(dcmread(src), profile, key)
        ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)

    return {"file": file_step, "gate": gate_step, "nogate": nogate_step}[kind]


def _dicognito(out: Path) -> Step:
    import pydicom
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer()

    def step(src: Path) -> None:
        ds = pydicom.dcmread(src)
        anonymizer.anonymize(ds)
        ds.save_as(out / f"{ds.SOPInstanceUID}.dcm")

    return step


def _pydicom_deid(out: Path) -> Step:
    from deid.config import DeidRecipe
    from deid.dicom import get_identifiers, replace_identifiers

    recipe = DeidRecipe()  # the package's default "dicom" recipe

    def step(src: Path) -> None:
        files = [str(src)]
        ids = get_identifiers(files)
        replace_identifiers(
            files, ids=ids, deid=recipe, save=True, output_folder=str(out), overwrite=True
        )

    return step


def build(tool: str, out: Path) -> Step:
    if tool.startswith("node-basic-"):
        return _node(tool.removeprefix("node-basic-"), out)
    if tool == "dicognito":
        return _dicognito(out)
    if tool == "pydicom-deid":
        return _pydicom_deid(out)
    raise SystemExit(f"unknown tool {tool!r} (one of {', '.join(TOOLS)})")


def _check_outputs(out: Path, originals: set[bytes]) -> int:
    written = 0
    for path in out.iterdir():
        if path.name.startswith(".") or path.suffix != ".dcm":
            continue
        data = path.read_bytes()
        for value in originals:
            if value in data:
                raise SystemExit(f"{path.name} still holds the original PatientID {value!r}")
        written += 1
    return written


def _peak_rss_mib() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str]) -> int:
    tool, cpu, listing, out_dir = argv
    os.sched_setaffinity(0, {int(cpu)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [Path(line) for line in Path(listing).read_text().splitlines() if line]
    t0 = time.perf_counter()
    step = build(tool, out)
    import pydicom

    originals = {
        str(pydicom.dcmread(f, stop_before_pixels=True).PatientID).encode() for f in files[:1]
    }
    setup = time.perf_counter() - t0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for src in files:
        step(src)
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0
    written = _check_outputs(out, originals)
    print(
        json.dumps(
            {
                "instances": len(files),
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "setup_seconds": setup,
                "peak_rss_mib": _peak_rss_mib(),
                "written": written,
                "cpu": int(cpu),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
