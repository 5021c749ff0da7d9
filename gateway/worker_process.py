"""The delivery worker in a process of its own (``worker.separate_process = true``).

One Python process runs its threads on one core at a time (the GIL): while a node forwards,
receiving and sending take turns, and a modality's C-STORE waits on de-identification and
outgoing C-STOREs. With ``separate_process`` the ``serve`` process keeps the listeners,
ingest, the router and the metrics endpoint, and starts ``dicom-gateway worker`` beside it
for the deliveries; the two share only the index and the spool, as several nodes sharing
one index do (leases, ``BEGIN IMMEDIATE`` / ``FOR UPDATE SKIP LOCKED``), so every guarantee
of the index holds unchanged.

Between the two (:class:`WorkerProcess` in ``serve``, :func:`run_worker` in the worker):

* a wake-up pipe: ``serve`` writes a byte whenever it queues a due delivery (a streamed
  instance, a study gone quiet), so the worker claims it at once instead of at its next
  poll. Its end of file tells the worker that ``serve`` is gone (killed): the worker then
  exits at once, as if killed with it; leases make whatever it was doing safe to redo;
* a ready pipe: the worker writes one byte once it can deliver, and ``serve`` opens its
  listeners only then (start-up fails, naming the cause, if the worker does not start);
* a metrics file (``<state_dir>/worker-metrics.prom``, rewritten every second): the
  worker's counters, which the endpoint of ``serve`` adds to its own
  (:class:`gateway.metrics.MergedCollector`).

A worker that dies while ``serve`` runs is logged, audited and started again after a second.
The worker refuses to start if the configuration file changed since ``serve`` read it.

:class:`ChildProcess` and :func:`run_child` are that life cycle for any child of ``serve``;
the receiver processes of :mod:`gateway.receiver_process` are the other kind.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from prometheus_client import generate_latest

from gateway import statelock
from gateway.config import GatewayConfig

if TYPE_CHECKING:
    from gateway.app import Node

log = logging.getLogger(__name__)

METRICS_FILE = "worker-metrics.prom"
METRICS_INTERVAL = 1.0
READY_TIMEOUT = 60.0
RESTART_DELAY = 1.0
STOP_STACKS_AFTER = 13.0
"""Seconds after a child's SIGTERM at which a stop still running writes every thread's
stack to stderr (its grace period is 10 s; ``serve`` kills it 5 s after its own)."""


class ChildStartError(RuntimeError):
    """A child process of ``serve`` exited or did not say it was ready in time."""


def config_digest(path: Path) -> str:
    """SHA-256 of the configuration file as it is now."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ChildWakeup(threading.Event):
    """The worker's wake-up as ``serve`` sees it: :meth:`set` writes to the pipe of the
    worker process (nothing while none runs: a new worker looks for due work first)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._fd = -1

    def attach(self, fd: int) -> None:
        with self._lock:
            self._fd = fd

    def detach(self) -> int:
        with self._lock:
            fd, self._fd = self._fd, -1
        return fd

    def set(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            try:
                os.write(self._fd, b"\0")
            except BlockingIOError:  # full: the worker has wake-ups to read anyway
                pass
            except OSError:  # the worker is gone; the supervisor starts another
                pass


@dataclass
class Channel:
    """What one start of a child process is given besides its ready pipe: arguments, the
    descriptors it inherits, and which of them are its ends (closed here once it has them)."""

    args: list[str]
    pass_fds: tuple[int, ...]
    child_ends: tuple[int, ...]
    parent_ends: tuple[int, ...]


class ChildProcess(ABC):
    """Starts, watches, restarts and stops one ``dicom-gateway <command>`` child of
    ``serve``; subclasses say what each start is given (:meth:`_open_channel`) and what
    ``serve`` does with its ends once the child is ready or gone."""

    command = ""
    label = ""

    def __init__(self, cfg: GatewayConfig, *, on_exit: Callable[[int], None] | None = None) -> None:
        self.cfg = cfg
        self._on_exit = on_exit or (lambda code: None)
        self._digest = config_digest(cfg.source)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @abstractmethod
    def _open_channel(self) -> Channel:
        """The channel of one start (made anew for each)."""

    @abstractmethod
    def _attach(self, channel: Channel) -> None:
        """The child is ready: ``serve`` starts using its ends of the channel."""

    @abstractmethod
    def _detach(self) -> None:
        """The child is gone (or stopping): ``serve`` lets go of its ends."""

    def start(self) -> None:
        """Start the child and wait until it is ready (ChildStartError if it is not)."""
        self._spawn()
        self._watcher = threading.Thread(
            target=self._watch, name=f"{self.label}-process", daemon=True
        )
        self._watcher.start()

    def _spawn(self) -> None:
        ready_r, ready_w = os.pipe()
        try:
            channel = self._open_channel()
        except BaseException:
            os.close(ready_r)
            os.close(ready_w)
            raise
        try:
            cmd = [
                sys.executable,
                "-m",
                "gateway.cli",
                self.command,
                "-c",
                str(self.cfg.source),
                *channel.args,
                "--ready-fd",
                str(ready_w),
                "--config-sha256",
                self._digest,
            ]
            proc = subprocess.Popen(
                cmd,
                # with serve's lock of the state directory: held while any child lives
                pass_fds=(*channel.pass_fds, ready_w, *statelock.inherited_fds()),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in (*channel.child_ends, *channel.parent_ends, ready_r, ready_w):
                os.close(fd)
            raise
        for fd in (*channel.child_ends, ready_w):
            os.close(fd)
        try:
            ready, _, _ = select.select([ready_r], [], [], READY_TIMEOUT)
            got = os.read(ready_r, 1) if ready else b""
        finally:
            os.close(ready_r)
        if got != b"\1":
            with contextlib.suppress(OSError):
                proc.kill()
            code = proc.wait()
            for fd in channel.parent_ends:
                os.close(fd)
            raise ChildStartError(f"the {self.label} process did not start (exit code {code})")
        with self._lock:
            self._proc = proc
        self._attach(channel)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                proc = self._proc
            if proc is None:
                return
            code = proc.wait()
            self._detach()
            if self._stopping.is_set():
                return
            log.error(
                f"{self.label} process exited; starting another",
                extra={"exit_code": code, "pid": proc.pid},
            )
            self._on_exit(code)
            while not self._stopping.wait(RESTART_DELAY):
                try:
                    self._spawn()
                    break
                except (OSError, RuntimeError):
                    log.exception(f"{self.label} process did not start; trying again")

    def terminate(self) -> None:
        """SIGTERM: the child stops as it would with ``serve`` (:meth:`stop` waits)."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def stop(self, grace: float) -> None:
        """SIGTERM (the child finishes or hands back what it holds), SIGKILL after
        ``grace`` + 5 s."""
        self.terminate()
        with self._lock:
            proc = self._proc
        if proc is not None:
            try:
                proc.wait(grace + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._watcher is not None:
            self._watcher.join(grace + 5)
        self._detach()


class WorkerProcess(ChildProcess):
    """``dicom-gateway worker`` for a ``serve`` process, woken through a pipe."""

    command = "worker"
    label = "worker"

    def __init__(
        self,
        cfg: GatewayConfig,
        wakeup: ChildWakeup,
        *,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(cfg, on_exit=on_exit)
        self.wakeup = wakeup

    def _open_channel(self) -> Channel:
        wake_r, wake_w = os.pipe()
        return Channel(["--wake-fd", str(wake_r)], (wake_r,), (wake_r,), (wake_w,))

    def _attach(self, channel: Channel) -> None:
        (wake_w,) = channel.parent_ends
        os.set_blocking(wake_w, False)
        self.wakeup.attach(wake_w)
        self.wakeup.set()  # anything queued while it started

    def _detach(self) -> None:
        fd = self.wakeup.detach()
        if fd >= 0:
            os.close(fd)


def run_worker(cfg: GatewayConfig, *, wake_fd: int, ready_fd: int, config_sha256: str) -> int:
    """The worker process: deliveries only, until SIGTERM or the end of ``serve``."""
    from gateway.app import Node

    if not config_unchanged(cfg, config_sha256):
        return 2
    node = Node(cfg, role="worker")

    def on_wake() -> None:
        node.worker.wakeup.set()

    return run_child(
        node,
        start=node.start_worker,
        link_fd=wake_fd,
        on_data=on_wake,
        ready_fd=ready_fd,
        metrics_path=cfg.state_dir / METRICS_FILE,
        stop=node.stop_worker,
    )


def config_unchanged(cfg: GatewayConfig, config_sha256: str) -> bool:
    """Whether the configuration file is the one ``serve`` read (a child refuses to start
    on another: it would run under settings that ``serve`` does not)."""
    if config_sha256 and config_digest(cfg.source) != config_sha256:
        log.error("configuration file changed since serve started; restart the node")
        return False
    return True


def stop_signals(
    signals: Sequence[signal.Signals], *, at_once: Callable[[], None] = lambda: None
) -> threading.Event:
    """An event set as soon as one of ``signals`` arrives, ``at_once`` called first.

    Python runs a signal handler in the main thread, when that thread next runs Python
    code: a signal the kernel hands to another thread waits until the main thread's wait
    times out, and a main thread held up (a slow write) holds the stop up with it; a
    receiver process went on accepting associations meanwhile. Here the C-level handler's
    write to :func:`signal.set_wakeup_fd` wakes a thread of our own at once, whichever
    thread took the signal; it calls ``at_once`` (say, refuse new associations) and sets the
    event, which wakes the main thread's wait. Call from the main thread, once per process.
    """
    stopping = threading.Event()
    wanted = {int(s) for s in signals}
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    for s in signals:
        signal.signal(s, on_signal)

    def watch() -> None:
        while True:  # os.read is retried on EINTR by Python itself (PEP 475)
            data = os.read(wake_r, 64)
            if wanted.intersection(data):
                at_once()
                stopping.set()

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()
    return stopping


def run_child(
    node: Node,
    *,
    start: Callable[[], None],
    link_fd: int,
    on_data: Callable[[], None],
    ready_fd: int,
    metrics_path: Path,
    stop: Callable[[], None],
    at_once: Callable[[], None] = lambda: None,
) -> int:
    """A child's life: ``start``, then ready said on ``ready_fd``; its metrics written to
    ``metrics_path`` every second; ``on_data`` for what ``serve`` writes to ``link_fd``,
    whose end of file means ``serve`` is gone (the child then ends at once, as if killed
    with it: nothing here is acknowledged that is not durable); on SIGTERM ``at_once``
    right away (:func:`stop_signals`), then ``stop``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches serve, which stops us
    stopping = stop_signals([signal.SIGTERM], at_once=at_once)
    start()

    def watch_serve() -> None:
        while True:
            data = os.read(link_fd, 4096)
            if not data:  # serve is gone: end as it ended
                os._exit(70)
            on_data()

    threading.Thread(target=watch_serve, name="serve-watch", daemon=True).start()
    os.write(ready_fd, b"\1")
    os.close(ready_fd)
    while not stopping.wait(METRICS_INTERVAL):
        write_metrics(node, metrics_path)
    # a stop that overruns its grace period (serve kills the child at grace + 5 s) says
    # where each thread is, on stderr (serve's log), before it is killed
    faulthandler.dump_traceback_later(STOP_STACKS_AFTER, exit=False)
    stop()
    faulthandler.cancel_dump_traceback_later()
    write_metrics(node, metrics_path)
    return 0


def write_metrics(node: Node, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_bytes(generate_latest(node.metrics.registry))
        os.replace(tmp, path)
    except OSError:
        log.warning("child process metrics not written", exc_info=True)
        with contextlib.suppress(OSError):
            tmp.unlink()
