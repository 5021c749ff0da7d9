"""C-STORE SCU to a DICOM destination (PS3.4 Annex B, PS3.7 9.1.1).

Instances are sent from their spool files without being parsed (pynetdicom streams the
data set from the file) when the destination accepts the stored transfer syntax. When it
does not, the instance is decoded and sent in an uncompressed syntax it accepted
(decompressing compressed pixel data); an instance that fits no accepted syntax fails
with that reason.

A destination with a ``tls`` table is reached over TLS (PS3.15 B.9): its certificate is
verified against its CA and name, and against its public key pin before any DIMSE message.

Deliveries reuse an association: after a delivery its association stays open for the
destination's ``keep_open_seconds`` (idle), and the next delivery whose instances it was
negotiated for takes it instead of opening one. Idle and busy associations together never
exceed the destination's ``max_associations``. An idle association the destination has
released or dropped is never taken, and one that fails before its first answer is replaced
by a fresh association (:class:`Sender` says whether it was reused and how many answers it
gave).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom.uid as pydicom_uid
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from gateway.config import DestinationConfig
from gateway.crypto.tls import check_pin
from gateway.dicom.contexts import UNCOMPRESSED
from gateway.dicom.spool_io import one_reader, open_plain
from gateway.dicom.tls import destination_context
from gateway.errors import (
    IntegrityError,
    PermanentError,
    QuarantineError,
    RetryableError,
    TLSRefusedError,
)

log = logging.getLogger(__name__)

MAX_CONTEXTS = 120  # PS3.8 allows 128 presentation contexts (odd ids 1..255)
_UNCOMPRESSED = frozenset(str(t) for t in (*UNCOMPRESSED, pydicom_uid.ExplicitVRBigEndian))


@dataclass(frozen=True)
class OutgoingFile:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    study_instance_uid: str = ""  # for the audit of retrieve sub-operations


class _ProviderQueue(queue.Queue[Any]):
    """pynetdicom's DUL send queue, bounded.

    pynetdicom queues every P-DATA PDU of a C-STORE for its DUL thread without a bound, so a
    sender faster than the socket holds the whole data set in memory (a 100 MB instance:
    100 MB). Bounded, the sending thread waits for the DUL thread instead. The DUL thread
    itself never puts into this queue; if it has stopped (the connection is gone) a put gives
    up rather than wait forever, and the association is already lost. Each put wakes the
    DUL thread, as the queue it replaces did.
    """

    def __init__(self, dul: Any, maxsize: int) -> None:
        super().__init__(maxsize)
        self._dul = dul
        # a WakingDUL (the node's associations) waits in select() until it is woken
        self._wake: Callable[[], None] = getattr(dul, "wake", lambda: None)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        while True:
            try:
                super().put(item, timeout=0.5)
                self._wake()
                return
            except queue.Full:
                if not self._dul.is_alive() or getattr(self._dul, "_kill_thread", False):
                    return


def bound_send_queue(assoc: Any, maxsize: int = 16) -> None:
    """Bound an established association's send queue (at most ``maxsize`` PDUs waiting)."""
    dul = assoc.dul
    pending = dul.to_provider_queue
    bounded = _ProviderQueue(dul, maxsize)
    while True:  # the association is established and idle: normally nothing is pending
        try:
            bounded.queue.append(pending.get_nowait())
        except queue.Empty:
            break
    dul.to_provider_queue = bounded


class NoAcceptableSyntax(Exception):
    """The destination accepted no transfer syntax this instance can be sent in."""


class AssociationLost(RetryableError):
    """The association went down while a C-STORE was under way (aborted, reset, closed)."""


def _nodelay(event: Any) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def context_groups(files: Sequence[OutgoingFile]) -> list[list[int]]:
    """Split ``files`` (by index) into groups whose presentation contexts fit one association."""
    groups: list[list[int]] = []
    current: list[int] = []
    keys: set[tuple[str, str]] = set()
    for i, f in enumerate(files):
        new = {(f.sop_class_uid, f.transfer_syntax_uid), (f.sop_class_uid, "uncompressed")}
        if len(keys | new) > MAX_CONTEXTS and current:
            groups.append(current)
            current, keys = [], set()
        current.append(i)
        keys |= new
    if current:
        groups.append(current)
    return groups


@dataclass
class _Link:
    """An established association and what was negotiated on it."""

    assoc: Any
    accepted: dict[str, set[str]]
    proposed: frozenset[tuple[str, str]]  # (SOP class, transfer syntax) proposed
    idle_since: float = 0.0

    def alive(self) -> bool:
        a = self.assoc
        dul = a.dul
        return bool(
            a.is_established
            and not a.is_aborted
            and not a.is_released
            and dul.is_alive()
            and not getattr(dul, "_kill_thread", False)
        )

    def covers(self, files: Sequence[OutgoingFile]) -> bool:
        """Whether every file's (SOP class, stored syntax) was proposed on this association,
        so sending on it behaves as on one opened for ``files``."""
        return all((f.sop_class_uid, f.transfer_syntax_uid) in self.proposed for f in files)


OUT_OF_THREADS = "no thread or memory for the association (out of resources)"


def associate(ae: AE, host: str, port: int, **kwargs: Any) -> Any:
    """``ae.associate(host, port, **kwargs)``; an association whose DUL or own thread could
    not be made or did not start (FAULTS F18, see :class:`~gateway.dicom.reactor.
    BoundedRequestor`) raises :class:`RetryableError` (:data:`OUT_OF_THREADS`)."""
    try:
        return ae.associate(host, port, **kwargs)
    except MemoryError:
        raise RetryableError(OUT_OF_THREADS) from None
    except RuntimeError as exc:
        if "thread" not in str(exc):  # CPython's "can't start new thread", or START_WAIT's
            raise
        raise RetryableError(OUT_OF_THREADS) from None


@dataclass
class Sender:
    """``send(file) -> status`` on one association (see :meth:`StoreSCU.associate`)."""

    link: _Link
    reused: bool
    moved: dict[str, Any] = field(default_factory=dict)
    answered: int = 0  # C-STORE responses received on this association in this delivery

    def __call__(self, f: OutgoingFile) -> int:
        assoc = self.link.assoc
        syntaxes = self.link.accepted.get(f.sop_class_uid, set())
        try:
            if f.transfer_syntax_uid in syntaxes:
                # decrypted by gateway.dicom.spool_io, once for the send's two opens
                with one_reader():
                    rsp = assoc.send_c_store(f.path, **self.moved)
            elif syntaxes & _UNCOMPRESSED:
                rsp = send_converted(assoc, f, syntaxes, **self.moved)
            else:
                raise NoAcceptableSyntax(
                    "destination accepted no transfer syntax for this SOP class"
                )
        except IntegrityError as exc:
            # only verified segments went out; aborting leaves the destination nothing
            assoc.abort()
            raise QuarantineError(f"spool file integrity check failed: {exc}") from None
        if not assoc.is_established and not rsp:
            raise AssociationLost("association lost while sending (timeout or abort)")
        status = getattr(rsp, "Status", None)
        if status is None:
            assoc.abort()
            raise RetryableError("no C-STORE response (DIMSE timeout)")
        self.answered += 1
        return int(status)


class StoreSCU:
    """Associations to a destination: one per :meth:`associate`, or (``reuse=True``) kept
    open between deliveries for ``keep_open_seconds``."""

    def __init__(self, dest: DestinationConfig, *, calling_ae_title: str) -> None:
        self.dest = dest
        self.calling_ae_title = dest.calling_ae_title or calling_ae_title
        self.tls_args = destination_context(dest)  # CryptoError names a file that won't load
        self.keep_open = dest.keep_open_seconds
        self.cap = max(1, dest.max_associations)
        self.on_association: Callable[[str], None] = lambda kind: None  # "opened" | "reused"
        self._lock = threading.Condition()
        self._idle: list[_Link] = []  # oldest first
        self._busy = 0  # reusable associations in use
        self._closed = False
        self._reaper: threading.Thread | None = None

    @contextlib.contextmanager
    def associate(
        self,
        files: Sequence[OutgoingFile],
        *,
        originator: tuple[str, int] | None = None,
        reuse: bool = False,
    ) -> Iterator[Sender]:
        """Yield a :class:`Sender`, ``send(file) -> status``; raises Retryable/PermanentError
        on the association. ``originator``: the Move Originator AE Title and Message ID of
        C-MOVE sub-operations. ``reuse``: take an idle association negotiated for ``files``
        if there is one, and keep this one open afterwards (see the module's note)."""
        moved: dict[str, Any] = {}
        if originator is not None:
            moved = {"originator_aet": originator[0], "originator_id": originator[1]}
        pooled = reuse and self.keep_open > 0
        link = self._take(files) if pooled else None
        sender: Sender | None = None
        try:
            if link is None:
                link = self._open(files)
                self.on_association("opened")
                sender = Sender(link, reused=False, moved=moved)
            else:
                self.on_association("reused")
                sender = Sender(link, reused=True, moved=moved)
        finally:
            if sender is None and pooled:
                with self._lock:
                    self._busy -= 1
        assoc = link.assoc
        try:
            yield sender
        except BaseException:
            if pooled:
                with self._lock:
                    self._busy -= 1
            if assoc.is_established:
                assoc.abort()
            raise
        if pooled and self._put_back(link):
            return
        if assoc.is_established:
            assoc.release()

    # --- kept-open associations -----------------------------------------------------------
    def _take(self, files: Sequence[OutgoingFile]) -> _Link | None:
        """An idle association covering ``files``, or None with a busy place reserved for a
        new one (an idle association is released first if the cap requires it)."""
        found: _Link | None = None
        drop: list[_Link] = []
        with self._lock:
            for link in reversed(self._idle):
                if not link.alive():
                    drop.append(link)
                elif found is None and link.covers(files):
                    found = link
            for link in [*drop, *([found] if found else [])]:
                self._idle.remove(link)
            if found is None:
                # the new association's place: the oldest idle ones go if the cap requires
                while self._idle and self._busy + len(self._idle) + 1 > self.cap:
                    drop.append(self._idle.pop(0))
            self._busy += 1
        for link in drop:
            _close(link)
        return found

    def _put_back(self, link: _Link) -> bool:
        """Keep ``link`` open for the next delivery; False if it must be released now."""
        with self._lock:
            self._busy -= 1
            if self._closed or not link.alive() or self._busy + len(self._idle) >= self.cap:
                return False
            link.idle_since = time.monotonic()
            self._idle.append(link)
            if self._reaper is None:
                self._reaper = threading.Thread(
                    target=self._reap, name=f"scu-idle-{self.dest.name}", daemon=True
                )
                self._reaper.start()
            self._lock.notify_all()
        return True

    def _reap(self) -> None:
        """Release associations idle for ``keep_open`` seconds."""
        while True:
            expired: list[_Link] = []
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                while self._idle and now - self._idle[0].idle_since >= self.keep_open:
                    expired.append(self._idle.pop(0))
                if not expired:
                    wait = self.keep_open - (now - self._idle[0].idle_since) if self._idle else None
                    self._lock.wait(wait)
            for link in expired:
                _close(link)

    def close(self) -> None:
        """Release every idle association; later deliveries release theirs at once."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._lock.notify_all()
        for link in idle:
            _close(link)

    @property
    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)

    # --- one association ------------------------------------------------------------------
    def _open(self, files: Sequence[OutgoingFile]) -> _Link:
        ae = AE(ae_title=self.calling_ae_title)
        ae.connection_timeout = self.dest.connect_timeout
        ae.acse_timeout = self.dest.connect_timeout
        ae.dimse_timeout = self.dest.dimse_timeout
        ae.network_timeout = self.dest.network_timeout
        classes: dict[str, set[str]] = {}
        for f in files:
            classes.setdefault(f.sop_class_uid, set()).add(f.transfer_syntax_uid)
        contexts = []
        for sop_class, syntaxes in classes.items():
            for ts in sorted(syntaxes - _UNCOMPRESSED):
                contexts.append(build_context(sop_class, [ts]))
            contexts.append(build_context(sop_class, [str(t) for t in UNCOMPRESSED]))
        proposed = frozenset(
            (str(cx.abstract_syntax), str(ts)) for cx in contexts for ts in cx.transfer_syntax
        )
        opened: list[Any] = []  # EVT_CONN_OPEN: connected (and, with TLS, handshake done)
        assoc = associate(
            ae,
            self.dest.host,
            self.dest.port,
            contexts=contexts,
            ae_title=self.dest.ae_title,
            max_pdu=self.dest.max_pdu_size,
            evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), (evt.EVT_CONN_OPEN, opened.append)],
            tls_args=self.tls_args,
        )
        if not assoc.is_established:
            if assoc.is_rejected:
                rsd = getattr(assoc.acceptor, "primitive", None)
                result = getattr(rsd, "result", None)
                source = getattr(rsd, "result_source", None)
                diagnostic = getattr(rsd, "diagnostic", None)
                reason = (
                    f"association rejected (result={result}, source={source}, reason={diagnostic})"
                )
                if result == 0x01:
                    raise PermanentError(reason)
                raise RetryableError(reason)
            if not opened and self.tls_args is not None:
                refused = self._tls_refusal()
                if refused:
                    raise TLSRefusedError(refused)
                raise RetryableError(
                    "destination unreachable (connection refused or timed out) or the TLS "
                    "handshake failed (its certificate not trusted or not for this name, or "
                    "ours refused)"
                )
            if assoc.is_aborted:
                raise RetryableError("association aborted by the destination")
            raise RetryableError("destination unreachable (connection refused or timed out)")
        self._check_pin(assoc)
        bound_send_queue(assoc)
        accepted: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
        return _Link(assoc, accepted, proposed)

    def _tls_refusal(self) -> str:
        """Why the TLS handshake failed, when it was the certificates (pynetdicom logs the
        error and reports only a failed association): one more handshake with the same
        context. "" when the destination is simply unreachable or the handshake succeeds."""
        assert self.tls_args is not None
        context, server_name = self.tls_args
        try:
            with (
                socket.create_connection(
                    (self.dest.host, self.dest.port), timeout=self.dest.connect_timeout
                ) as sock,
                context.wrap_socket(sock, server_hostname=server_name),
            ):
                return ""
        except ssl.SSLCertVerificationError as exc:
            return str(exc.verify_message or exc.reason or "certificate verify failed")[:200]
        except ssl.SSLError as exc:
            return str(exc.reason or "handshake failure").lower().replace("_", "-")[:200]
        except OSError:
            return ""

    def _check_pin(self, assoc: Any) -> None:
        pin = self.dest.tls.pin_sha256 if self.dest.tls is not None else ""
        if not pin:
            return
        sock = getattr(assoc.dul.socket, "socket", None)
        try:
            if not isinstance(sock, ssl.SSLSocket):
                raise IntegrityError("no TLS socket to check the destination's pin against")
            check_pin(sock, public_key=pin)
        except IntegrityError as exc:
            assoc.abort()
            raise PermanentError(f"destination certificate refused: {exc}") from exc


def _close(link: _Link) -> None:
    """Release an idle association (abort it if the release is not answered)."""
    assoc = link.assoc
    try:
        if link.alive():
            assoc.release()
        elif assoc.is_established:
            assoc.abort()
    except Exception:  # a dying connection: nothing left to release
        log.debug("closing an idle association failed", exc_info=True)


def send_converted(
    assoc: Any, f: OutgoingFile, syntaxes: set[str], *, msg_id: int = 1, **moved: Any
) -> Any:
    """Send ``f`` decoded, in a syntax ``syntaxes`` accepted (decompressing if need be).

    The decoded data set is sent from memory: no plaintext copy is written to disk."""
    try:
        with open_plain(f.path) as fp:
            ds = dcmread(fp)
        if f.transfer_syntax_uid not in _UNCOMPRESSED:
            # A change of encoding, not a new instance: the SOP Instance UID stays
            # (pydicom would otherwise make a new one, and a retry a second copy).
            ds.decompress(generate_instance_uid=False)
    except IntegrityError:
        raise
    except Exception as exc:  # any decoder failure: the instance cannot be converted
        raise NoAcceptableSyntax(
            f"cannot decompress {f.transfer_syntax_uid} for a destination accepting "
            "only uncompressed syntaxes"
        ) from exc
    return assoc.send_c_store(ds, msg_id=msg_id, **moved)
