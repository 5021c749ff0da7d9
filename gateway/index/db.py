"""Engine, sessions and migrations for the index (SQLite by default, PostgreSQL by URL).

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk when it returns) and
every transaction opens with ``BEGIN IMMEDIATE``, so two writers never race on a stale
snapshot. PostgreSQL runs at READ COMMITTED; work queues use ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gateway.errors import IndexError_

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
_READ_ONLY = "gateway_read_only"


class Database:
    """The index: an engine, a session factory and the schema migrations."""

    def __init__(self, url: str, *, busy_timeout: float = 10.0) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                url,
                connect_args={"timeout": busy_timeout, "check_same_thread": False},
                pool_size=8,
                max_overflow=16,
            )
            _sqlite_setup(self.engine, busy_timeout)
        else:
            self.engine = create_engine(
                url,
                pool_size=8,
                max_overflow=16,
                pool_pre_ping=True,
                connect_args={"connect_timeout": max(1, int(busy_timeout))},
            )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time and every transaction here begins IMMEDIATE: queue
        # the node's own threads on a lock rather than in SQLite's sleeping busy handler,
        # which backs off for milliseconds per retry under concurrent associations.
        self._writer: contextlib.AbstractContextManager[object] = (
            threading.RLock() if self.is_sqlite else contextlib.nullcontext()
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One unit of work: committed on success, rolled back on any exception.

        Database failures surface as :class:`IndexError_`; a connection lost while the
        session flushed or committed at the end as :class:`CommitOutcomeUnknown`.
        """
        done = False
        try:
            with self._writer, self._sessions() as s, s.begin():
                yield s
                done = True  # what fails from here on fails in the flush or the commit
        except SQLAlchemyError as exc:
            raise _index_error(exc, committing=done) from exc

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only unit of work: no writer lock and, on SQLite, a deferred ``BEGIN``, so
        it neither waits for the writer nor holds others up (a WAL reader sees the last
        commit). For polling and gauges; anything that writes uses :meth:`session`.

        Database failures surface as :class:`IndexError_`.
        """
        try:
            with self._sessions() as s, s.begin():
                s.connection(execution_options={_READ_ONLY: True})
                yield s
        except SQLAlchemyError as exc:
            raise IndexError_(f"index read failed: {exc.__class__.__name__}") from exc

    def migrate(self) -> None:
        """Bring the schema to the newest migration."""
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def dispose(self) -> None:
        self.engine.dispose()


class LostConnection(IndexError_):
    """A transaction's connection was found dead (a disconnect) before its commit: nothing
    of the transaction is in the index."""


class CommitOutcomeUnknown(IndexError_):
    """The connection was lost while its commit was under way: the server may have made the
    transaction durable or not, and whoever ran it cannot tell. Nothing the transaction
    names may be undone (a spool file its rows would name stays for the start-up sweep to
    judge), and it must not run again (it would find its own rows)."""


def _index_error(exc: SQLAlchemyError, *, committing: bool) -> IndexError_:
    """What a failed write transaction raises: the connection lost during the commit
    (:class:`CommitOutcomeUnknown`), lost before it (:class:`LostConnection`), or any other
    failure (:class:`IndexError_`)."""
    text = f"index transaction failed: {exc.__class__.__name__}"
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return CommitOutcomeUnknown(text) if committing else LostConnection(text)
    return IndexError_(text)


HELD_IDLE = 1.0
"""A held connection unused for longer than this (s) goes back to the pool before the next
transaction, which checks one out again (with PostgreSQL's pre-ping)."""


class HeldConnection:
    """A connection kept checked out between write transactions, for the ingest's group
    commit, which runs one transaction per received instance.

    A transaction through :meth:`Database.session` makes an ORM session, checks a connection
    out of the pool, and closes both after the commit: ~0.2 ms of Python per instance, as much
    as the statements of the transaction on the DBAPI cursor (:mod:`gateway.index.prepared`).
    Here a transaction is ``Connection.begin()`` on a connection kept from the last one
    (``BEGIN IMMEDIATE`` on SQLite, behind the node's writer lock as for a session); its
    commit is the same. The connection is given up, and a new one checked out next time,
    when a transaction fails (it may be the connection that failed: a restarted PostgreSQL)
    and when it lay unused for :data:`HELD_IDLE` (the pool's pre-ping then checks it).

    Database failures surface as :class:`IndexError_`, as from :meth:`Database.session`.
    Safe from several threads: one that finds the connection taken checks out its own.
    """

    def __init__(self, db: Database, *, idle: float = HELD_IDLE) -> None:
        self.db = db
        self.idle = idle
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._since = 0.0

    def _take(self) -> Connection | None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and (conn.invalidated or time.monotonic() - self._since > self.idle):
            _close_quietly(conn)
            return None
        return conn

    def _keep(self, conn: Connection) -> None:
        with self._lock:
            if self._conn is None:
                self._conn, self._since = conn, time.monotonic()
                return
        _close_quietly(conn)  # another thread's connection is kept

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction, committed on success, rolled back on any exception.

        Raises :class:`LostConnection` when the connection was found dead before the commit
        (nothing of the transaction is in the index, so it may run again), and
        :class:`CommitOutcomeUnknown` when it was lost during the commit."""
        conn = self._take()
        committing = False
        try:
            with self.db._writer:
                if conn is None:
                    conn = self.db.engine.connect()
                trans = conn.begin()
                try:
                    yield conn
                except BaseException:
                    trans.rollback()
                    raise
                committing = True
                trans.commit()
        except BaseException as exc:
            if conn is not None:
                _close_quietly(conn)
            if not isinstance(exc, SQLAlchemyError):
                raise
            raise _index_error(exc, committing=committing) from exc
        self._keep(conn)

    def close(self) -> None:
        """Give the held connection back (the next transaction checks one out again)."""
        conn = self._take()
        if conn is not None:
            _close_quietly(conn)


def _close_quietly(conn: Connection) -> None:
    """Back to the pool (discarded there when invalidated); a broken one may fail to roll
    back on its way: it is gone either way."""
    try:
        conn.close()
    except SQLAlchemyError:
        log.debug("a held index connection failed to close", exc_info=True)


# A writer that finds another process's write lock polls for it at these intervals (doubling
# from the first), up to the busy timeout.
LOCK_POLL_FIRST = 0.0002
LOCK_POLL_MAX = 0.001


def _sqlite_setup(engine: Engine, busy_timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        read_only = conn.get_execution_options().get(_READ_ONLY, False)
        statement = "BEGIN" if read_only else "BEGIN IMMEDIATE"
        # on the driver's connection: every transaction begins here, and SQLAlchemy's
        # execution of the statement (~0.2 ms of Python in the node) was most of the cost
        dbapi_connection = conn.connection.dbapi_connection
        try:
            if read_only:
                dbapi_connection.execute(statement)
            else:
                _begin_immediate(dbapi_connection, busy_timeout)
        except sqlite3.Error as exc:  # as SQLAlchemy's execution raises it ("locked")
            raise DBAPIError.instance(statement, (), exc, sqlite3.Error) from exc


def _begin_immediate(dbapi_connection: Any, busy_timeout: float) -> None:
    """``BEGIN IMMEDIATE``, waiting at most ``busy_timeout`` for another process's write lock
    (receiver processes, the delivery worker's process): polled every 0.2-1 ms, where
    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between tries. Within a
    process, writers queue on ``Database._writer`` instead. The connection's busy timeout,
    which every other statement keeps, is off only for these tries."""
    deadline = time.monotonic() + busy_timeout
    delay = LOCK_POLL_FIRST
    dbapi_connection.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                busy = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
                left = deadline - time.monotonic()
                if not busy or left <= 0:
                    raise
            time.sleep(min(delay, left))
            delay = min(delay * 2, LOCK_POLL_MAX)
    finally:
        dbapi_connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
