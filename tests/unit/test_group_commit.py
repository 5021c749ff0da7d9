"""Group commit: concurrent units of work share transactions, each answered after its commit."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, event, func, select
from sqlalchemy.exc import OperationalError

from gateway.audit.chain import AuditRecord, append, verify
from gateway.errors import IndexError_
from gateway.index.db import Database, HeldConnection
from gateway.index.group_commit import GroupCommit
from gateway.index.models import AuditEvent

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _count_commits(db: Database) -> list[int]:
    commits = [0]

    @event.listens_for(db.engine, "commit")
    def _on_commit(_conn: Any) -> None:
        commits[0] += 1

    return commits


def _record(s: Connection, n: int) -> int:
    return append(s, AuditRecord("c-store", "success", detail={"n": n}), node="n", now=T0)


def test_concurrent_units_share_commits_and_each_sees_its_own_result(db: Database) -> None:
    commits = _count_commits(db)
    group = GroupCommit(db)
    gate = threading.Barrier(8)
    results: dict[int, int] = {}

    def worker(n: int) -> None:
        gate.wait()
        for i in range(25):
            results[n * 100 + i] = group.run(lambda s, k=n * 100 + i: (_record(s, k), k)[1])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {k: k for k in results} and len(results) == 200
    with db.session() as s:
        assert verify(s) == 200
        assert s.execute(select(func.count()).select_from(AuditEvent)).scalar_one() == 200
    # 8 threads queued on one writer: batches formed, so fewer commits than units
    assert commits[0] < 200


def _behind_a_slow_leader(
    group: GroupCommit,
    bad: tuple[Any, Any],
    good: tuple[Any, Any],
    error: type[BaseException],
) -> dict[str, object]:
    """Units ``bad`` and ``good`` ((work, ready) each) queued behind a slow leader, so the
    next leader runs them in one batch; each one's result, or its ``error``."""
    release = threading.Event()
    started = threading.Event()
    outcomes: dict[str, object] = {}

    def slow(s: Connection) -> str:
        started.set()
        release.wait(5)
        _record(s, 0)
        return "slow"

    def call(name: str, work: Any, ready: Any = None) -> None:
        try:
            outcomes[name] = group.run(work, ready=ready)
        except error as exc:
            outcomes[name] = exc

    first = threading.Thread(target=call, args=("slow", slow))
    first.start()
    assert started.wait(5)
    others = [
        threading.Thread(target=call, args=("bad", *bad)),
        threading.Thread(target=call, args=("good", *good)),
    ]
    for t in others:
        t.start()
    while len(group._queue) < 2:
        threading.Event().wait(0.01)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert outcomes["slow"] == "slow" and outcomes["good"] == "good"
    return outcomes


def test_a_failing_unit_fails_alone(db: Database) -> None:
    def bad(s: Connection) -> str:
        _record(s, 1)
        raise IndexError_("this unit fails")

    def good(s: Connection) -> str:
        _record(s, 2)
        return "good"

    outcomes = _behind_a_slow_leader(GroupCommit(db), (bad, None), (good, None), IndexError_)
    assert isinstance(outcomes["bad"], IndexError_)
    with db.session() as s:
        assert verify(s) == 2  # the failed unit left nothing; the chain is whole
        details = sorted(s.execute(select(AuditEvent.detail)).scalars())
    assert details == ['{"n":0}', '{"n":2}']


def test_a_failed_commit_reaches_every_caller(db: Database) -> None:
    group = GroupCommit(db)

    @event.listens_for(db.engine, "commit")
    def _fail(_conn: Any) -> None:
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    with pytest.raises(IndexError_):
        group.run(lambda s: _record(s, 1))


def test_the_commit_waits_for_ready(db: Database) -> None:
    """``ready`` runs after the unit's statements and before the commit: what the unit wrote
    is not in the index until ``ready`` has returned (the ingest's folder fsync)."""
    group = GroupCommit(db)
    in_ready = threading.Event()
    release = threading.Event()
    seen_during_ready: list[int] = []

    def ready() -> None:
        with db.read() as s:  # another connection: sees only what was committed
            seen_during_ready.append(
                s.execute(select(func.count()).select_from(AuditEvent)).scalar_one()
            )
        in_ready.set()
        assert release.wait(5)

    done: list[int] = []
    t = threading.Thread(
        target=lambda: done.append(group.run(lambda s: _record(s, 1), ready=ready))
    )
    t.start()
    assert in_ready.wait(5)
    assert _events(db) == []  # the unit's row is written but not committed
    release.set()
    t.join(5)
    assert done and seen_during_ready == [0]
    assert _events(db) == ['{"n":1}']


def test_a_ready_that_fails_fails_its_unit_alone(db: Database) -> None:
    """In a batch, one unit whose ``ready`` raises (its folder's fsync failed) leaves no row;
    the others are committed."""

    def refuse() -> None:
        raise OSError(5, "Input/output error")

    outcomes = _behind_a_slow_leader(
        GroupCommit(db),
        (lambda s: (_record(s, 1), "bad")[1], refuse),
        (lambda s: (_record(s, 2), "good")[1], lambda: None),
        OSError,
    )
    assert isinstance(outcomes["bad"], OSError)
    assert _events(db) == ['{"n":0}', '{"n":2}']


def _count_checkouts(db: Database) -> list[int]:
    checkouts = [0]

    @event.listens_for(db.engine, "checkout")
    def _on_checkout(*_args: Any) -> None:
        checkouts[0] += 1

    return checkouts


def _events(db: Database) -> list[str]:
    with db.read() as s:
        return sorted(s.execute(select(AuditEvent.detail)).scalars())


def test_transactions_run_on_one_kept_connection(db: Database) -> None:
    checkouts = _count_checkouts(db)
    group = GroupCommit(db)
    for n in range(20):
        assert group.run(lambda c, n=n: _record(c, n)) == n + 1
        # committed: another connection sees the row at once
        assert len(_events(db)) == n + 1
    assert checkouts[0] == 20 + 1  # one per read above, one kept for the 20 transactions
    group.close()
    with db.read() as s:
        assert verify(s) == 20


def test_a_failed_unit_gives_up_the_kept_connection(db: Database) -> None:
    checkouts = _count_checkouts(db)
    group = GroupCommit(db)
    group.run(lambda c: _record(c, 1))

    def bad(c: Connection) -> None:
        _record(c, 2)
        raise IndexError_("this unit fails")

    with pytest.raises(IndexError_, match="this unit fails"):
        group.run(bad)
    group.run(lambda c: _record(c, 3))
    assert checkouts[0] == 2  # the failed transaction's connection was not kept
    assert _events(db) == ['{"n":1}', '{"n":3}']


def test_a_connection_idle_too_long_is_checked_out_again(db: Database) -> None:
    checkouts = _count_checkouts(db)
    held = HeldConnection(db, idle=0.0)
    for n in range(3):
        with held.transaction() as c:
            _record(c, n)
    assert checkouts[0] == 3
    kept = HeldConnection(db, idle=60.0)
    for n in range(3, 6):
        with kept.transaction() as c:
            _record(c, n)
    assert checkouts[0] == 4
    held.close()
    kept.close()
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_kept_connection_the_server_dropped_is_replaced(pg_schema_url: tuple[str, str]) -> None:
    """PostgreSQL ends the kept connection's backend between two transactions (as a restart
    would): the next unit fails on it before any commit, and runs again on a new connection."""
    url, _schema = pg_schema_url
    db = Database(url)
    db.migrate()
    try:
        checkouts = _count_checkouts(db)
        group = GroupCommit(db)
        group.run(lambda c: _record(c, 1))
        pid = group.run(lambda c: c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        with db.engine.connect() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
            other.commit()
        assert group.run(lambda c: _record(c, 2)) == 2
        assert checkouts[0] == 3  # the kept one, the killer, the kept one's successor
        with db.read() as s:
            assert verify(s) == 2
        group.close()
    finally:
        db.dispose()
