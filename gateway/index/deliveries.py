"""Delivery jobs in the index: creation, leased claiming, progress and admin actions.

Workers claim with a lease. On PostgreSQL the candidate rows are selected ``FOR UPDATE
SKIP LOCKED`` so several nodes can share the queue; on SQLite ``BEGIN IMMEDIATE``
serialises claimers. A lease whose worker died expires and the delivery is claimed again.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session

from gateway.ids import new_id
from gateway.index.models import Delivery, DeliveryAttempt, DeliveryItem, Instance
from gateway.index.prepared import Prepared, connection_of
from gateway.index.states import CLAIMABLE, Event, State, next_state

STREAM_LINGER = timedelta(seconds=0.2)
"""A streaming delivery becomes claimable this long after its first instance: the study's
next instances join it meanwhile, so one association carries many (an association, a claim
and a finish per instance cost more than sending it)."""
STREAM_QUIET = timedelta(seconds=0.05)
"""... or sooner, once no instance has joined it for this long: the study's instances have
stopped arriving (or paused), and its last ones wait for the quiet, not the linger."""

_DELIVERIES = cast(Table, Delivery.__table__)
_ITEMS = cast(Table, DeliveryItem.__table__)
# append_to_open runs once per streamed instance: its statements are built once
_OPEN_DELIVERY = (
    select(_DELIVERIES.c.id)
    .where(
        _DELIVERIES.c.study_instance_uid == bindparam("study_instance_uid"),
        _DELIVERIES.c.route_name == bindparam("route_name"),
        _DELIVERIES.c.destination == bindparam("destination"),
        _DELIVERIES.c.profile == bindparam("profile"),
        _DELIVERIES.c.state == State.PENDING.value,
        _DELIVERIES.c.attempts == 0,
    )
    .limit(1)
    .with_for_update(skip_locked=True)
)
_INSERT_ITEM = insert(_ITEMS)
_COUNT_ITEM = (
    update(_DELIVERIES)
    .where(_DELIVERIES.c.id == bindparam("delivery_id"))
    .values(instance_count=_DELIVERIES.c.instance_count + 1, updated_at=bindparam("now"))
)
# a streamed instance runs these three in the ingest's transaction, on the DBAPI cursor
# (gateway.index.prepared): through Connection.execute they cost ~0.2 ms of Python an instance
_RUN_OPEN_DELIVERY = Prepared(_OPEN_DELIVERY)
_RUN_INSERT_ITEM = Prepared(_INSERT_ITEM, ("delivery_id", "instance_id", "state", "reason"))
_RUN_COUNT_ITEM = Prepared(_COUNT_ITEM)


def create(
    session: Session,
    *,
    study_instance_uid: str,
    route_name: str,
    destination: str,
    profile: str,
    instance_ids: Sequence[int],
    now: datetime,
    claimable_at: datetime | None = None,
) -> Delivery:
    """A pending delivery of ``instance_ids``, claimable from ``claimable_at`` (default now)."""
    delivery = Delivery(
        id=new_id(),
        study_instance_uid=study_instance_uid,
        route_name=route_name,
        destination=destination,
        profile=profile,
        state=State.PENDING.value,
        attempts=0,
        next_attempt_at=claimable_at or now,
        created_at=now,
        updated_at=now,
        last_error="",
        instance_count=len(instance_ids),
        sent_count=0,
        warning_count=0,
        failed_count=0,
    )
    session.add(delivery)
    session.flush()
    session.add_all(
        DeliveryItem(delivery_id=delivery.id, instance_id=i, state="pending", reason="")
        for i in instance_ids
    )
    return delivery


def append_to_open(
    session: Session | Connection,
    *,
    study_instance_uid: str,
    route_name: str,
    destination: str,
    profile: str,
    instance_id: int,
    now: datetime,
    linger: timedelta = timedelta(0),
) -> str:
    """Add an instance to this study's unclaimed delivery for the route, or start one that
    is claimable ``linger`` from now (so the study's next instances join it and one
    association carries them); return the delivery's id. Core statements: this runs once
    per streamed instance. ``session``: a session, or a connection in a transaction."""
    conn = connection_of(session)
    row = _RUN_OPEN_DELIVERY.first(
        conn,
        {
            "study_instance_uid": study_instance_uid,
            "route_name": route_name,
            "destination": destination,
            "profile": profile,
        },
    )
    if row is None:
        # a study's first instance on the route: the ORM's rows, in the connection's
        # transaction (a session bound to it joins that transaction, and commits nothing)
        orm = session if isinstance(session, Session) else Session(bind=conn)
        try:
            delivery = create(
                orm,
                study_instance_uid=study_instance_uid,
                route_name=route_name,
                destination=destination,
                profile=profile,
                instance_ids=[instance_id],
                now=now,
                claimable_at=now + linger,
            )
            orm.flush()  # the next Core statement in this transaction must see it
            return delivery.id
        finally:
            if orm is not session:
                orm.close()
    open_id = str(row[0])
    _RUN_INSERT_ITEM.rowcount(
        conn,
        {"delivery_id": open_id, "instance_id": instance_id, "state": "pending", "reason": ""},
    )
    _RUN_COUNT_ITEM.rowcount(conn, {"delivery_id": open_id, "now": now})
    return open_id


@dataclass(frozen=True)
class Claim:
    delivery_id: str
    destination: str
    attempt: int
    lease_expires_at: datetime


@dataclass(frozen=True)
class _DueQueries:
    """The statements of :func:`any_due` and :func:`claim`, built once (parameters ``now``
    and, with a horizon, ``beyond``): idle workers poll with them, and building them per
    poll (expressions, bind parameters, cache keys) cost more than running them."""

    any_id: Any
    waiting: Any
    busy: Any
    candidates: Any


@functools.cache
def _due_queries(with_horizon: bool) -> _DueQueries:
    now = bindparam("now", type_=Delivery.next_attempt_at.type)
    retry_due = Delivery.next_attempt_at <= now
    # a streaming delivery (pending, never attempted) no instance has joined since ``quiet``
    stream_quiet = (
        (Delivery.state == State.PENDING.value)
        & (Delivery.attempts == 0)
        & (Delivery.updated_at <= bindparam("quiet", type_=Delivery.updated_at.type))
    )
    lease_over = Delivery.lease_expires_at < now
    lease_live = Delivery.lease_expires_at >= now
    if with_horizon:
        beyond = bindparam("beyond", type_=Delivery.next_attempt_at.type)
        retry_due = or_(retry_due, Delivery.next_attempt_at > beyond)
        lease_over = or_(lease_over, Delivery.lease_expires_at > beyond)
        lease_live = lease_live & (Delivery.lease_expires_at <= beyond)
    due = or_(
        (Delivery.state.in_([s.value for s in CLAIMABLE])) & retry_due,
        stream_quiet,
        (Delivery.state == State.IN_PROGRESS.value) & lease_over,
    )
    return _DueQueries(
        any_id=select(Delivery.id).where(due).limit(1),
        waiting=select(Delivery.destination).where(due).distinct(),
        busy=select(Delivery.destination, func.count())
        .where(Delivery.state == State.IN_PROGRESS.value, lease_live)
        .group_by(Delivery.destination),
        candidates=select(Delivery)
        .where(due)
        .order_by(Delivery.next_attempt_at, Delivery.created_at)
        .limit(32)
        .with_for_update(skip_locked=True),
    )


def _due(now: datetime, horizon: float | None) -> tuple[_DueQueries, dict[str, datetime]]:
    """(the statements finding the deliveries due at ``now`` and the leases still live,
    their parameters), see :func:`claim`."""
    params = {"now": now, "quiet": now - STREAM_QUIET}
    if horizon is not None:
        params["beyond"] = now + timedelta(seconds=horizon)
    return _due_queries(horizon is not None), params


def any_due(
    session: Session,
    *,
    now: datetime,
    horizon: float | None = None,
    capacity: dict[str, int] | None = None,
) -> bool:
    """Whether :func:`claim` could find a due delivery: a read that idle workers make
    without taking the writer. With ``capacity``, only a due delivery whose destination has
    a free association slot counts (as in :func:`claim`): while a study streams, its next
    delivery is due while the destination's slots are busy, and every idle worker took the
    writer lock for a claim that could not succeed, once per streamed instance."""
    queries, params = _due(now, horizon)
    if capacity is None:
        return session.execute(queries.any_id, params).first() is not None
    waiting = set(session.execute(queries.waiting, params).scalars())
    if not waiting:
        return False
    busy = _busy(session, queries.busy, params)
    return any(busy.get(d, 0) < capacity.get(d, 1) for d in waiting)


def _busy(session: Session, query: Any, params: dict[str, Any]) -> dict[str, int]:
    """Open attempts per destination (rows unpacked directly: ``Result.tuples()`` is
    deprecated from SQLAlchemy 2.1)."""
    return {str(destination): int(count) for destination, count in session.execute(query, params)}


def claim(
    session: Session,
    *,
    worker: str,
    now: datetime,
    lease_seconds: float,
    capacity: dict[str, int],
    skip: frozenset[str] = frozenset(),
    horizon: float | None = None,
) -> Claim | None:
    """Lease the next due delivery whose destination has a free association slot.

    With ``horizon`` (seconds), a retry time or lease expiry further than that ahead of
    ``now`` counts as due: no clock on this time line sets one so far ahead, so it was
    written under a system clock that has since been set back (FAULTS F19), and waiting
    for it would stall the delivery for as long as the clock went back."""
    queries, params = _due(now, horizon)
    candidates = session.execute(queries.candidates, params).scalars().all()
    if not candidates:
        return None
    busy = _busy(session, queries.busy, params)
    for d in candidates:
        if d.destination in skip:
            continue
        if busy.get(d.destination, 0) >= capacity.get(d.destination, 1):
            continue
        event = Event.LEASE_EXPIRED if d.state == State.IN_PROGRESS.value else Event.CLAIM
        d.state = next_state(d.state, event).value
        d.lease_owner = worker
        d.lease_expires_at = now + timedelta(seconds=lease_seconds)
        d.attempts += 1
        d.updated_at = now
        return Claim(d.id, d.destination, d.attempts, d.lease_expires_at)
    return None


def release_leases(session: Session, *, owners: str, keep: str, now: datetime) -> int:
    """Make due at once the deliveries leased by workers whose names start with ``owners``
    but not ``keep``: earlier runs of this node, known to be dead (``serve`` holds the state
    directory's lock, :mod:`gateway.statelock`), whose leases would otherwise have to run out.
    Returns how many."""
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.state == State.IN_PROGRESS.value,
            Delivery.lease_owner.startswith(owners, autoescape=True),
            ~Delivery.lease_owner.startswith(keep, autoescape=True),
        )
        .values(lease_expires_at=now - timedelta(seconds=1))
    )
    return int(getattr(result, "rowcount", 0))


def renew(session: Session, delivery_id: str, *, worker: str, until: datetime) -> bool:
    """Extend a lease still held by ``worker``; False if it was lost (expired, cancelled)."""
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.lease_owner == worker,
            Delivery.state == State.IN_PROGRESS.value,
        )
        .values(lease_expires_at=until)
    )
    return bool(getattr(result, "rowcount", 0))


def pending_items(session: Session, delivery_id: str) -> list[tuple[DeliveryItem, Instance]]:
    rows = session.execute(
        select(DeliveryItem, Instance)
        .join(Instance, Instance.id == DeliveryItem.instance_id)
        .where(DeliveryItem.delivery_id == delivery_id, DeliveryItem.state == "pending")
        .order_by(DeliveryItem.id)
    ).all()
    return list(rows)


def record_item(
    session: Session, item_id: int, *, state: str, status: int | None, reason: str
) -> None:
    record_items(session, [(item_id, state, status, reason)])


_RECORD_ITEM = (
    update(_ITEMS)
    .where(_ITEMS.c.id == bindparam("item_id"))
    .values(state=bindparam("new_state"), status=bindparam("new_status"), reason=bindparam("why"))
)


def record_items(session: Session, results: Sequence[tuple[int, str, int | None, str]]) -> None:
    """Record destinations' answers, ``(item id, state, status, reason)`` each, with one
    statement executed for all of them (a statement per instance cost a round trip each)."""
    if not results:
        return
    session.connection().execute(
        _RECORD_ITEM,
        [
            {"item_id": item_id, "new_state": state, "new_status": status, "why": reason}
            for item_id, state, status, reason in results
        ],
    )


def refresh_counts(session: Session, delivery: Delivery) -> None:
    counts = dict(
        session.execute(
            select(DeliveryItem.state, func.count())
            .where(DeliveryItem.delivery_id == delivery.id)
            .group_by(DeliveryItem.state)
        ).all()
    )
    delivery.sent_count = counts.get("sent", 0) + counts.get("warning", 0)
    delivery.warning_count = counts.get("warning", 0)
    delivery.failed_count = counts.get("failed", 0)
    delivery.instance_count = sum(counts.values())


def finish_attempt(
    session: Session,
    delivery: Delivery,
    *,
    event: Event,
    worker: str,
    started_at: datetime,
    now: datetime,
    reason: str,
    next_attempt_at: datetime | None = None,
) -> None:
    """Close an attempt: move the state, release the lease, write the attempt row."""
    refresh_counts(session, delivery)
    session.add(
        DeliveryAttempt(
            delivery_id=delivery.id,
            number=delivery.attempts,
            worker=worker,
            started_at=started_at,
            finished_at=now,
            outcome=event.value,
            reason=reason,
            sent=delivery.sent_count,
            warnings=delivery.warning_count,
            failed=delivery.failed_count,
        )
    )
    delivery.state = next_state(delivery.state, event).value
    delivery.lease_owner = None
    delivery.lease_expires_at = None
    delivery.last_error = reason
    delivery.updated_at = now
    if next_attempt_at is not None:
        delivery.next_attempt_at = next_attempt_at


def admin_retry(session: Session, delivery: Delivery, *, now: datetime) -> None:
    """Re-queue a dead-lettered, cancelled or quarantined delivery; failed items resend."""
    delivery.state = next_state(delivery.state, Event.RETRY).value
    delivery.attempts = 0
    delivery.next_attempt_at = now
    delivery.updated_at = now
    session.execute(
        update(DeliveryItem)
        .where(DeliveryItem.delivery_id == delivery.id, DeliveryItem.state.in_(["failed"]))
        .values(state="pending", status=None, reason="")
    )


def admin_cancel(delivery: Delivery, *, now: datetime) -> None:
    delivery.state = next_state(delivery.state, Event.CANCEL).value
    delivery.lease_owner = None
    delivery.lease_expires_at = None
    delivery.updated_at = now
