"""gateway.index.deliveries against a real SQLite index: leases, capacity, attempts, admin."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from gateway.errors import TransitionError
from gateway.ids import new_id
from gateway.index import deliveries
from gateway.index.db import Database
from gateway.index.models import Delivery, DeliveryAttempt, DeliveryItem, Instance
from gateway.index.states import Event, State

T0 = datetime(2024, 1, 15, 10, 0, 0, tzinfo=UTC)
LEASE = 60.0


def _instances(db: Database, n: int, study: str = "1.2.3") -> list[int]:
    with db.session() as s:
        rows = [
            Instance(
                spool_key=new_id(),
                sop_instance_uid=f"{study}.{i}",
                version=1,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                study_instance_uid=study,
                series_instance_uid=f"{study}.100",
                modality="CT",
                instance_number=str(i),
                size=1000,
                sha256="0" * 64,
                received_at=T0,
                calling_ae_title="MOD",
                called_ae_title="GATEWAY",
                calling_address="127.0.0.1",
                association_id=new_id(),
            )
            for i in range(1, n + 1)
        ]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def _create(
    db: Database,
    destination: str = "pacs",
    *,
    now: datetime = T0,
    instance_ids: Sequence[int] = (),
    study: str = "1.2.3",
) -> str:
    with db.session() as s:
        d = deliveries.create(
            s,
            study_instance_uid=study,
            route_name="r",
            destination=destination,
            profile="",
            instance_ids=list(instance_ids),
            now=now,
        )
        return d.id


def _claim(
    db: Database,
    worker: str,
    now: datetime,
    capacity: dict[str, int] | None = None,
    skip: frozenset[str] = frozenset(),
) -> deliveries.Claim | None:
    with db.session() as s:
        return deliveries.claim(
            s,
            worker=worker,
            now=now,
            lease_seconds=LEASE,
            capacity={"pacs": 1} if capacity is None else capacity,
            skip=skip,
        )


def _get(db: Database, delivery_id: str) -> Delivery:
    with db.session() as s:
        d = s.get(Delivery, delivery_id)
        assert d is not None
        return d


def _finish(
    db: Database,
    delivery_id: str,
    event: Event,
    *,
    now: datetime,
    worker: str = "w1",
    reason: str = "",
    next_attempt_at: datetime | None = None,
) -> None:
    with db.session() as s:
        d = s.get(Delivery, delivery_id)
        assert d is not None
        deliveries.finish_attempt(
            s,
            d,
            event=event,
            worker=worker,
            started_at=now - timedelta(seconds=1),
            now=now,
            reason=reason,
            next_attempt_at=next_attempt_at,
        )


def test_create_and_claim(db: Database) -> None:
    ids = _instances(db, 3)
    did = _create(db, instance_ids=ids)
    d = _get(db, did)
    assert d.state == State.PENDING.value
    assert d.instance_count == 3
    assert d.attempts == 0
    c = _claim(db, "w1", T0)
    assert c is not None
    assert c.delivery_id == did
    assert c.destination == "pacs"
    assert c.attempt == 1
    assert c.lease_expires_at == T0 + timedelta(seconds=LEASE)
    d = _get(db, did)
    assert d.state == State.IN_PROGRESS.value
    assert d.lease_owner == "w1"
    assert d.lease_expires_at == T0 + timedelta(seconds=LEASE)
    assert _claim(db, "w2", T0) is None  # nothing else due
    with db.session() as s:
        items = deliveries.pending_items(s, did)
    assert [i.instance_id for i, _ in items] == ids
    assert [inst.sop_instance_uid for _, inst in items] == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]


def test_claim_respects_capacity_per_destination(db: Database) -> None:
    pacs = [_create(db, "pacs", now=T0 + timedelta(seconds=i)) for i in range(3)]
    archive = _create(db, "archive", now=T0 + timedelta(seconds=10))
    capacity = {"pacs": 2, "archive": 1}
    now = T0 + timedelta(seconds=20)
    first = _claim(db, "w1", now, capacity)
    second = _claim(db, "w2", now, capacity)
    third = _claim(db, "w3", now, capacity)
    assert first is not None and second is not None and third is not None
    assert [first.delivery_id, second.delivery_id] == pacs[:2]  # oldest due first
    assert third.delivery_id == archive  # pacs is full, so the archive job is taken
    assert _claim(db, "w4", now, capacity) is None
    assert _get(db, pacs[2]).state == State.PENDING.value
    # a finished attempt frees the slot
    _finish(db, pacs[0], Event.DELIVERED, now=now)
    fourth = _claim(db, "w4", now, capacity)
    assert fourth is not None and fourth.delivery_id == pacs[2]


def test_unknown_destination_defaults_to_one_slot(db: Database) -> None:
    a = _create(db, "other")
    _create(db, "other")
    c = _claim(db, "w1", T0, {})
    assert c is not None and c.delivery_id == a
    assert _claim(db, "w2", T0, {}) is None


def test_claim_skips_destinations(db: Database) -> None:
    _create(db, "pacs")
    b = _create(db, "archive", now=T0 + timedelta(seconds=1))
    c = _claim(db, "w1", T0 + timedelta(seconds=1), {"pacs": 1, "archive": 1}, frozenset({"pacs"}))
    assert c is not None and c.delivery_id == b


def test_claim_waits_for_next_attempt_at(db: Database) -> None:
    did = _create(db, now=T0 + timedelta(seconds=30))
    assert _claim(db, "w1", T0) is None
    assert _claim(db, "w1", T0 + timedelta(seconds=29)) is None
    c = _claim(db, "w1", T0 + timedelta(seconds=30))  # due at exactly next_attempt_at
    assert c is not None and c.delivery_id == did


def test_expired_lease_is_claimed_again(db: Database) -> None:
    did = _create(db)
    c1 = _claim(db, "w1", T0)
    assert c1 is not None and c1.attempt == 1
    # still leased: neither re-claimed nor a free slot
    assert _claim(db, "w2", T0 + timedelta(seconds=LEASE - 1)) is None
    assert _claim(db, "w2", T0 + timedelta(seconds=LEASE)) is None  # expires strictly after
    later = T0 + timedelta(seconds=LEASE + 1)
    c2 = _claim(db, "w2", later)
    assert c2 is not None
    assert c2.delivery_id == did
    assert c2.attempt == 2
    d = _get(db, did)
    assert d.state == State.IN_PROGRESS.value
    assert d.lease_owner == "w2"
    assert d.attempts == 2
    assert d.lease_expires_at == later + timedelta(seconds=LEASE)
    # the first worker lost its lease; the second may renew
    with db.session() as s:
        assert not deliveries.renew(s, did, worker="w1", until=later + timedelta(seconds=999))
    with db.session() as s:
        assert deliveries.renew(s, did, worker="w2", until=later + timedelta(seconds=90))
    assert _get(db, did).lease_expires_at == later + timedelta(seconds=90)


def test_leases_of_an_earlier_run_of_this_node_are_released_at_once(db: Database) -> None:
    """What ``serve`` does when it starts (or its worker process died): the deliveries held
    by this node's earlier runs are due at once; its own run's, another node's (the same
    thread names) and ended deliveries are left as they are."""
    earlier, other_node, own, ended = (_create(db, study=f"1.2.{i}") for i in range(4))
    owners = {
        earlier: "aa11:run1:worker-0",
        other_node: "bb22:run1:worker-0",
        own: "aa11:run2:worker-0",
        ended: "aa11:run1:worker-1",
    }
    for did, owner in owners.items():
        c = _claim(db, owner, T0, capacity={"pacs": 4}, skip=frozenset())
        assert c is not None
    with db.session() as s:  # claim takes them in creation order: fix the owners by id
        for did, owner in owners.items():
            s.execute(update(Delivery).where(Delivery.id == did).values(lease_owner=owner))
        s.execute(update(Delivery).where(Delivery.id == ended).values(state="delivered"))
    later = T0 + timedelta(seconds=5)  # every lease still live
    with db.session() as s:
        released = deliveries.release_leases(s, owners="aa11:", keep="aa11:run2:", now=later)
    assert released == 1
    c = _claim(db, "aa11:run2:worker-1", later, capacity={"pacs": 4})
    assert c is not None and c.delivery_id == earlier and c.attempt == 2
    assert _claim(db, "aa11:run2:worker-1", later, capacity={"pacs": 4}) is None
    # an owner prefix is matched as text: LIKE's wildcards in it match only themselves
    with db.session() as s:
        assert deliveries.release_leases(s, owners="a_1%", keep="zz", now=later) == 0
    assert _get(db, own).lease_owner == "aa11:run2:worker-0"
    assert _get(db, other_node).lease_expires_at == T0 + timedelta(seconds=LEASE)


def test_renew_extends_a_held_lease(db: Database) -> None:
    did = _create(db)
    assert _claim(db, "w1", T0) is not None
    until = T0 + timedelta(seconds=LEASE * 3)
    with db.session() as s:
        assert deliveries.renew(s, did, worker="w1", until=until)
    assert _claim(db, "w2", T0 + timedelta(seconds=LEASE + 1)) is None  # renewed: not expired
    with db.session() as s:
        assert not deliveries.renew(s, "0" * 32, worker="w1", until=until)


def test_finish_attempt_writes_attempt_rows_and_retries(db: Database) -> None:
    ids = _instances(db, 3)
    did = _create(db, instance_ids=ids)
    assert _claim(db, "w1", T0) is not None
    with db.session() as s:
        items = deliveries.pending_items(s, did)
        deliveries.record_item(s, items[0][0].id, state="sent", status=0, reason="")
    retry_at = T0 + timedelta(seconds=30)
    _finish(
        db,
        did,
        Event.RETRYABLE_FAILURE,
        now=T0 + timedelta(seconds=5),
        reason="association rejected",
        next_attempt_at=retry_at,
    )
    d = _get(db, did)
    assert d.state == State.RETRY_WAIT.value
    assert d.lease_owner is None and d.lease_expires_at is None
    assert d.last_error == "association rejected"
    assert d.next_attempt_at == retry_at
    assert d.sent_count == 1
    with db.session() as s:
        assert len(deliveries.pending_items(s, did)) == 2  # only unsent items remain

    assert _claim(db, "w1", retry_at - timedelta(seconds=1)) is None
    c = _claim(db, "w2", retry_at)
    assert c is not None and c.attempt == 2
    with db.session() as s:
        for item, _ in deliveries.pending_items(s, did):
            deliveries.record_item(s, item.id, state="warning", status=0xB000, reason="coerced")
    _finish(db, did, Event.DELIVERED_WITH_WARNINGS, now=retry_at, worker="w2")
    d = _get(db, did)
    assert d.state == State.DELIVERED_WITH_WARNINGS.value
    assert (d.sent_count, d.warning_count, d.failed_count, d.instance_count) == (3, 2, 0, 3)

    with db.session() as s:
        attempts = (
            s.execute(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.delivery_id == did)
                .order_by(DeliveryAttempt.number)
            )
            .scalars()
            .all()
        )
    assert [(a.number, a.worker, a.outcome) for a in attempts] == [
        (1, "w1", "retryable_failure"),
        (2, "w2", "delivered_with_warnings"),
    ]
    assert attempts[0].reason == "association rejected"
    assert (attempts[0].sent, attempts[0].warnings, attempts[0].failed) == (1, 0, 0)
    assert (attempts[1].sent, attempts[1].warnings, attempts[1].failed) == (3, 2, 0)
    assert attempts[0].finished_at == T0 + timedelta(seconds=5)


def test_finish_from_an_unlisted_state_raises(db: Database) -> None:
    did = _create(db)
    with pytest.raises(TransitionError):
        _finish(db, did, Event.DELIVERED, now=T0)  # never claimed
    assert _get(db, did).state == State.PENDING.value  # rolled back
    with db.session() as s:
        assert s.execute(select(DeliveryAttempt)).first() is None


@pytest.mark.parametrize(
    ("event", "state"),
    [
        (Event.PERMANENT_FAILURE, State.FAILED),
        (Event.ATTEMPTS_EXHAUSTED, State.FAILED),
        (Event.QUARANTINE, State.QUARANTINED),
    ],
)
def test_admin_retry_requeues_dead_letters(db: Database, event: Event, state: State) -> None:
    ids = _instances(db, 2)
    did = _create(db, instance_ids=ids)
    assert _claim(db, "w1", T0) is not None
    with db.session() as s:
        items = deliveries.pending_items(s, did)
        deliveries.record_item(s, items[0][0].id, state="sent", status=0, reason="")
        deliveries.record_item(s, items[1][0].id, state="failed", status=0xA900, reason="x")
    _finish(db, did, event, now=T0)
    assert _get(db, did).state == state.value
    assert _claim(db, "w1", T0 + timedelta(days=1)) is None  # dead letters are not claimed

    later = T0 + timedelta(hours=1)
    with db.session() as s:
        d = s.get(Delivery, did)
        assert d is not None
        deliveries.admin_retry(s, d, now=later)
    d = _get(db, did)
    assert d.state == State.PENDING.value
    assert d.attempts == 0
    assert d.next_attempt_at == later
    with db.session() as s:
        states = s.execute(
            select(DeliveryItem.state, DeliveryItem.status).where(DeliveryItem.delivery_id == did)
        ).all()
    assert sorted(tuple(r) for r in states) == [("pending", None), ("sent", 0)]
    c = _claim(db, "w1", later)
    assert c is not None and c.attempt == 1


def _to_state(db: Database, did: str, state: State) -> None:
    if state is State.PENDING:
        return
    assert _claim(db, "w1", T0) is not None
    events = {
        State.IN_PROGRESS: None,
        State.RETRY_WAIT: Event.RETRYABLE_FAILURE,
        State.DELIVERED: Event.DELIVERED,
        State.DELIVERED_WITH_WARNINGS: Event.DELIVERED_WITH_WARNINGS,
        State.FAILED: Event.PERMANENT_FAILURE,
        State.QUARANTINED: Event.QUARANTINE,
        State.CANCELLED: Event.CANCEL,
    }
    event = events[state]
    if event is not None:
        _finish(db, did, event, now=T0, next_attempt_at=T0 + timedelta(days=1))
    assert _get(db, did).state == state.value


@pytest.mark.parametrize("state", list(State))
def test_admin_retry_follows_the_state_machine(db: Database, state: State) -> None:
    did = _create(db)
    _to_state(db, did, state)
    allowed = state in (
        State.FAILED,
        State.CANCELLED,
        State.QUARANTINED,
        State.DELIVERED_WITH_WARNINGS,
    )
    with db.session() as s:
        d = s.get(Delivery, did)
        assert d is not None
        if allowed:
            deliveries.admin_retry(s, d, now=T0)
        else:
            with pytest.raises(TransitionError):
                deliveries.admin_retry(s, d, now=T0)
    assert _get(db, did).state == (State.PENDING.value if allowed else state.value)


@pytest.mark.parametrize("state", list(State))
def test_admin_cancel_follows_the_state_machine(db: Database, state: State) -> None:
    did = _create(db)
    _to_state(db, did, state)
    allowed = state in (State.PENDING, State.RETRY_WAIT, State.IN_PROGRESS)
    with db.session() as s:
        d = s.get(Delivery, did)
        assert d is not None
        if allowed:
            deliveries.admin_cancel(d, now=T0)
        else:
            with pytest.raises(TransitionError):
                deliveries.admin_cancel(d, now=T0)
    d = _get(db, did)
    assert d.state == (State.CANCELLED.value if allowed else state.value)
    if allowed:
        assert d.lease_owner is None and d.lease_expires_at is None
        assert _claim(db, "w2", T0 + timedelta(days=2)) is None
        with db.session() as s:  # a worker that held the lease loses it
            assert not deliveries.renew(s, did, worker="w1", until=T0 + timedelta(days=3))


def _append(
    db: Database, instance_id: int, at: datetime = T0, linger: timedelta = timedelta(0)
) -> str:
    """``append_to_open`` of one instance of study 1.2.3 on route "r" to "pacs" at ``at``."""
    with db.session() as s:
        return deliveries.append_to_open(
            s,
            study_instance_uid="1.2.3",
            route_name="r",
            destination="pacs",
            profile="",
            instance_id=instance_id,
            now=at,
            linger=linger,
        )


def test_append_to_open_joins_the_unclaimed_delivery(db: Database) -> None:
    ids = _instances(db, 3)

    def append(instance_id: int) -> str:
        return _append(db, instance_id)

    first = append(ids[0])
    assert append(ids[1]) == first
    assert _get(db, first).instance_count == 2
    assert _claim(db, "w1", T0) is not None
    third = append(ids[2])  # the first is claimed: a new delivery starts
    assert third != first
    assert _get(db, third).instance_count == 1


def test_any_due_agrees_with_claim_and_reads_without_the_writer(db: Database) -> None:
    ids = _instances(db, 1)
    with db.read() as s:
        assert not deliveries.any_due(s, now=T0)
    _append(db, ids[0], T0, timedelta(seconds=0.2))
    with db.read() as s:  # lingering: not claimable yet, and claim agrees
        assert not deliveries.any_due(s, now=T0)
    assert _claim(db, "w1", T0) is None
    later = T0 + timedelta(seconds=0.2)
    with db.read() as s:
        assert deliveries.any_due(s, now=later)
    # a read neither waits for nor blocks a writer holding the lock in another thread
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:
        with db.session() as s:
            s.execute(update(Delivery).values(updated_at=later))
            holding.set()
            release.wait(5)

    t = threading.Thread(target=writer)
    t.start()
    seen: list[bool] = []

    def reader() -> None:
        with db.read() as s:
            seen.append(deliveries.any_due(s, now=later))

    try:
        assert holding.wait(5)
        r = threading.Thread(target=reader)
        r.start()
        r.join(5)  # a read that queued on the writer would still be waiting for `release`
        assert not r.is_alive() and seen == [True]
    finally:
        release.set()
        t.join()
    assert _claim(db, "w1", later) is not None
    with db.read() as s:
        assert not deliveries.any_due(s, now=later)


def test_a_streaming_delivery_is_claimable_once_quiet_or_after_its_linger(db: Database) -> None:
    """Claimable STREAM_QUIET after the last instance joined it (the study stopped), or
    STREAM_LINGER after its first while instances keep joining, whichever comes first."""
    ids = _instances(db, 8)
    quiet = deliveries.STREAM_QUIET
    step = quiet * 0.8  # instances arriving closer together than the quiet

    def append(instance_id: int, at: datetime) -> str:
        return _append(db, instance_id, at, deliveries.STREAM_LINGER)

    def due(at: datetime) -> bool:
        with db.read() as s:
            return deliveries.any_due(s, now=at)

    # a study that stops after two instances: claimable a quiet after the second
    first = append(ids[0], T0)
    append(ids[1], T0 + step)
    assert not due(T0 + step + quiet * 0.9)
    assert due(T0 + step + quiet)
    claimed = _claim(db, "w1", T0 + step + quiet)
    assert claimed is not None and claimed.delivery_id == first
    # a study that keeps streaming: never quiet, claimable at its linger
    t1 = T0 + timedelta(seconds=10)
    second = append(ids[2], t1)
    assert second != first
    for k, instance_id in enumerate(ids[3:7], start=1):
        at = t1 + step * k
        assert append(instance_id, at) == second
        if at + quiet * 0.9 < t1 + deliveries.STREAM_LINGER:
            assert not due(at + quiet * 0.9)
    last = t1 + step * 4
    assert t1 + deliveries.STREAM_LINGER < last + quiet  # not quiet yet at the linger ...
    assert due(t1 + deliveries.STREAM_LINGER)  # ... but due
    claimed = _claim(db, "w2", t1 + deliveries.STREAM_LINGER, capacity={"pacs": 2})
    assert claimed is not None and claimed.delivery_id == second


def test_any_due_with_capacity_skips_busy_destinations(db: Database) -> None:
    """A due delivery whose destination has every slot busy is not worth a claim."""
    ids = _instances(db, 2)
    with db.session() as s:
        for i, study in enumerate(("1.2.3", "1.2.4")):
            deliveries.append_to_open(
                s,
                study_instance_uid=study,
                route_name="r",
                destination="pacs",
                profile="",
                instance_id=ids[i],
                now=T0,
            )
    with db.read() as s:
        assert deliveries.any_due(s, now=T0, capacity={"pacs": 1})
    assert _claim(db, "w1", T0) is not None  # pacs's one slot is now busy
    with db.read() as s:
        assert deliveries.any_due(s, now=T0)  # due, whatever the slots
        assert not deliveries.any_due(s, now=T0, capacity={"pacs": 1})
        assert deliveries.any_due(s, now=T0, capacity={"pacs": 2})
    assert _claim(db, "w2", T0) is None  # claim agrees
    assert _claim(db, "w2", T0, capacity={"pacs": 2}) is not None
