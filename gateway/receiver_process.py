"""DICOM receiver processes beside ``serve`` (``dicom.receiver_processes`` above one).

One Python process runs its threads on one core at a time (the GIL), so with several
associations at once a single ``serve`` receives on one core. With ``receiver_processes =
N``, ``serve`` binds the listening sockets and starts N - 1 ``dicom-gateway receiver``
processes that inherit them: every process accepts from the same sockets (the least busy
first, :class:`gateway.dicom.server.DicomServer`) and runs the whole DICOM service for the
associations it takes (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET), with the same ingest: an
instance is answered 0x0000 only once its file, its name and its index row are on disk, as
in ``serve``. The processes share the index (one writer at a time: ``BEGIN IMMEDIATE``,
the audit chain's head locked) and the spool, as nodes sharing one index do, and the
connection and association limits through :mod:`gateway.dicom.ledger`.

Between ``serve`` (:class:`ReceiverProcess`) and a receiver (:func:`run_receiver`):

* a socket pair: the receiver writes a byte when it queued a streamed delivery, which
  ``serve`` passes to the delivery worker (in ``serve`` or in its own process); its end of
  file tells the receiver that ``serve`` is gone, and the receiver then exits at once;
* a ready pipe, and a metrics file (``<state_dir>/receiver-<index>-metrics.prom``) that
  ``serve``'s endpoint adds to its own, as for the worker process;
* a receiver that dies is logged, audited (``application`` / ``receiver-exited``), its
  ledger entry removed, and another started after a second; what it had not answered was
  never acknowledged (its partial files are swept from ``incoming/`` as orphans).

``serve`` runs the router, the metrics endpoint, the peer endpoint and the housekeeping;
receivers only receive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

from gateway.config import GatewayConfig
from gateway.dicom.ledger import LEDGER_DIR, forget
from gateway.worker_process import (
    Channel,
    ChildProcess,
    config_unchanged,
    run_child,
)

log = logging.getLogger(__name__)


def metrics_file(index: int) -> str:
    return f"receiver-{index}-metrics.prom"


class ReceiverProcess(ChildProcess):
    """``dicom-gateway receiver`` number ``index`` (``serve`` is 0) on ``sockets``."""

    command = "receiver"
    label = "receiver"

    def __init__(
        self,
        cfg: GatewayConfig,
        index: int,
        sockets: list[socket.socket],
        *,
        on_wake: Callable[[], None],
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(cfg, on_exit=on_exit)
        self.index = index
        self._sockets = sockets
        self._on_wake = on_wake
        self._link: socket.socket | None = None

    def _open_channel(self) -> Channel:
        ours, theirs = socket.socketpair()
        listen_fds = [s.fileno() for s in self._sockets]
        ours_fd, theirs_fd = ours.detach(), theirs.detach()
        return Channel(
            [
                "--index",
                str(self.index),
                "--link-fd",
                str(theirs_fd),
                *(f"--listen-fd={fd}" for fd in listen_fds),
            ],
            (theirs_fd, *listen_fds),
            (theirs_fd,),
            (ours_fd,),
        )

    def _attach(self, channel: Channel) -> None:
        (fd,) = channel.parent_ends
        link = socket.socket(fileno=fd)
        self._link = link
        threading.Thread(
            target=self._relay, args=(link,), name=f"receiver-{self.index}-link", daemon=True
        ).start()

    def _relay(self, link: socket.socket) -> None:
        """The receiver's wake-ups, passed to the delivery worker, until its end closes."""
        while True:
            try:
                data = link.recv(4096)
            except OSError:  # closed here (stop, or the receiver gone)
                return
            if not data:
                return
            self._on_wake()

    def _detach(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            with contextlib.suppress(OSError):
                link.close()
        # dead (or stopped): its connections closed with it
        forget(self.cfg.state_dir / LEDGER_DIR, self.index)


def run_receiver(
    cfg: GatewayConfig,
    *,
    index: int,
    listen_fds: list[int],
    link_fd: int,
    ready_fd: int,
    config_sha256: str,
) -> int:
    """A receiver process: the DICOM listener on ``serve``'s sockets, until SIGTERM or the
    end of ``serve``."""
    from gateway.app import Node

    if not config_unchanged(cfg, config_sha256):
        return 2
    link = socket.socket(fileno=link_fd)
    wake_lock = threading.Lock()

    def wake() -> None:
        with wake_lock, contextlib.suppress(OSError):  # full or gone: serve has it anyway
            link.send(b"\0", socket.MSG_DONTWAIT)

    node = Node(
        cfg,
        role="receiver",
        receiver_index=index,
        inherited=[socket.socket(fileno=fd) for fd in listen_fds],
        on_stream_delivery=wake,
    )
    return run_child(
        node,
        start=node.start_receiver,
        link_fd=os.dup(link_fd),
        on_data=lambda: None,
        ready_fd=ready_fd,
        metrics_path=cfg.state_dir / metrics_file(index),
        stop=node.stop_receiver,
        at_once=node.server.refuse_new_associations,
    )
