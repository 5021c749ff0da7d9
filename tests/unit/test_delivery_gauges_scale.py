"""The delivery gauges on a node that has made many deliveries, on a real SQLite index.

Unfinished deliveries (pending, in progress, waiting to retry) are counted, and the oldest
one's age found, every second: through the claim index, without reading every delivery ever
made. The states a delivery ends in are counted only when asked (the node asks every
``ENDED_GAUGE_INTERVAL`` seconds).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, text

from gateway.clock import SystemClock
from gateway.index.db import Database
from gateway.index.models import Delivery
from gateway.metrics import Metrics
from gateway.routing.router import Router
from tests.unit.test_clock_jumps import worker_config

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
DELIVERED = 3000


def _rows(state: str, count: int, first: int, created: datetime) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{first + i:032x}",
            "study_instance_uid": f"1.2.826.0.1.{first + i}",
            "route_name": "all",
            "destination": "pacs",
            "profile": "",
            "state": state,
            "attempts": 1,
            "next_attempt_at": created,
            "created_at": created + timedelta(seconds=i),
            "updated_at": created,
            "last_error": "",
            "instance_count": 1,
            "sent_count": 0,
            "warning_count": 0,
            "failed_count": 0,
        }
        for i in range(count)
    ]


@pytest.fixture
def router(tmp_path: Path) -> Router:
    cfg = worker_config(tmp_path, "")
    db = Database(cfg.database_url)
    db.migrate()
    with db.session() as s:
        conn = s.connection()
        conn.execute(insert(Delivery), _rows("delivered", DELIVERED, 0, T0 - timedelta(days=30)))
        conn.execute(insert(Delivery), _rows("failed", 3, 10_000, T0 - timedelta(days=2)))
        conn.execute(insert(Delivery), _rows("retry_wait", 1, 20_000, T0 + timedelta(seconds=5)))
        conn.execute(insert(Delivery), _rows("pending", 2, 30_000, T0 + timedelta(seconds=10)))
        conn.execute(insert(Delivery), _rows("in_progress", 1, 40_000, T0 + timedelta(seconds=20)))
    now = (T0 + timedelta(seconds=100)).timestamp()
    clock = SystemClock(wall=lambda: now, monotonic=lambda: 100.0)
    return Router(cfg, db=db, clock=clock, metrics=Metrics())


def _gauge(router: Router, name: str, **labels: str) -> float | None:
    return router.metrics.registry.get_sample_value(name, labels)


def _statements(router: Router, ended: bool) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(router.db.engine, "before_cursor_execute", record)
    try:
        router.update_gauges(ended=ended)
    finally:
        event.remove(router.db.engine, "before_cursor_execute", record)
    return seen


def test_unfinished_deliveries_are_counted_through_the_index(router: Router) -> None:
    statements = _statements(router, ended=False)
    assert len(statements) == 2
    with router.db.read() as s:
        conn = s.connection()
        for statement, parameters in statements:
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
            details = [row[-1] for row in plan]
            # "SCAN deliveries" (with or without a covering index) reads every row ever made;
            # the old gauges' NOT IN and unfiltered GROUP BY both did
            assert not any(d.startswith("SCAN deliveries") for d in details), (statement, details)
            assert any("ix_deliveries_claim" in d for d in details), (statement, details)
    assert _gauge(router, "gateway_deliveries", state="retry_wait") == 1
    assert _gauge(router, "gateway_deliveries", state="pending") == 2
    assert _gauge(router, "gateway_deliveries", state="in_progress") == 1
    assert _gauge(router, "gateway_oldest_pending_delivery_seconds") == 95.0
    # the ended states were not counted: their gauges are not set yet
    assert not _gauge(router, "gateway_deliveries", state="delivered")
    assert not _gauge(router, "gateway_deliveries", state="failed")


def test_ended_states_are_counted_when_asked_and_kept_between(router: Router) -> None:
    router.update_gauges()
    assert _gauge(router, "gateway_deliveries", state="delivered") == DELIVERED
    assert _gauge(router, "gateway_deliveries", state="failed") == 3
    assert _gauge(router, "gateway_deliveries", state="quarantined") == 0
    assert _gauge(router, "gateway_deliveries", state="pending") == 2
    with router.db.session() as s:
        s.execute(text("UPDATE deliveries SET state = 'delivered' WHERE state = 'pending'"))
    router.update_gauges(ended=False)
    assert _gauge(router, "gateway_deliveries", state="pending") == 0
    assert _gauge(router, "gateway_deliveries", state="delivered") == DELIVERED  # as last counted
    router.update_gauges(ended=True)
    assert _gauge(router, "gateway_deliveries", state="delivered") == DELIVERED + 2
    assert _gauge(router, "gateway_oldest_pending_delivery_seconds") == 95.0
