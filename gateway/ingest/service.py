"""The C-STORE and C-ECHO service of the node (PS3.4 Annex B and A).

For every instance, in this order: the receive buffer is fsync'd, renamed into the spool
and the spool folder fsync'd; then one transaction writes the index rows, the route
decisions and the audit row; only after that commit is 0x0000 answered. A crash at any
point before the commit leaves a spool file that no index row names, which start-up
removes (no Success was sent for it).

Duplicates (the same SOP Instance UID again): identical bytes are an idempotent Success
with one copy kept; different bytes follow ``ingest.duplicate_policy``: ``keep-both``
stores the new bytes as the next version and routes it, ``reject`` answers 0x0111
(Duplicate SOP Instance) and keeps only the first. Both are audited.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, TypeVar, cast

from pydicom.dataset import Dataset
from sqlalchemy import Connection, Executable, Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from gateway.audit.chain import AuditRecord, append
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.dicom import status as st
from gateway.dicom.server import AssociationInfo, StoreRequest
from gateway.dicom.uids import is_valid_uid
from gateway.errors import IngestError
from gateway.index import deliveries
from gateway.index.db import CommitOutcomeUnknown, Database
from gateway.index.group_commit import GroupCommit
from gateway.index.models import Instance, RouteCandidate, Series, Study
from gateway.index.prepared import Prepared
from gateway.ingest.helpers import Helpers
from gateway.ingest.parse import PrefixedReader, read_header
from gateway.metrics import Metrics
from gateway.received import UnreadableValue, value_texts
from gateway.routing.match import matches
from gateway.spool.store import Spool, SpooledObject

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")
# helper threads per process (gateway.ingest.helpers); with more associations than this at
# once, the cores are busy with their work anyway
HELPER_THREADS = 2

# Ingest writes its rows with Core statements on the session's connection: the ORM's unit of
# work cost more than the statements themselves, once per received instance.
_INSTANCES = cast(Table, Instance.__table__)
_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_ROUTE_CANDIDATES = cast(Table, RouteCandidate.__table__)
# Built once and executed with parameters: building a statement per instance (bind
# parameters, cache key) cost as much as running it.
_VERSIONS = select(_INSTANCES.c.version, _INSTANCES.c.sha256).where(
    _INSTANCES.c.sop_instance_uid == bindparam("sop_instance_uid")
)
_INSERT_INSTANCE = insert(_INSTANCES).returning(_INSTANCES.c.id)
_INSERT_CANDIDATES = insert(_ROUTE_CANDIDATES)
_SPOOL_KEYS = select(_INSTANCES.c.spool_key).where(
    _INSTANCES.c.spool_key.in_(bindparam("keys", expanding=True))
)
_KEY_BATCH = 500
_STUDY_WHERE = _STUDIES.c.study_instance_uid == bindparam("uid")
_STUDY_MODALITIES = select(_STUDIES.c.modalities).where(_STUDY_WHERE).with_for_update()
_SET_MODALITIES = update(_STUDIES).where(_STUDY_WHERE).values(modalities=bindparam("modalities"))
# Every instance but a study's (or series') first finds its row: counted by an update, and
# the values of a new row (a dozen conversions of received values) made only for the first.
_STUDY_SEEN = (
    update(_STUDIES)
    .where(_STUDY_WHERE)
    .values(
        instance_count=_STUDIES.c.instance_count + 1,
        last_received_at=bindparam("received_at"),
    )
)
_SERIES_SEEN = (
    update(_SERIES)
    .where(_SERIES.c.series_instance_uid == bindparam("uid"))
    .values(instance_count=_SERIES.c.instance_count + 1)
    .returning(_SERIES.c.instance_count)
)
# The statements every instance runs, on the DBAPI cursor (gateway.index.prepared).
# the row's columns but its key: _index gives every one (Prepared refuses a default not given)
_INSTANCE_COLUMNS = tuple(c.key for c in _INSTANCES.c if not c.primary_key)
_RUN_VERSIONS = Prepared(_VERSIONS)
_RUN_INSERT_INSTANCE = Prepared(_INSERT_INSTANCE, _INSTANCE_COLUMNS)
_RUN_STUDY_SEEN = Prepared(_STUDY_SEEN)
_RUN_SERIES_SEEN = Prepared(_SERIES_SEEN)
_RUN_INSERT_CANDIDATE = Prepared(
    _INSERT_CANDIDATES, ("instance_id", "study_instance_uid", "route_name", "routed")
)


@functools.cache
def _upserts(dialect: str) -> tuple[Executable, Executable]:
    """The study and series upserts (ON CONFLICT on SQLite and PostgreSQL)."""
    insert_ = postgresql.insert if dialect == "postgresql" else sqlite.insert
    study = insert_(_STUDIES)
    series = insert_(_SERIES)
    return (
        study.on_conflict_do_update(
            index_elements=[_STUDIES.c.study_instance_uid],
            set_={
                "instance_count": _STUDIES.c.instance_count + 1,
                "last_received_at": study.excluded.last_received_at,
            },
        ),
        series.on_conflict_do_update(
            index_elements=[_SERIES.c.series_instance_uid],
            set_={"instance_count": _SERIES.c.instance_count + 1},
        ).returning(_SERIES.c.instance_count),
    )


@dataclass(frozen=True)
class _Header:
    study_instance_uid: str
    series_instance_uid: str
    values: Dataset


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    """A received value as text for the index ("" when absent or when it does not decode)."""
    try:
        return "\\".join(value_texts(ds, keyword))[:limit]
    except UnreadableValue:
        return ""


class IngestService:
    """Implements :class:`gateway.dicom.server.AssociationListener`."""

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        db: Database,
        spool: Spool,
        clock: Clock,
        metrics: Metrics,
        on_stream_delivery: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.spool = spool
        self.clock = clock
        self.metrics = metrics
        self._notify = on_stream_delivery or (lambda: None)
        self._commits = GroupCommit(db)
        # for what a C-STORE's thread computes while it waits for the disk (see store)
        self._helpers = Helpers(HELPER_THREADS)

    def close(self) -> None:
        """Give back the index connection the group commit keeps between transactions, and
        stop the helper threads (once the C-STOREs under way have finished)."""
        self._helpers.close()
        self._commits.close()

    # --- association events --------------------------------------------------------------
    def _audit(self, record: AuditRecord) -> None:
        with self.db.session() as s:
            append(s, record, node=self.cfg.node.name, now=self.clock.now())

    def association_accepted(self, info: AssociationInfo) -> None:
        self.metrics.associations.labels("accepted").inc()
        self._audit(
            AuditRecord(
                "association",
                "accepted",
                info.calling_ae_title,
                info.called_ae_title,
                info.address,
                detail={"association_id": info.association_id},
            )
        )

    def association_rejected(self, info: AssociationInfo, reason: str) -> None:
        self.metrics.associations.labels("rejected").inc()
        self.metrics.security_events.labels(reason).inc()
        self._audit(
            AuditRecord(
                "association",
                "rejected",
                info.calling_ae_title,
                info.called_ae_title,
                info.address,
                detail={"association_id": info.association_id, "reason": reason},
            )
        )

    def association_aborted(self, info: AssociationInfo, reason: str) -> None:
        self.metrics.associations.labels("aborted").inc()
        self._audit(
            AuditRecord(
                "association",
                "aborted",
                info.calling_ae_title,
                info.called_ae_title,
                info.address,
                detail={"association_id": info.association_id, "reason": reason},
            )
        )

    def security_event(self, address: str, reason: str, detail: str = "") -> None:
        """A refusal before any association exists (a failed TLS handshake); the metric is
        counted by the server's ``on_security_event``."""
        self._audit(
            AuditRecord(
                "security",
                "failure",
                address=address,
                detail={"reason": reason, "error": detail} if detail else {"reason": reason},
            )
        )

    def spool_health_changed(self, healthy: bool, reason: str) -> None:
        """The spool went unhealthy (a failed fsync) or a probe made it healthy again."""
        self.metrics.spool_healthy.set(1 if healthy else 0)
        if not healthy:
            self.metrics.spool_faults.inc()
        try:
            self._audit(
                AuditRecord(
                    "spool",
                    "success" if healthy else "failure",
                    detail={"health": "recovered" if healthy else "unhealthy", "reason": reason},
                )
            )
        except Exception:  # the index may be what failed; the metric and the log still say it
            log.exception("spool health audit failed")

    def echo(self, info: AssociationInfo) -> None:
        self._audit(
            AuditRecord(
                "c-echo",
                "success",
                info.calling_ae_title,
                info.called_ae_title,
                info.address,
                status=st.SUCCESS,
            )
        )

    def store_failed(
        self, info: AssociationInfo, request: StoreRequest, status: int, reason: str
    ) -> None:
        self.metrics.instances_received.labels(self._called_label(info), "failed").inc()
        log.info(
            "C-STORE refused",
            extra={
                "association_id": info.association_id,
                "status": f"0x{status:04X}",
                "reason": reason,
            },
        )
        self._audit(
            AuditRecord(
                "c-store",
                "failure",
                info.calling_ae_title,
                info.called_ae_title,
                info.address,
                sop_class_uid=request.sop_class_uid if is_valid_uid(request.sop_class_uid) else "",
                sop_instance_uid=(
                    request.sop_instance_uid if is_valid_uid(request.sop_instance_uid) else ""
                ),
                status=status,
                detail={"reason": reason, "association_id": info.association_id},
            )
        )

    def _called_label(self, info: AssociationInfo) -> str:
        return info.called_ae_title if info.called_ae_title else "unknown"

    # --- C-STORE ------------------------------------------------------------------------
    def store(self, info: AssociationInfo, request: StoreRequest) -> int:
        started = time.perf_counter()
        _check_command_uids(request)
        temp = request.dataset_path
        self.spool.check_space()
        size, sha256 = request.received_digest or self.spool.digest(temp)
        # the header parse on a helper thread while this one waits in the file's fsync; a
        # bad data set is refused before its file is named in the spool, as it always was.
        # The fsync is prepared (the file opened) before the hand-over, so that nothing but
        # the fsync lies between them (Spool.file_sync)
        with self.spool.file_sync(temp) as fsync_file:
            header, _ = self._beside(lambda: self._parse_header(request), fsync_file)
        obj = self.spool.name(temp, size=size, sha256=sha256)
        now = self.clock.now()
        named = _Outcome()
        try:
            # a failure reaches the index transaction before the spool's health audit, which
            # needs the index's write lock that transaction holds
            with self.spool.name_sync(obj, failed=named.fail) as fsync_name:

                def sync_name() -> None:
                    try:
                        fsync_name()
                    except BaseException as exc:
                        named.fail(exc)
                        raise
                    named.succeed()

                # the index statements on a helper thread while this one waits in the
                # folder's fsync; the commit waits for that fsync (named.wait), so the order
                # in which things reach the disk is unchanged: file, name, folder, index
                # (F21). Committed together with other associations' instances when they
                # arrive at once; returns only after the commit that holds this instance's
                # rows.
                (outcome, streamed), _ = self._beside(
                    lambda: self._commits.run(
                        lambda conn: self._index(
                            conn, info, request, header, obj.key, size, sha256, now
                        ),
                        ready=named.wait,
                    ),
                    sync_name,
                )
        except CommitOutcomeUnknown:
            # the rows may be in the index and would name this file: it stays, and the
            # start-up sweep removes it if they are not (the sender was not answered Success)
            log.warning(
                "C-STORE index commit outcome unknown; its spool file is kept",
                extra={"association_id": info.association_id},
            )
            raise
        except BaseException:
            self.spool.delete(obj.key)
            raise
        if streamed:
            self._notify()
        if outcome != "stored":
            self.spool.delete(obj.key)
        if outcome == "rejected-duplicate":
            self.metrics.instances_received.labels(self._called_label(info), "rejected").inc()
            # audited in _index's transaction; raising would audit and count it a second time
            return st.DUPLICATE_SOP_INSTANCE
        self.metrics.instances_received.labels(self._called_label(info), outcome).inc()
        if outcome == "stored":
            self.metrics.bytes_received.labels(self._called_label(info)).inc(size)
        self.metrics.ingest_latency.observe(time.perf_counter() - started)
        return st.SUCCESS

    def store_batch(
        self,
        info: AssociationInfo,
        requests: Sequence[StoreRequest],
        within: Callable[[Session, datetime], None],
        *,
        event_type: str = "c-store",
    ) -> list[str]:
        """Store several files as one unit, without a DICOM association (peer packages).

        Every file is validated first (IngestError on the first bad one, nothing stored),
        then committed to the spool, then all are indexed, routed and audited in one
        transaction together with ``within(session, now)``: all or nothing. Each file is
        consumed as :meth:`store` consumes a receive buffer. Returns each file's outcome
        ("stored", "duplicate" or "rejected-duplicate").
        """
        headers = [self._validate(r) for r in requests]
        self.spool.check_space()
        committed: list[SpooledObject] = []
        try:
            for request in requests:
                size, sha256 = self.spool.digest(request.dataset_path)
                committed.append(self.spool.commit(request.dataset_path, size=size, sha256=sha256))
            now = self.clock.now()
            with self.db.session() as s:
                conn = s.connection()
                results = [
                    self._index(
                        conn,
                        info,
                        r,
                        h,
                        o.key,
                        o.size,
                        o.sha256,
                        now,
                        event_type=event_type,
                    )
                    for r, h, o in zip(requests, headers, committed, strict=True)
                ]
                within(s, now)
        except CommitOutcomeUnknown:
            log.warning("package index commit outcome unknown; its spool files are kept")
            raise  # as in store(): the start-up sweep judges them
        except BaseException:
            for obj in committed:
                self.spool.delete(obj.key)
            raise
        label = self._called_label(info)
        for obj, (outcome, _streamed) in zip(committed, results, strict=True):
            if outcome != "stored":
                self.spool.delete(obj.key)
            else:
                self.metrics.bytes_received.labels(label).inc(obj.size)
            self.metrics.instances_received.labels(
                label, "rejected" if outcome == "rejected-duplicate" else outcome
            ).inc()
        if any(streamed for _outcome, streamed in results):
            self._notify()
        return [outcome for outcome, _streamed in results]

    def _beside(self, work: Callable[[], T], wait: Callable[[], U]) -> tuple[T, U]:
        """``work()`` (CPU) on a helper thread while this one runs ``wait()`` (a sync, which
        lets the interpreter lock go); both results. Both always finish; work's error is
        raised first. This thread waits and the helper computes, not the other way round: a
        thread that wants to start a sync while another holds the lock waits for the
        interpreter's switch interval (5 ms). Without a helper thread (none could be
        started, F18), ``wait()`` then ``work()`` here."""
        task = self._helpers.submit(work)
        if task is None:
            waited = wait()
            return work(), waited
        try:
            waited = wait()
        except BaseException:
            error = task.error()  # waits for it
            if error is not None:
                raise error from None
            raise
        return task.wait(), waited

    def _validate(self, request: StoreRequest) -> _Header:
        _check_command_uids(request)
        return self._parse_header(request)

    def _parse_header(self, request: StoreRequest) -> _Header:
        """The received data set's header, checked against the command (its UIDs checked)."""
        ds = read_header(
            request.dataset_path,
            max_depth=self.cfg.dicom.max_sequence_depth,
            opener=self._opener(request),
            # a receive buffer's File Meta is the node's own, in the context's syntax
            transfer_syntax=(
                request.transfer_syntax_uid if request.received_digest is not None else None
            ),
        )
        if _text(ds, "SOPInstanceUID", 65) != request.sop_instance_uid:
            raise IngestError(st.DATASET_MISMATCH, "sop-instance-uid-differs-from-command")
        if _text(ds, "SOPClassUID", 65) != request.sop_class_uid:
            raise IngestError(st.DATASET_MISMATCH, "sop-class-uid-differs-from-command")
        study = _text(ds, "StudyInstanceUID", 65)
        series = _text(ds, "SeriesInstanceUID", 65)
        if not is_valid_uid(study) or not is_valid_uid(series):
            raise IngestError(st.DATASET_MISMATCH, "missing-or-invalid-study-or-series-uid")
        return _Header(study, series, ds)

    def _opener(self, request: StoreRequest) -> Callable[[Path], BinaryIO]:
        """How the header parse reads the received file: from the bytes the receive buffer
        kept as they arrived, the spool file only past them (or wholly, when none were)."""
        prefix, digest = request.received_prefix, request.received_digest
        if not prefix or digest is None:
            return self.spool.open_path
        size = digest[0]
        if len(prefix) == size:  # all of it (a small instance): read in C, no file at all
            return lambda path: io.BytesIO(prefix)
        return lambda path: cast(
            BinaryIO, PrefixedReader(prefix, size, lambda: self.spool.open_path(path))
        )

    def _index(
        self,
        conn: Connection,
        info: AssociationInfo,
        request: StoreRequest,
        header: _Header,
        key: str,
        size: int,
        sha256: str,
        now: datetime,
        *,
        event_type: str = "c-store",
    ) -> tuple[str, bool]:
        ds = header.values
        versions = _RUN_VERSIONS.all(conn, {"sop_instance_uid": request.sop_instance_uid})
        base = AuditRecord(
            event_type,
            "success",
            info.calling_ae_title,
            info.called_ae_title,
            info.address,
            sop_class_uid=request.sop_class_uid,
            sop_instance_uid=request.sop_instance_uid,
            study_instance_uid=header.study_instance_uid,
            status=st.SUCCESS,
        )
        node = self.cfg.node.name
        if any(digest == sha256 for _version, digest in versions):
            append(
                conn,
                _with(
                    base, detail={"duplicate": "identical", "association_id": info.association_id}
                ),
                node=node,
                now=now,
            )
            return "duplicate", False
        if versions and self.cfg.ingest.duplicate_policy == "reject":
            append(
                conn,
                _with(
                    base,
                    outcome="failure",
                    status=st.DUPLICATE_SOP_INSTANCE,
                    detail={
                        "duplicate": "different-content-rejected",
                        "association_id": info.association_id,
                    },
                ),
                node=node,
                now=now,
            )
            return "rejected-duplicate", False
        version = max((v for v, _digest in versions), default=0) + 1
        modality = _text(ds, "Modality", 16)
        (instance_id,) = _RUN_INSERT_INSTANCE.one(
            conn,
            dict(
                spool_key=key,
                sop_instance_uid=request.sop_instance_uid,
                version=version,
                sop_class_uid=request.sop_class_uid,
                transfer_syntax_uid=request.transfer_syntax_uid,
                study_instance_uid=header.study_instance_uid,
                series_instance_uid=header.series_instance_uid,
                modality=modality,
                instance_number=_text(ds, "InstanceNumber", 12),
                size=size,
                sha256=sha256,
                received_at=now,
                calling_ae_title=info.calling_ae_title[:16],
                called_ae_title=info.called_ae_title[:16],
                calling_address=info.address[:64],
                association_id=info.association_id,
            ),
        )
        self._summaries(conn, ds, header, modality, now)
        streamed = self._route(conn, info, ds, header, instance_id, now)
        detail: dict[str, object] = {"association_id": info.association_id, "size": size}
        if version > 1:
            detail["duplicate"] = "different-content-kept"
            detail["version"] = version
        append(conn, _with(base, detail=detail), node=node, now=now)
        return "stored", streamed

    def _summaries(
        self, conn: Connection, ds: Dataset, header: _Header, modality: str, now: datetime
    ) -> None:
        study_upsert, series_upsert = _upserts(conn.dialect.name)
        seen = _RUN_STUDY_SEEN.rowcount(
            conn, {"uid": header.study_instance_uid, "received_at": now}
        )
        if seen != 1:  # the study's first instance (the upsert: another node may too)
            conn.execute(
                study_upsert,
                {
                    "study_instance_uid": header.study_instance_uid,
                    "patient_id": _text(ds, "PatientID", 64),
                    "patient_name": _text(ds, "PatientName", 324),
                    "patient_birth_date": _text(ds, "PatientBirthDate", 8),
                    "patient_sex": _text(ds, "PatientSex", 16),
                    "study_date": _text(ds, "StudyDate", 8),
                    "study_time": _text(ds, "StudyTime", 16),
                    "accession_number": _text(ds, "AccessionNumber", 16),
                    "study_id": _text(ds, "StudyID", 16),
                    "study_description": _text(ds, "StudyDescription", 64),
                    "referring_physician_name": _text(ds, "ReferringPhysicianName", 324),
                    "modalities": "",
                    "instance_count": 1,
                    "first_received_at": now,
                    "last_received_at": now,
                },
            )
        counted = _RUN_SERIES_SEEN.first(conn, {"uid": header.series_instance_uid})
        new_series = None if counted is None else counted[0]
        if new_series is None:
            new_series = conn.execute(
                series_upsert,
                {
                    "series_instance_uid": header.series_instance_uid,
                    "study_instance_uid": header.study_instance_uid,
                    "modality": modality,
                    "series_number": _text(ds, "SeriesNumber", 12),
                    "series_description": _text(ds, "SeriesDescription", 64),
                    "instance_count": 1,
                },
            ).scalar_one()
        if new_series == 1 and modality:
            # a new series may bring a new modality to the study (rare: once per series)
            uid = header.study_instance_uid
            modalities = conn.execute(_STUDY_MODALITIES, {"uid": uid}).scalar_one()
            mods = [m for m in modalities.split("\\") if m]
            if modality not in mods:
                joined = "\\".join([*mods, modality])[:128]
                conn.execute(_SET_MODALITIES, {"uid": uid, "modalities": joined})

    def _route(
        self,
        conn: Connection,
        info: AssociationInfo,
        ds: Dataset,
        header: _Header,
        instance_id: int,
        now: datetime,
    ) -> bool:
        facts = {
            "CalledAETitle": [info.called_ae_title],
            "CallingAETitle": [info.calling_ae_title],
            "CallingAddress": [info.address],
        }

        def lookup(attribute: str) -> list[str]:
            if attribute in facts:
                return facts[attribute]
            try:
                return value_texts(ds, attribute)
            except UnreadableValue:  # matches no condition but ``absent``
                return []

        streamed = False
        candidates: list[dict[str, object]] = []  # a row for each route that matched
        for route in self.cfg.routes:
            if not matches(route.match, lookup):
                continue
            if route.mode == "stream":
                for destination in route.destinations:
                    deliveries.append_to_open(
                        conn,
                        study_instance_uid=header.study_instance_uid,
                        route_name=route.name,
                        destination=destination,
                        profile=route.profile,
                        instance_id=instance_id,
                        now=now,
                        linger=deliveries.STREAM_LINGER,
                    )
                streamed = True
            candidates.append(
                {
                    "instance_id": instance_id,
                    "study_instance_uid": header.study_instance_uid,
                    "route_name": route.name,
                    "routed": 1 if route.mode == "stream" else 0,
                }
            )
        for candidate in candidates:
            _RUN_INSERT_CANDIDATE.rowcount(conn, candidate)
        return streamed

    # --- start-up -----------------------------------------------------------------------
    def recover(self) -> int:
        """Remove spool files no index row names (crash before commit); return how many."""
        removed = self.spool.remove_orphans(self._indexed)
        removed += self.spool.sweep_incoming(older_than=0, now=time.time())
        return removed

    def _indexed(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` (spool keys) an instance row names, looked up through the
        unique index on ``spool_key`` in batches."""
        found: set[str] = set()
        with self.db.read() as s:
            for i in range(0, len(keys), _KEY_BATCH):
                batch = keys[i : i + _KEY_BATCH]
                found.update(s.execute(_SPOOL_KEYS, {"keys": batch}).scalars())
        return found


def _check_command_uids(request: StoreRequest) -> None:
    if not is_valid_uid(request.sop_instance_uid) or not is_valid_uid(request.sop_class_uid):
        raise IngestError(st.INVALID_OBJECT_INSTANCE, "invalid-uid-in-command")


class _Outcome:
    """Whether a step another thread runs has succeeded: :meth:`wait` returns once it has,
    or raises what it raised."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

    def succeed(self) -> None:
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error


def _with(record: AuditRecord, **changes: object) -> AuditRecord:
    return replace(record, **changes)  # type: ignore[arg-type]
