"""The programs under test, each started on loopback in its own fresh storage folder.

Every receiver is a process the harness starts and stops by pid; ``pid`` is the root of the
process tree whose memory and CPU are measured.  Peers run at their best: TCP_NODELAY=1 in
the environment of DCMTK and Orthanc (Debian's builds set it only then), large PDUs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tests.support.node import GatewayNode
from tests.support.peers import (
    LOOPBACK,
    Orthanc,
    PeerError,
    dcmtk_path,
    free_port,
    log_tail,
    wait_for_port,
)

PEER_MAX_PDU = 131072
"""Largest PDU DCMTK accepts for --max-pdu; also given to Orthanc (its default is 16 KiB)."""


def peer_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


class Receiver(Protocol):
    name: str
    ae_title: str
    port: int

    @property
    def pid(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def stored(self) -> int | None:
        """Instances the receiver holds now; None when it keeps nothing (discarding)."""
        ...


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """SIGTERM by pid, SIGKILL after ``timeout``; reap."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class _Process:
    """A command started with its output in ``log``, ready when ``port`` accepts."""

    def __init__(self, cmd: Sequence[str], log: Path, port: int, env: dict[str, str]) -> None:
        self.cmd = list(cmd)
        self.log = log
        self.port = port
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        try:
            wait_for_port(self.port, timeout=timeout)
        except PeerError as exc:
            self.stop()
            raise PeerError(f"{self.cmd[0]} did not start:\n{log_tail(self.log)}") from exc

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


class Storescp:
    """DCMTK storescp writing files (or discarding them with ``--ignore``).

    With more than one concurrent association it runs with ``--fork`` (one child process
    per association), otherwise associations would be served one after the other.
    """

    def __init__(self, root: Path, *, ignore: bool, concurrency: int) -> None:
        self.name = "dcmtk-storescp-ignore" if ignore else "dcmtk-storescp"
        self.ae_title = "STORESCP"
        self.port = free_port()
        self.out = root / "storage"
        self.out.mkdir(parents=True)
        self.ignore = ignore
        args = [
            dcmtk_path("storescp"),
            "--aetitle",
            self.ae_title,
            "--max-pdu",
            str(PEER_MAX_PDU),
            "--output-directory",
            str(self.out),
        ]
        if ignore:
            args.append("--ignore")
        if concurrency > 1:
            args.append("--fork")
        args.append(str(self.port))
        self.settings = " ".join(args[1:-1])
        self._proc = _Process(args, root / "storescp.log", self.port, peer_env())

    @property
    def pid(self) -> int:
        return self._proc.pid

    def start(self) -> None:
        self._proc.start()

    def stop(self) -> None:
        self._proc.stop()

    def stored(self) -> int | None:
        return None if self.ignore else _count_files(self.out)


class PynetdicomSCP:
    """bench/pynetdicom_scp.py: a minimal pynetdicom SCP writing each data set to a file."""

    def __init__(self, root: Path) -> None:
        self.name = "pynetdicom-scp"
        self.ae_title = "PYSCP"
        self.port = free_port()
        self.out = root / "storage"
        args = [
            sys.executable,
            "-m",
            "bench.pynetdicom_scp",
            "--port",
            str(self.port),
            "--out",
            str(self.out),
            "--ae-title",
            self.ae_title,
        ]
        self.settings = "bench/pynetdicom_scp.py, max PDU 262144, TCP_NODELAY"
        self._proc = _Process(args, root / "pyscp.log", self.port, dict(os.environ))

    @property
    def pid(self) -> int:
        return self._proc.pid

    def start(self) -> None:
        self._proc.start()

    def stop(self) -> None:
        self._proc.stop()

    def stored(self) -> int | None:
        return _count_files(self.out)


ORTHANC_SETTINGS: dict[str, Any] = {"MaximumPduLength": PEER_MAX_PDU}


class OrthancReceiver:
    """Orthanc with its default storage (files + SQLite index) in a fresh folder."""

    def __init__(
        self,
        root: Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        lua: str | None = None,
        name: str = "orthanc",
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.server = Orthanc(
            root, aet=aet, modalities=modalities, lua=lua, extra_config=ORTHANC_SETTINGS
        )
        self.ae_title = aet
        self.port = self.server.dicom_port
        self.settings = f"default storage, TCP_NODELAY=1, {ORTHANC_SETTINGS}"

    @property
    def pid(self) -> int:
        pid = self.server.pid
        assert pid is not None, "not started"
        return pid

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        # The storage is thrown away: SIGKILL by pid (a graceful stop costs ~3.5 s).
        self.server.kill()

    def stored(self) -> int | None:
        return self.server.count_instances()


NODE_DEFAULT_WORKER: dict[str, Any] = {
    "poll_interval": 0.5,
    "routing_interval": 1.0,
    "backoff_initial": 5,
    "backoff_max": 600,
}
"""config/gateway.toml's defaults (tests.support.node.GatewayNode shortens them otherwise)."""


@dataclass
class NodeOptions:
    destinations: list[dict[str, Any]] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)
    worker: dict[str, Any] = field(default_factory=lambda: dict(NODE_DEFAULT_WORKER))
    dicom: dict[str, Any] = field(default_factory=dict)


class NodeReceiver:
    """``dicom-gateway serve`` with its real configuration: durable spool (fsync), SQLite
    index and audit chain, defaults for everything not named here."""

    def __init__(self, node: GatewayNode, name: str = "node") -> None:
        """``node`` configured, not started (e.g. one of the peer pair of bench.scenarios)."""
        self.name = name
        self.node = node
        self.ae_title = node.ae_title
        self.port = node.port
        self.settings = f"dicom-gateway serve -c {node.config_path}"
        self.config_text = node.config_path.read_text()

    @classmethod
    def configured(
        cls, root: Path, options: NodeOptions | None = None, name: str = "node"
    ) -> NodeReceiver:
        """A node in ``root`` with ``options`` and its defaults otherwise."""
        opts = options or NodeOptions()
        node = GatewayNode(
            root,
            destinations=opts.destinations,
            routes=opts.routes,
            worker=opts.worker,
            dicom=opts.dicom,
            allow=[{"called_ae": "GATEWAY", "calling_ae": ["*"], "addresses": [LOOPBACK]}],
        )
        return cls(node, name)

    @property
    def pid(self) -> int:
        return self.node.pid

    def start(self) -> None:
        self.node.start()

    def stop(self) -> None:
        # Its storage is thrown away: SIGTERM, SIGKILL after 3 s (a graceful stop of the node
        # took ~11 s here, which is not what is measured).
        self.node.stop(timeout=3.0)

    def forward_counts(self) -> dict[str, float]:
        """Associations the node opened to its destinations and reused (its metrics), and
        the deliveries it made (its index)."""
        counts: dict[str, float] = {"associations_opened": 0.0, "associations_reused": 0.0}
        for line in self.node.metrics().splitlines():
            if line.startswith("gateway_destination_associations_total{"):
                kind = line.split('kind="', 1)[1].split('"', 1)[0]
                counts[f"associations_{kind}"] = float(line.rsplit(" ", 1)[1])
        db = self.node.state_dir / "index.sqlite3"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            (deliveries,) = conn.execute("SELECT count(*) FROM deliveries").fetchone()
            retries = conn.execute(
                "SELECT reason FROM delivery_attempts WHERE outcome != 'delivered'"
            ).fetchall()
        counts["deliveries"] = float(deliveries)
        counts["failed_attempts"] = float(len(retries))
        for (reason,) in retries[:5]:  # a run slowed by retries says why
            print(f"bench: {self.name}: attempt failed: {reason}", file=sys.stderr)
        return counts

    def stored(self) -> int | None:
        db = self.node.state_dir / "index.sqlite3"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            (count,) = conn.execute("SELECT count(*) FROM instances").fetchone()
        return int(count)


IngestFactory = Callable[[Path, int], Receiver]
"""(fresh folder, concurrent associations) -> a receiver not started yet."""

INGEST_SYSTEMS: dict[str, IngestFactory] = {
    "node": lambda root, conc: NodeReceiver.configured(root),
    # dicom.receiver_processes = 2, the configuration for two cores (README "Receiver
    # processes"), at every concurrency, one association included
    "node-rx2": lambda root, conc: NodeReceiver.configured(
        root, NodeOptions(dicom={"receiver_processes": 2}), name="node-rx2"
    ),
    "dcmtk-storescp": lambda root, conc: Storescp(root, ignore=False, concurrency=conc),
    "dcmtk-storescp-ignore": lambda root, conc: Storescp(root, ignore=True, concurrency=conc),
    "orthanc": lambda root, conc: OrthancReceiver(root),
    "pynetdicom-scp": lambda root, conc: PynetdicomSCP(root),
}


# --------------------------------------------------------------------------- sender


@dataclass
class SendResult:
    seconds: float
    returncodes: list[int]
    log: str


def split(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """``files`` in ``parts`` contiguous chunks of near-equal length (empty ones dropped)."""
    n = len(files)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [list(files[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


def storescu_command(ae_title: str, port: int, files: Sequence[Path]) -> list[str]:
    return [
        dcmtk_path("storescu"),
        "-aet",
        "BENCH",
        "-aec",
        ae_title,
        LOOPBACK,
        str(port),
        *(str(f) for f in files),
    ]


def start_storescu(
    ae_title: str, port: int, files: Sequence[Path], concurrency: int, log: Path
) -> list[subprocess.Popen[bytes]]:
    """Start ``concurrency`` DCMTK storescu processes (one association each) over the files."""
    procs = []
    with open(log, "ab") as out:
        for chunk in split(files, concurrency):
            procs.append(
                subprocess.Popen(
                    storescu_command(ae_title, port, chunk),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=peer_env(),
                )
            )
    return procs


def wait_storescu(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    """The senders' exit codes, as soon as the last has exited: a blocking wait for each,
    where ``Popen.wait`` with a timeout polls, sleeping up to 50 ms between looks, which
    became part of every timed figure (0-50 ms a run). A timer kills them all after
    ``timeout`` (TimeoutExpired then)."""
    expired = threading.Event()

    def kill_all() -> None:
        expired.set()
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill_all)
    timer.daemon = True
    timer.start()
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        timer.cancel()
    if expired.is_set():
        raise subprocess.TimeoutExpired("storescu", timeout)
    return codes
