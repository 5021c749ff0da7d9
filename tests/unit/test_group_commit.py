"""Group commit: concurrent units of work share transactions, each answered after its commit."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from gateway.audit.chain import AuditRecord, append, verify
from gateway.errors import IndexError_
from gateway.index.db import Database
from gateway.index.group_commit import GroupCommit
from gateway.index.models import AuditEvent

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _count_commits(db: Database) -> list[int]:
    commits = [0]

    @event.listens_for(db.engine, "commit")
    def _on_commit(_conn: Any) -> None:
        commits[0] += 1

    return commits


def _record(s: Session, n: int) -> int:
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


def test_a_failing_unit_fails_alone(db: Database) -> None:
    group = GroupCommit(db)
    release = threading.Event()
    started = threading.Event()
    outcomes: dict[str, object] = {}

    def slow(s: Session) -> str:
        started.set()
        release.wait(5)
        _record(s, 0)
        return "slow"

    def bad(s: Session) -> str:
        _record(s, 1)
        raise IndexError_("this unit fails")

    def good(s: Session) -> str:
        _record(s, 2)
        return "good"

    def call(name: str, work: Any) -> None:
        try:
            outcomes[name] = group.run(work)
        except IndexError_ as exc:
            outcomes[name] = exc

    first = threading.Thread(target=call, args=("slow", slow))
    first.start()
    assert started.wait(5)
    # queued behind the slow leader, so the next leader runs these two in one batch
    others = [
        threading.Thread(target=call, args=("bad", bad)),
        threading.Thread(target=call, args=("good", good)),
    ]
    for t in others:
        t.start()
    while len(group._queue) < 2:
        threading.Event().wait(0.01)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert outcomes["slow"] == "slow" and outcomes["good"] == "good"
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
