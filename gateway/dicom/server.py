"""The DICOM listener: pynetdicom's AE, hardened, with the gateway's admission policy.

This module is the boundary between pynetdicom and the rest of the node. It

* receives C-STORE data sets in chunks to a file in the spool's ``incoming`` folder, so
  memory stays bounded whatever the instance size, encrypted as it arrives (an envelope
  under the spool's current key-encryption key: plaintext never touches the disk);
* listens on a plain port, a TLS port (PS3.15 B.9, 2762 by convention) or both; the TLS
  handshake runs on the connection's own thread with a deadline, never on the accept
  thread (pynetdicom's ``get_request`` would let one silent client stall every other);
* wraps every accepted socket in :class:`~gateway.dicom.guard.GuardedSocket`;
* applies the admission policy (called AE, calling AE allowlist bound to addresses,
  global and per-address limits) before pynetdicom negotiates, answering with the
  PS3.8 9.3.4 A-ASSOCIATE-RJ result, source and reason, including calling AE titles bound
  to client certificate names;
* answers C-FIND, C-MOVE and C-GET (PS3.4 Annex C) for a
  :class:`~gateway.dicom.retrieve.QueryRetrieveListener` when one is given;
* turns the gateway's exceptions into DIMSE statuses, in :func:`failure_status` only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom import ae as pynetdicom_ae
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from gateway.config import DicomConfig, is_valid_ae_title
from gateway.crypto.envelope import EnvelopeWriter
from gateway.crypto.kek import DataKeyWrapper
from gateway.dicom import file_meta, spool_io
from gateway.dicom import status as st
from gateway.dicom.contexts import scp_contexts
from gateway.dicom.guard import GuardedDIMSE, GuardedSocket, GuardedStateMachine
from gateway.dicom.ledger import ConnectionLedger
from gateway.dicom.reactor import (
    BoundedRequestor,
    WaitingSocket,
    WakingDUL,
    bound_start,
    run_acceptor_reactor,
)
from gateway.dicom.retrieve import (
    CANCEL,
    IDENTIFIER_MISMATCH,
    PENDING,
    QueryRequest,
    QueryRetrieveListener,
    RetrieveCounts,
    RetrieveRequest,
    get_sender,
    move_sender,
    response,
    run_suboperations,
)
from gateway.errors import (
    DeliveryError,
    IndexError_,
    IngestError,
    QueryRetrieveError,
    SpoolError,
    SpoolFullError,
)
from gateway.ids import new_id
from gateway.spool.store import Spool
from gateway.text import safe_text

log = logging.getLogger(__name__)

# PS3.8 Table 9-21: (result, source, reason)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE not recognized
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service-user, called AE not recognized
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), local limit
REJECT_STOPPING = (0x02, 0x03, 0x01)  # transient, service-provider, temporary congestion

# PS3.4 C.6.1 / C.6.2: Query/Retrieve SOP classes -> (information model, service)
QR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.2.1.1": ("PATIENT", "c-find"),
    "1.2.840.10008.5.1.4.1.2.1.2": ("PATIENT", "c-move"),
    "1.2.840.10008.5.1.4.1.2.1.3": ("PATIENT", "c-get"),
    "1.2.840.10008.5.1.4.1.2.2.1": ("STUDY", "c-find"),
    "1.2.840.10008.5.1.4.1.2.2.2": ("STUDY", "c-move"),
    "1.2.840.10008.5.1.4.1.2.2.3": ("STUDY", "c-get"),
}
UNABLE_TO_PROCESS = 0xC000  # PS3.4 C.4.1.1.4 / C.4.2.1.5: failure, unable to process


@dataclass(frozen=True)
class AssociationInfo:
    """What the rest of the node may know about an association; text is as received."""

    association_id: str
    calling_ae_title: str
    called_ae_title: str
    address: str


@dataclass(frozen=True)
class StoreRequest:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset_path: Path
    received_digest: tuple[int, str] | None = None
    """Size and SHA-256 of the file's plaintext, taken as it was received (None: not known,
    the spool reads the file to compute them)."""
    received_prefix: bytes = b""
    """The plaintext's first bytes (up to :data:`RECEIVED_PREFIX_BYTES`), kept as they were
    received, so the header is parsed without reading the file back; only a header that
    reaches past them is read from the file."""


class AssociationListener(Protocol):
    """What the node does on DICOM events; implemented by :mod:`gateway.ingest`."""

    def association_accepted(self, info: AssociationInfo) -> None: ...

    def association_rejected(self, info: AssociationInfo, reason: str) -> None: ...

    def association_aborted(self, info: AssociationInfo, reason: str) -> None: ...

    def echo(self, info: AssociationInfo) -> None: ...

    def security_event(self, address: str, reason: str, detail: str = "") -> None: ...

    def store(self, info: AssociationInfo, request: StoreRequest) -> int: ...

    def store_failed(
        self, info: AssociationInfo, request: StoreRequest, status: int, reason: str
    ) -> None: ...


class Admission:
    """Who may associate: called AE titles, per-called-AE calling allowlists, limits."""

    def __init__(self, cfg: DicomConfig) -> None:
        self.cfg = cfg
        self.called_titles = {cfg.ae_title.strip()} | {a.called_ae.strip() for a in cfg.allow}
        self._allow = [
            (
                a.called_ae.strip(),
                {c.strip() for c in a.calling_ae},
                [ipaddress.ip_network(x, strict=False) for x in a.addresses],
            )
            for a in cfg.allow
        ]
        self._names_by_ae: dict[str, set[str]] = {}
        self._aes_by_name: dict[str, set[str]] = {}
        for b in cfg.tls_bindings:
            self._names_by_ae.setdefault(b.calling_ae.strip(), set()).add(b.certificate_name)
            self._aes_by_name.setdefault(b.certificate_name, set()).add(b.calling_ae.strip())

    def certificate_mismatch(self, calling: str, certificate_names: frozenset[str] | None) -> bool:
        """A bound calling AE without one of its certificates, or a bound certificate
        calling with an AE title not bound to it (``None``: not over TLS, no certificate)."""
        names = certificate_names or frozenset()
        bound_names = self._names_by_ae.get(calling)
        if bound_names is not None and not names & bound_names:
            return True
        bound_aes = {ae for n in names for ae in self._aes_by_name.get(n, ())}
        return bool(bound_aes) and calling not in bound_aes

    def check(
        self,
        *,
        called: str,
        calling: str,
        address: str,
        established_total: int,
        established_from_address: int,
        certificate_names: frozenset[str] | None = None,
    ) -> tuple[tuple[int, int, int], str] | None:
        if called not in self.called_titles:
            return REJECT_CALLED_AE, "called-ae-not-recognized"
        if not is_valid_ae_title(calling):
            return REJECT_CALLING_AE, "calling-ae-invalid"
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return REJECT_CALLING_AE, "address-invalid"
        allowed = False
        for called_ae, callers, networks in self._allow:
            if called_ae != called:
                continue
            if "*" not in callers and calling not in callers:
                continue
            if networks and not any(ip in n for n in networks):
                continue
            allowed = True
            break
        if not allowed:
            return REJECT_CALLING_AE, "calling-ae-not-allowed"
        if self.certificate_mismatch(calling, certificate_names):
            return REJECT_CALLING_AE, "certificate-ae-mismatch"
        if established_total >= self.cfg.max_associations:
            return REJECT_LIMIT, "association-limit"
        if established_from_address >= self.cfg.max_associations_per_address:
            return REJECT_LIMIT, "address-association-limit"
        return None


def _info(assoc: Any) -> AssociationInfo:
    return AssociationInfo(
        association_id=getattr(assoc, "gateway_id", ""),
        calling_ae_title=str(assoc.requestor.ae_title or "").strip(),
        called_ae_title=str(assoc.acceptor.ae_title or "").strip(),
        address=str(assoc.requestor.address),
    )


class _GatewayAssociation(Association):
    """An acceptor association whose C-MOVE and C-GET requests the node serves itself
    (:mod:`gateway.dicom.retrieve`); every other request goes to pynetdicom."""

    gateway_server: DicomServer | None = None

    gateway_address: str | None = None  # counted against max_connections_per_address
    gateway_admitted = False  # passed the admission policy (counted while negotiating)

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        # the event-driven DUL (gateway.dicom.reactor) in place of the polling one, with
        # the timeouts the association gave the one it made
        self.gateway_activity = threading.Event()
        self.dul = WakingDUL(self, activity=self.gateway_activity)
        bound_start(self)  # start() raises instead of hanging if this thread dies starting
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def _run_reactor(self) -> None:
        run_acceptor_reactor(self)

    def run_reactor(self) -> None:
        try:
            self._start_and_run()
        except _NO_MEMORY as exc:  # F18: the address space ran out under the association
            self._out_of_memory(exc)
        finally:  # the connection this association was is over
            if self.gateway_server is not None and self.gateway_address is not None:
                self.gateway_server._connection_handled(
                    self.gateway_address, admitted=self.gateway_admitted
                )

    def _out_of_memory(self, exc: BaseException) -> None:
        """End the connection with an answer when this association's thread has no memory
        to go on: A-ASSOCIATE-RJ transient (2/3/2) if its request was not answered yet, else
        A-ABORT; its DUL thread then sees the transport closed and ends."""
        sock = getattr(self.dul.socket, "socket", None)
        server = self.gateway_server
        if server is None or sock is None:
            return
        if not (self.is_established or self.is_rejected or self.is_aborted):
            server._out_of_resources(
                sock,
                None,
                exc,
                what="no memory for an association",
                # its DUL read the A-ASSOCIATE-RQ once it left Sta2 (awaiting it)
                request_wait=None if self.dul.state_machine.current_state == "Sta2" else 0,
            )
            return
        self.is_aborted = True
        with contextlib.suppress(OSError, MemoryError):  # the answer first (_out_of_resources)
            sock.sendall(_ABORT_NO_REASON)
            sock.shutdown(socket.SHUT_RDWR)
        server._refused_for_resources(
            "no memory to go on with an association; aborted",
            {"association_id": getattr(self, "gateway_id", None), "error": "MemoryError"},
        )

    def _start_and_run(self) -> None:  # not _run_reactor: pynetdicom has one
        if not self._started_dul:
            try:
                self.dul.start()
            except _NO_THREAD as exc:  # no thread for the DUL (F18: address space)
                sock = getattr(self.dul.socket, "socket", None)
                if self.gateway_server is not None and sock is not None:
                    self.gateway_server._out_of_resources(sock, None, exc)
                return
            self._started_dul = True
            if not self._dul_ready.wait(10):  # its thread died starting (F18: MemoryError)
                sock = getattr(self.dul.socket, "socket", None)
                if self.gateway_server is not None and sock is not None:
                    self.gateway_server._out_of_resources(sock, None, MemoryError())
                return
        super().run_reactor()

    def _serve_request(self, msg: Any, context_id: int) -> None:
        server = self.gateway_server
        if (
            server is None
            or server.query_retrieve is None
            or not isinstance(msg, C_MOVE | C_GET)
            or self._sent_release
            or not msg.is_valid_request
        ):
            super()._serve_request(msg, context_id)
            return
        context = self._accepted_cx.get(context_id)
        if context is None:  # as pynetdicom: a request on a context never accepted
            self.abort()
            return
        self.dimse.cancel_req = {}
        self._is_paused = True  # the reactor waits while we send (C-GET sub-operations)
        try:
            server._retrieve(self, msg, context)
        finally:
            self._is_paused = False
            self.dimse.cancel_req = {}


class _GatewayACSE(ACSE):
    """ACSE whose acceptor first applies the gateway's admission policy."""

    def __init__(self, assoc: Any, server: DicomServer) -> None:
        super().__init__(assoc)
        self._server = server

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        assert rq is not None
        called = str(rq.called_ae_title or "").strip()
        calling = str(rq.calling_ae_title or "").strip()
        self.requestor.ae_title = rq.calling_ae_title
        address = str(self.requestor.address)
        # Checked and taken under one lock: associations negotiating at the same moment
        # each saw the others not yet established and all got in past the limits. Those of
        # the node's other receiver processes are counted from the ledger, under its lock.
        with self._server.admission_lock, self._server.ledger.locked() as ledger:
            peers = [
                a
                for a in self.assoc.ae.active_associations
                if a.is_acceptor and a is not self.assoc and _holds_place(a)
            ]
            same = [a for a in peers if str(a.requestor.address) == address]
            verdict = (
                (REJECT_STOPPING, "node-stopping")
                if self._server.stopping
                else self._server.admission.check(
                    called=called,
                    calling=calling,
                    address=address,
                    established_total=len(peers) + ledger.associations_elsewhere(),
                    established_from_address=len(same) + ledger.associations_elsewhere(address),
                    certificate_names=getattr(self.assoc, "gateway_certificate_names", None),
                )
            )
            if verdict is None:
                self.assoc.gateway_admitted = True  # type: ignore[attr-defined]
                ledger.admit(address)
        if verdict is not None:
            rsd, reason = verdict
            info = AssociationInfo(getattr(self.assoc, "gateway_id", ""), calling, called, address)
            log.info(
                "association rejected",
                extra={
                    "association_id": info.association_id,
                    "reason": reason,
                    "calling_ae": safe_text(calling),
                    "address": address,
                },
            )
            self.send_reject(*rsd)
            self._server.listener.association_rejected(info, reason)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        self.acceptor.ae_title = called
        super()._negotiate_as_acceptor()


def _holds_place(assoc: Any) -> bool:
    """Whether an association counts against the association limits: established, or
    admitted and still negotiating."""
    if assoc.is_established:
        return True
    return bool(getattr(assoc, "gateway_admitted", False)) and not (
        assoc.is_released or assoc.is_aborted or assoc.is_rejected
    )


# A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): type 3, length 4, result 2 (transient), source 3
# (service provider, presentation related), reason 2 (local limit exceeded)
_REJECT_LOCAL_LIMIT = bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 0x02, 0x03, 0x02])


def _provider_abort() -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = 0x02  # DICOM UL service-provider
    pdu.reason_diagnostic = 0x00  # reason not specified
    return bytes(pdu.encode())


# made at import: when it is sent, the process may have no memory to make it
_ABORT_NO_REASON = _provider_abort()
# what running out of address space raises (FAULTS F18): MemoryError, and, seen under
# prlimit --as as a thread started, SystemError ("error return without exception set": an
# allocation in CPython that failed without setting MemoryError); starting a thread also
# CPython's RuntimeError "can't start new thread" (or bound_start's)
_NO_MEMORY = (MemoryError, SystemError)
_NO_THREAD = (RuntimeError, *_NO_MEMORY)
# what a rejected peer sent, read and dropped (the bytes are never looked at, so the
# threads that read into it at once need no lock)
_DISCARD = bytearray(4096)
REQUEST_WAIT = 2.0
"""How long a connection refused for want of threads or memory waits for its
A-ASSOCIATE-RQ before it is answered all the same (s), on the connection's own thread."""
ACCEPT_REQUEST_WAIT = 0.5
"""The same wait where the refusal runs on the accept loop (no thread for the connection),
which takes no other connection meanwhile (s)."""
_REQUEST_CAP = 1 << 20  # the most of that request read (its declared length is the peer's)


def _await_request(request: Any, wait: float) -> None:
    """Read the peer's first PDU (its A-ASSOCIATE-RQ) and drop it, for at most ``wait`` s:
    only its 6-byte header is looked at, for its length (PS3.8 9.3.1); raises ``OSError``
    on a timeout or a closed connection."""
    deadline = time.monotonic() + wait
    header = bytearray(6)
    view = memoryview(header)
    got = 0
    while got < 6:
        got += _recv_before(request, view[got:], deadline)
    remaining = min(int.from_bytes(header[2:6], "big"), _REQUEST_CAP)
    while remaining > 0:
        remaining -= _recv_before(request, memoryview(_DISCARD)[: min(remaining, 4096)], deadline)


def _recv_before(request: Any, into: memoryview, deadline: float) -> int:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no A-ASSOCIATE-RQ in time")
    request.settimeout(left)
    n = int(request.recv_into(into))
    if n == 0:
        raise ConnectionError("closed before its A-ASSOCIATE-RQ")
    return n


PEER_PDU_WAIT = 0.005
"""The longest a C-FIND's next pending response waits for its association's DUL thread to
take a PDU the peer has sent (a C-CANCEL, most likely) (s)."""

PEER_PDU_STEP = 0.0005
"""The steps of that wait: each one lets the DUL thread have the interpreter lock (s)."""


def _let_the_dul_read(assoc: Any, message_id: int) -> None:
    """Before a C-FIND's next pending response: when the peer has sent a PDU that the DUL
    thread has not read yet, let that thread have the interpreter lock until it has read
    it and had a step to act on it, or a C-CANCEL of ``message_id`` is in (looked at, not
    taken: pynetdicom's ``is_cancelled`` takes it), at most :data:`PEER_PDU_WAIT`.

    This thread, encoding responses one after the other, held the lock but for the
    instants of its sends, too short for a waiting thread to take it: the DUL thread got it
    only when the interpreter's switch interval (5 ms) ran out, a few times over to read,
    decode and record a C-CANCEL, and the find sent 14 to 90 more of its 100 pending
    responses first. Plain TCP only: a TLS socket is not looked at from a second thread."""
    sock = getattr(assoc.dul, "socket", None)
    if not isinstance(sock, WaitingSocket) or isinstance(sock.socket, ssl.SSLSocket):
        return
    if not sock.waiting():
        return
    deadline = time.monotonic() + PEER_PDU_WAIT
    while message_id not in assoc.dimse.cancel_req and time.monotonic() < deadline:
        taken = not sock.waiting()
        time.sleep(PEER_PDU_STEP)
        if taken:
            return


class DicomServer:
    """Runs the SCP; :meth:`start` returns once it listens, :meth:`stop` shuts it down."""

    def __init__(
        self,
        cfg: DicomConfig,
        listener: AssociationListener,
        *,
        incoming_dir: Path,
        on_security_event: Callable[[str], None] | None = None,
        tls_context: ssl.SSLContext | None = None,
        query_retrieve: QueryRetrieveListener | None = None,
        spool: Spool | None = None,
        ledger: ConnectionLedger | None = None,
        inherited: list[socket.socket] | None = None,
    ) -> None:
        """``query_retrieve`` answers C-FIND/C-MOVE/C-GET (no Q/R contexts without it).
        With ``spool`` (and its keyring) receive buffers are envelopes and pynetdicom reads
        spool files as plaintext (:mod:`gateway.dicom.spool_io`).
        ``tls_context`` (a :func:`gateway.crypto.tls.server_context`) opens the TLS
        listener on ``cfg.tls.port``; the plain one runs unless ``cfg.tls.plain`` is false.
        ``ledger`` counts connections and associations against the limits with those of the
        node's other receiver processes (when it is shared); ``inherited`` are the listening
        sockets of ``serve`` (:meth:`listening_sockets`, in that order) for a receiver
        process to accept from instead of binding its own."""
        self.cfg = cfg
        self.listener = listener
        self.query_retrieve = query_retrieve
        self.admission = Admission(cfg)
        self.incoming_dir = incoming_dir
        self._on_security_event = on_security_event or (lambda _r: None)
        self._tls_context = tls_context
        self._servers: list[ThreadedAssociationServer] = []
        self._tls_server: ThreadedAssociationServer | None = None
        self._handshaking = 0  # TLS connections not yet through their handshake
        self.stopping = False  # set by stop(): new associations are refused, transient
        self._handshaking_lock = threading.Lock()
        self.admission_lock = threading.Lock()  # association limits checked and taken at once
        # open connections per address (from accept until the handler or the association
        # thread ends), bounded by max_connections_per_address, and admitted associations
        self.ledger = ledger or ConnectionLedger()
        self._inherited = list(inherited or [])
        configure_pynetdicom(incoming_dir, spool=spool)
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_pdu_size = cfg.max_pdu_size
        ae.acse_timeout = cfg.acse_timeout
        ae.dimse_timeout = cfg.dimse_timeout
        ae.network_timeout = cfg.network_timeout
        # Limits are applied by Admission on established associations; pynetdicom's own
        # count includes idle half-open connections, so it is only the hard connection cap.
        ae.maximum_associations = cfg.max_connections
        ae.require_called_aet = False
        ae.require_calling_aet = []
        self.ae = ae

    @property
    def port(self) -> int:
        """The plain listener's port (the TLS one's when there is no plain listener)."""
        assert self._servers
        return int(self._servers[-1].server_address[1])

    @property
    def tls_port(self) -> int | None:
        if self._tls_server is None:
            return None
        return int(self._tls_server.server_address[1])

    def listening_sockets(self) -> list[socket.socket]:
        """The listening sockets, TLS first, for receiver processes to inherit."""
        return [cast(socket.socket, server.socket) for server in self._servers]

    def _open_connection(self, address: str) -> str | None:
        """Count a new connection from ``address``, or say which limit it is over:
        ``max_connections`` (with those not yet through their TLS handshake and the other
        receiver processes' connections) or ``max_connections_per_address`` (so one host
        cannot take every connection)."""
        live = sum(1 for a in self.ae.active_associations if a.is_acceptor)
        with self.ledger.locked() as ledger:
            if live + self._handshaking + ledger.connections_elsewhere() >= (
                self.cfg.max_connections
            ):
                return "connection-limit"
            if ledger.connections_from(address) >= self.cfg.max_connections_per_address:
                return "connection-limit-per-address"
            ledger.open_connection(address)
            return None

    def _connection_handled(self, address: str, *, admitted: bool = False) -> None:
        with self.ledger.locked() as ledger:
            ledger.close_connection(address, admitted=admitted)

    def _refused_for_resources(self, message: str, extra: dict[str, object]) -> None:
        """Log and count a refusal for lack of threads or memory, once its answer is sent:
        either may fail to allocate, which must not take the caller's clean-up with it."""
        with contextlib.suppress(MemoryError):
            log.warning(message, extra=extra)
        with contextlib.suppress(MemoryError):
            self._on_security_event("out-of-resources")

    def _out_of_resources(
        self,
        request: Any,
        client_address: Any,
        exc: BaseException,
        *,
        what: str = "no thread for a new association",
        request_wait: float | None = None,
    ) -> None:
        """A connection the node has no thread (memory) for: A-ASSOCIATE-RJ transient, local
        limit exceeded (2/3/2); counted, never fatal.

        The reject answers the peer's A-ASSOCIATE-RQ, read first (:func:`_await_request`;
        after ``request_wait`` s, by default :data:`REQUEST_WAIT`, without one it is sent
        all the same; 0: read already, or not a DICOM request: a TLS port's connection
        before its handshake), as PS3.8 has it (Sta2 -> Sta3). Sent on accept, before the
        request, it reached pynetdicom requestors all the sooner: pynetdicom 3.0.4's looks
        whether its socket is connected once its connect is done, and a reject that came
        back before it looked had closed it; it then reports a failed connect, the reject
        left unread in its DUL's queue (its FSM: Sta5 + Evt4 -> Sta1). That race is
        pynetdicom's and is narrowed here, not closed.

        The reject goes out before the log record and the metric, from bytes made at import:
        those allocate, and at the edge of the address space an allocation that fails
        there had ended the connection without any answer (the peer saw it closed)."""
        wait = REQUEST_WAIT if request_wait is None else request_wait
        if wait > 0:
            with contextlib.suppress(OSError, MemoryError):
                _await_request(request, wait)
        with contextlib.suppress(OSError, MemoryError):
            request.sendall(_REJECT_LOCAL_LIMIT)
            request.shutdown(socket.SHUT_WR)
        self._refused_for_resources(f"{what}; rejected (transient)", {"error": type(exc).__name__})
        with contextlib.suppress(OSError, MemoryError):
            # read what the peer still sends until it closes (its A-ASSOCIATE-RQ, when that
            # was not waited for), briefly and bounded: closing with unread bytes would send
            # a reset that can discard the reject before it is read; into a buffer made at
            # import, as there may be no memory for one now
            request.settimeout(0.5)
            for _ in range(256):
                if not request.recv_into(_DISCARD):
                    break
        with contextlib.suppress(OSError):
            request.close()

    def start(self) -> None:
        """Bind (or take the inherited sockets) and accept."""
        self.bind()
        self.accept()

    def bind(self) -> None:
        """Make the listeners, bound and listening, without accepting yet: connections wait
        in the backlog (serve starts its receiver processes between the two)."""
        server_self = self

        class Handler(RequestHandler):
            certificate_names: frozenset[str] | None = None
            handed_over = False

            def handle(self) -> None:
                # the connection was counted for its address when accepted; the count goes
                # with the association thread once that starts, else it ends here
                self.handed_over = False
                try:
                    self._handle()
                finally:
                    if not self.handed_over:
                        server_self._connection_handled(str(self.client_address[0]))

            def _handle(self) -> None:
                context = getattr(self.server, "gateway_tls_context", None)
                if context is not None:
                    tls = server_self._handshake(context, self.request, self.client_address)
                    if tls is None:
                        return
                    self.request = tls
                    self.certificate_names = certificate_names(tls.getpeercert())
                try:
                    super().handle()  # makes the association and starts its thread
                except _NO_THREAD as exc:  # no thread/memory for it (F18)
                    self.handed_over = False  # its thread never ran
                    server_self._out_of_resources(self.request, self.client_address, exc)

            def _create_association(self) -> Any:
                # pynetdicom's RequestHandler._create_association, with our socket and ACSE
                assoc = _GatewayAssociation(self.ae, MODE_ACCEPTOR)
                assoc.gateway_server = server_self
                assoc.gateway_address = str(self.client_address[0])
                self.handed_over = True  # started next by RequestHandler.handle, or raises
                assoc._server = self.server
                assoc.name = f"AcceptorThread@{new_id()[:8]}"
                assoc.gateway_id = new_id()[:16]  # type: ignore[attr-defined]
                assoc.gateway_certificate_names = self.certificate_names  # type: ignore[attr-defined]
                assoc.acse = _GatewayACSE(assoc, server_self)
                assoc.dimse = GuardedDIMSE(
                    assoc,
                    max_instance_bytes=server_self.cfg.max_instance_bytes,
                    on_message=assoc.gateway_activity.set,
                    on_store_out_of_memory=lambda cmd: server_self._store_out_of_memory(assoc, cmd),
                )
                assoc.dul.state_machine = GuardedStateMachine(
                    assoc.dul, on_invalid_pdu=lambda: server_self._invalid_pdu(assoc)
                )
                with contextlib.suppress(OSError):
                    self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

                def violation(reason: str) -> None:
                    server_self._violation(assoc, str(self.client_address[0]), reason)

                assoc.set_socket(
                    GuardedSocket(
                        assoc,
                        self.request,
                        max_pdu_size=server_self.cfg.max_pdu_size,
                        max_associate_pdu_size=server_self.cfg.max_associate_pdu_size,
                        pdu_read_timeout=server_self.cfg.pdu_read_timeout,
                        on_violation=violation,
                    )
                )
                assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
                assoc.acceptor.ae_title = self.server.ae_title
                assoc.acceptor.address_info = self.local
                assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
                assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
                # shared, not deep-copied: negotiation only reads them, and a copy of ~200
                # contexts x ~35 syntaxes costs ~170 ms CPU for every TCP connection
                assoc.acceptor.supported_contexts = self.server.contexts
                assoc.requestor.address_info = self.remote
                bound_handlers: dict[Any, Any] = self.server._handlers
                for event, bound in bound_handlers.items():
                    if event.is_intervention and bound:
                        assoc.bind(event, *bound)
                    elif isinstance(event, evt.NotificationEvent):
                        for handler in bound:
                            assoc.bind(event, handler[0], handler[1])
                return assoc

        class Server(ThreadedAssociationServer):
            # listen() backlog: socketserver's 5 makes a burst of connects wait for SYN
            # retransmits (1 s, 3 s, ...) while the accept loop catches up
            request_queue_size = 128
            gateway_tls_context: ssl.SSLContext | None = None

            gateway_inherited: socket.socket | None = None

            def server_bind(self) -> None:
                if self.gateway_inherited is None:
                    super().server_bind()
                    return
                cast(socket.socket, self.socket).close()  # TCPServer's; serve's is used
                self.socket = self.gateway_inherited
                self.server_address = self.socket.getsockname()

            def server_activate(self) -> None:
                if self.gateway_inherited is None:
                    super().server_activate()  # an inherited socket listens already

            def server_close(self) -> None:
                if server_self.ledger.shared:
                    # shared with the other receiver processes: shutdown() would end their
                    # accepting too; serve's close (the last) ends the listening socket
                    cast(socket.socket, self.socket).close()
                    return
                super().server_close()

            def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
                if server_self.ledger.shared:
                    # Every receiver process wakes for a connection and one accept()s it;
                    # the others find none (BlockingIOError: the socket does not block, so
                    # their accept loops never wait in accept()). The busier one lets the
                    # least busy take it first.
                    fewest = server_self.ledger.fewest_connections_elsewhere()
                    excess = server_self.ledger.connections_here() - (fewest or 0)
                    if fewest is not None and excess > 0:
                        time.sleep(min(0.002 * excess, 0.01))
                return super().get_request()

            def process_request(self, request: Any, client_address: Any) -> None:
                address = str(client_address[0])
                over = server_self._open_connection(address)
                if over is not None:
                    server_self._on_security_event(over)
                    self.shutdown_request(request)
                    return
                if self.gateway_tls_context is not None:
                    with server_self._handshaking_lock:
                        server_self._handshaking += 1  # until _handshake ends
                try:
                    self._start_connection_thread(request, client_address)
                except _NO_THREAD as exc:  # no thread for the connection (F18: memory)
                    if self.gateway_tls_context is not None:
                        with server_self._handshaking_lock:
                            server_self._handshaking -= 1
                    server_self._connection_handled(address)
                    server_self._out_of_resources(
                        request,
                        client_address,
                        exc,
                        request_wait=0
                        if self.gateway_tls_context is not None
                        else ACCEPT_REQUEST_WAIT,
                    )

            def _start_connection_thread(self, request: Any, client_address: Any) -> None:
                # socketserver.ThreadingMixIn.process_request, with a start that cannot
                # block the accept loop forever on a thread that died starting (F18)
                thread = threading.Thread(
                    target=self.process_request_thread,
                    args=(request, client_address),
                    name="dicom-connection",
                    daemon=self.daemon_threads,
                )
                bound_start(thread)
                if self.block_on_close:
                    threads: Any = vars(self).setdefault("_threads", socketserver._Threads())  # type: ignore[attr-defined]
                    threads.append(thread)  # joined by server_close()
                thread.start()

        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._echo),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_ESTABLISHED, self._established),
            (evt.EVT_ABORTED, self._peer_aborted),
        ]
        if self.query_retrieve is not None:
            handlers.append((evt.EVT_C_FIND, self._find))
        # TLS first: once the plain port accepts, both are bound
        listeners: list[tuple[int, ssl.SSLContext | None]] = []
        if self._tls_context is not None:
            listeners.append((self.cfg.tls.port, self._tls_context))
        if self._tls_context is None or self.cfg.tls.plain:
            listeners.append((self.cfg.port, None))
        contexts = scp_contexts(query_retrieve=self.query_retrieve is not None)
        if self._inherited and len(self._inherited) != len(listeners):
            raise RuntimeError(
                f"{len(self._inherited)} listening socket(s) inherited for {len(listeners)}"
            )
        for i, (port, context) in enumerate(listeners):
            server_class = Server
            if self._inherited:

                class InheritedServer(Server):
                    gateway_inherited = self._inherited[i]

                server_class = InheritedServer
            # ssl_context stays None: pynetdicom would handshake on the accept thread
            server = server_class(
                self.ae,
                (self.cfg.host, port),
                self.cfg.ae_title,
                contexts,
                None,
                evt_handlers=handlers,
                request_handler=Handler,
            )
            server.gateway_tls_context = context
            if self.ledger.shared:
                cast(socket.socket, server.socket).settimeout(0.0)  # see Server.get_request
            self.ae._servers.append(server)
            self._servers.append(server)
            if context is not None:
                self._tls_server = server

    def accept(self) -> None:
        """Accept on every listener (all are bound before any accepts)."""
        for listening in self._servers:
            threading.Thread(
                target=listening.serve_forever,
                kwargs={"poll_interval": 0.2},
                name="dicom-accept-tls" if listening is self._tls_server else "dicom-accept",
                daemon=True,
            ).start()

    def _handshake(
        self, context: ssl.SSLContext, sock: socket.socket, client_address: Any
    ) -> ssl.SSLSocket | None:
        """The server side of the TLS handshake, on the connection's thread, within
        ``tls.handshake_timeout`` s in all (CPython's ``do_handshake`` keeps one deadline
        across its reads). A failure closes the connection and is audited."""
        address = str(client_address[0])
        tls: ssl.SSLSocket | None = None
        try:
            tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            tls.settimeout(self.cfg.tls.handshake_timeout)
            tls.do_handshake()
            tls.settimeout(None)  # from here GuardedSocket sets its own per-PDU deadlines
            return tls
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            detail = _handshake_error(exc)
            with contextlib.suppress(OSError):
                (tls or sock).close()
            log.info("TLS handshake failed", extra={"address": address, "reason": detail})
            self._on_security_event("tls-handshake-failed")
            try:
                self.listener.security_event(address, "tls-handshake-failed", detail)
            except Exception:  # connection thread boundary: auditing the refusal failed
                log.exception("TLS handshake failure audit failed")
            return None
        finally:
            with self._handshaking_lock:
                self._handshaking -= 1

    def refuse_new_associations(self) -> None:
        """From now on every association is rejected, transient (the first step of
        :meth:`stop`, taken as soon as a stop is asked for)."""
        self.stopping = True

    def stop(self, grace: float = 10.0) -> None:
        """Graceful stop (FAULTS F17): new associations are refused with A-ASSOCIATE-RJ
        transient (2, 3, 1) while the associations in progress get ``grace`` s to finish;
        then the listeners close and whatever is left is aborted. Nothing is answered
        0x0000 that is not durable, so an aborted association loses nothing acknowledged."""
        self.refuse_new_associations()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
            a.is_acceptor and a.is_alive() and a.is_established for a in self.ae.active_associations
        ):
            time.sleep(0.05)
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []
        self._tls_server = None
        self.ae.shutdown()

    # --- event handlers (run on association threads) -----------------------------------
    def _violation(self, assoc: Any, address: str, reason: str) -> None:
        info = AssociationInfo(getattr(assoc, "gateway_id", ""), "", "", address)
        try:
            calling = assoc.requestor.ae_title
            info = AssociationInfo(
                info.association_id,
                str(calling or "").strip(),
                str(assoc.acceptor.ae_title or "").strip(),
                address,
            )
        except AttributeError:
            pass
        self._on_security_event(reason.split(" ")[0])
        self.listener.association_aborted(info, reason)

    def _established(self, event: Any) -> None:
        self.listener.association_accepted(_info(event.assoc))

    def _peer_aborted(self, event: Any) -> None:
        self.listener.association_aborted(_info(event.assoc), "peer-abort")

    def _invalid_pdu(self, assoc: Any) -> None:
        """Evt19: an unrecognised or invalid PDU; pynetdicom answered with A-ABORT (AA-8)."""
        self._on_security_event("invalid-pdu")
        try:
            self.listener.association_aborted(_info(assoc), "invalid-pdu")
        except Exception:  # association boundary (the DUL thread): auditing it failed
            log.exception("invalid PDU audit failed")

    def _echo(self, event: Any) -> int:
        try:
            self.listener.echo(_info(event.assoc))
        except IndexError_:
            log.exception("C-ECHO audit failed")
            return st.PROCESSING_FAILURE
        return st.SUCCESS

    def _store(self, event: Any) -> int:
        """The one place where ingest's exceptions become C-STORE statuses."""
        info = _info(event.assoc)
        req = event.request
        request = StoreRequest(
            sop_class_uid=str(req.AffectedSOPClassUID or ""),
            sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            dataset_path=Path(event.dataset_path),
        )
        try:
            received = _check_receive_buffer(req)
            if received is not None:
                size, sha256, prefix = received
                request = replace(request, received_digest=(size, sha256), received_prefix=prefix)
            return self.listener.store(info, request)
        except Exception as exc:  # association boundary: answer, never kill the association
            code, reason = failure_status(exc, unexpected=st.PROCESSING_FAILURE)
            if reason == "internal-error":
                log.exception("C-STORE failed", extra={"association_id": info.association_id})
        try:
            self.listener.store_failed(info, request, code, reason)
        except Exception:  # association boundary: auditing the failure itself failed
            log.exception("C-STORE failure audit failed")
        return code

    def _store_out_of_memory(self, assoc: Any, command: Any) -> None:
        """A C-STORE :class:`GuardedDIMSE` answered 0xA700: no memory to receive it (F18)."""
        request = StoreRequest(
            sop_class_uid=str(command.AffectedSOPClassUID or ""),
            sop_instance_uid=str(command.AffectedSOPInstanceUID or ""),
            transfer_syntax_uid="",
            dataset_path=Path(),
        )
        try:
            self.listener.store_failed(_info(assoc), request, st.OUT_OF_RESOURCES, "out-of-memory")
        except Exception:  # association boundary (the DUL thread): auditing it failed
            log.exception("C-STORE failure audit failed")

    # --- query/retrieve (PS3.4 Annex C) ------------------------------------------------
    def _qr_refused(self, info: AssociationInfo, service: str, status: int, reason: str) -> None:
        assert self.query_retrieve is not None
        try:
            self.query_retrieve.refused(info, service, status, reason)
        except Exception:  # association boundary: auditing the refusal itself failed
            log.exception("query/retrieve refusal audit failed")

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND: pending matches, then success; refusals via :func:`failure_status`."""
        assert self.query_retrieve is not None
        info = _info(event.assoc)
        model = QR_SOP_CLASSES.get(str(event.request.AffectedSOPClassUID), ("STUDY", ""))[0]
        try:
            try:
                identifier = event.identifier
            except Exception as exc:  # any decoding failure of the peer's identifier
                raise QueryRetrieveError(IDENTIFIER_MISMATCH, "identifier-unparseable") from exc
            result = self.query_retrieve.find(
                info, QueryRequest(model, identifier, int(event.request.MessageID or 0))
            )
        except Exception as exc:  # association boundary: answer, never kill the association
            status, reason = failure_status(exc, unexpected=UNABLE_TO_PROCESS)
            if reason == "internal-error":
                log.exception("C-FIND failed", extra={"association_id": info.association_id})
            self._qr_refused(info, "c-find", status, reason)
            yield status, None
            return
        for ds in result.datasets:
            _let_the_dul_read(event.assoc, int(event.request.MessageID or 0))
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, ds
        if result.truncated:  # more matches than qr.max_results: the list is incomplete
            yield st.OUT_OF_RESOURCES, None

    def _retrieve(self, assoc: Any, req: Any, context: Any) -> None:
        """C-MOVE or C-GET: plan, sub-operations with pending responses, final status."""
        assert self.query_retrieve is not None
        listener = self.query_retrieve
        info = _info(assoc)
        service = "c-move" if isinstance(req, C_MOVE) else "c-get"
        kind = C_MOVE if service == "c-move" else C_GET
        syntax = context.transfer_syntax[0]
        implicit = bool(syntax.is_implicit_VR)
        cx_id = int(context.context_id)

        def answer(status: int, counts: RetrieveCounts | None, *, final: bool) -> None:
            rsp = response(kind, req, status, counts, implicit=implicit, final=final)
            assoc.dimse.send_msg(rsp, cx_id)

        try:
            model = QR_SOP_CLASSES.get(str(req.AffectedSOPClassUID), ("STUDY", ""))[0]
            try:
                identifier = decode(req.Identifier, implicit, syntax.is_little_endian, False)
            except Exception as exc:  # any decoding failure of the peer's identifier
                raise QueryRetrieveError(IDENTIFIER_MISMATCH, "identifier-unparseable") from exc
            destination = str(getattr(req, "MoveDestination", "") or "").strip()
            plan = listener.plan_retrieve(
                info, RetrieveRequest(service, model, identifier, destination)
            )
        except Exception as exc:  # association boundary: answer, never kill the association
            status, reason = failure_status(exc, unexpected=UNABLE_TO_PROCESS)
            if reason == "internal-error":
                log.exception("retrieve failed", extra={"association_id": info.association_id})
            self._qr_refused(info, service, status, reason)
            answer(status, None, final=True)
            return
        counts = RetrieveCounts(remaining=len(plan.files) + plan.expected)
        done: set[str] = set()
        taken: list[Any] = []  # every file handed to a sender, in order
        cancelled = [False]

        def is_cancelled() -> bool:
            if not cancelled[0] and assoc.dimse.cancel_req.pop(req.MessageID, None) is not None:
                cancelled[0] = True
            return cancelled[0]

        def on_result(f: Any, status: int | None, reason: str) -> None:
            done.add(f.sop_instance_uid)
            try:
                listener.sub_operation(info, plan, f, status, reason)
            except Exception:  # association boundary: the sub-operation audit failed
                log.exception("sub-operation audit failed")
            if counts.remaining:
                answer(PENDING, counts, final=False)

        def send_all(send: Any, batch: list[Any]) -> None:
            taken.extend(batch)
            counts.remaining = max(counts.remaining, len(batch))  # more arrived than announced
            run_suboperations(batch, counts, send, is_cancelled=is_cancelled, on_result=on_result)

        try:
            if service == "c-get":
                with get_sender(assoc, int(req.MessageID)) as send:
                    for batch in plan.batches(is_cancelled):
                        if batch:
                            send_all(send, batch)
                        elif counts.remaining:  # still waiting: progress, and a chance to cancel
                            answer(PENDING, counts, final=False)
                        if counts.cancelled or not assoc.is_established:
                            break
            else:
                for batch in plan.batches(is_cancelled):
                    if not batch:
                        if counts.remaining:
                            answer(PENDING, counts, final=False)
                        continue
                    with move_sender(
                        plan,
                        batch,
                        calling_ae_title=self.cfg.ae_title,
                        originator_ae_title=info.calling_ae_title,
                        originator_message_id=int(req.MessageID),
                    ) as send:
                        send_all(send, batch)
                    if counts.cancelled or not assoc.is_established:
                        break
        except Exception as exc:  # association boundary: the destination is unusable
            if not isinstance(exc, DeliveryError):
                log.exception(f"{service} failed", extra={"association_id": info.association_id})
            failed = {*counts.failed_uids}
            for f in taken:
                if f.sop_instance_uid not in done and f.sop_instance_uid not in failed:
                    counts.failed += 1
                    counts.failed_uids.append(f.sop_instance_uid)
                    with contextlib.suppress(Exception):  # boundary: audit failed
                        listener.sub_operation(info, plan, f, None, "destination-unusable")
            counts.remaining = 0
        if cancelled[0]:
            counts.cancelled = True
        if counts.remaining and not counts.cancelled:
            # expected from a peer but never arrived (its retrieve timed out or failed)
            counts.failed += counts.remaining
            counts.remaining = 0
        status = counts.final_status()
        try:
            listener.retrieve_finished(info, plan, counts, status)
        except Exception:  # association boundary: the final audit failed
            log.exception("retrieve audit failed")
        if assoc.is_established:
            answer(status, counts, final=True)


def failure_status(exc: BaseException, *, unexpected: int) -> tuple[int, str]:
    """The one mapping of the node's exceptions to DIMSE statuses and audit reasons;
    anything unexpected is ``unexpected`` with the reason ``internal-error``."""
    if isinstance(exc, IngestError | QueryRetrieveError):
        return exc.status, exc.reason
    if isinstance(exc, SpoolFullError):
        return st.OUT_OF_RESOURCES, "spool-full"
    if isinstance(exc, SpoolError):
        return st.OUT_OF_RESOURCES, "spool-unavailable"
    if isinstance(exc, IndexError_):
        return st.OUT_OF_RESOURCES, "index-unavailable"
    if isinstance(exc, MemoryError):  # F18: the address space ran out mid-request
        return st.OUT_OF_RESOURCES, "out-of-memory"
    return unexpected, "internal-error"


def certificate_names(peer_certificate: Any) -> frozenset[str]:
    """The subject CN(s) and every SAN value of a verified peer certificate
    (``SSLSocket.getpeercert()``; empty when the peer presented none)."""
    names: set[str] = set()
    for rdn in (peer_certificate or {}).get("subject", ()):
        names.update(str(value) for key, value in rdn if key == "commonName")
    names.update(str(value) for _kind, value in (peer_certificate or {}).get("subjectAltName", ()))
    return frozenset(names)


def _handshake_error(exc: BaseException) -> str:
    """A short, bounded reason for the audit log (OpenSSL's reason code, never peer bytes)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        # which check failed (expired, revoked, unknown issuer, key too weak): OpenSSL's text
        return "certificate-verify-failed: " + str(exc.verify_message)[:120]
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or "ssl-error").lower().replace("_", "-")
    return "connection-closed"


def _any_uid_text(value: object) -> tuple[bool, str]:
    return isinstance(value, str), "must be a str"


def configure_pynetdicom(incoming_dir: Path, *, spool: Spool | None = None) -> None:
    """Process-wide pynetdicom settings the node relies on.

    Data sets are received to, and sent from, files in chunks, and the receive buffer files
    are created in the spool's ``incoming`` folder, on the spool's filesystem. With a
    ``spool`` holding a keyring, receive buffers are written as envelopes under its current
    key-encryption key and spool files are sent decrypted (:mod:`gateway.dicom.spool_io`).
    """
    global _receive_kek
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    # pynetdicom refuses a UID over 64 characters while decoding a command set and aborts
    # the association; the gateway checks UIDs itself and answers 0x0117 (PS3.7 C.4.2).
    _config.VALIDATORS["UI"] = _any_uid_text
    incoming_dir.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(incoming_dir)
    dimse_messages.NamedTemporaryFile = _ReceiveBuffer  # type: ignore[attr-defined,assignment]
    file_meta.install()  # each receive buffer's File Meta: pydicom's bytes, cached in parts
    # what AE.associate makes: an outgoing association whose threads cannot hang starting
    pynetdicom_ae.Association = BoundedRequestor  # type: ignore[attr-defined]
    pynetdicom_ae.AssociationSocket = WaitingSocket  # type: ignore[attr-defined]
    _receive_kek = spool.keyring.current if spool is not None and spool.keyring else None
    spool_io.install(spool)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


_receive_kek: DataKeyWrapper | None = None

RECEIVED_PREFIX_BYTES = 64 * 1024
"""How much of each received data set's start a receive buffer keeps in memory: the whole
header of nearly every instance (a CT's is ~1-2 KB before its Pixel Data)."""


class _ReceiveBuffer:
    """pynetdicom's C-STORE receive file, which survives a failed write (ENOSPC).

    pynetdicom writes the data set from its reactor thread; an ``OSError`` there kills the
    association without a C-STORE response. Instead the error is kept, the rest of the data
    set is dropped, and :meth:`DicomServer._store` answers 0xA700 for the incomplete file.

    With a key-encryption key configured, the bytes go through an :class:`EnvelopeWriter`;
    :meth:`finish` (from the C-STORE handler, before parsing) writes the final segment. A
    buffer never finished (association aborted) has no final segment and never opens.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._f = tempfile.NamedTemporaryFile(**kwargs)  # closed by pynetdicom
        self.name: str = self._f.name
        self.file = self  # pynetdicom calls ``.file.flush()``
        self.error: OSError | None = None
        self.received = 0  # data set bytes so far (GuardedDIMSE caps it)
        self._sha256 = hashlib.sha256()  # of the plaintext, as it arrives
        self._prefix = bytearray()  # its first RECEIVED_PREFIX_BYTES
        self._envelope: EnvelopeWriter | None = None
        if _receive_kek is not None:
            kek = _receive_kek
            sink = cast(BinaryIO, self._f)
            self._guard(lambda: setattr(self, "_envelope", EnvelopeWriter(sink, kek)))

    def _guard(self, op: Callable[[], object]) -> None:
        if self.error is None:
            try:
                op()
            except OSError as exc:
                self.error = exc

    def write(self, data: bytes) -> int:
        self.received += len(data)
        self._sha256.update(data)
        room = RECEIVED_PREFIX_BYTES - len(self._prefix)
        if room > 0:
            self._prefix += memoryview(data)[:room]
        sink = self._envelope if self._envelope is not None else self._f
        self._guard(lambda: sink.write(data))
        return len(data)

    def flush(self) -> None:
        if self._envelope is None:  # sealed segments go to the file as written; the rest at finish
            self._guard(self._f.flush)

    def finish(self) -> None:
        """Seal the final segment and flush: the file is now a complete envelope."""
        if self._envelope is not None:
            self._guard(self._envelope.close)
        self._guard(self._f.flush)

    def digest(self) -> tuple[int, str]:
        """Size and SHA-256 of everything written (the file's plaintext)."""
        return self.received, self._sha256.hexdigest()

    def prefix(self) -> bytes:
        """The first :data:`RECEIVED_PREFIX_BYTES` written (all of it when shorter)."""
        return bytes(self._prefix)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()


def _check_receive_buffer(req: Any) -> tuple[int, str, bytes] | None:
    """Finish the request's receive buffer; its plaintext's size, SHA-256 and first bytes
    (None when the buffer is not ours). Raises SpoolError when a write to it failed."""
    buffer = getattr(req, "_dataset_file", None)
    if not isinstance(buffer, _ReceiveBuffer):
        return None
    buffer.finish()
    if buffer.error is not None:
        if buffer.error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SpoolFullError("spool filesystem is full (receive buffer)")
        raise SpoolError(f"receive buffer write failed: {buffer.error.strerror}")
    return (*buffer.digest(), buffer.prefix())
