"""FAULTS F19: the system clock jumps while the node runs, or was ahead before a restart.

The node's clock is injected with a fake wall clock and a fake monotonic clock, and the real
worker, router and delivery queries run on a real SQLite index. Retries, leases and the study
quiet period must follow elapsed (monotonic) time whatever the wall clock does; audit times
stay UTC, never go back, and the audit is ordered by sequence number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.audit.chain import AuditRecord, append
from gateway.clock import SystemClock
from gateway.config import GatewayConfig
from gateway.config.loader import load_config
from gateway.dicom.scu import OutgoingFile
from gateway.errors import RetryableError
from gateway.ids import new_id
from gateway.index import deliveries
from gateway.index.db import Database
from gateway.index.models import AuditEvent, Delivery, Instance, RouteCandidate, Study
from gateway.index.states import State
from gateway.metrics import Metrics
from gateway.routing.router import Router
from gateway.spool.store import Spool
from gateway.transfer.destinations import Report
from gateway.transfer.worker import Worker

T0 = datetime(2026, 3, 29, 0, 30, 0, tzinfo=UTC)
HOUR = 3600.0


class FakeTime:
    """A wall clock that can be stepped and a monotonic clock that only moves forward."""

    def __init__(self) -> None:
        self.wall = T0.timestamp()
        self.mono = 5000.0

    def elapse(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def step_wall(self, seconds: float) -> None:
        self.wall += seconds

    def clock(self) -> SystemClock:
        return SystemClock(wall=lambda: self.wall, monotonic=lambda: self.mono)


class Refusing:
    """A destination that is down: every attempt is retryable."""

    name = "pacs"

    def __init__(self) -> None:
        self.attempts = 0

    def deliver(
        self, files: Sequence[OutgoingFile], report: Report, should_stop: Callable[[], bool]
    ) -> None:
        self.attempts += 1
        raise RetryableError("connection refused")


def worker_config(tmp_path: Path, worker: str, route: str = "") -> GatewayConfig:
    """A node with ``[worker]`` settings ``worker`` (TOML lines), one destination "pacs"
    (nothing listens there) and a route "all" to it with ``route``'s extra lines."""
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[node]
name = "worker-test"
state_dir = "{tmp_path / "state"}"

[worker]
{worker}

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[[routes]]
name = "all"
destinations = ["pacs"]
{route}
"""
    )
    return load_config(path)


@pytest.fixture
def cfg(tmp_path: Path) -> GatewayConfig:
    return worker_config(
        tmp_path,
        "backoff_initial = 60\nbackoff_max = 600\nlease_seconds = 120",
        "quiet_seconds = 30",
    )


def instance_row(
    now: datetime, *, study: str = "1.2.3", spool_key: str = "", sop_instance_uid: str = ""
) -> dict[str, object]:
    """The columns of an ``instances`` row of a CT of ``study`` received at ``now`` (a fresh
    spool key and instance UID unless given)."""
    return {
        "spool_key": spool_key or new_id(),
        "sop_instance_uid": sop_instance_uid or f"{study}.{new_id()[:8]}",
        "version": 1,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "study_instance_uid": study,
        "series_instance_uid": f"{study}.1",
        "modality": "CT",
        "instance_number": "1",
        "size": 10,
        "sha256": "0" * 64,
        "received_at": now,
        "calling_ae_title": "CT1",
        "called_ae_title": "GATEWAY",
        "calling_address": "127.0.0.1",
        "association_id": new_id(),
    }


def _instance(db: Database, now: datetime, study: str = "1.2.3") -> int:
    with db.session() as s:
        row = Instance(**instance_row(now, study=study))
        s.add(row)
        s.flush()
        return row.id


def pending_delivery(s: Session, db: Database, now: datetime, **when: datetime) -> Delivery:
    """A pending delivery to "pacs" on route "all" of one new instance of study 1.2.3, made
    at ``now`` (``when``: ``claimable_at``)."""
    return deliveries.create(
        s,
        study_instance_uid="1.2.3",
        route_name="all",
        destination="pacs",
        profile="",
        instance_ids=[_instance(db, now)],
        now=now,
        **when,
    )


def _worker(cfg: GatewayConfig, db: Database, clock: SystemClock, dest: Refusing) -> Worker:
    spool = Spool(cfg.spool_dir)
    return Worker(
        cfg, db=db, spool=spool, clock=clock, metrics=Metrics(), destinations={"pacs": dest}
    )


def _delivery(db: Database, did: str) -> Delivery:
    with db.session() as s:
        d = s.get(Delivery, did)
        assert d is not None
        s.expunge(d)
        return d


def _awaiting_route(db: Database, study: str, instance_id: int, received_at: datetime) -> None:
    """A one-instance study whose instance waits for the study route ``all``."""
    with db.session() as s:
        s.add(
            Study(
                study_instance_uid=study,
                patient_id="",
                patient_name="",
                patient_birth_date="",
                patient_sex="",
                study_date="",
                study_time="",
                accession_number="",
                study_id="",
                study_description="",
                referring_physician_name="",
                modalities="CT",
                instance_count=1,
                first_received_at=received_at,
                last_received_at=received_at,
            )
        )
        s.add(
            RouteCandidate(
                instance_id=instance_id, study_instance_uid=study, route_name="all", routed=0
            )
        )


def test_the_node_clock_follows_elapsed_time_not_wall_steps() -> None:
    t = FakeTime()
    clock = t.clock()
    assert clock.now() == T0
    t.elapse(10)
    assert clock.now() == T0 + timedelta(seconds=10)
    t.step_wall(-HOUR)  # the system clock is set back an hour
    assert clock.now() == T0 + timedelta(seconds=10)
    assert clock.wall_offset() == pytest.approx(-HOUR)
    t.elapse(5)
    assert clock.now() == T0 + timedelta(seconds=15)
    t.step_wall(2 * HOUR)  # and forward two
    assert clock.now() == T0 + timedelta(seconds=15)
    assert clock.now().tzinfo is UTC
    assert clock.wall_offset() == pytest.approx(HOUR)


def test_retry_backoff_follows_elapsed_time(cfg: GatewayConfig, db: Database) -> None:
    t = FakeTime()
    clock = t.clock()
    dest = Refusing()
    worker = _worker(cfg, db, clock, dest)
    with db.session() as s:
        did = pending_delivery(s, db, clock.now()).id
    assert worker.run_once("w") and dest.attempts == 1
    assert _delivery(db, did).state == State.RETRY_WAIT.value
    # the wall clock jumps forward an hour: the 60 s backoff has not elapsed
    t.step_wall(HOUR)
    t.elapse(10)
    assert not worker.run_once("w") and dest.attempts == 1
    # it jumps back two hours: once 60 s have elapsed the retry runs (not in two hours)
    t.step_wall(-2 * HOUR)
    t.elapse(51)
    assert worker.run_once("w") and dest.attempts == 2


def test_an_abandoned_lease_expires_after_elapsed_lease_seconds(
    cfg: GatewayConfig, db: Database
) -> None:
    t = FakeTime()
    clock = t.clock()
    with db.session() as s:
        did = pending_delivery(s, db, clock.now()).id

    def claim(worker: str) -> deliveries.Claim | None:
        with db.session() as s:
            return deliveries.claim(
                s,
                worker=worker,
                now=clock.now(),
                lease_seconds=120,
                capacity={"pacs": 1},
                horizon=900,
            )

    first = claim("dead-worker")
    assert first is not None and first.delivery_id == did
    t.step_wall(HOUR)  # a forward jump does not expire a live lease ...
    t.elapse(60)
    assert claim("other") is None
    t.step_wall(-3 * HOUR)  # ... nor does a backward jump hold it for hours
    t.elapse(61)
    again = claim("other")
    assert again is not None and again.delivery_id == did and again.attempt == 2


def test_deadlines_written_under_a_clock_that_was_ahead_do_not_stall(
    cfg: GatewayConfig, db: Database
) -> None:
    """The node ran with its clock a day ahead and was restarted after the clock was fixed:
    a retry time, a lease and a study's last arrival a day ahead must not wait a day."""
    t = FakeTime()
    ahead = T0 + timedelta(days=1)
    with db.session() as s:
        retry = pending_delivery(s, db, ahead)
        retry.state = State.RETRY_WAIT.value
        retry.next_attempt_at = ahead + timedelta(seconds=60)
        retry_id = retry.id
    clock = t.clock()  # restarted with the corrected clock
    dest = Refusing()
    worker = _worker(cfg, db, clock, dest)
    assert worker.run_once("w") and dest.attempts == 1
    assert _delivery(db, retry_id).attempts == 1
    # the retry it just scheduled is on the corrected time line: not due before 60 s
    assert not worker.run_once("w")

    # a study whose last instance was recorded a day ahead is routed after its quiet period
    study = "1.2.4"
    iid = _instance(db, ahead, study)
    _awaiting_route(db, study, iid, ahead)
    router = Router(cfg, db=db, clock=clock, metrics=Metrics())
    assert router.run_once() == 1
    with db.session() as s:
        routed = s.execute(select(Delivery).where(Delivery.study_instance_uid == study)).scalars()
        assert len(list(routed)) == 1


def test_study_quiet_period_follows_elapsed_time(cfg: GatewayConfig, db: Database) -> None:
    t = FakeTime()
    clock = t.clock()
    study = "1.2.5"
    now = clock.now()
    iid = _instance(db, now, study)
    _awaiting_route(db, study, iid, now)
    router = Router(cfg, db=db, clock=clock, metrics=Metrics())
    t.step_wall(HOUR)  # a forward jump does not make the study quiet early
    t.elapse(5)
    assert router.run_once() == 0
    t.step_wall(-2 * HOUR)  # a backward jump does not hold it back
    t.elapse(26)
    assert router.run_once() == 1


def test_audit_times_stay_utc_and_ordered_when_the_wall_clock_goes_back(db: Database) -> None:
    t = FakeTime()
    clock = t.clock()
    for i in range(6):
        if i == 3:
            t.step_wall(-HOUR)
        t.elapse(1)
        with db.session() as s:
            append(s, AuditRecord("c-echo", "success", "CT1", "GATEWAY"), node="n", now=clock.now())
    with db.session() as s:
        rows = list(s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars())
    seqs = [r.seq for r in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    times = [r.recorded_at for r in rows][-6:]
    assert times == sorted(times), "audit times went back with the wall clock"
    for r in rows[-6:]:  # read back as aware UTC times
        assert r.recorded_at.utcoffset() == timedelta(0)
    assert times[-1] - times[0] == timedelta(seconds=5)
