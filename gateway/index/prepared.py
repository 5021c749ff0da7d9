"""Statements run for every received instance, compiled once and run on the DBAPI cursor.

``Connection.execute`` of a Core statement costs ~70 us of Python per call here beside the
driver's own ~10-20 us: a cache key built from the statement, the compiled form looked up,
an execution context, events and a result object. The ingest transaction runs seven such
statements per instance (1.4-1.9 ms with SQLAlchemy against 0.6 ms on the cursor, its
commit included), so those few are compiled by SQLAlchemy once per dialect, with its own
bind processors (the UTC datetimes), and executed on the session connection's DBAPI
cursor, inside the same transaction. A driver error is raised as SQLAlchemy's
:class:`~sqlalchemy.exc.DBAPIError`, as ``Connection.execute`` raises it, so the
transaction's callers see no difference.

Only for statements whose parameters all come from the call (or are literal values in the
statement) and whose results need no conversion (integers and text).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

Row = tuple[Any, ...]
_LITERAL = object()


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # bind names, in the SQL's order
    keys: tuple[str | None, ...]  # the caller's key for each, or None for a literal
    literals: tuple[Any, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    positional: bool


def connection_of(session: Session | Connection) -> Connection:
    """The connection of a session's transaction, or the connection itself (the ingest's
    group commit hands its units a connection in a transaction, not a session)."""
    return session if isinstance(session, Connection) else session.connection()


class Prepared:
    """``statement`` compiled per dialect on first use (``column_keys``: an INSERT's columns,
    as the parameters will name them)."""

    def __init__(self, statement: ClauseElement, column_keys: Sequence[str] | None = None) -> None:
        self.statement = statement
        self.column_keys = list(column_keys) if column_keys is not None else None
        self._by_dialect: dict[str, _Compiled] = {}
        self._lock = threading.Lock()

    def _compiled(self, conn: Connection) -> _Compiled:
        dialect = conn.dialect
        found = self._by_dialect.get(dialect.name)
        if found is not None:
            return found
        compiled = self.statement.compile(dialect=dialect, column_keys=self.column_keys)
        assert isinstance(compiled, SQLCompiler)
        names = (
            tuple(compiled.positiontup or ())
            if dialect.positional
            else tuple(compiled.bind_names.values())
        )
        keys: list[str | None] = []
        literals: list[Any] = []
        processors: list[Callable[[Any], Any] | None] = []
        for name in names:
            bind = compiled.binds[name]
            # a column default is applied by SQLAlchemy's execution, which this skips: such a
            # bind (not required, no value) must be named in the parameters instead
            if (
                bind.expanding
                or bind.callable is not None
                or (not bind.required and bind.value is None)
            ):
                raise ValueError(f"{name}: not a parameter given or a literal value")
            keys.append(bind.key if bind.required else None)
            literals.append(_LITERAL if bind.required else bind.value)
            processors.append(bind.type.dialect_impl(dialect).bind_processor(dialect))
        found = _Compiled(
            compiled.string,
            names,
            tuple(keys),
            tuple(literals),
            tuple(processors),
            bool(dialect.positional),
        )
        with self._lock:
            self._by_dialect.setdefault(dialect.name, found)
        return found

    def _execute(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        c = self._compiled(conn)
        values = [
            params[key] if key is not None else literal
            for key, literal in zip(c.keys, c.literals, strict=True)
        ]
        for i, process in enumerate(c.processors):
            if process is not None:
                values[i] = process(values[i])
        bound: Sequence[Any] | dict[str, Any] = (
            tuple(values) if c.positional else dict(zip(c.names, values, strict=True))
        )
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None
        cursor = dbapi_connection.cursor()
        dbapi_error: type[Exception] = conn.dialect.loaded_dbapi.Error
        try:
            cursor.execute(c.sql, bound)
        except dbapi_error as exc:
            invalidated = conn.dialect.is_disconnect(cast(Any, exc), dbapi_connection, cursor)
            cursor.close()
            if invalidated:
                conn.invalidate(exc)
            raise DBAPIError.instance(
                c.sql, bound, exc, dbapi_error, connection_invalidated=invalidated
            ) from exc
        return cursor

    def all(self, conn: Connection, params: Mapping[str, Any] | None = None) -> list[Row]:
        """Every row of the result."""
        cursor = self._execute(conn, params or {})
        try:
            return [tuple(row) for row in cursor.fetchall()]
        finally:
            cursor.close()

    def first(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Row | None:
        """The first row (None when there is none); the rest are read and dropped, as a
        statement with RETURNING must be read to its end."""
        rows = self.all(conn, params)
        return rows[0] if rows else None

    def one(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Row:
        """Exactly one row, as ``Result.one()``."""
        rows = self.all(conn, params)
        if not rows:
            raise NoResultFound("No row was found when one was required")
        if len(rows) > 1:
            raise MultipleResultsFound("Multiple rows were found when exactly one was required")
        return rows[0]

    def rowcount(self, conn: Connection, params: Mapping[str, Any] | None = None) -> int:
        """Rows an INSERT, UPDATE or DELETE wrote or matched."""
        cursor = self._execute(conn, params or {})
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()
