"""Where the node's Python time goes while it ingests: py-spy samples, summarised.

A target the node misses is reported with what its profile shows. So the ingest scenario also
runs each node receiver once more, untimed, with py-spy attached to its process tree (its
receiver processes too) while storescu sends it the data set over one association. py-spy
samples, :data:`RATE` times a second, the stack of the thread that holds the interpreter lock
(``--gil``): a thread that waits (in ``select()``, ``recv()``, a lock, ``fsync``) has released
it and is not counted, so the samples stand for the Python time of the node, the time only one
thread of a process can spend at once. They are summarised two ways:

* **by part**: each sample goes to the code its innermost frame runs in: a package
  (``pynetdicom``, ``pydicom``, ``sqlalchemy``, ``cryptography`` ...), a module of the node
  (``gateway.ingest``, ``gateway.dicom`` ...) or the standard library (``stdlib``);
* **by function**: the functions that run most themselves (self) and the node's functions
  that most of the samples pass through (total, a caller counted once per sample).

py-spy pauses the process for each sample, so the run is slower than a timed one; shares are
what it is for, not times.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RATE = 1000
"""Samples per second (of the thread holding the interpreter lock)."""

TOP = 12
"""Functions listed by self samples."""

TOP_TOTAL = 20
"""The node's functions listed by total samples (the first are the threads' outer frames)."""

# "function (path:line)", the frame format of py-spy's raw output
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")
_SITE = re.compile(r"/(?:site|dist)-packages/(?P<package>[A-Za-z0-9_]+)")
_STDLIB = re.compile(r"/lib/python3\.\d+/")
_GATEWAY = re.compile(r"/gateway/(?:(?P<package>[A-Za-z0-9_]+)/)?[^/]+$")


def executable() -> str | None:
    """py-spy beside the running Python (the venv's), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def part(path: str) -> str:
    """The part of the code a frame's file belongs to (see the module notes)."""
    m = _GATEWAY.search(path)
    if m and "-packages/" not in path:
        return f"gateway.{m['package']}" if m["package"] else "gateway"
    m = _SITE.search(path)
    if m:
        return m["package"].lower()
    return "stdlib" if _STDLIB.search(path) else "other"


@dataclass(frozen=True)
class Frame:
    function: str
    path: str
    part: str

    @property
    def name(self) -> str:
        """``function (file)`` with the file shortened to the part's own path."""
        short = self.path
        for marker in ("/site-packages/", "/dist-packages/", "/lib/python3."):
            if marker in short:
                short = short.split(marker, 1)[1]
                if marker == "/lib/python3.":
                    short = short.split("/", 1)[-1]
                break
        else:
            if "/gateway/" in short:
                short = "gateway/" + short.rsplit("/gateway/", 1)[1]
        return f"{self.function} ({short})"


def _frame(text: str) -> Frame | None:
    m = _FRAME.match(text.strip())
    if m is None:
        return None
    return Frame(m["function"], m["path"], part(m["path"]))


@dataclass
class Profile:
    samples: int = 0
    by_part: Counter[str] = field(default_factory=Counter)
    self_samples: Counter[str] = field(default_factory=Counter)
    total_samples: Counter[str] = field(default_factory=Counter)


def parse(raw: str) -> Profile:
    """py-spy's raw (collapsed) output: one ``frame;frame;...;frame count`` line per stack,
    outermost first, after py-spy's own ``process ...`` and ``thread ...`` frames."""
    profile = Profile()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in (_frame(t) for t in stack.split(";")) if f is not None]
        if not frames:
            continue
        profile.samples += count
        leaf = frames[-1]
        profile.by_part[leaf.part] += count
        profile.self_samples[leaf.name] += count
        for name in {f.name for f in frames if f.part.startswith("gateway")}:
            profile.total_samples[name] += count
    return profile


def summary(profile: Profile, top: int = TOP) -> dict[str, Any]:
    """Shares (of all samples) by part and for the top functions, for latest.json."""
    n = profile.samples or 1

    def shares(counter: Counter[str], limit: int | None) -> list[dict[str, Any]]:
        return [
            {"name": name, "share": round(count / n, 4)}
            for name, count in counter.most_common(limit)
        ]

    return {
        "samples": profile.samples,
        "by_part": shares(profile.by_part, None),
        "self": shares(profile.self_samples, top),
        "total_gateway": shares(profile.total_samples, TOP_TOTAL),
    }


def _sampling(spy: subprocess.Popen[bytes], log: Path) -> bool:
    """py-spy has attached (it says so on stderr once it samples) and is still running."""
    return spy.poll() is None and "Sampling process" in log.read_text(errors="replace")


@contextlib.contextmanager
def recording(root_pid: int, out: Path) -> Iterator[None]:
    """py-spy samples ``root_pid``'s process tree (its children as they start, too) while the
    block runs, into ``out`` (raw); :func:`parse` reads it."""
    spy_bin = executable()
    if spy_bin is None:
        raise RuntimeError("py-spy is not installed")
    log = out.with_suffix(".log")
    cmd = [
        spy_bin,
        "record",
        "--pid",
        str(root_pid),
        "--subprocesses",
        "--full-filenames",
        "--gil",
        "--format",
        "raw",
        "--rate",
        str(RATE),
        "--output",
        str(out),
    ]
    with log.open("wb") as err:
        spy = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + 15
        while not _sampling(spy, log):
            if spy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"py-spy did not attach to {root_pid} (exit {spy.poll()}; see {log})"
                )
            time.sleep(0.05)
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # stops sampling and writes out its output
        try:
            spy.wait(20)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no profile (exit {spy.returncode}; see {log})")


def parse_file(raw: Path) -> Profile:
    """:func:`parse` of the file :func:`recording` wrote."""
    return parse(raw.read_text(errors="replace"))
