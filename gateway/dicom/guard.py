"""A socket wrapper that bounds what a peer can make the node read (PS3.8 9.3.1).

pynetdicom reads a 6-byte PDU header and then allocates and reads whatever length the peer
declared, with no deadline. This wrapper, which pynetdicom's DUL reads through, enforces:

* a size cap per PDU type: A-ASSOCIATE-RQ up to ``max_associate_pdu_size`` (near DCMTK's
  1 MB), P-DATA-TF up to the maximum PDU length we advertised, release and abort PDUs their
  fixed 4 bytes, anything else 64 KiB;
* a deadline for the whole PDU once its first byte has arrived (slowloris).

On a violation it sends an A-ABORT (service provider, invalid PDU parameter value), calls
``on_violation`` so the event is audited, and raises ``OSError``, which pynetdicom treats
as the transport closing.

:class:`GuardedDIMSE` bounds what the PDUs add up to: a DIMSE message held in memory (the
command set; a data set that is not a C-STORE's, such as a C-FIND identifier) may grow to
``MAX_COMMAND_SET`` / ``MAX_IN_MEMORY_DATASET`` bytes, and a C-STORE data set (written to its
receive file) ``max_instance_bytes``, so a message whose last fragment never comes is aborted
(FAULTS_AND_ATTACKS A7), and a message pynetdicom cannot decode (no command
field, a garbage command set) is aborted instead of killing pynetdicom's reactor thread and
dropping the connection without an answer.

:class:`GuardedStateMachine` keeps pynetdicom's reactor thread alive when the peer's PDUs put
the association in a state where a local primitive arrives too late (an A-RELEASE-RP after
the peer's garbage made us abort: ``Evt14`` in ``Sta13``); pynetdicom raises there and the
thread dies with the connection still open. It also ends a connection that closed before its
A-ASSOCIATE-RQ at once: pynetdicom kept its thread waiting ``acse_timeout`` (30 s), so a burst
of garbage connections, each aborted at once, filled ``max_connections`` for that long.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_FIND_RSP, C_STORE_RQ
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.fsm import ACTIONS, InvalidEventError
from pynetdicom.pdu import A_ABORT_RQ

from gateway.dicom import commands
from gateway.dicom.reactor import (
    OrderedStateMachine,
    WaitingSocket,
    WakingDUL,
    WakingQueue,
    pdv_controls,
    with_memory,
)

log = logging.getLogger(__name__)

_OTHER_CAP = 65536
_FIXED = {0x05: 4, 0x06: 4, 0x07: 4}
# A command set is a few hundred bytes (PS3.7 E.1); 64 KiB leaves room for any real one.
MAX_COMMAND_SET = 65536
# Data sets other than C-STORE's are identifiers (C-FIND/C-MOVE/C-GET keys), read in memory.
MAX_IN_MEMORY_DATASET = 4 << 20
# the data of a draining C-STORE's PDUs is read into this and dropped; made at import (F18)
# and never looked at, so the associations that read into it at once need no lock
_SKIPPED = bytearray(65536)
_PENDING = frozenset({0xFF00, 0xFF01})  # C-FIND pending statuses (PS3.4 C.4.1.1.4)


def _abort_bytes() -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = 0x02  # DICOM UL service-provider
    pdu.reason_diagnostic = 0x06  # invalid PDU parameter value
    return bytes(pdu.encode())


class GuardedSocket(WaitingSocket):
    """A :class:`~gateway.dicom.reactor.WaitingSocket` that refuses oversized or slow PDUs;
    the socket of the node's acceptor associations, whose DUL is a
    :class:`~gateway.dicom.reactor.WakingDUL`."""

    def __init__(
        self,
        assoc: Any,
        client_socket: socket.socket,
        *,
        max_pdu_size: int,
        max_associate_pdu_size: int,
        pdu_read_timeout: float,
        on_violation: Callable[[str], None],
    ) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._max_pdata = max_pdu_size
        self._max_assoc = max_associate_pdu_size
        self._timeout = pdu_read_timeout
        self._on_violation = on_violation
        self._expect_body: int | None = None
        self._deadline = 0.0
        self._violated = False
        self._item_header = bytearray(6)  # a draining P-DATA-TF item's header (skip_pdata)

    @property
    def ready(self) -> bool:
        """Whether a PDU can be read; waits as :class:`WaitingSocket` does."""
        # After a violation nothing more is read: the rest is the same peer's garbage, and
        # reading it would audit the same connection again for every 6 bytes of it.
        if self._violated:
            cast(WakingDUL, self.assoc.dul).wait_if_idle(None)
            return False
        return super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        if self._violated:
            raise OSError("closed after a violation")
        if self._expect_body is None:
            # A header: the PDU's deadline starts with its first byte.
            self._deadline = time.monotonic() + self._timeout
            data = self._read_exact(nr_bytes)
            if len(data) == 6:
                pdu_type, _, length = struct.unpack(">BBL", bytes(data))
                self._check(pdu_type, length)
                if 0x01 <= pdu_type <= 0x07:  # pynetdicom reads no body of an unknown type
                    self._expect_body = length
            return data
        self._expect_body = None
        return self._read_exact(nr_bytes)

    def _check(self, pdu_type: int, length: int) -> None:
        if pdu_type == 0x01:
            cap = self._max_assoc
        elif pdu_type == 0x04:
            cap = self._max_pdata
        else:
            cap = _FIXED.get(pdu_type, _OTHER_CAP)
        if length > cap:
            self._violation(f"pdu-too-large type=0x{pdu_type:02x}")

    def refuse(self, reason: str) -> None:
        """Abort from above the PDU layer (:class:`GuardedDIMSE`): send A-ABORT, audit, and
        read nothing more; pynetdicom is then told the transport closed (Evt17)."""
        with contextlib.suppress(OSError):
            self._violation(reason)
        sock = self.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.event_queue.put("Evt17")

    def _violation(self, reason: str) -> None:
        self._violated = True
        sock = self.socket
        if sock is not None:
            with contextlib.suppress(OSError), self.send_lock:
                sock.settimeout(1.0)
                sock.sendall(_abort_bytes())
        self._on_violation(reason)
        raise OSError(reason)

    def _read_exact(self, nr_bytes: int) -> bytearray:
        # out of memory (F18), wait for some while the peer is held by TCP flow control
        buf = with_memory(lambda: bytearray(nr_bytes), until=self._deadline)
        got = self._fill(memoryview(buf))
        # the peer closed: a short read (buf cannot shrink while viewed)
        return buf if got == nr_bytes else buf[:got]

    def _fill(self, view: memoryview) -> int:
        """Read into ``view`` until it is full, the peer closes (fewer bytes: how many) or
        the PDU's deadline passes (a violation)."""
        sock = self.socket
        if sock is None:
            raise OSError("socket closed")
        got = 0
        try:
            while got < len(view):
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    self._violation("pdu-read-deadline")
                sock.settimeout(remaining)
                try:
                    n = sock.recv_into(view[got:], min(len(view) - got, 1 << 20))
                except TimeoutError:
                    self._violation("pdu-read-deadline")
                if n == 0:
                    return got
                got += n
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(None)
        return got

    def skip_pdata(self, length: int) -> list[tuple[int, int]]:
        """Read the body of a P-DATA-TF PDU (its header read by :meth:`recv`) without
        holding it, for a C-STORE drained for want of memory (FAULTS F18): its items'
        presentation context IDs and control headers (see
        :func:`gateway.dicom.reactor.pdv_controls`), their data read into a buffer made at
        import and dropped. Raises ``OSError`` as :meth:`recv` does (the PDU's deadline, a
        closed connection), and with an A-ABORT (invalid PDU) for items that do not add up
        to the PDU."""
        self._expect_body = None

        def read_header() -> bytearray:
            if self._fill(memoryview(self._item_header)) != 6:
                raise OSError("closed in a P-DATA-TF")
            return self._item_header

        def skip(n: int) -> None:
            while n > 0:
                chunk = memoryview(_SKIPPED)[: min(n, len(_SKIPPED))]
                if self._fill(chunk) != len(chunk):
                    raise OSError("closed in a P-DATA-TF")
                n -= len(chunk)

        try:
            return pdv_controls(length, read_header, skip)
        except ValueError:
            self._violation("invalid-pdata")
            raise  # not reached: _violation raises OSError


class GuardedDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with bounded in-memory messages and decoding errors
    turned into an A-ABORT (through the association's :class:`GuardedSocket`)."""

    def __init__(
        self,
        assoc: Any,
        *,
        max_instance_bytes: int = 0,
        on_message: Callable[[], None] | None = None,
        on_store_out_of_memory: Callable[[Any], None] | None = None,
    ) -> None:
        """``max_instance_bytes``: the most a C-STORE's data set (written to its receive
        file as it arrives) may bring; 0 for no cap. ``on_message`` is called whenever a
        complete message is queued for the association's reactor (it waits for that).
        ``on_store_out_of_memory`` is called with the command set of a C-STORE answered
        0xA700 because its data set could not be received for want of memory."""
        super().__init__(assoc)
        self.max_instance_bytes = max_instance_bytes
        if on_message is not None:
            self.msg_queue = WakingQueue(on_message)
        self._on_store_out_of_memory = on_store_out_of_memory
        # (context id, command set) of a C-STORE-RQ whose data set is being read and
        # discarded: it ran out of memory (FAULTS F18) and is answered once its last
        # fragment is in
        self._draining: tuple[int, Any] | None = None

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """A C-STORE response from :func:`gateway.dicom.commands.store_response` (pydicom's
        bytes, not built and encoded twice) when it fits one PDU and nothing listens for
        EVT_DIMSE_SENT (that event carries pynetdicom's message object); a C-GET's C-STORE
        sub-operation from its file by :func:`gateway.dicom.commands.send_file_store`;
        anything else as pynetdicom sends it."""
        if commands.send_file_store(self, primitive, context_id):
            return
        encoded = None
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            encoded = commands.store_response(primitive)
        pdata = commands.command_pdu(encoded, context_id, self.maximum_pdu_size)
        if pdata is None:
            if isinstance(primitive, C_FIND) and primitive.Status in _PENDING:
                self._send_paced(primitive, context_id)
                return
            super().send_msg(primitive, context_id)
            return
        # from this thread when that keeps the order (WakingDUL.send_pdata), else queued
        getattr(self.dul, "send_pdata", self.dul.send_pdu)(pdata)

    def _send_paced(self, primitive: Any, context_id: int) -> None:
        """A C-FIND pending response as pynetdicom's ``send_msg`` sends it (the same message,
        event and fragments), each fragment written by this thread when that keeps the order
        (``WakingDUL.send_pdata``): the find's handler then makes its next response only
        once this one is on its way. Queued for the DUL thread, responses were made faster
        than that thread (which needs the interpreter lock from this one) sent them, most of
        them before the SCU had its first, and a C-CANCEL stops only the responses not yet
        made (14 to 90 of 100 went out after it)."""
        dimse_msg = C_FIND_RSP()
        dimse_msg.primitive_to_message(primitive)
        dimse_msg.context_id = context_id
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": dimse_msg})
        send = getattr(self.dul, "send_pdata", self.dul.send_pdu)
        for pdata in dimse_msg.encode_msg(context_id, self.maximum_pdu_size):
            send(pdata)

    def receive_primitive(self, primitive: Any) -> None:
        if self._draining is not None:
            self._drain(primitive)
            return
        try:
            super().receive_primitive(primitive)
        except MemoryError:  # F18: no memory for the message, not the peer's fault
            self._out_of_memory(primitive)
            return
        except Exception:  # noqa: BLE001 - the peer's bytes: anything the decoder raises
            self._refuse("invalid-dimse-message")
            return
        message = self.message
        if message is None:
            return
        command = message.encoded_command_set.tell()
        receive_file = getattr(message, "_data_set_file", None)
        if receive_file is None:
            data = message.data_set.tell() if message.data_set is not None else 0
            if command > MAX_COMMAND_SET or data > MAX_IN_MEMORY_DATASET:
                self._refuse("dimse-message-too-large")
            return
        received = getattr(receive_file, "received", 0)
        if command > MAX_COMMAND_SET:
            self._refuse("dimse-message-too-large")
        elif self.max_instance_bytes and received > self.max_instance_bytes:
            self._refuse("instance-too-large")
            # the partial receive file goes now (pynetdicom keeps it: delete=False)
            with contextlib.suppress(OSError):
                receive_file.close()
                os.unlink(receive_file.name)

    @property
    def draining(self) -> bool:
        """Whether a C-STORE is being drained: its PDUs are read and dropped (the DUL then
        hands on only their control headers, :class:`~gateway.dicom.reactor.WakingDUL`)."""
        return self._draining is not None

    def _out_of_memory(self, primitive: Any) -> None:
        """A C-STORE whose data set could not be taken in: its fragments are read and
        dropped, and it is answered 0xA700 (out of resources) after its last, so the
        association goes on; out of memory for any other message, the association is
        aborted (A-ABORT, audited as out-of-resources)."""
        if self.drain_for_memory():
            self._drain(primitive)
        else:
            self._refuse("out-of-resources")

    def drain_for_memory(self) -> bool:
        """Drain the message being received if it is a C-STORE whose command set is in (its
        data set could not be taken in: ``_out_of_memory``, or the DUL had no memory for one
        of its PDUs) and return True; otherwise drop the message and return False (the
        caller aborts the association). Either way its partial receive file goes now."""
        message = self.message
        command = getattr(message, "command_set", None)
        context_id = getattr(message, "context_id", None)
        self.message = None
        if message is not None:
            receive_file = getattr(message, "_data_set_file", None)
            if receive_file is not None:
                with contextlib.suppress(OSError):
                    receive_file.close()
                    os.unlink(receive_file.name)
        if not isinstance(message, C_STORE_RQ) or command is None or context_id is None:
            return False
        self._draining = (context_id, command)
        with contextlib.suppress(MemoryError):  # the drain does not depend on the record
            log.warning("no memory to receive a C-STORE data set; answered 0xA700")
        return True

    def _drain(self, primitive: Any) -> None:
        """Drop a draining C-STORE's fragments; answer it after the last one."""
        assert self._draining is not None
        for _context_id, data in getattr(primitive, "presentation_data_value_list", ()):
            # the message control header (PS3.8 E.2): bit 0 command, bit 1 last fragment
            if data and not data[0] & 0x01 and data[0] & 0x02:
                context_id, command = self._draining
                self._draining = None
                rsp = C_STORE()
                rsp.MessageIDBeingRespondedTo = command.MessageID
                rsp.AffectedSOPClassUID = command.AffectedSOPClassUID
                rsp.AffectedSOPInstanceUID = command.AffectedSOPInstanceUID
                rsp.Status = 0xA700  # out of resources
                try:
                    self.send_msg(rsp, context_id)
                except MemoryError:  # not even for the answer: end the association
                    self._refuse("out-of-resources")
                    return
                if self._on_store_out_of_memory is not None:
                    self._on_store_out_of_memory(command)
                return

    def _refuse(self, reason: str) -> None:
        self.message = None  # what was buffered goes now, not when the association ends
        sock = self.dul.socket
        if isinstance(sock, GuardedSocket):
            sock.refuse(reason)
        else:  # not ours (an SCU's association): pynetdicom's own answer to a bad PDU
            self.dul.event_queue.put("Evt19")


# Events raised by a primitive of the local user (PS3.8 9.2): A-ASSOCIATE request, accept
# and reject, P-DATA, A-RELEASE request and response, A-ABORT
_LOCAL_PRIMITIVE_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


class GuardedStateMachine(OrderedStateMachine):
    """pynetdicom's upper-layer state machine; an event the state has no transition for is
    dropped instead of raised (the state's own timers still end the association: ARTIM in
    Sta13), and an action that fails on the peer's bytes aborts through the guarded socket.

    ``on_invalid_pdu`` hears Evt19 (an unrecognised or invalid PDU, answered with A-ABORT by
    AA-8) once its action ran: a callback here instead of a handler of pynetdicom's
    EVT_FSM_TRANSITION, which built an event object for every transition of every PDU."""

    def __init__(self, dul: Any, *, on_invalid_pdu: Callable[[], None] | None = None) -> None:
        super().__init__(dul)
        self._on_invalid_pdu = on_invalid_pdu

    def do_action(self, event: str) -> None:
        try:
            super().do_action(event)
            if event == "Evt19" and self._on_invalid_pdu is not None:
                self._on_invalid_pdu()
            self._end_wait_if_idle()
        except InvalidEventError:
            log.info("upper-layer event out of order dropped", extra={"event": event})
            if event in _LOCAL_PRIMITIVE_EVENTS:
                # the primitive that raised it is still first in the queue (pynetdicom only
                # peeks it; the action would take it): left there, the reactor raises the
                # same event again at once, a busy loop until ARTIM ends the connection
                with contextlib.suppress(queue.Empty):
                    self.dul.to_provider_queue.get_nowait()
                if event == "Evt15" and self.current_state == "Sta2":
                    # our own abort (the node stopping) of a connection that has sent no
                    # A-ASSOCIATE-RQ yet: close it, as the table does in Sta4 (AA-2)
                    self.current_state = ACTIONS["AA-2"][1](self.dul)
        except (
            Exception
        ) as exc:  # the peer's bytes: anything an action raises (re-raised if not ours)
            sock = self.dul.socket
            if not isinstance(sock, GuardedSocket):
                raise
            # no memory for the PDU's decoding (F18) is ours, not the peer's
            oom = isinstance(exc, MemoryError)
            sock.refuse("out-of-resources" if oom else "invalid-pdu-sequence")

    def _end_wait_if_idle(self) -> None:
        """Back in Sta1 (the transport closed) before an A-ASSOCIATE-RQ arrived: pynetdicom's
        acceptor would wait ``acse_timeout`` for one anyway, its thread counting against
        ``max_connections`` with no socket left; ``None`` is its own "nothing came"."""
        assoc = self.dul.assoc
        if (
            self.current_state == "Sta1"
            and assoc.is_acceptor
            and assoc.requestor.primitive is None
            and self.dul.to_user_queue.empty()
        ):
            cast("queue.Queue[Any]", self.dul.to_user_queue).put(None)
