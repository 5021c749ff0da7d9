"""The node: wires config, index, spool, the DICOM listener, the router and the worker."""

from __future__ import annotations

import functools
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway import __version__, statelock
from gateway.audit.chain import AuditRecord, append
from gateway.audit.export import AuditExporter, tls_connector
from gateway.clock import Clock, SystemClock
from gateway.config import GatewayConfig
from gateway.crypto.keys import CURRENT_KEK, Keyring, init_node_keys, keys_dir, load_keyring
from gateway.dicom import ledger
from gateway.dicom.qr_scu import UpstreamClient
from gateway.dicom.server import DicomServer
from gateway.dicom.tls import listener_context
from gateway.errors import IndexError_
from gateway.index import deliveries
from gateway.index.db import Database
from gateway.ingest.service import IngestService
from gateway.metrics import Metrics
from gateway.peer.client import SealStep, build_peer_destinations
from gateway.peer.material import load_own_keys, load_peers
from gateway.peer.server import PeerServer
from gateway.qr.federation import FederationClient
from gateway.qr.responder import PeerQueryResponder
from gateway.qr.service import QRService
from gateway.receiver_process import ReceiverProcess, metrics_file
from gateway.routing.router import Router
from gateway.spool.store import Spool
from gateway.statelock import lease_owner_prefix, node_id
from gateway.transfer.destinations import Destination, build_destinations
from gateway.transfer.pipeline import Pipeline
from gateway.transfer.prepare import DeidStep, check_profiles
from gateway.transfer.worker import Worker
from gateway.worker_process import METRICS_FILE, ChildWakeup, WorkerProcess

log = logging.getLogger(__name__)

GAUGE_INTERVAL = 1.0
"""Seconds between refreshes of the delivery gauges (unfinished deliveries by state, the
oldest one's age): two queries, which a ``routing_interval`` below a second would otherwise
repeat with every look for quiet studies."""
ENDED_GAUGE_INTERVAL = 10.0
"""Seconds between counts of the deliveries in the states a delivery ends in (delivered,
failed, quarantined, ...): every delivery ever made, one index entry read per delivery
(45 ms at a million on SQLite; with the unfinished ones every second, that was 4.5 % of a
core, and the oldest one's age, found with ``NOT IN``, another 21 %)."""


class Node:
    """The node's parts. ``role`` "serve" is the node (listeners, ingest, router, metrics
    and, unless ``worker.separate_process``, the delivery worker); "worker" is the delivery
    worker's own process (:mod:`gateway.worker_process`), started by :meth:`start_worker`;
    "receiver" is one of the receiver processes (:mod:`gateway.receiver_process`), number
    ``receiver_index``, on the listening sockets ``inherited`` from serve, started by
    :meth:`start_receiver`, its streamed deliveries told to ``on_stream_delivery``."""

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        clock: Clock | None = None,
        role: str = "serve",
        receiver_index: int = 0,
        inherited: list[socket.socket] | None = None,
        on_stream_delivery: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock or SystemClock()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(cfg.database_url, busy_timeout=cfg.database.busy_timeout)
        self.keyring = _spool_keyring(cfg)
        self.spool = Spool(
            cfg.spool_dir,
            min_free_bytes=cfg.ingest.spool_min_free_bytes,
            keyring=self.keyring,
            reload_keyring=lambda: load_keyring(cfg.state_dir),
            probe_interval=cfg.ingest.spool_probe_interval,
            monotonic=self.clock.monotonic,
        )
        self.metrics = Metrics()
        self.deid_step = DeidStep(cfg, outgoing_dir=cfg.spool_dir / "outgoing", spool=self.spool)
        # peers: trusted material and this node's keys, loaded only when peers are in use
        uses_peers = (
            cfg.peer.enabled
            or any(d.type == "peer" for d in cfg.destinations)
            or bool(cfg.qr.federation)
        )
        self.peers = load_peers(cfg) if uses_peers else {}
        self.own_keys = load_own_keys(cfg) if uses_peers else None
        self.seal_step = SealStep(
            cfg,
            self.peers,
            folder=cfg.spool_dir / "outgoing" / "sealed",
            profile_of=self.deid_step.summary,
            spool=self.spool,
        )
        destinations: dict[str, Destination] = dict(
            build_destinations(
                cfg.destinations, calling_ae_title=cfg.dicom.ae_title, metrics=self.metrics
            )
        )
        if self.own_keys is not None:
            destinations.update(
                build_peer_destinations(
                    cfg,
                    peers=self.peers,
                    own=self.own_keys,
                    seal=self.seal_step,
                    db=self.db,
                    clock=self.clock,
                )
            )
        # this run's leases: <node id>:<run>:worker-<thread>, see gateway.statelock
        self.node_id = node_id(cfg.state_dir)
        self.lease_prefix = lease_owner_prefix(self.node_id)
        self.worker = Worker(
            cfg,
            lease_prefix=self.lease_prefix,
            pipeline=Pipeline([self.deid_step, self.seal_step]),
            db=self.db,
            spool=self.spool,
            clock=self.clock,
            metrics=self.metrics,
            destinations=destinations,
        )
        # the worker in a process of its own: what wakes it here writes to its pipe
        self.worker_process: WorkerProcess | None = None
        if role == "serve" and cfg.worker.enabled and cfg.worker.separate_process:
            wakeup = ChildWakeup()
            self.worker.wakeup = wakeup
            self.worker_process = WorkerProcess(cfg, wakeup, on_exit=self._worker_exited)
        self.ingest = IngestService(
            cfg,
            db=self.db,
            spool=self.spool,
            clock=self.clock,
            metrics=self.metrics,
            on_stream_delivery=on_stream_delivery or self.worker.wakeup.set,
        )
        self.spool.on_health = self.ingest.spool_health_changed
        for name in self.seal_step.targets:
            if name not in self.worker.capacity:  # federated retrieves: two packages at once
                self.worker.capacity[name] = 2
        self.router = Router(cfg, db=self.db, clock=self.clock, metrics=self.metrics)
        self.query_retrieve = self._query_retrieve()
        # several receiver processes: the limits counted across them (serve starts afresh)
        ledger_dir = cfg.state_dir / ledger.LEDGER_DIR
        connection_ledger: ledger.ConnectionLedger | None = None
        if cfg.dicom.receiver_processes > 1 and role in ("serve", "receiver"):
            if role == "serve":
                ledger.reset(ledger_dir)
            connection_ledger = ledger.ConnectionLedger(ledger_dir, receiver_index)
        self.receivers: list[ReceiverProcess] = []
        self.server = DicomServer(
            cfg.dicom,
            self.ingest,
            incoming_dir=self.spool.incoming,
            on_security_event=lambda kind: self.metrics.security_events.labels(kind).inc(),
            tls_context=listener_context(cfg),
            query_retrieve=self.query_retrieve,
            spool=self.spool,
            ledger=connection_ledger,
            inherited=inherited,
        )
        self.peer_server: PeerServer | None = None
        if cfg.peer.enabled and self.own_keys is not None:
            self.peer_server = PeerServer(
                cfg,
                db=self.db,
                ingest=self.ingest,
                clock=self.clock,
                metrics=self.metrics,
                own=self.own_keys,
                peers=self.peers,
                qr_responder=self._qr_responder(),
            )
        self.audit_exporter: AuditExporter | None = None
        if cfg.audit.export.enabled:
            self.audit_exporter = AuditExporter(
                cfg,
                db=self.db,
                clock=self.clock,
                metrics=self.metrics,
                connector=tls_connector(cfg),
            )
        self._stop = threading.Event()
        self._housekeeping: threading.Thread | None = None

    def _query_retrieve(self) -> QRService | None:
        if not self.cfg.qr.enabled:
            return None
        upstream = self.cfg.qr.upstream
        return QRService(
            self.cfg,
            db=self.db,
            spool=self.spool,
            clock=self.clock,
            upstream=UpstreamClient(upstream, calling_ae_title=self.cfg.dicom.ae_title)
            if upstream is not None
            else None,
            federation=FederationClient(
                self.cfg,
                self.peers,
                on_outcome=lambda peer, outcome: self.metrics.qr_peer_requests.labels(
                    peer, outcome
                ).inc(),
            )
            if self.cfg.qr.federation
            else None,
        )

    def _qr_responder(self) -> PeerQueryResponder | None:
        if not self.cfg.qr.grants or self.query_retrieve is None:
            return None
        return PeerQueryResponder(
            self.cfg,
            qr=self.query_retrieve,
            db=self.db,
            clock=self.clock,
            key_of=self.deid_step.key,
            on_delivery=self.worker.wakeup.set,
        )

    def _prepare_deliveries(self) -> None:
        """What deliveries need before the first: profiles checked, the secret loaded (or,
        for development, made), and files prepared by attempts a crash interrupted removed
        (every attempt prepares afresh)."""
        check_profiles(self.cfg)
        if any(route.profile for route in self.cfg.routes) or any(
            grant.profile for grant in self.cfg.qr.grants
        ):
            self.deid_step.key()
        shutil.rmtree(self.deid_step.outgoing_dir, ignore_errors=True)

    def start(self) -> None:
        self._prepare_deliveries()
        self.db.migrate()
        removed = self.ingest.recover()
        self._release_earlier_leases("started")
        if removed:
            log.warning(
                "removed unacknowledged spool files left by a crash", extra={"count": removed}
            )
        if self.cfg.metrics.enabled:
            self.metrics.serve(
                self.cfg.metrics.host, self.cfg.metrics.port, relayed=self._relayed_metrics()
            )
        if self.audit_exporter is not None:
            self.audit_exporter.start()
        # before the listeners: every row of what the node serves follows its start row
        self._audit_application(
            "started", {"version": __version__, "recovered_spool_files": removed}
        )
        if self.worker_process is not None:
            self.worker_process.start()  # ready to deliver before anything is received
        self.server.bind()
        self._start_receivers()  # they accept once ready; serve once they all are
        self.server.accept()
        if self.peer_server is not None:
            self.peer_server.start()
        if self.cfg.worker.enabled:
            if self.worker_process is None:
                self.worker.start()
            self._housekeeping = threading.Thread(
                target=self._housekeep, name="router", daemon=True
            )
            self._housekeeping.start()
        log.info(
            "node started", extra={"ae_title": self.cfg.dicom.ae_title, "port": self.server.port}
        )

    def _relayed_metrics(self) -> list[Path]:
        """The metrics files of the node's other processes, added to serve's endpoint."""
        files = [self.cfg.state_dir / METRICS_FILE] if self.worker_process is not None else []
        for index in range(1, self.cfg.dicom.receiver_processes):
            files.append(self.cfg.state_dir / metrics_file(index))
        return files

    def _start_receivers(self) -> None:
        """Receiver processes 1 .. N-1 on serve's listening sockets, once they listen."""
        sockets = self.server.listening_sockets()
        for index in range(1, self.cfg.dicom.receiver_processes):
            # a previous run's counters are not this one's
            (self.cfg.state_dir / metrics_file(index)).unlink(missing_ok=True)
            receiver = ReceiverProcess(
                self.cfg,
                index,
                sockets,
                on_wake=self.worker.wakeup.set,
                on_exit=functools.partial(self._receiver_exited, index),
            )
            self.receivers.append(receiver)
            receiver.start()

    def start_receiver(self) -> None:
        """A receiver process's start: the listener only (serve migrated the index,
        recovered the spool and runs everything else)."""
        self.server.start()
        log.info("receiver process started", extra={"port": self.server.port})

    def stop_receiver(self, grace: float = 10.0) -> None:
        self.server.stop(grace)
        self.server.ledger.close()
        self.ingest.close()
        self.db.dispose()

    def start_worker(self) -> None:
        """The worker process's start: the deliveries only (``serve`` migrated the index,
        recovered the spool and runs everything else)."""
        self._prepare_deliveries()  # also what a previous worker process, killed, left
        self.worker.start()
        log.info("worker process started", extra={"threads": self.cfg.worker.threads})

    def stop_worker(self, grace: float = 10.0) -> None:
        self.worker.stop(timeout=grace)
        self.db.dispose()

    def _receiver_exited(self, index: int, code: int) -> None:
        self._audit_application("receiver-exited", {"receiver": index, "exit_code": code})

    def _worker_exited(self, code: int) -> None:
        self._audit_application("worker-exited", {"exit_code": code})
        self._release_earlier_leases("worker-exited")

    def _release_earlier_leases(self, why: str) -> None:
        """The deliveries an earlier run of this node's workers (a killed ``serve``, a
        worker process that died) had claimed, due again at once instead of when their
        leases run out. Only ``serve`` calls it: it holds the state directory's lock
        (``gateway.statelock``), so no process of an earlier run is alive, and a worker
        process has just ended when it is told so."""
        if not statelock.held():
            return  # not the serve command (a Node in a test, a CLI command)
        try:
            with self.db.session() as s:
                released = deliveries.release_leases(
                    s,
                    owners=f"{self.node_id}:",
                    keep=self.lease_prefix,
                    now=self.clock.now(),
                )
        except IndexError_:
            log.warning("index unavailable; leases of an earlier run left to run out")
            return
        if released:
            log.warning(
                "deliveries of an earlier run taken again without waiting for their leases",
                extra={"count": released, "reason": why},
            )

    def _audit_application(self, outcome: str, detail: dict[str, object]) -> None:
        """The node's own start and stop, in the audit (ATNA Application Start/Stop)."""
        record = AuditRecord(
            event_type="application",
            outcome=outcome,
            called_ae_title=self.cfg.dicom.ae_title,
            detail=detail,
        )
        try:
            with self.db.session() as s:
                append(s, record, node=self.cfg.node.name, now=self.clock.now())
        except IndexError_:  # the index went away (stop): said in the log instead
            log.warning("index unavailable; node %s not audited", outcome)

    def _housekeep(self) -> None:
        last_sweep = 0.0
        last_gauges = -GAUGE_INTERVAL
        last_ended = -ENDED_GAUGE_INTERVAL
        while not self._stop.is_set():
            try:
                if self.router.run_once():
                    self.worker.wakeup.set()
                if (now := time.monotonic()) - last_gauges >= GAUGE_INTERVAL:
                    last_gauges = now
                    ended = now - last_ended >= ENDED_GAUGE_INTERVAL
                    if ended:
                        last_ended = now
                    self.router.update_gauges(ended=ended)
                if isinstance(self.clock, SystemClock):  # F19: how far the system clock moved
                    self.metrics.clock_offset.set(self.clock.wall_offset())
                if time.monotonic() - last_sweep > 60:
                    last_sweep = time.monotonic()
                    self.spool.sweep_incoming(
                        older_than=self.cfg.ingest.incoming_orphan_seconds, now=time.time()
                    )
            except IndexError_:
                log.warning("index unavailable; router backing off")
            except Exception:  # thread boundary: keep routing alive through a bug
                log.exception("router iteration failed")
            self._stop.wait(self.cfg.worker.routing_interval)

    def stop(self, grace: float = 10.0) -> None:
        self._stop.set()
        for receiver in self.receivers:  # they stop as serve does, at the same time
            receiver.terminate()
        self.server.stop(grace)
        for receiver in self.receivers:
            receiver.stop(grace)
        if self.peer_server is not None:
            self.peer_server.stop(grace)
        if self.worker_process is not None:
            self.worker_process.stop(grace)
        else:
            self.worker.stop(timeout=grace)
        if self._housekeeping is not None:
            self._housekeeping.join(grace)
        self._audit_application("stopped", {"grace_seconds": grace})
        if self.audit_exporter is not None:
            self.audit_exporter.stop(timeout=grace)
        self.ingest.close()
        self.db.dispose()


def _spool_keyring(cfg: GatewayConfig) -> Keyring:
    """The keyring the spool is encrypted under; development keys on a first start."""
    if not (keys_dir(cfg.state_dir) / CURRENT_KEK).exists():
        result = init_node_keys(cfg.state_dir)
        log.warning(
            "generated development node keys (spool key-encryption key, signing and HPKE "
            "keys); run dicom-gateway keys init for production and back them up",
            extra={"path": str(keys_dir(cfg.state_dir)), "files": list(result.created)},
        )
    return load_keyring(cfg.state_dir)
