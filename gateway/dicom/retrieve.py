"""C-MOVE and C-GET SCP mechanics (PS3.4 C.4.2 and C.4.3, PS3.7 9.1.3 and 9.1.4).

pynetdicom's own retrieve service holds each instance in memory as a ``Dataset`` and makes
the C-MOVE sub-association itself; the node's instead sends spool files as they are,
through :class:`~gateway.dicom.scu.StoreSCU` for C-MOVE (TLS, pins, conversion) and over
the requestor's own association for C-GET (only on presentation contexts where the
requestor accepted the Storage SCP role, PS3.7 D.3.3.4). It answers a pending response
after each sub-operation with the remaining, completed, failed and warning counts, honours
C-CANCEL between sub-operations, and ends with 0x0000, 0xB000 (some failed or warned, with
the Failed SOP Instance UID List), 0xA702 (all failed) or 0xFE00 (cancelled). A plan may
announce instances still to come (a federated retrieve): they are sent as they arrive, with a
pending response while waiting; those that never arrive count as failed. C-MOVE
sub-operations name the Move Originator AE Title and Message ID (PS3.7 9.3.1.1).

What to send, to whom, and the audit of each step come from a
:class:`QueryRetrieveListener` (implemented by :mod:`gateway.qr.service`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode

from gateway.config import DestinationConfig
from gateway.dicom.scu import NoAcceptableSyntax, OutgoingFile, StoreSCU, send_converted
from gateway.dicom.spool_io import one_reader
from gateway.errors import DeliveryError, RetryableError

log = logging.getLogger(__name__)

PENDING = 0xFF00
CANCEL = 0xFE00
WARNING_SUBOPERATIONS = 0xB000  # PS3.4 C.4.2.1.5: one or more failures or warnings
UNABLE_TO_PERFORM = 0xA702  # PS3.4 C.4.2.1.5: refused, unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_MISMATCH = 0xA900
NOT_AUTHORIZED = 0x0124  # PS3.7 C.5.x: refused, not authorized


@dataclass(frozen=True)
class QueryRequest:
    """A C-FIND: the information model ("PATIENT" or "STUDY" root) and its identifier."""

    model: str
    identifier: Dataset
    message_id: int = 0


@dataclass(frozen=True)
class FindResult:
    """Matches to answer as pending responses; ``truncated``: more matched than allowed."""

    datasets: list[Dataset]
    truncated: bool = False


@dataclass(frozen=True)
class RetrieveRequest:
    """A C-MOVE (``move_destination`` set) or a C-GET."""

    service: str  # "c-move" | "c-get"
    model: str
    identifier: Dataset
    move_destination: str = ""


Arrivals = Callable[[Callable[[], bool]], Iterator[list[OutgoingFile]]]
"""Given ``stop()``, yields batches of files as they become available (an empty batch
while waiting, so the caller can answer a pending response and check for C-CANCEL)."""


@dataclass
class RetrievePlan:
    """What a retrieve sends: spool files and, for C-MOVE, the destination; with
    ``arrivals``, ``expected`` more files that arrive later (a federated retrieve)."""

    files: list[OutgoingFile]
    destination: DestinationConfig | None = None
    context: dict[str, Any] = field(default_factory=dict)  # the listener's own (audit)
    expected: int = 0
    arrivals: Arrivals | None = None

    def batches(self, stop: Callable[[], bool]) -> Iterator[list[OutgoingFile]]:
        """The files at hand, then what arrives."""
        if self.files:
            yield self.files
        if self.arrivals is not None:
            yield from self.arrivals(stop)


@dataclass
class RetrieveCounts:
    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    cancelled: bool = False

    def final_status(self) -> int:
        if self.cancelled:
            return CANCEL
        if self.failed == 0 and self.warning == 0:
            return 0x0000
        if self.completed == 0 and self.warning == 0:
            return UNABLE_TO_PERFORM
        return WARNING_SUBOPERATIONS


class QueryRetrieveListener(Protocol):
    """What the node does for C-FIND, C-MOVE and C-GET; raises
    :class:`~gateway.errors.QueryRetrieveError` (and the index/spool errors) to refuse."""

    def find(self, info: Any, request: QueryRequest) -> FindResult: ...

    def plan_retrieve(self, info: Any, request: RetrieveRequest) -> RetrievePlan: ...

    def sub_operation(
        self, info: Any, plan: RetrievePlan, file: OutgoingFile, status: int | None, reason: str
    ) -> None: ...

    def retrieve_finished(
        self, info: Any, plan: RetrievePlan, counts: RetrieveCounts, status: int
    ) -> None: ...

    def refused(self, info: Any, service: str, status: int, reason: str) -> None: ...


def classify_store_status(status: int | None) -> str:
    """A C-STORE sub-operation's outcome: completed, warning or failed (PS3.4 B.2.3)."""
    if status == 0x0000:
        return "completed"
    if status is not None and (status == 0x0001 or 0xB000 <= status <= 0xBFFF):
        return "warning"
    return "failed"


def response(
    kind: type[C_MOVE] | type[C_GET],
    req: Any,
    status: int,
    counts: RetrieveCounts | None,
    *,
    implicit: bool,
    final: bool,
) -> Any:
    """A C-MOVE-RSP / C-GET-RSP with its counts, and, when some failed (or a cancel or
    failure ends it), the Failed SOP Instance UID List identifier (PS3.4 C.4.2.1.6)."""
    rsp = kind()
    rsp.MessageIDBeingRespondedTo = req.MessageID
    rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
    rsp.Status = status
    if counts is not None:
        if not final or status == CANCEL:
            rsp.NumberOfRemainingSuboperations = counts.remaining
        rsp.NumberOfCompletedSuboperations = counts.completed
        rsp.NumberOfFailedSuboperations = counts.failed
        rsp.NumberOfWarningSuboperations = counts.warning
        if final and counts.failed_uids:
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = counts.failed_uids
            rsp.Identifier = BytesIO(encode(ds, implicit, True, False) or b"")
    return rsp


def run_suboperations(
    files: list[OutgoingFile],
    counts: RetrieveCounts,
    send: Callable[[OutgoingFile], int],
    *,
    is_cancelled: Callable[[], bool],
    on_result: Callable[[OutgoingFile, int | None, str], None],
) -> None:
    """Send every file; ``on_result`` after each (audit, pending response)."""
    for i, f in enumerate(files):
        if is_cancelled():
            counts.cancelled = True
            return
        status: int | None
        reason = ""
        try:
            status = send(f)
        except NoAcceptableSyntax as exc:
            status, reason = None, str(exc)
        except DeliveryError as exc:  # the association is gone: the rest fail too
            for rest in files[i:]:
                counts.remaining -= 1
                counts.failed += 1
                counts.failed_uids.append(rest.sop_instance_uid)
                on_result(rest, None, str(exc))
            return
        outcome = classify_store_status(status)
        counts.remaining -= 1
        if outcome == "completed":
            counts.completed += 1
        elif outcome == "warning":
            counts.warning += 1
        else:
            counts.failed += 1
            counts.failed_uids.append(f.sop_instance_uid)
        on_result(f, status, reason or outcome)


def move_sender(
    plan: RetrievePlan,
    files: list[OutgoingFile],
    *,
    calling_ae_title: str,
    originator_ae_title: str,
    originator_message_id: int,
) -> Any:
    """A context manager yielding ``send(file) -> status`` to the C-MOVE destination; each
    C-STORE sub-operation names the Move Originator AE Title and Message ID (PS3.7 9.3.1.1)."""
    assert plan.destination is not None
    return StoreSCU(plan.destination, calling_ae_title=calling_ae_title).associate(
        files, originator=(originator_ae_title, originator_message_id)
    )


@contextlib.contextmanager
def get_sender(assoc: Any, base_message_id: int) -> Iterator[Callable[[OutgoingFile], int]]:
    """``send(file) -> status`` over the C-GET requestor's own association, on contexts
    where it accepted the Storage SCP role."""
    accepted: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        if cx.as_scu:  # we are the Storage SCU on it: the requestor took the SCP role
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    message_id = [base_message_id]

    def send(f: OutgoingFile) -> int:
        syntaxes = accepted.get(f.sop_class_uid, set())
        if not syntaxes:
            raise NoAcceptableSyntax("no Storage SCP role negotiated for this SOP class")
        message_id[0] = message_id[0] % 65535 + 1
        if f.transfer_syntax_uid in syntaxes:
            with one_reader():
                rsp = assoc.send_c_store(f.path, msg_id=message_id[0])
        else:
            rsp = send_converted(assoc, f, syntaxes, msg_id=message_id[0])
        status = getattr(rsp, "Status", None)
        if status is None:
            raise RetryableError("no C-STORE response from the C-GET requestor")
        return int(status)

    yield send
