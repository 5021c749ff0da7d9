"""Open connections and admitted associations per address, across receiver processes.

With ``dicom.receiver_processes`` above one, ``serve`` and its ``dicom-gateway receiver``
children accept from the same listening sockets, and the limits of ``[dicom]``
(``max_connections``, ``max_connections_per_address``, ``max_associations``,
``max_associations_per_address``) are the node's, not each process's. Each process keeps its
own counts here and, when they change, rewrites its file in ``<state_dir>/receivers/``
(``<index>.json``); a check reads the other processes' files under one lock (``flock`` of
``.lock`` there, with a thread lock, as ``flock`` does not exclude threads sharing a
descriptor), so two processes admitting at the same moment cannot both pass a limit that
only one fits. A receiver that dies holds nothing: its sockets close with it, and ``serve``
removes its file before starting another (:func:`forget`).

With one process the ledger holds the counts in memory only, and nothing is read or written.
These are runtime counts: written without fsync, and the folder is emptied at start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LEDGER_DIR = "receivers"


@dataclass
class Counts:
    """Connections (from accept until the connection ends) and associations (from admission
    until the connection ends) per address."""

    connections: Counter[str] = field(default_factory=Counter)
    associations: Counter[str] = field(default_factory=Counter)

    def add(self, other: Counts) -> None:
        self.connections.update(other.connections)
        self.associations.update(other.associations)


class LedgerView:
    """What a check sees under the lock: this process's counts (to change) and the others'."""

    def __init__(self, own: Counts, others: Counts) -> None:
        self.own = own
        self.others = others
        self.changed = False

    def connections_elsewhere(self) -> int:
        return sum(self.others.connections.values())

    def connections_from(self, address: str) -> int:
        """This process's and the others' connections from ``address``."""
        return self.own.connections[address] + self.others.connections[address]

    def associations_elsewhere(self, address: str | None = None) -> int:
        if address is None:
            return sum(self.others.associations.values())
        return self.others.associations[address]

    def open_connection(self, address: str) -> None:
        self.own.connections[address] += 1
        self.changed = True

    def close_connection(self, address: str, *, admitted: bool) -> None:
        _decrement(self.own.connections, address)
        if admitted:
            _decrement(self.own.associations, address)
        self.changed = True

    def admit(self, address: str) -> None:
        self.own.associations[address] += 1
        self.changed = True


def _decrement(counter: Counter[str], key: str) -> None:
    left = counter[key] - 1
    if left > 0:
        counter[key] = left
    else:
        counter.pop(key, None)


class ConnectionLedger:
    """This receiver process's counts; shared through ``folder`` when it is given."""

    def __init__(self, folder: Path | None = None, index: int = 0) -> None:
        self.folder = folder
        self.index = index
        self._own = Counts()
        self._thread_lock = threading.Lock()
        self._lock_fd = -1
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with self.locked() as view:
                view.changed = True  # this process's (empty) file, from the start

    @property
    def shared(self) -> bool:
        return self.folder is not None

    @contextlib.contextmanager
    def locked(self) -> Iterator[LedgerView]:
        """The counts of every receiver process, for one check and change."""
        with self._thread_lock:
            if self._lock_fd < 0:
                view = LedgerView(self._own, Counts())
                yield view
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                view = LedgerView(self._own, self._read_others())
                yield view
                if view.changed:
                    self._publish()
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def connections_here(self) -> int:
        return sum(self._own.connections.values())

    def fewest_connections_elsewhere(self) -> int | None:
        """The open connections of the least busy other receiver (None: there is none), read
        without the lock: a hint for which process takes the next connection."""
        if self.folder is None:
            return None
        fewest: int | None = None
        for path in self._others():
            counts = _read(path)
            if counts is not None:
                total = sum(counts.connections.values())
                fewest = total if fewest is None else min(fewest, total)
        return fewest

    def _others(self) -> list[Path]:
        assert self.folder is not None
        mine = f"{self.index}.json"
        return [p for p in self.folder.glob("*.json") if p.name != mine]

    def _read_others(self) -> Counts:
        total = Counts()
        for path in self._others():
            counts = _read(path)
            if counts is not None:
                total.add(counts)
        return total

    def _publish(self) -> None:
        assert self.folder is not None
        path = self.folder / f"{self.index}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "connections": dict(self._own.connections),
                    "associations": dict(self._own.associations),
                }
            )
        )
        os.replace(tmp, path)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _read(path: Path) -> Counts | None:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):  # removed meanwhile (a receiver that ended)
        return None
    return Counts(Counter(raw.get("connections", {})), Counter(raw.get("associations", {})))


def reset(folder: Path) -> None:
    """Empty the ledger folder (``serve``'s start: no receiver runs yet)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.glob("*.json"):
        path.unlink(missing_ok=True)


def forget(folder: Path, index: int) -> None:
    """Remove the counts of receiver ``index``, which is dead (its connections closed with
    it), under the lock so no check reads half of it."""
    lock_fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        (folder / f"{index}.json").unlink(missing_ok=True)
    finally:
        os.close(lock_fd)
