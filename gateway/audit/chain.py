"""The audit log as a hash chain, written in the same transaction as the work it records.

Each row holds the SHA-256 of the previous row's hash and its own canonical content, and
the single ``audit_head`` row holds the last sequence number and hash. Writers lock the
head row (``SELECT ... FOR UPDATE``; on SQLite the ``BEGIN IMMEDIATE`` write lock), so the
chain is ordered even with several threads or nodes. :func:`verify` names the first row
that was edited, deleted, inserted or moved, and notices a truncated tail against the head.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from gateway.errors import AuditChainError
from gateway.index.models import AuditEvent, AuditHead
from gateway.index.prepared import Prepared, connection_of
from gateway.text import safe_text

GENESIS = "0" * 64
_EVENTS = cast(Table, AuditEvent.__table__)
_HEAD = cast(Table, AuditHead.__table__)
# built once, executed with parameters (once per audited event)
_LOCK_HEAD = select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == 1).with_for_update()
_INSERT_EVENT = insert(_EVENTS)
_MOVE_HEAD = (
    update(_HEAD)
    .where(_HEAD.c.id == 1)
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)
# the hashed content, in order; ``hash`` itself is the digest of these
_HASHED = (
    "seq",
    "recorded_at",
    "event_type",
    "outcome",
    "node",
    "calling_ae_title",
    "called_ae_title",
    "address",
    "sop_class_uid",
    "sop_instance_uid",
    "study_instance_uid",
    "delivery_id",
    "status",
    "detail",
    "prev_hash",
)
# every audited event runs these, on the DBAPI cursor (gateway.index.prepared)
_RUN_LOCK_HEAD = Prepared(_LOCK_HEAD)
_RUN_INSERT_EVENT = Prepared(_INSERT_EVENT, (*_HASHED, "hash"))
_RUN_MOVE_HEAD = Prepared(_MOVE_HEAD)


@dataclass(frozen=True)
class AuditRecord:
    """What happened; peer-supplied text is escaped when the row is written."""

    event_type: str
    outcome: str
    calling_ae_title: str = ""
    called_ae_title: str = ""
    address: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    delivery_id: str = ""
    status: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def _utc_text(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _digest(row: AuditEvent) -> str:
    return _digest_values({name: getattr(row, name) for name in _HASHED})


def _digest_values(values: dict[str, Any]) -> str:
    content = [values[name] for name in _HASHED]
    content[1] = _utc_text(values["recorded_at"])
    encoded = json.dumps(content, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(encoded).hexdigest()


def append(session: Session | Connection, record: AuditRecord, *, node: str, now: datetime) -> int:
    """Add ``record`` to the chain inside ``session``'s transaction (a session's, or a
    connection's in a transaction); return its sequence.

    Three statements on the session's connection (lock and read the head, insert the row,
    move the head), run on its cursor: this runs once per received instance.
    """
    conn = connection_of(session)
    seq, prev_hash = _RUN_LOCK_HEAD.one(conn)
    values: dict[str, Any] = {
        "seq": seq + 1,
        "recorded_at": now,
        "event_type": record.event_type,
        "outcome": record.outcome,
        "node": safe_text(node),
        "calling_ae_title": safe_text(record.calling_ae_title),
        "called_ae_title": safe_text(record.called_ae_title),
        "address": safe_text(record.address),
        "sop_class_uid": safe_text(record.sop_class_uid),
        "sop_instance_uid": safe_text(record.sop_instance_uid),
        "study_instance_uid": safe_text(record.study_instance_uid),
        "delivery_id": record.delivery_id,
        "status": record.status,
        "detail": json.dumps(record.detail, sort_keys=True, separators=(",", ":"), default=str),
        "prev_hash": prev_hash,
    }
    values["hash"] = _digest_values(values)
    _RUN_INSERT_EVENT.rowcount(conn, values)
    _RUN_MOVE_HEAD.rowcount(conn, {"new_seq": values["seq"], "new_hash": values["hash"]})
    return int(values["seq"])


def _rows(session: Session, batch: int = 2000) -> Iterator[AuditEvent]:
    last = -1
    while True:
        chunk = (
            session.execute(
                select(AuditEvent)
                .where(AuditEvent.seq > last)
                .order_by(AuditEvent.seq)
                .limit(batch)
            )
            .scalars()
            .all()
        )
        if not chunk:
            return
        yield from chunk
        last = chunk[-1].seq
        session.expunge_all()


def verify(session: Session) -> int:
    """Check the whole chain; return the number of rows, or raise :class:`AuditChainError`."""
    expected_seq = 1
    prev = GENESIS
    count = 0
    for row in _rows(session):
        if row.seq != expected_seq:
            bad = expected_seq if row.seq > expected_seq else row.seq
            raise AuditChainError(bad, f"sequence gap or duplicate (found {row.seq})")
        if row.prev_hash != prev:
            raise AuditChainError(row.seq, "does not link to the previous row")
        if _digest(row) != row.hash:
            raise AuditChainError(row.seq, "content does not match its hash")
        prev = row.hash
        expected_seq += 1
        count += 1
    head = session.execute(select(AuditHead).where(AuditHead.id == 1)).scalar_one()
    if head.seq != count:
        # rows missing at the end: the first missing one; rows past the head: the first extra
        raise AuditChainError(
            min(count, head.seq) + 1, f"chain ends at {count} but the head records {head.seq}"
        )
    if head.hash != prev:
        raise AuditChainError(max(count, 1), "the last row's hash does not match the head")
    return count
