"""Event-driven reactors for the node's associations (pynetdicom 3.0.4, pinned).

pynetdicom runs two threads per association that poll: the DUL thread (PS3.8 9.2, the
upper-layer state machine) sleeps 1 ms whenever a loop found nothing to do, and the
association's reactor sleeps 1 ms before every look at its queues. Each request/response
therefore waits up to ~1 ms at every hand-over (PDU read -> DIMSE message -> handler ->
response primitive -> PDU written), and an idle association costs its process ~70 ms of CPU
per second in wake-ups that contend for the GIL.

Here both threads wait for what they wait for instead:

* :class:`WakingDUL` waits in ``select()`` on the association's socket and a wake-up pipe;
  every primitive or event queued for it from another thread (a C-STORE response, an abort,
  the node stopping) writes a byte to the pipe. The waiting itself is in
  :meth:`WaitingSocket.ready` (the acceptors' :class:`gateway.dicom.guard.GuardedSocket` is
  one), which pynetdicom's loop calls when it has no primitive to send; it waits only when
  nothing is queued.
* :func:`run_acceptor_reactor` is pynetdicom's ``Association._run_reactor`` with its 1 ms
  sleep replaced by a wait on an event set when a DIMSE message is complete, when the DUL
  hands up an A-RELEASE/A-ABORT, and when the DUL thread ends.

Both waits are bounded by :data:`IDLE_WAIT`, so the timers they check (ARTIM, the network
idle timeout) keep a resolution of 50 ms, as does a stop that sets a flag.

The node's acceptors (:mod:`gateway.dicom.server`) and its outgoing associations
(:class:`BoundedRequestor`: deliveries, C-MOVE and C-GET sub-operations, upstream queries)
both run this way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from gateway.dicom import commands

log = logging.getLogger(__name__)

T = TypeVar("T")

IDLE_WAIT = 0.05
"""The longest either thread waits before looking at its timers and flags again (s)."""


MEMORY_WAIT = 5.0
"""How long a PDU's read waits for memory to hold and decode it before it gives up (s)."""

MEMORY_RETRY = 0.01
"""How long the DUL's loop pauses when it had no memory to look at its socket (s)."""

START_WAIT = 5.0
"""How long a new thread of an association may take to begin running before the thread
that started it gives up on it (s)."""


class _StartedOrDead(threading.Event):
    """``Thread._started`` for a thread whose start must not block forever.

    CPython's ``Thread.start()`` waits without a timeout for the new thread to set this
    event. Under an address-space limit (FAULTS F18) the new thread can die of
    ``MemoryError`` in its bootstrap before it sets it ("Exception ignored in thread started
    by"), and the starter (the accept loop, a connection's handler, an association) would
    wait forever with the peer's connection open and unanswered. Here that wait gives up
    after :data:`START_WAIT` with ``RuntimeError``, which ``start()`` raises as it does when
    no thread can be made at all, and the caller answers the peer as for that."""

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            return super().wait(timeout)
        if super().wait(START_WAIT):
            return True
        raise RuntimeError("the new thread did not start (died in its bootstrap)")


def bound_start(thread: threading.Thread) -> threading.Thread:
    """Make ``thread.start()`` raise ``RuntimeError`` instead of blocking forever when the
    thread dies before it runs (see :class:`_StartedOrDead`); call before ``start()``."""
    vars(thread)["_started"] = _StartedOrDead()
    return thread


class _AnyAssociation(type):
    """``isinstance(x, BoundedRequestor)`` holds for every pynetdicom association: the name
    :class:`BoundedRequestor` replaces in ``pynetdicom.ae`` is also what
    ``AE.active_associations`` counts threads with, and the node's acceptors (limits) must
    still be counted there."""

    def __instancecheck__(cls, instance: object) -> bool:
        return isinstance(instance, Association)


class BoundedRequestor(Association, metaclass=_AnyAssociation):
    """The association pynetdicom's ``AE.associate`` makes (installed by
    :func:`gateway.dicom.server.configure_pynetdicom`), whose thread starts cannot block
    forever (FAULTS F18): its DUL thread's start and the wait for it to run, and its own
    thread's start once the association is established, raise ``RuntimeError`` after
    :data:`START_WAIT` instead. An established association whose thread did not start is
    aborted (A-ABORT to the peer) before the error is raised, so no half-made association
    is left to the peer's timeout. The node's outgoing associations (deliveries, C-MOVE and
    C-GET sub-operations, upstream queries) map the error to a retry."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        bound_start(self)
        # event-driven as the acceptors are: the DUL waits in select() (on the socket that
        # AE.associate makes, a WaitingSocket) and the reactor on its activity event,
        # which a DIMSE message set too (a C-GET's C-STORE sub-operations come that way)
        self.gateway_activity = threading.Event()
        self.dul = WakingDUL(self, activity=self.gateway_activity)
        self.dimse = _FileStoreDIMSE(self)
        self.dimse.msg_queue = WakingQueue(self.gateway_activity.set)
        self.acse_timeout = self.acse_timeout  # the timers of the DUL it replaced
        self.network_timeout = self.network_timeout
        self._dul_ready = _StartedOrDead()  # set by the DUL thread as it begins

    def _run_reactor(self) -> None:
        run_acceptor_reactor(self)

    def start(self) -> None:
        try:
            super().start()
        except RuntimeError:
            self.abort()
            raise


class _FileStoreDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, sending a C-STORE-RQ of a file (a delivery's, a C-MOVE
    sub-operation's) by :func:`gateway.dicom.commands.send_file_store`."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if not commands.send_file_store(self, primitive, context_id):
            super().send_msg(primitive, context_id)


def with_memory(make: Callable[[], T], *, until: float | None = None) -> T:
    """``make()``, tried again while it raises ``MemoryError`` (FAULTS F18: the address
    space is full while other associations hold buffers, which they give back as they end)
    for up to :data:`MEMORY_WAIT` s, or until ``until`` (monotonic) if sooner; then the
    ``MemoryError`` is raised. The peer meanwhile is held by TCP flow control."""
    give_up = time.monotonic() + MEMORY_WAIT
    if until is not None:
        give_up = min(give_up, until)
    pause = 0.01
    while True:
        try:
            return make()
        except MemoryError:
            if time.monotonic() + pause > give_up:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


def pdv_controls(
    length: int, read_header: Callable[[], bytes | bytearray], skip: Callable[[int], None]
) -> list[tuple[int, int]]:
    """The presentation context ID and message control header (PS3.8 9.3.5.1 and E.2) of
    each item of a P-DATA-TF PDU body of ``length`` bytes, whose items' 6-byte headers
    (item length, context ID, control header) ``read_header`` gives in turn while
    ``skip(n)`` passes over each item's data. ``ValueError`` when the items do not add up to
    the body."""
    controls: list[tuple[int, int]] = []
    left = length
    while left > 0:
        if left < 6:
            raise ValueError("a P-DATA-TF item header runs past the PDU")
        header = read_header()
        item_length = int.from_bytes(header[0:4], "big")
        if item_length < 2 or item_length + 4 > left:
            raise ValueError("a P-DATA-TF item length does not fit the PDU")
        controls.append((header[4], header[5]))
        skip(item_length - 2)
        left -= item_length + 4
    if not controls:
        raise ValueError("a P-DATA-TF PDU without items")
    return controls


def pdv_controls_of(body: bytes | bytearray) -> list[tuple[int, int]]:
    """:func:`pdv_controls` of a body held in memory (no copy of its data is made)."""
    view = memoryview(body)
    pos = 0

    def read_header() -> bytes | bytearray:
        nonlocal pos
        pos += 6
        return bytes(view[pos - 6 : pos])

    def skip(n: int) -> None:
        nonlocal pos
        pos += n

    return pdv_controls(len(body), read_header, skip)


def _pdata_over(body: bytearray) -> P_DATA_TF:
    """A received P-DATA-TF decoded as pynetdicom decodes it (its own item decoder, the
    body's items in order), over ``body`` itself: each item's data a view into it.

    pynetdicom's ``_decode_pdu`` copies a PDU four times before its data reaches the DIMSE
    provider (the PDU's bytes, the body's slice, each item's slice, then the data after the
    control header), and a CT instance's 513 KB went through each: here the one buffer the
    socket filled is all there is, until the receive file's write (the DIMSE provider's
    ``data[1:]`` is a view too)."""
    pdu = P_DATA_TF()
    # pynetdicom's annotations say bytes; its decoder only slices and unpacks
    pdu.presentation_data_value_items = pdu._wrap_generate_items(cast(bytes, memoryview(body)))
    return pdu


def drained_pdata(controls: list[tuple[int, int]]) -> P_DATA_TF:
    """A P-DATA-TF made of a draining C-STORE's PDU: each item with its control header as
    its only byte of data, which is all the draining ``GuardedDIMSE`` looks at."""
    primitive = P_DATA()
    # pynetdicom takes [ID, data] lists here (and gives tuples back)
    items: Any = [[ctx, bytes([ctrl])] for ctx, ctrl in controls]
    primitive.presentation_data_value_list = items
    return P_DATA_TF(primitive)


class WakingQueue(queue.Queue[Any]):
    """A queue that calls ``on_put`` after every put (from any thread)."""

    def __init__(self, on_put: Callable[[], None]) -> None:
        super().__init__()
        self._on_put = on_put

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._on_put()


class WaitingSocket(AssociationSocket):
    """pynetdicom's association socket, waiting for something to do in :meth:`ready`.

    pynetdicom's DUL asks ``ready`` whenever it has no primitive to send; with a
    :class:`WakingDUL`, when nothing at all is queued for it, this is where it waits (for
    the peer's bytes or a wake-up), instead of pynetdicom's 1 ms polling. The socket of the
    node's outgoing associations (``AE.associate``, installed by
    :func:`gateway.dicom.server.configure_pynetdicom`) and the base of the acceptors'
    :class:`gateway.dicom.guard.GuardedSocket`.

    A TLS client's socket also turns readable with records that carry no PDU bytes (TLS 1.3
    session tickets, sent by the server right after the handshake): pynetdicom would then
    block in ``recv`` for a PDU, with the A-ASSOCIATE-RQ still unsent, until a timeout.
    Here such a socket is read without blocking when it turns readable; what arrives is kept
    for :meth:`recv`, and a record with no bytes for us leaves it not ready."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stash = bytearray()  # PDU bytes read by ready(), given out first by recv()
        # one writer at a time: the DUL thread, and a thread sending a P-DATA itself
        # (WakingDUL.send_pdata), or an abort sent from a read that broke a rule
        self.send_lock = threading.Lock()

    def send(self, bytestream: bytes) -> None:
        with self.send_lock:
            super().send(bytestream)

    @property
    def ready(self) -> bool:
        if self._stash:
            return True
        dul = self.assoc.dul
        if not isinstance(dul, WakingDUL):
            return bool(super().ready)
        try:
            sock = self.socket
            if sock is None or not self._is_connected:
                dul.wait_if_idle(None)
                return False
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return True  # TLS has decrypted bytes that select() cannot see
            dul.wait_if_idle(sock)
            return bool(super().ready) and self._brings_bytes(sock)
        except MemoryError:
            # F18: no memory even to look (select()'s lists): not ready now, looked at again
            # on the DUL's next loop; pynetdicom's loop would abort the association. Its
            # timers (ARTIM, the network timeout) still end one that never gets memory.
            time.sleep(MEMORY_RETRY)
            return False

    def waiting(self) -> bool:
        """Whether PDU bytes can be read now, found without waiting (and without queuing an
        event when the socket has closed: the DUL's loop finds that out)."""
        if self._stash:
            return True
        sock = self.socket
        if sock is None or not self._is_connected:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError, MemoryError):
            return False
        return bool(readable) and self._brings_bytes(sock)

    def _brings_bytes(self, sock: Any) -> bool:
        """For a readable socket: True, except for a TLS client's whose records held no PDU
        bytes (what they held is read ahead into the stash)."""
        if isinstance(sock, ssl.SSLSocket) and not sock.server_side:
            return self._read_ahead(sock)
        return True

    def _read_ahead(self, sock: ssl.SSLSocket) -> bool:
        """Whether the readable TLS client socket brought PDU bytes (kept in the stash), or
        an end or error that ``recv`` will meet; False for records with nothing for us."""
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            data = sock.recv(65536)
        except ssl.SSLWantReadError:
            return False  # a session ticket or other record without application data
        except OSError:
            return True  # the read that follows meets it (Evt17)
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(timeout)
        self._stash += data  # b"": the peer closed, and recv() returns short
        return True

    def recv(self, nr_bytes: int) -> bytearray:
        if not self._stash:
            return super().recv(nr_bytes)
        data = self._stash[:nr_bytes]
        del self._stash[:nr_bytes]
        if len(data) < nr_bytes:
            data += super().recv(nr_bytes - len(data))
        return data


class OrderedStateMachine(StateMachine):
    """pynetdicom's upper-layer state machine, each action taken under its DUL's ``order``
    lock (:meth:`WakingDUL.send_pdata`)."""

    def do_action(self, event: str) -> None:
        order = getattr(self.dul, "order", None)
        if order is None:
            super().do_action(event)
            return
        with order:
            super().do_action(event)


class WakingDUL(DULServiceProvider):
    """pynetdicom's DUL service provider, woken through a pipe instead of polling."""

    def __init__(self, assoc: Any, *, activity: threading.Event) -> None:
        super().__init__(assoc)
        bound_start(self)
        # the loop's own sleep after an idle pass: the wait in ready() replaces it
        self._run_loop_delay = 0.0
        self.activity = activity  # the association reactor's wake-up
        self._pipe_lock = threading.Lock()
        self._wake_r = -1
        self._wake_w = -1
        # set before the DUL thread checks its queues and waits, cleared after: a put that
        # sees it False was made before that check, which then finds the item
        self._waiting = False
        self._sent_last = False  # the last loop sent a local primitive (see below)
        self.to_provider_queue = WakingQueue(self.wake)
        self.event_queue = WakingQueue(self.wake)
        self.to_user_queue = WakingQueue(activity.set)
        # held by the DUL thread while it turns a local primitive into its event and while
        # the state machine acts (OrderedStateMachine): a P-DATA sent by another thread
        # (send_pdata) goes out only when none of its own is queued or being sent
        self.order = threading.RLock()
        self.state_machine = OrderedStateMachine(self)

    def send_pdata(self, primitive: P_DATA) -> None:
        """Send ``primitive`` (a P-DATA) to the peer from the calling thread when that keeps
        the order pynetdicom's queue would, else queue it for the DUL thread
        (``send_pdu``).

        Queued, each PDU waits for the DUL thread to wake (the pipe), take the interpreter
        lock, turn the primitive into Evt9 and act on it (DT-1): two hand-overs between
        threads per C-STORE response, ~0.4 ms on a busy two-core machine. It is sent here
        when, under :attr:`order` (not waited for: held, the DUL thread is acting, and the
        primitive is queued): the association is established (Sta6, where DT-1 sends a
        P-DATA-TF and stays), nothing is queued for the DUL thread (the primitive would
        overtake it), and the connection is plain TCP (an ``ssl.SSLSocket`` must not be
        written while the DUL thread may be reading it). The bytes are pynetdicom's
        (``P_DATA_TF(primitive)`` through its ``_send``, as DT-1 sends them)."""
        if not self._send_now(primitive):
            self.send_pdu(primitive)

    def _send_now(self, primitive: P_DATA) -> bool:
        sock = self.socket
        if not isinstance(sock, WaitingSocket) or isinstance(sock.socket, ssl.SSLSocket):
            return False
        if not self.order.acquire(blocking=False):
            return False
        try:
            if self.state_machine.current_state != "Sta6" or not self.to_provider_queue.empty():
                return False
            self._send(P_DATA_TF(primitive))
            return True
        finally:
            self.order.release()

    def wake(self) -> None:
        """Make a wait in :meth:`wait` return. Writes only while the DUL thread waits (or is
        about to): its own puts, and puts while it works, need no wake-up."""
        if not self._waiting:
            return
        with self._pipe_lock:
            if self._wake_w < 0:  # not started yet or ended: nothing waits on the pipe
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:  # the pipe is full: a wake-up is pending anyway
                pass

    def wait_if_idle(self, sock: Any, timeout: float = IDLE_WAIT) -> None:
        """When nothing is queued for the state machine, wait until ``sock`` (None: only the
        pipe) is readable, :meth:`wake` is called or ``timeout`` passes."""
        self._waiting = True
        try:
            if self.to_provider_queue.empty() and self.event_queue.empty():
                self._wait(sock, timeout)
        finally:
            self._waiting = False

    def _wait(self, sock: Any, timeout: float) -> None:
        fds: list[Any] = [self._wake_r] if self._wake_r >= 0 else []
        if sock is not None:
            fds.append(sock)
        if not fds:
            time.sleep(min(timeout, 0.001))
            return
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
        except (OSError, ValueError):  # the socket closed under us: the caller finds out
            return
        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def _process_recv_primitive(self) -> bool:
        """pynetdicom's, which turns the next local primitive into its event on every loop
        that has one, so the peer's PDUs are read only once everything queued is sent: a
        C-CANCEL waited behind all of a C-FIND's pending responses. Here a loop after one
        that sent reads first when the peer's PDU is waiting."""
        if self._sent_last and self._peer_waiting():
            self._sent_last = False
            return False  # the loop goes on to _is_transport_event, which reads it
        with self.order:
            self._sent_last = super()._process_recv_primitive()
        return self._sent_last

    def _peer_waiting(self) -> bool:
        sock = self.socket
        return isinstance(sock, WaitingSocket) and sock.waiting()

    def _read_pdu_data(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider._read_pdu_data``: the same event for each
        outcome (Evt17 for a transport that closed or fell short, Evt19 for an unknown type
        or a PDU that does not decode, the PDU's own event otherwise), except that the PDU's
        buffers, which pynetdicom allocates three times over, wait for memory when there is
        none (F18) instead of the association ending as if the peer's PDU were invalid.

        If none comes for a P-DATA-TF of a C-STORE's data set, that C-STORE is drained (its
        ``GuardedDIMSE`` answers it 0xA700 after its last fragment), and the PDUs of a
        draining C-STORE are read without being held (:meth:`_drain_pdata`): draining
        associations that each waited for memory to read their next PDU had waited for each
        other, and one was aborted. Out of memory for anything else, the association is
        aborted as out of resources."""
        sock = cast(Any, self.socket)
        pdu_type = pdu_length = 0
        try:
            header = sock.recv(6)
            if len(header) != 6:  # the peer closed
                self.event_queue.put("Evt17")
                return
            pdu_type, _, pdu_length = struct.unpack(">BBL", bytes(header))
            if not 0x01 <= pdu_type <= 0x07:
                log.warning("unknown PDU type received", extra={"pdu_type": pdu_type})
                self.event_queue.put("Evt19")
                return
            if pdu_type == 0x04 and getattr(self.assoc.dimse, "draining", False):
                self._drain_pdata(sock, pdu_length)
                return
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError):  # closed, or refused by the guarded socket
            self.event_queue.put("Evt17")
            return
        except MemoryError:  # nothing of the body read yet
            if pdu_type == 0x04 and self._drain_for_memory():
                self._drain_pdata(sock, pdu_length)
            else:
                self._out_of_memory(sock)
            return
        if len(body) != pdu_length:
            self.event_queue.put("Evt17")
            return
        try:
            pdu: Any
            if pdu_type == 0x04 and not self._pdu_listened():
                pdu, event = with_memory(lambda: _pdata_over(body)), "Evt10"
            else:
                pdu, event = with_memory(lambda: self._decode_pdu(header + body))
        except MemoryError:
            if pdu_type == 0x04 and self._drain_for_memory():
                self._put_drained(sock, lambda: pdv_controls_of(body))
            else:
                self._out_of_memory(sock)
            return
        except Exception:  # noqa: BLE001 - the peer's bytes: anything the decoder raises
            log.warning("a received PDU could not be decoded")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _pdu_listened(self) -> bool:
        """Whether a handler is bound to the events pynetdicom's ``_decode_pdu`` triggers
        with a received PDU (its bytes, its object): then it decodes every PDU."""
        return bool(
            self.assoc.get_handlers(evt.EVT_DATA_RECV) or self.assoc.get_handlers(evt.EVT_PDU_RECV)
        )

    def _drain_for_memory(self) -> bool:
        """Whether the association's DIMSE provider drains the C-STORE whose data set the
        P-DATA-TF with no memory belongs to (the node's ``GuardedDIMSE``)."""
        drain = getattr(self.assoc.dimse, "drain_for_memory", None)
        return bool(drain is not None and drain())

    def _drain_pdata(self, sock: Any, length: int) -> None:
        """Read a draining C-STORE's P-DATA-TF body into nothing (the guarded socket's
        ``skip_pdata``) and hand on only its items' control headers."""
        self._put_drained(sock, lambda: sock.skip_pdata(length))

    def _put_drained(self, sock: Any, controls: Callable[[], list[tuple[int, int]]]) -> None:
        """Queue a P-DATA-TF of ``controls()`` (see :func:`drained_pdata`); Evt17 when the
        transport closed or failed (the socket aborts items that do not add up), Evt19 for
        such items in a body held in memory, an abort when even this finds no memory."""
        try:
            pdu = drained_pdata(controls())
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return
        except ValueError:
            self.event_queue.put("Evt19")
            return
        except MemoryError:
            self._out_of_memory(sock)
            return
        self.event_queue.put("Evt10")  # P-DATA-TF received
        self._recv_pdu.put(pdu)

    def _out_of_memory(self, sock: Any) -> None:
        refuse = getattr(sock, "refuse", None)  # the node's GuardedSocket: abort, audited
        if refuse is not None:
            refuse("out-of-resources")
        else:
            self.event_queue.put("Evt17")

    def run_reactor(self) -> None:
        with self._pipe_lock:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
        try:
            super().run_reactor()
        finally:
            with self._pipe_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1
            self.activity.set()  # the association reactor sees the DUL gone

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        """pynetdicom's ``stop_dul`` (Sta1 only), which wakes the loop to see the flag."""
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.wake()
            while self.is_alive():
                time.sleep(0.001)
            return True
        return False


def run_acceptor_reactor(assoc: Any) -> None:
    """pynetdicom 3.0.4's ``Association._run_reactor`` (the loop of acceptors and
    requestors alike), waiting on ``assoc.dul.activity`` instead of sleeping 1 ms per loop;
    otherwise the same steps in the same order: serve a complete DIMSE message, answer a
    release, end on an abort, on the DUL thread's end and on the network idle timeout."""
    dul: WakingDUL = assoc.dul
    activity = dul.activity
    assoc._is_paused = False
    while not assoc._kill:
        if assoc.dimse.msg_queue.empty():
            # parked: it takes no message while it waits, so a send_* method on this
            # association (a requestor's send_c_store, a C-GET's sub-operations) need not
            # wait for it to reach the checkpoint below; it does not leave the checkpoint
            # before the sender sets it again
            assoc._is_paused = True
            activity.wait(IDLE_WAIT)
        activity.clear()  # before looking: a put after this sets it again

        # paused while a handler sends on this association itself (send_* methods). The
        # checkpoint is looked at again once the flag is down: a sender clears it, then
        # waits for the flag; one that cleared it just after the wait returned saw the flag
        # still up and is sending, and its response must be left for it (taken here, it was
        # "unexpected" and the sender waited out its DIMSE timeout)
        while True:
            assoc._is_paused = True
            assoc._reactor_checkpoint.wait()
            assoc._is_paused = False
            if assoc._reactor_checkpoint.is_set():
                break

        context_id, msg = assoc.dimse.get_msg(block=False)
        if msg:
            assoc._serve_request(msg, context_id)

        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            log.debug("association released")
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return

        if assoc.acse.is_aborted():
            dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return

        if not dul.is_alive():
            assoc.kill()
            return

        if dul.idle_timer_expired():
            log.info("network timeout reached")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return
