"""The audit exporter: the chain's rows to the hospital's audit repository (IHE ATNA).

A thread of its own reads the rows after a durable cursor (table ``audit_export_cursors``,
one row per repository ``host:port``), turns each into a PS3.15 A.5 message
(:mod:`gateway.audit.atna`) in an RFC 5424 syslog message (:mod:`gateway.audit.syslog`) and
writes them, octet-counted (RFC 5425), over TLS to the repository, whose certificate must
chain to the configured CA and name its host. Nothing that records an audit row waits on
it: rows are committed with the work they record, and the exporter reads them afterwards.

Delivery is at least once. The cursor moves past a batch only after the batch was written
and the repository's TCP stack acknowledged every byte (Linux ``TIOCOUTQ`` drained), and it
is committed after that. RFC 5425 has no application acknowledgement, so bytes a repository
acknowledged but had not read when it dropped the connection are not known to be lost:
each new connection therefore begins ``resend_on_reconnect`` rows before the cursor. Every
message carries its row's sequence number (``[meta sequenceId=...]``), by which a repository
drops the duplicates. While the repository is down or drops the connection, the exporter
backs off exponentially (``backoff_initial`` doubling up to ``backoff_max``) and retries.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from sqlalchemy import select as sql_select

from gateway.audit.atna import AuditEntry, AuditSource, Patient, build_message, study_uids
from gateway.audit.syslog import frame, syslog_message
from gateway.clock import Clock
from gateway.config.model import AuditExportConfig, GatewayConfig
from gateway.crypto.tls import client_context
from gateway.errors import AuditExportError, IndexError_
from gateway.index.db import Database
from gateway.index.models import AuditEvent, AuditExportCursor, AuditHead, Study
from gateway.metrics import Metrics

log = logging.getLogger(__name__)


class Connection(Protocol):
    """A connection to the audit repository."""

    def send(self, data: bytes) -> None:
        """Write ``data`` and return once the repository acknowledged it; raises
        :class:`AuditExportError` (kind ``send``)."""

    def alive(self) -> bool:
        """False once the repository closed or reset the connection."""

    def close(self) -> None: ...


Connector = Callable[[], Connection]


class TLSConnection:
    """A TLS client socket to a syslog-TLS receiver (RFC 5425)."""

    def __init__(self, sock: ssl.SSLSocket, *, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
            self._drain()
        except OSError as exc:  # ssl.SSLError, resets and timeouts are OSErrors
            raise AuditExportError("send", exc.__class__.__name__) from exc

    def _drain(self) -> None:
        """Wait until the peer's TCP stack acknowledged every byte written (Linux)."""
        request = getattr(termios, "TIOCOUTQ", None)
        if request is None:
            return
        deadline = time.monotonic() + self.timeout
        while True:
            buf = fcntl.ioctl(self.sock.fileno(), request, b"\0\0\0\0")
            if struct.unpack("i", buf)[0] == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the repository did not acknowledge the messages in time")
            time.sleep(0.002)

    def alive(self) -> bool:
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        if not readable:
            return True
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(4096)  # a syslog receiver sends nothing: EOF or a reset
        except ssl.SSLWantReadError:
            return True  # only TLS records (session tickets) were waiting
        except OSError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        return bool(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def repository_name(export: AuditExportConfig) -> str:
    """The key of a repository's cursor row."""
    return f"{export.host}:{export.port}"


def tls_connector(cfg: GatewayConfig) -> Connector:
    """Connections to ``[audit.export]``'s repository with the node's TLS client material.

    The client certificate is ``cert_file``/``key_file``, else the node's TLS certificate
    (``<state_dir>/keys/tls.crt``, or ``dicom.tls``'s) when it exists, else none. Raises
    CryptoError naming the file when the CA, certificate or key does not load.
    """
    export = cfg.audit.export
    if export.ca_file is None:
        raise AuditExportError("connect", "audit.export.ca_file is not set")
    cert_file, key_file = export.cert_file, export.key_file
    if cert_file is None and cfg.tls_cert_file.exists() and cfg.tls_key_file.exists():
        cert_file, key_file = cfg.tls_cert_file, cfg.tls_key_file
    context = client_context(
        ca_file=export.ca_file,
        cert_file=cert_file,
        key_file=key_file,
        allow_tls12=export.allow_tls12,
    )
    server_name = export.server_name or export.host

    def connect() -> Connection:
        try:
            raw = socket.create_connection((export.host, export.port), timeout=export.timeout)
        except OSError as exc:
            raise AuditExportError("connect", exc.__class__.__name__) from exc
        try:
            tls = context.wrap_socket(raw, server_hostname=server_name)
        except OSError as exc:  # ssl.SSLError (verification, protocol) or a reset/timeout
            raw.close()
            reason = getattr(exc, "verify_message", "") or exc.__class__.__name__
            raise AuditExportError("tls", str(reason)) from exc
        return TLSConnection(tls, timeout=export.timeout)

    return connect


class AuditExporter:
    """Sends the audit chain to one repository from its own thread; see the module doc."""

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        db: Database,
        clock: Clock,
        metrics: Metrics,
        connector: Connector,
    ) -> None:
        self.cfg = cfg
        self.export = cfg.audit.export
        self.db = db
        self.clock = clock
        self.metrics = metrics
        self.connector = connector
        self.repository = repository_name(self.export)
        self.source = AuditSource(cfg.node.name, self.export.enterprise_site_id)
        self.hostname = socket.gethostname()
        self.procid = str(os.getpid())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the durable cursor --------------------------------------------------------------
    def cursor(self) -> int:
        """The last row known to be sent to this repository (0: none)."""
        with self.db.session() as s:
            row = s.get(AuditExportCursor, self.repository)
            return row.seq if row is not None else 0

    def _advance(self, seq: int) -> None:
        with self.db.session() as s:
            row = s.get(AuditExportCursor, self.repository, with_for_update=True)
            if row is None:
                s.add(
                    AuditExportCursor(
                        repository=self.repository, seq=seq, updated_at=self.clock.now()
                    )
                )
            elif seq > row.seq:
                row.seq = seq
                row.updated_at = self.clock.now()

    def _progress(self) -> tuple[int, int]:
        """(the cursor, the chain's last sequence number), in one short transaction."""
        with self.db.session() as s:
            row = s.get(AuditExportCursor, self.repository)
            head = s.execute(sql_select(AuditHead.seq).where(AuditHead.id == 1)).scalar()
            return (row.seq if row is not None else 0), int(head or 0)

    def _read(self, after: int) -> tuple[list[AuditEntry], dict[str, Patient]]:
        with self.db.session() as s:
            rows = (
                s.execute(
                    sql_select(AuditEvent)
                    .where(AuditEvent.seq > after)
                    .order_by(AuditEvent.seq)
                    .limit(self.export.batch_size)
                )
                .scalars()
                .all()
            )
            entries = [AuditEntry.from_row(r) for r in rows]
            uids = study_uids(entries)
            patients: dict[str, Patient] = {}
            if uids:
                for study in s.execute(
                    sql_select(Study).where(Study.study_instance_uid.in_(sorted(uids)))
                ).scalars():
                    patients[study.study_instance_uid] = Patient(
                        study.patient_id, study.patient_name
                    )
            return entries, patients

    def messages(self, entries: Sequence[AuditEntry], patients: dict[str, Patient]) -> bytes:
        """The framed syslog messages for ``entries``, in order."""
        out = []
        for entry in entries:
            document = build_message(entry, source=self.source, patients=patients)
            message = syslog_message(
                document,
                sequence=entry.seq,
                timestamp=entry.recorded_at,
                hostname=self.hostname,
                app_name=self.export.app_name,
                procid=self.procid,
                failure=entry.outcome not in ("success", "accepted", "started", "warning"),
            )
            out.append(frame(message))
        return b"".join(out)

    # --- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-export", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = self.export.backoff_initial
        connection: Connection | None = None
        position = 0
        try:
            while not self._stop.is_set():
                try:
                    if connection is not None and not connection.alive():
                        connection.close()
                        connection = None
                        raise AuditExportError("send", "the repository closed the connection")
                    cursor, head = self._progress()
                    self.metrics.audit_export_lag.set(max(0, head - cursor))
                    if connection is None:
                        if head <= cursor:
                            self._stop.wait(self.export.poll_interval)
                            continue
                        connection = self.connector()
                        position = max(0, cursor - self.export.resend_on_reconnect)
                        log.info(
                            "audit repository connected",
                            extra={"repository": self.repository, "resend_from": position + 1},
                        )
                    entries, patients = self._read(position)
                    if not entries:
                        self._stop.wait(self.export.poll_interval)
                        continue
                    connection.send(self.messages(entries, patients))
                    position = entries[-1].seq
                    self._advance(position)
                    self.metrics.audit_export_messages.inc(len(entries))
                    self.metrics.audit_export_lag.set(max(0, head - max(cursor, position)))
                    backoff = self.export.backoff_initial
                except AuditExportError as exc:
                    self.metrics.audit_export_failures.labels(exc.kind).inc()
                    log.warning(
                        "audit repository unavailable; backing off",
                        extra={
                            "repository": self.repository,
                            "kind": exc.kind,
                            "error": str(exc),
                            "retry_in": backoff,
                        },
                    )
                    if connection is not None:
                        connection.close()
                        connection = None
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.export.backoff_max)
                except IndexError_:
                    log.warning("index unavailable; audit export backing off")
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.export.backoff_max)
                except Exception:  # thread boundary: keep exporting through a bug
                    log.exception("audit export iteration failed")
                    if connection is not None:
                        connection.close()
                        connection = None
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.export.backoff_max)
        finally:
            if connection is not None:
                connection.close()
