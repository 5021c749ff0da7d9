"""Resource use of a process and its descendants, read from /proc (Linux only).

CPU: ``utime + stime + cutime + cstime`` of the root plus ``utime + stime + cutime + cstime``
of every descendant still present (zombies included).  A descendant that exits and is reaped
moves its time into its parent's ``cutime``/``cstime``, so the sum is continuous and the
difference between two readings is the CPU the tree used in between.

Memory: a sampling thread sums ``VmRSS`` over the tree; the peak is the larger of that sum's
maximum and the largest ``VmHWM`` (per-process high-water mark) seen.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants alive (or zombie) now."""
    children = _children_map()
    tree: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root``'s tree, see the module notes."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # After the comm field: state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / _TICKS


def _status_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB; zeros for a zombie or a vanished process."""
    rss = hwm = 0
    try:
        text = (_PROC / str(pid) / "status").read_text()
    except OSError:
        return 0, 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


@dataclass
class Usage:
    cpu_seconds: float
    peak_rss_mib: float
    samples: int


class TreeMonitor:
    """Samples a process tree's memory on a thread; ``stop()`` returns usage since ``start()``."""

    def __init__(self, root: int, interval: float = 0.02) -> None:
        self.root = root
        self.interval = interval
        self._peak_kib = 0
        self._samples = 0
        self._cpu0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-monitor", daemon=True)

    def _sample(self) -> None:
        total = 0
        peak = self._peak_kib
        for pid in process_tree(self.root):
            rss, hwm = _status_kib(pid)
            total += rss
            peak = max(peak, hwm)
        self._peak_kib = max(peak, total)
        self._samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> TreeMonitor:
        self._sample()
        self._cpu0 = cpu_seconds(self.root)
        self._thread.start()
        return self

    def stop(self) -> Usage:
        self._stop.set()
        self._thread.join()
        self._sample()
        cpu = cpu_seconds(self.root) - self._cpu0
        return Usage(cpu_seconds=cpu, peak_rss_mib=self._peak_kib / 1024, samples=self._samples)


def wait_idle(
    root: int, settle: float = 0.3, busy_fraction: float = 0.2, timeout: float = 15.0
) -> float:
    """Wait until ``root``'s tree used under ``busy_fraction`` of a core over ``settle``
    seconds (its start-up is over; a node polling its index is never at zero).  Returns the
    seconds waited."""
    start = time.monotonic()
    last = cpu_seconds(root)
    while time.monotonic() - start < timeout:
        time.sleep(settle)
        now = cpu_seconds(root)
        if now - last < busy_fraction * settle:
            break
        last = now
    return time.monotonic() - start
