"""Statements on the DBAPI cursor (gateway/index/prepared.py), on SQLite and PostgreSQL:
they write what SQLAlchemy's own execution writes, within the session's transaction, and
fail as it fails."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Table, insert, select
from sqlalchemy.exc import DBAPIError, NoResultFound

from gateway.audit.chain import AuditRecord, append, verify
from gateway.errors import IndexError_
from gateway.index import deliveries
from gateway.index.db import Database
from gateway.index.models import (
    AuditEvent,
    Delivery,
    DeliveryItem,
    Instance,
    RouteCandidate,
    Study,
)
from gateway.index.prepared import Prepared
from gateway.ingest import service

_INSTANCES = cast(Table, Instance.__table__)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    else:
        url, _schema = request.getfixturevalue("pg_schema_url")
    db = Database(url)
    db.migrate()
    assert db.engine.dialect.name == request.param
    try:
        yield db
    finally:
        db.dispose()


def _instance(key: str, uid: str, received_at: datetime) -> dict[str, Any]:
    return {
        "spool_key": key,
        "sop_instance_uid": uid,
        "version": 1,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "modality": "CT",
        "instance_number": "7",
        "size": 5_000_000_000,  # past 32 bits: a BIGINT
        "sha256": "ab" * 32,
        "received_at": received_at,
        "calling_ae_title": "MODALITY",
        "called_ae_title": "GATEWAY",
        "calling_address": "127.0.0.1",
        "association_id": "a1",
    }


def test_rows_are_what_sqlalchemy_writes(database: Database) -> None:
    # an aware time in another zone and a naive one (taken as UTC), as UTCDateTime takes them
    aware = datetime(2026, 12, 7, 6, 30, 15, 123456, tzinfo=timezone(timedelta(hours=1)))
    naive = datetime(2026, 12, 7, 5, 30, 15, 123456)
    with database.session() as s:
        conn = s.connection()
        (prepared_id,) = service._RUN_INSERT_INSTANCE.one(conn, _instance("k1", "1.9.1", aware))
        core_id = conn.execute(
            insert(_INSTANCES).returning(_INSTANCES.c.id), _instance("k2", "1.9.2", naive)
        ).scalar_one()
        assert isinstance(prepared_id, int) and prepared_id != core_id
    with database.read() as s:
        rows = {r.spool_key: r for r in s.execute(select(Instance)).scalars()}
        raw = dict(
            s.connection().exec_driver_sql("SELECT spool_key, received_at FROM instances").all()
        )
    a, b = rows["k1"], rows["k2"]
    assert a.received_at == b.received_at == datetime(2026, 12, 7, 5, 30, 15, 123456, tzinfo=UTC)
    assert raw["k1"] == raw["k2"]  # the same stored form (SQLite: the same text)
    for column in _instance("", "", aware):
        if column not in ("spool_key", "sop_instance_uid"):
            assert getattr(a, column) == getattr(b, column), column
    with database.read() as s:
        conn = s.connection()
        assert service._RUN_VERSIONS.all(conn, {"sop_instance_uid": "1.9.1"}) == [(1, "ab" * 32)]
        assert service._RUN_VERSIONS.all(conn, {"sop_instance_uid": "1.9.9"}) == []
        assert service._RUN_VERSIONS.first(conn, {"sop_instance_uid": "1.9.9"}) is None
        with pytest.raises(NoResultFound):
            service._RUN_VERSIONS.one(conn, {"sop_instance_uid": "1.9.9"})


def test_literal_values_and_rowcounts(database: Database) -> None:
    now = datetime(2026, 12, 7, 5, 0, tzinfo=UTC)
    later = now + timedelta(minutes=3)
    with database.session() as s:
        s.add(
            Study(
                study_instance_uid="1.2.3",
                instance_count=1,
                first_received_at=now,
                last_received_at=now,
            )
        )
    with database.session() as s:
        conn = s.connection()
        # the statement's "+ 1" is a literal bind: not named by the caller
        assert service._RUN_STUDY_SEEN.rowcount(conn, {"uid": "1.2.3", "received_at": later}) == 1
        assert service._RUN_STUDY_SEEN.rowcount(conn, {"uid": "1.2.3", "received_at": later}) == 1
        assert service._RUN_STUDY_SEEN.rowcount(conn, {"uid": "9.9", "received_at": later}) == 0
    with database.read() as s:
        study = s.execute(select(Study)).scalar_one()
    assert study.instance_count == 3
    assert study.last_received_at == later


def test_audit_chain_written_on_the_cursor_verifies(database: Database) -> None:
    """The chain hashes each row's recorded_at as read back: a stored time that differed
    from the hashed one would fail verification."""
    times = [
        datetime(2026, 12, 7, 5, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 12, 7, 6, 0, 0, 999999, tzinfo=timezone(timedelta(hours=-5))),
        datetime(2026, 12, 7, 5, 0, 1),
    ]
    with database.session() as s:
        seqs = [
            append(
                s,
                AuditRecord("c-store", "success", "MOD\x1b[31m", "GATEWAY", detail={"n": i}),
                node="node-a",
                now=t,
            )
            for i, t in enumerate(times)
        ]
    assert seqs == [1, 2, 3]
    with database.read() as s:
        assert verify(s) == 3
        first = s.execute(select(AuditEvent).where(AuditEvent.seq == 1)).scalar_one()
    assert first.calling_ae_title == "MOD\\x1b[31m"  # escaped as before


def test_driver_error_fails_the_transaction_as_sqlalchemy_does(database: Database) -> None:
    now = datetime(2026, 12, 7, 5, 0, tzinfo=UTC)
    with database.session() as s:
        service._RUN_INSERT_INSTANCE.one(s.connection(), _instance("k1", "1.9.1", now))
    with pytest.raises(IndexError_, match="IntegrityError"), database.session() as s:
        conn = s.connection()
        service._RUN_INSERT_INSTANCE.one(conn, _instance("k2", "1.9.2", now))
        try:
            service._RUN_INSERT_INSTANCE.one(conn, _instance("k1", "1.9.3", now))  # spool_key
        except DBAPIError as exc:
            assert "instances" in str(exc.statement)
            raise
    with database.read() as s:  # the whole transaction rolled back
        keys = s.execute(select(Instance.spool_key)).scalars().all()
    assert keys == ["k1"]
    with database.session() as s:  # and the connection serves the next one
        service._RUN_INSERT_INSTANCE.one(s.connection(), _instance("k3", "1.9.4", now))


def test_a_column_default_must_be_given(database: Database) -> None:
    """SQLAlchemy fills column defaults during its execution, which the cursor skips."""
    partial = Prepared(insert(_INSTANCES), ["spool_key", "sop_instance_uid"])
    with database.session() as s, pytest.raises(ValueError, match="version"):
        partial.rowcount(s.connection(), {"spool_key": "k", "sop_instance_uid": "1.2"})


def test_a_locked_sqlite_index_fails_the_transaction_as_index_error(tmp_path: Path) -> None:
    """Every SQLite transaction begins on the driver's connection (BEGIN IMMEDIATE in the
    engine's begin event): a writer that cannot get the lock within the busy timeout is an
    IndexError_, as it was through SQLAlchemy's execution; a reader is not held up (WAL)."""
    import sqlite3

    path = tmp_path / "index.sqlite3"
    db = Database(f"sqlite:///{path}", busy_timeout=0.2)
    db.migrate()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(IndexError_, match="OperationalError"), db.session() as s:
            s.connection()
        with db.read() as s:  # a deferred BEGIN: reads the last commit
            assert s.execute(select(Instance)).all() == []
        holder.execute("ROLLBACK")
        with db.session() as s:  # the lock gone, the next writer goes ahead
            service._RUN_INSERT_INSTANCE.one(
                s.connection(), _instance("k1", "1.9.1", datetime(2026, 12, 7, tzinfo=UTC))
            )
    finally:
        holder.close()
        db.dispose()


def test_a_writer_waits_for_another_processes_lock_then_goes_ahead(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE polls for the write lock another connection holds (SQLite's busy
    handler is off only for those tries): the writer goes ahead once it is released, and
    the connection keeps its busy timeout for everything else."""
    import sqlite3
    import threading

    path = tmp_path / "index.sqlite3"
    db = Database(f"sqlite:///{path}", busy_timeout=5.0)
    db.migrate()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    releasing = threading.Event()

    def release() -> None:
        releasing.set()
        holder.execute("ROLLBACK")

    timer = threading.Timer(0.3, release)
    timer.start()
    try:
        with db.session() as s:
            conn = s.connection()
            assert releasing.is_set()  # it waited for the lock, then took it
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            service._RUN_INSERT_INSTANCE.one(
                conn, _instance("k1", "1.9.1", datetime(2026, 12, 7, tzinfo=UTC))
            )
        with db.read() as s:
            assert s.execute(select(Instance.spool_key)).scalars().all() == ["k1"]
    finally:
        timer.cancel()
        timer.join()  # the holder is closed only once its thread is done with it
        holder.close()
        db.dispose()


def test_begin_errors_other_than_busy_are_not_retried(tmp_path: Path) -> None:
    from gateway.index import db as db_module

    class Refusing:
        def __init__(self) -> None:
            self.statements: list[str] = []

        def execute(self, statement: str) -> None:
            self.statements.append(statement)
            if statement == "BEGIN IMMEDIATE":
                import sqlite3

                raise sqlite3.OperationalError("disk I/O error")

    refusing = Refusing()
    with pytest.raises(Exception, match="disk I/O error"):
        db_module._begin_immediate(refusing, 5.0)
    # one try, and the busy timeout put back
    assert refusing.statements == [
        "PRAGMA busy_timeout = 0",
        "BEGIN IMMEDIATE",
        "PRAGMA busy_timeout = 5000",
    ]


def test_a_streamed_instance_joins_its_delivery_on_the_cursor(database: Database) -> None:
    """A stream route's rows as the ingest writes them, on a connection in a transaction: the
    study's first instance starts the delivery (an ORM session joined to the transaction),
    the next ones join it on the cursor (its lookup with FOR UPDATE SKIP LOCKED on
    PostgreSQL, the item, the count), and a route candidate row each."""
    now = datetime(2026, 12, 7, 5, 0, tzinfo=UTC)
    with database.session() as s:
        conn = s.connection()
        ids = [
            service._RUN_INSERT_INSTANCE.one(conn, _instance(f"k{n}", f"1.9.{n}", now))[0]
            for n in range(3)
        ]
    delivery_ids = []
    for n, instance_id in enumerate(ids):
        with database.engine.begin() as conn:
            delivery_ids.append(
                deliveries.append_to_open(
                    conn,
                    study_instance_uid="1.2.3",
                    route_name="r",
                    destination="pacs",
                    profile="",
                    instance_id=instance_id,
                    now=now + timedelta(seconds=n),
                )
            )
            candidate = {
                "instance_id": instance_id,
                "study_instance_uid": "1.2.3",
                "route_name": "r",
                "routed": 1,
            }
            assert service._RUN_INSERT_CANDIDATE.rowcount(conn, candidate) == 1
    assert len(set(delivery_ids)) == 1
    with database.read() as s:
        delivery = s.execute(select(Delivery)).scalar_one()
        items = s.execute(select(DeliveryItem).order_by(DeliveryItem.id)).scalars().all()
        candidates = s.execute(select(RouteCandidate)).scalars().all()
    assert delivery.id == delivery_ids[0] and delivery.instance_count == 3
    assert delivery.updated_at == now + timedelta(seconds=2)
    assert [(i.instance_id, i.state, i.reason, i.status) for i in items] == [
        (i, "pending", "", None) for i in ids
    ]
    assert sorted(c.instance_id for c in candidates) == ids and all(c.routed for c in candidates)
