"""One ``serve`` per state directory, and who this node is on a shared index.

``serve`` holds an exclusive ``flock`` on ``<state_dir>/serve.lock`` from before it builds
anything until it exits, and passes the descriptor to every child it starts (the worker and
receiver processes): the lock is the kernel's, on the open file, so it is held until the
last process of that run has ended, however it ended. A second ``serve`` on the same state
directory (a second unit, a restart while the first is still stopping) waits a few seconds
for it and then refuses to start, naming the lock file and the holder's pid, instead of
sweeping the first one's unacknowledged files as a crash's leftovers.

Holding the lock, ``serve`` knows that nothing of an earlier run of this node is alive, so
the deliveries that run had claimed can be taken again at once instead of after their
leases run out (:func:`gateway.index.deliveries.release_leases`). For that every lease names
its holder as ``<node id>:<run>:<thread>``: the node id is random, made on the first start
and kept in ``<state_dir>/node-id`` (nodes sharing one index each have their own state
directory), the run id is new for every process. Two nodes, or two runs of one node, never
hold a lease under the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import time
from pathlib import Path

from gateway.crypto.keys import write_private_file
from gateway.errors import GatewayError

LOCK_FILE = "serve.lock"
NODE_ID_FILE = "node-id"
WAIT_SECONDS = 10.0
_NODE_ID = re.compile(r"[0-9a-f]{16}")

_held: int | None = None  # this process's descriptor of the lock, when it holds it


def acquire(state_dir: Path, *, wait: float = WAIT_SECONDS) -> None:
    """Take the state directory's lock for this process (and the children it starts), or
    raise GatewayError naming the holder after ``wait`` seconds."""
    global _held
    if _held is not None:
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _read_pid(fd)
                os.close(fd)
                raise GatewayError(
                    f"{path}: another dicom-gateway serve"
                    + (f" (pid {holder})" if holder else "")
                    + " or a process it started is running on this state directory"
                ) from None
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held = fd


def held() -> bool:
    """Whether this process holds the lock (it is the ``serve`` of its state directory)."""
    return _held is not None


def inherited_fds() -> tuple[int, ...]:
    """The descriptors a child of ``serve`` is given so that the lock outlives ``serve``
    for as long as the child lives."""
    return () if _held is None else (_held,)


def release() -> None:
    """Let go of the lock in this process (children that have it keep it until they end)."""
    global _held
    if _held is not None:
        with contextlib.suppress(OSError):
            os.close(_held)
        _held = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def node_id(state_dir: Path) -> str:
    """This node's id on a shared index (16 hex digits), made on the first start."""
    path = state_dir / NODE_ID_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = ""
    if _NODE_ID.fullmatch(text):
        return text
    if text:
        raise GatewayError(f"{path}: expected 16 lowercase hex digits, found {len(text)} chars")
    write_private_file(path, f"{secrets.token_hex(8)}\n".encode())  # or another's, made meanwhile
    return node_id(state_dir)


def lease_owner_prefix(node: str) -> str:
    """``<node>:<run id>:``, new for each process: what its workers' leases start with."""
    return f"{node}:{secrets.token_hex(4)}:"
