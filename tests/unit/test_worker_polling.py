"""Idle delivery worker threads look for due work once per ``poll_interval`` together, not
once each: the real worker on a real SQLite index, its queries counted at the engine. A
delivery that falls due (a retry time reached) is still found within about an interval, and
a wake-up still makes the threads look at once."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from gateway.clock import SystemClock
from gateway.config import GatewayConfig
from gateway.index import deliveries
from gateway.index.db import Database
from gateway.index.models import Delivery
from tests.unit.test_clock_jumps import (
    Refusing,
    _instance,
    _worker,
    pending_delivery,
    worker_config,
)

POLL = 0.1
THREADS = 4


@pytest.fixture
def cfg(tmp_path: Path) -> GatewayConfig:
    return worker_config(
        tmp_path, f"threads = {THREADS}\npoll_interval = {POLL}\nbackoff_initial = 600"
    )


class _Looks:
    """The worker's looks for due work: its ``SELECT ... FROM deliveries`` statements."""

    def __init__(self, db: Database) -> None:
        self.count = 0
        self._lock = threading.Lock()
        event.listen(db.engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM deliveries" in statement:
            with self._lock:
                self.count += 1


def test_idle_threads_look_once_per_interval_together(cfg: GatewayConfig, db: Database) -> None:
    looks = _Looks(db)
    worker = _worker(cfg, db, SystemClock(), Refusing())
    worker.start()
    try:
        time.sleep(0.5)  # the first look of each thread
        before = looks.count
        time.sleep(2.0)
        during = looks.count - before
    finally:
        worker.stop(timeout=5)
    # one look per interval is ~20 in 2 s; four threads looking each would be ~80
    assert 8 <= during <= 30, f"{during} looks in 2 s at poll_interval {POLL}"


def test_a_delivery_falling_due_is_found_and_a_wake_up_looks_at_once(
    cfg: GatewayConfig, db: Database
) -> None:
    dest = Refusing()
    clock = SystemClock()
    worker = _worker(cfg, db, clock, dest)
    now = clock.now()
    with db.session() as s:
        delivery = pending_delivery(s, db, now, claimable_at=now + timedelta(seconds=1))
        did = delivery.id
    worker.start()
    try:
        deadline = time.monotonic() + 3
        while dest.attempts == 0:  # due 1 s from now, found by a timed look
            assert time.monotonic() < deadline, "a delivery that fell due was not found"
            time.sleep(0.02)
        with db.session() as s:
            row = s.get(Delivery, did)
            assert row is not None
            row.next_attempt_at = clock.now()  # due again now; only a wake-up says so
        worker.wakeup.set()
        deadline = time.monotonic() + 1
        while dest.attempts < 2:
            assert time.monotonic() < deadline, "a wake-up did not make a thread look"
            time.sleep(0.02)
    finally:
        worker.stop(timeout=5)


def test_a_streamed_study_that_stops_is_sent_after_a_quiet_not_its_linger(
    tmp_path: Path, db: Database
) -> None:
    """A streaming delivery no instance has joined for STREAM_QUIET is claimable: the wake-up
    of its last instance makes the look that finds it, long before its linger (30 s here)
    and the next timed look (5 s)."""
    cfg = worker_config(tmp_path, "threads = 2\npoll_interval = 5\nbackoff_initial = 600")
    dest = Refusing()
    clock = SystemClock()
    worker = _worker(cfg, db, clock, dest)
    worker.start()
    try:
        time.sleep(0.3)  # the threads' first looks, before the study arrives
        now = clock.now()
        with db.session() as s:
            deliveries.append_to_open(
                s,
                study_instance_uid="1.2.3",
                route_name="all",
                destination="pacs",
                profile="",
                instance_id=_instance(db, now),
                now=now,
                linger=timedelta(seconds=30),
            )
        worker.wakeup.set()  # as the ingest does for a streamed instance
        deadline = time.monotonic() + 2
        while dest.attempts == 0:
            assert time.monotonic() < deadline, "a quiet streamed study was not sent"
            time.sleep(0.02)
    finally:
        worker.stop(timeout=5)
