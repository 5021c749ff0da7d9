"""Group commit: units of work from several threads committed in one index transaction.

Each received instance needs its index and audit rows committed before its C-STORE response,
and every commit is an fsync of the write-ahead log. With several associations at once the
threads queue on the one writer anyway, so whichever thread finds no batch running leads: it
takes every unit of work queued so far, runs them in order in one transaction and commits
once; each caller returns only after the commit that holds its rows (or raises). The order
of durability for each caller is unchanged: its spool file is fsync'd and renamed before it
submits, and it answers the peer only when :meth:`GroupCommit.run` has returned.

A unit of work that raises makes the batch roll back; the units are then run again, each in a
transaction of its own, so one bad instance never fails the others and each caller gets its
own outcome. Not when the connection was lost during the commit
(:class:`~gateway.index.db.CommitOutcomeUnknown`): the batch may be in the index, so every
caller gets that error and nothing runs again. Units of work must therefore touch nothing
but the connection (they may run twice).

A unit may come with ``ready``, called after every unit of its batch has run and before the
commit: the ingest's waits there for its spool folder's fsync, which another thread makes
while the unit's statements run. A ``ready`` that raises fails its unit as its work would.

The transactions run on a connection kept between them (:class:`HeldConnection`), not in an
ORM session each: a unit gets the transaction's :class:`~sqlalchemy.Connection`. A unit whose
transaction failed because that connection was found dead (the database server restarted
while the node was busy) runs once more, on a new connection.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from sqlalchemy import Connection

from gateway.index.db import CommitOutcomeUnknown, Database, HeldConnection, LostConnection

T = TypeVar("T")


class _Unit(Generic[T]):
    __slots__ = ("done", "error", "ready", "result", "work")

    def __init__(self, work: Callable[[Connection], T], ready: Callable[[], None] | None) -> None:
        self.work = work
        self.ready = ready
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None


class GroupCommit:
    """Run units of work from concurrent threads in shared transactions (see module docs)."""

    def __init__(self, db: Database, *, max_batch: int = 64) -> None:
        self.db = db
        self.max_batch = max_batch
        self._held = HeldConnection(db)
        self._cond = threading.Condition()
        self._queue: list[_Unit[object]] = []
        self._leading = False

    def run(self, work: Callable[[Connection], T], *, ready: Callable[[], None] | None = None) -> T:
        """Run ``work(connection)`` in a transaction, maybe shared; return after its commit,
        which comes after ``ready()`` has returned.

        Raises what ``work`` or ``ready`` raised, or :class:`~gateway.errors.IndexError_`
        when the commit failed (nothing of ``work`` is then in the index).
        """
        unit: _Unit[T] = _Unit(work, ready)
        with self._cond:
            self._queue.append(unit)  # type: ignore[arg-type]
        while True:
            with self._cond:
                while not unit.done and self._leading:
                    self._cond.wait()
                if unit.done:
                    break
                self._leading = True  # first in line: run the queue so far (ours included)
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if unit.error is not None:
            raise unit.error
        return unit.result  # type: ignore[return-value]

    def _commit(self, batch: list[_Unit[object]]) -> None:
        try:
            if len(batch) == 1:
                self._alone(batch[0])
                return
            try:
                results = []
                with self._held.transaction() as conn:
                    for unit in batch:
                        results.append(unit.work(conn))
                    for unit in batch:
                        if unit.ready is not None:
                            unit.ready()
                for unit, result in zip(batch, results, strict=True):
                    unit.result = result
            except CommitOutcomeUnknown as exc:  # maybe committed: running again is wrong
                for unit in batch:
                    unit.error = exc
            except BaseException:  # noqa: BLE001 - one unit failed: each runs again alone
                for unit in batch:
                    self._alone(unit)
        finally:
            for unit in batch:
                unit.done = True

    def close(self) -> None:
        """Give back the connection kept between transactions."""
        self._held.close()

    def _alone(self, unit: _Unit[object]) -> None:
        for tries_left in (1, 0):
            try:
                with self._held.transaction() as conn:
                    result = unit.work(conn)
                    if unit.ready is not None:
                        unit.ready()
                unit.result = result
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the caller that owns the unit
                if tries_left and isinstance(exc, LostConnection):
                    continue  # the kept connection had died (a restarted server): a new one
                unit.error = exc
                return
