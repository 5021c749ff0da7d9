"""The node's query/retrieve service: who may ask, what matches, where it goes, the audit.

Implements :class:`gateway.dicom.retrieve.QueryRetrieveListener`. A C-FIND is matched on
the index (:mod:`gateway.qr.query`) and, with ``[qr.upstream]``, on the upstream PACS,
merged and de-duplicated by the level's unique key (the index's row wins). A C-MOVE/C-GET
sends the newest version of each selected instance from the spool; what only the upstream
holds is first moved from it to this node (received by the C-STORE SCP as any study).

With ``[[qr.federation]]`` (:mod:`gateway.qr.federation`) the caller's peers are asked too:
their C-FIND answers are merged after the index's, de-duplicated the same way; a C-MOVE/C-GET
of what the index lacks asks them to send it as sealed packages, and the plan's ``arrivals``
yield the instances as each package is ingested here (the answering side is
:mod:`gateway.qr.responder`, its policy :mod:`gateway.qr.policy`).

Audit (event types ``c-find``, ``c-move``, ``c-get``, ``sub-operation``): the requesting AE,
node, level and query keys as keywords with their values (audit data, never logged); the
C-FIND record is written in the transaction that reads the matches, the C-MOVE/C-GET record
in the one that selects the instances.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.audit.chain import AuditRecord, append
from gateway.clock import Clock
from gateway.config import DestinationConfig, GatewayConfig
from gateway.dicom.retrieve import (
    IDENTIFIER_MISMATCH,
    MOVE_DESTINATION_UNKNOWN,
    NOT_AUTHORIZED,
    UNABLE_TO_PERFORM,
    FindResult,
    QueryRequest,
    RetrieveCounts,
    RetrievePlan,
    RetrieveRequest,
)
from gateway.dicom.scu import OutgoingFile
from gateway.dicom.status import OUT_OF_RESOURCES
from gateway.errors import QueryRetrieveError
from gateway.index.db import Database
from gateway.index.models import PeerPackage
from gateway.qr import query
from gateway.qr.federation import FederationClient, PeerAnswer
from gateway.qr.matching import Matcher, MatchingError, Universal, parse
from gateway.spool.store import Spool

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.25  # how often a federated retrieve looks for arrived packages
_PROGRESS_SECONDS = 5.0  # a pending response at least this often while waiting
_STATE_SECONDS = 5.0  # how often the sending peers are asked about awaited packages
_GIVEN_UP = frozenset({"failed", "quarantined", "cancelled"})  # delivery states at the peer
NOT_MATCHED = ("QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle")
Upstream = Any  # gateway.dicom.qr_scu.UpstreamClient (find, move)


class QRService:
    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        db: Database,
        spool: Spool,
        clock: Clock,
        upstream: Upstream | None = None,
        federation: FederationClient | None = None,
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.spool = spool
        self.clock = clock
        self.upstream = upstream
        self.federation = federation
        self.node = cfg.node.name
        self.retrieve_ae_title = cfg.qr.retrieve_ae_title or cfg.dicom.ae_title
        self._networks = [ipaddress.ip_network(a, strict=False) for a in cfg.qr.allowed_addresses]

    # --- who may ask --------------------------------------------------------------------
    def _authorize(self, info: Any) -> None:
        callers = self.cfg.qr.allowed_callers
        if "*" not in callers and info.calling_ae_title not in callers:
            raise QueryRetrieveError(NOT_AUTHORIZED, "caller-not-allowed")
        if self._networks:
            try:
                ip = ipaddress.ip_address(info.address)
            except ValueError as exc:
                raise QueryRetrieveError(NOT_AUTHORIZED, "caller-address-not-allowed") from exc
            if not any(ip in n for n in self._networks):
                raise QueryRetrieveError(NOT_AUTHORIZED, "caller-address-not-allowed")

    # --- identifiers --------------------------------------------------------------------
    def level_of(self, model: str, identifier: Dataset) -> str:
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        if level not in query.LEVELS or (model == "STUDY" and level == "PATIENT"):
            raise QueryRetrieveError(IDENTIFIER_MISMATCH, "invalid-query-level")
        return level

    def keys_of(self, identifier: Dataset) -> tuple[dict[str, Matcher], list[str]]:
        """Matchers of the keys the node matches on, and every requested keyword."""
        matchers: dict[str, Matcher] = {}
        requested: list[str] = []
        for elem in identifier:
            keyword = elem.keyword or ""
            if not keyword or keyword in NOT_MATCHED or elem.tag.group == 0x0002:
                continue
            requested.append(keyword)
            if keyword not in query.ATTRIBUTES or elem.VR == "SQ":
                continue  # returned (empty) but not matched: universal (PS3.4 C.2.2.1.2)
            try:
                matchers[keyword] = parse(query.ATTRIBUTES[keyword].vr, _text(elem.value))
            except MatchingError as exc:
                raise QueryRetrieveError(IDENTIFIER_MISMATCH, "invalid-key-value") from exc
        return matchers, requested

    # --- C-FIND -------------------------------------------------------------------------
    def find(self, info: Any, request: QueryRequest) -> FindResult:
        self._authorize(info)
        level = self.level_of(request.model, request.identifier)
        matchers, requested = self.keys_of(request.identifier)
        limit = self.cfg.qr.max_results
        wanted_counts = {k for k in requested if k in query.COUNTS}
        keys = audit_keys(request.identifier)
        peers: list[PeerAnswer] = []
        if self.federation is not None:  # first: each peer's outcome goes into the audit row
            peers = self.federation.find(info.calling_ae_title, request.model, request.identifier)
        with self.db.session() as s:
            rows = query.find_rows(s, level=level, matchers=matchers, limit=limit + 1)
            for row in rows[:limit]:
                row.update(query.related_counts(s, row, wanted_counts))
            append(
                s,
                AuditRecord(
                    "c-find",
                    "success",
                    info.calling_ae_title,
                    info.called_ae_title,
                    info.address,
                    detail={
                        "association_id": info.association_id,
                        "model": request.model,
                        "level": level,
                        "keys": keys,
                        "matches": min(len(rows), limit),
                        **({"peers": {p.peer: p.summary() for p in peers}} if peers else {}),
                    },
                ),
                node=self.node,
                now=self.clock.now(),
            )
        truncated = len(rows) > limit
        rows = rows[:limit]
        seen = {row.get(query.UNIQUE_KEYS[level], "") for row in rows}
        for answer in peers:  # merged after the index's rows, de-duplicated by the unique key
            for row in answer.rows:
                key = row.get(query.UNIQUE_KEYS[level], "")
                if key and key not in seen and len(rows) < limit:
                    seen.add(key)
                    rows.append({k: v for k, v in row.items() if k in requested})
                elif key and key not in seen:
                    truncated = True
        if self.upstream is not None and len(rows) < limit:
            remote = self._upstream_find(request, level)
            for ds in remote:
                key = str(ds.get(query.UNIQUE_KEYS[level], "") or "")
                if key and key not in seen:
                    seen.add(key)
                    rows.append({k: _text(ds.get(k, "")) for k in requested if k in ds})
                    if len(rows) >= limit:
                        truncated = True
                        break
        charset = request.identifier.get("SpecificCharacterSet")
        datasets = [self._response(request.identifier, level, row, charset) for row in rows]
        return FindResult(datasets, truncated)

    def _upstream_find(self, request: QueryRequest, level: str) -> list[Dataset]:
        assert self.upstream is not None
        try:
            return list(self.upstream.find(request.model, request.identifier))
        except Exception:  # the upstream is optional: its failure leaves the local matches
            log.warning("upstream C-FIND failed", exc_info=True)
            return []

    def _response(
        self, identifier: Dataset, level: str, row: dict[str, str], charset: Any
    ) -> Dataset:
        ds = Dataset()
        values = [v for v in row.values() if isinstance(v, str)]
        if any(not v.isascii() for v in values):
            ds.SpecificCharacterSet = _charset_for(values, charset)
        elif charset:
            ds.SpecificCharacterSet = charset
        ds.QueryRetrieveLevel = level
        for elem in identifier:
            keyword = elem.keyword or ""
            if keyword in NOT_MATCHED or elem.tag.group == 0x0002:
                continue
            value = row.get(keyword, "")
            try:
                vr = dictionary_VR(elem.tag) if keyword else elem.VR
                if vr == "SQ":
                    ds.add_new(elem.tag, "SQ", [])
                else:
                    ds.add_new(elem.tag, vr, value if value != "" else None)
            except (KeyError, ValueError, TypeError):
                ds.add_new(elem.tag, elem.VR, None)
        ds.RetrieveAETitle = self.retrieve_ae_title
        return ds

    # --- C-MOVE / C-GET ------------------------------------------------------------------
    def plan_retrieve(self, info: Any, request: RetrieveRequest) -> RetrievePlan:
        self._authorize(info)
        destination = None
        if request.service == "c-move":
            destination = self._move_destination(info, request.move_destination)
        level = self.level_of(request.model, request.identifier)
        matchers, _ = self.keys_of(request.identifier)
        if not any(not isinstance(m, Universal) for m in matchers.values()):
            raise QueryRetrieveError(IDENTIFIER_MISMATCH, "no-unique-key")
        limit = 100000
        files = self._select(info, request, level, matchers, limit, destination)
        context: dict[str, Any] = {
            "service": request.service,
            "studies": sorted({f.study_instance_uid for f in files}),
            "destination": request.move_destination,
        }
        if not files and self.federation is not None and level != "PATIENT":
            plan = self._retrieve_from_peers(info, request, level, matchers, destination)
            if plan is not None:
                plan.context = {**context, **plan.context}
                return plan
        if not files and self.upstream is not None:
            self._pull_from_upstream(request)
            files = self._select(info, request, level, matchers, limit, destination)
            context["studies"] = sorted({f.study_instance_uid for f in files})
        return RetrievePlan(files, destination, context)

    def _retrieve_from_peers(
        self,
        info: Any,
        request: RetrieveRequest,
        level: str,
        matchers: dict[str, Matcher],
        destination: DestinationConfig | None,
    ) -> RetrievePlan | None:
        """Ask the caller's peers to send what the identifier selects; ``None`` if none is
        configured for the caller. Raises 0x0124 when every peer asked refused."""
        assert self.federation is not None
        entries = {e.peer: e for e in self.federation.peers_for(info.calling_ae_title)}
        if not entries:
            return None
        answers = self.federation.retrieve(
            info.calling_ae_title,
            request.service,
            request.model,
            request.identifier,
            request.move_destination,
        )
        expected = sum(a.instances for a in answers if a.outcome == "answered")
        # nobody answered: refused if a peer's policy refused, else unable to perform
        unanswered = not any(a.outcome == "answered" for a in answers)
        refused = unanswered and any(a.outcome == "refused" for a in answers)
        self._audit(
            AuditRecord(
                request.service,
                "refused" if refused else "failure" if unanswered else "peer-requested",
                info.calling_ae_title,
                info.called_ae_title,
                info.address,
                status=NOT_AUTHORIZED if refused else UNABLE_TO_PERFORM if unanswered else None,
                detail={
                    "association_id": info.association_id,
                    "destination": request.move_destination,
                    "keys": audit_keys(request.identifier),
                    "peers": {a.peer: a.summary() for a in answers},
                    "expected": expected,
                },
            )
        )
        if refused:
            raise QueryRetrieveError(NOT_AUTHORIZED, "refused-by-peers")
        if unanswered:
            raise QueryRetrieveError(UNABLE_TO_PERFORM, "peers-unavailable")
        waiting = [(a.peer, p) for a in answers if a.outcome == "answered" for p in a.packages]
        timeout = max((entries[a.peer].retrieve_timeout for a in answers), default=0.0)

        plan = RetrievePlan(
            [],
            destination,
            {"peers": sorted(entries), "packages": [p for _peer, p in waiting]},
            expected=expected,
        )

        def arrivals(stop: Callable[[], bool]) -> Iterator[list[OutgoingFile]]:
            for files in self._arrivals(level, matchers, waiting, timeout, stop):
                studies = {*plan.context.get("studies", []), *(f.study_instance_uid for f in files)}
                plan.context["studies"] = sorted(studies)
                yield files

        plan.arrivals = arrivals
        return plan

    def _arrivals(
        self,
        level: str,
        matchers: dict[str, Matcher],
        waiting: list[tuple[str, str]],
        timeout: float,
        stop: Callable[[], bool],
    ) -> Iterator[list[OutgoingFile]]:
        """As each awaited package is ingested here, the newly available files the
        identifier selects; an empty batch every few seconds while waiting."""
        pending = set(waiting)
        sent: set[str] = set()
        deadline = time.monotonic() + timeout
        last_yield = last_state = time.monotonic()
        while pending and time.monotonic() < deadline and not stop():
            if time.monotonic() - last_state >= _STATE_SECONDS:
                last_state = time.monotonic()
                pending -= self._failed_at_peers(pending)
            with self.db.session() as s:
                arrived = {
                    (peer, package_id)
                    for peer, package_id in pending
                    if (row := s.get(PeerPackage, package_id)) is not None and row.sender == peer
                }
                files = []
                if arrived:
                    files = [
                        f
                        for f in self._files(s, level, matchers, 100000)
                        if f.sop_instance_uid not in sent
                    ]
            if arrived:
                pending -= arrived
                sent.update(f.sop_instance_uid for f in files)
                last_yield = time.monotonic()
                yield files
            elif time.monotonic() - last_yield >= _PROGRESS_SECONDS:
                last_yield = time.monotonic()
                yield []
            else:
                time.sleep(_POLL_SECONDS)
        if pending:
            log.warning("retrieved packages did not arrive", extra={"missing": len(pending)})

    def _failed_at_peers(self, pending: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """The awaited packages their peer reports as failed, quarantined or cancelled:
        they will not come, so the wait for them ends (counted as failed sub-operations)."""
        assert self.federation is not None
        gone: set[tuple[str, str]] = set()
        for peer in sorted({p for p, _ in pending}):
            ids = sorted(i for p, i in pending if p == peer)
            states = self.federation.package_states(peer, ids)
            gone |= {(peer, i) for i in ids if states.get(i) in _GIVEN_UP}
        if gone:
            log.warning("a peer gave up sending retrieved packages", extra={"packages": len(gone)})
        return gone

    def _select(
        self,
        info: Any,
        request: RetrieveRequest,
        level: str,
        matchers: dict[str, Matcher],
        limit: int,
        destination: DestinationConfig | None,
    ) -> list[OutgoingFile]:
        with self.db.session() as s:
            files = self._files(s, level, matchers, limit)
            studies = sorted({f.study_instance_uid for f in files})
            append(
                s,
                AuditRecord(
                    request.service,
                    "started",
                    info.calling_ae_title,
                    info.called_ae_title,
                    info.address,
                    study_instance_uid=studies[0] if len(studies) == 1 else "",
                    detail={
                        "association_id": info.association_id,
                        "model": request.model,
                        "level": level,
                        "keys": audit_keys(request.identifier),
                        "destination": request.move_destination,
                        "studies": studies,
                        "instances": len(files),
                    },
                ),
                node=self.node,
                now=self.clock.now(),
            )
        return files

    def _files(
        self, s: Any, level: str, matchers: dict[str, Matcher], limit: int
    ) -> list[OutgoingFile]:
        return [
            OutgoingFile(
                i.sop_class_uid,
                i.sop_instance_uid,
                i.transfer_syntax_uid,
                self.spool.path_of(i.spool_key),
                i.study_instance_uid,
            )
            for i in query.instances_for(s, level=level, matchers=matchers, limit=limit)
        ]

    def _pull_from_upstream(self, request: RetrieveRequest) -> None:
        assert self.upstream is not None
        try:
            self.upstream.move(request.model, request.identifier)
        except Exception:  # the upstream is optional: nothing more to send then
            log.warning("upstream C-MOVE failed", exc_info=True)

    def _move_destination(self, info: Any, ae_title: str) -> DestinationConfig:
        own = self.cfg.dicom.ae_title.strip()
        for entry in self.cfg.qr.move_destinations:
            if entry.ae_title.strip() != ae_title:
                continue
            if ae_title == own:
                raise QueryRetrieveError(MOVE_DESTINATION_UNKNOWN, "move-to-self")
            if (
                "*" not in entry.allowed_callers
                and info.calling_ae_title not in entry.allowed_callers
            ):
                raise QueryRetrieveError(NOT_AUTHORIZED, "destination-not-allowed-for-caller")
            return DestinationConfig(
                name=entry.name, ae_title=entry.ae_title, host=entry.host, port=entry.port
            )
        if self.cfg.qr.move_to_destinations and ae_title != own:
            for dest in self.cfg.destinations:
                if dest.type == "dicom" and dest.ae_title.strip() == ae_title:
                    return dest
        raise QueryRetrieveError(MOVE_DESTINATION_UNKNOWN, "move-destination-unknown")

    def sub_operation(
        self, info: Any, plan: RetrievePlan, file: OutgoingFile, status: int | None, reason: str
    ) -> None:
        self._audit(
            AuditRecord(
                "sub-operation",
                "success" if reason in ("completed", "warning") else "failure",
                info.calling_ae_title,
                info.called_ae_title,
                info.address,
                sop_class_uid=file.sop_class_uid,
                sop_instance_uid=file.sop_instance_uid,
                study_instance_uid=file.study_instance_uid,
                status=status,
                detail={
                    "association_id": info.association_id,
                    "service": plan.context.get("service", ""),
                    "destination": plan.context.get("destination", ""),
                    "outcome": reason,
                },
            )
        )

    def retrieve_finished(
        self, info: Any, plan: RetrievePlan, counts: RetrieveCounts, status: int
    ) -> None:
        studies = plan.context.get("studies", [])
        self._audit(
            AuditRecord(
                plan.context.get("service", "c-move"),
                "success" if status == 0 else "cancelled" if counts.cancelled else "failure",
                info.calling_ae_title,
                info.called_ae_title,
                info.address,
                study_instance_uid=studies[0] if len(studies) == 1 else "",
                status=status,
                detail={
                    "association_id": info.association_id,
                    "destination": plan.context.get("destination", ""),
                    "studies": studies,
                    "completed": counts.completed,
                    "failed": counts.failed,
                    "warning": counts.warning,
                    "remaining": counts.remaining,
                },
            )
        )

    def refused(self, info: Any, service: str, status: int, reason: str) -> None:
        self._audit(
            AuditRecord(
                service,
                "refused" if status in (NOT_AUTHORIZED, MOVE_DESTINATION_UNKNOWN) else "failure",
                info.calling_ae_title,
                info.called_ae_title,
                info.address,
                status=status,
                detail={"association_id": info.association_id, "reason": reason},
            )
        )

    def _audit(self, record: AuditRecord) -> None:
        with self.db.session() as s:
            append(s, record, node=self.node, now=self.clock.now())


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value)


def audit_keys(identifier: Dataset) -> dict[str, str]:
    """The query keys as keywords (tag numbers for private or unknown ones) with values."""
    keys: dict[str, str] = {}
    for elem in identifier:
        name = keyword_for_tag(elem.tag) or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        keys[name] = "" if elem.VR == "SQ" else _text(elem.value)[:256]
    return keys


def _charset_for(values: list[str], requested: Any) -> str:
    """The requester's character set if it encodes every value, else UTF-8 (ISO_IR 192)."""
    from pydicom.charset import convert_encodings, encode_string

    if requested:
        encodings = convert_encodings(
            list(requested) if isinstance(requested, MultiValue | list) else [str(requested)]
        )
        try:
            for v in values:
                encode_string(v, encodings)
            return _text(requested)
        except (UnicodeError, LookupError, ValueError):
            pass
    return "ISO_IR 192"


IsCancelled = Callable[[], bool]
__all__ = ["OUT_OF_RESOURCES", "IsCancelled", "QRService"]
