"""What each ingest receiver makes durable before it answers: its sync calls, counted.

Throughput figures compare receivers that promise different things. The node answers a
C-STORE only after the received file, its folder entry and the index commit are on disk;
another receiver may answer after fewer syncs, or none. So the harness also runs each
receiver once, untimed, under ``strace`` (attached to its process tree once it is idle,
following what it forks) while storescu sends it a few instances over one association, and
counts per instance the calls that wait for the disk (``fsync``, ``fdatasync``, ``syncfs``,
``sync_file_range``, ``msync``) by what they sync: a data file, a folder (a new name made
durable) or an index (SQLite's database, WAL or journal). ``strace -T`` gives the time each
call took, so the table also says how many milliseconds per instance the receiver spent
waiting for the disk. Tracing slows every system call of the traced process, which is why
this run is separate from the timed ones.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.procstat import process_tree

SYNC_CALLS = ("fsync", "fdatasync", "syncfs", "sync_file_range", "msync")
TARGETS = ("file", "folder", "index")

# "PID call(FD</path>...) = 0 <0.000123>" (strace -f -y -T; -o writes the pid first)
_LINE = re.compile(
    r"^\s*(?:\d+\s+)?(?P<call>" + "|".join(SYNC_CALLS) + r")\((?P<fd>\d+)(?:<(?P<path>[^>]*)>)?"
    r".*<(?P<seconds>\d+\.\d+)>\s*$"
)
_INDEX = re.compile(r"(?:-wal|-journal|\.sqlite3?|\.db|/index)$")


@dataclass(frozen=True)
class SyncCall:
    call: str
    target: str
    seconds: float


def available() -> bool:
    return shutil.which("strace") is not None


def classify(path: str) -> str:
    """``index`` for a SQLite database, WAL or journal (Orthanc's is named ``index``),
    ``folder`` for a directory, ``file`` for anything else."""
    if _INDEX.search(path):
        return "index"
    return "folder" if Path(path).is_dir() else "file"


def parse(log: str) -> list[SyncCall]:
    calls = []
    for line in log.splitlines():
        m = _LINE.match(line)
        if m:
            calls.append(SyncCall(m["call"], classify(m["path"] or ""), float(m["seconds"])))
    return calls


def _traced(pids: list[int]) -> bool:
    """Every thread of ``pids`` has a tracer (strace has attached)."""
    for pid in pids:
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            try:
                text = status.read_text()
            except OSError:
                continue  # the thread ended
            if "\nTracerPid:\t0\n" in text:
                return False
    return True


def trace_syncs(root_pid: int, log: Path, run: Callable[[], None]) -> list[SyncCall]:
    """The sync calls ``root_pid``'s process tree made while ``run()`` ran."""
    pids = process_tree(root_pid)
    cmd = ["strace", "-f", "-qq", "-y", "-T", "-o", str(log), "-e", "trace=" + ",".join(SYNC_CALLS)]
    for pid in pids:
        cmd += ["-p", str(pid)]
    tracer = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 15
        while not _traced(pids):
            if tracer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"strace did not attach to {pids} (exit {tracer.poll()})")
            time.sleep(0.05)
        run()
        time.sleep(0.3)  # a sync that follows the last response (a checkpoint) is counted too
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches and writes out its log
        try:
            tracer.wait(10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait(5)
    return parse(log.read_text() if log.exists() else "")


def per_instance(calls: list[SyncCall], instances: int) -> dict[str, float]:
    """Sync calls per instance by target, all of them, and the ms per instance they took."""
    out = {
        f"{target}_syncs_per_instance": sum(c.target == target for c in calls) / instances
        for target in TARGETS
    }
    out["syncs_per_instance"] = len(calls) / instances
    out["sync_ms_per_instance"] = 1000 * sum(c.seconds for c in calls) / instances
    return out
