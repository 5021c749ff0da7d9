"""Helper threads for what a C-STORE's thread computes while it waits for the disk.

A fixed number of threads, all started with the ingest service and none later: a thread
made while an instance is stored would take address space (its stack) when memory is
short (FAULTS F18), and a task queued for a thread that then failed to start would run
later, out of its C-STORE. With no helper (none could be started), :meth:`Helpers.submit`
returns None and the caller does the work itself.

A C-STORE's thread hands one task at a time to the helpers, and a task waits only for
that thread's own fsync: more C-STOREs under way than helpers queue their tasks, never
deadlock.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Task(Generic[T]):
    """A function run once on a helper; :meth:`wait` returns its result or raises its
    error once it has run."""

    __slots__ = ("_done", "_error", "_fn", "_result")

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._done = threading.Lock()
        self._done.acquire()  # released when the function has run
        self._result: T | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits
            self._error = exc
        finally:
            self._done.release()

    def wait(self) -> T:
        with self._done:
            pass
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def error(self) -> BaseException | None:
        """Wait for the function to have run; its error, or None."""
        with self._done:
            pass
        return self._error


class Helpers:
    """``count`` threads started now that run submitted tasks in turn."""

    def __init__(self, count: int, *, name: str = "ingest-helper") -> None:
        self._tasks: queue.SimpleQueue[Task[object] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # a task is queued before close()'s stops, or not at all
        for i in range(count):
            thread = threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            try:
                thread.start()
            except (RuntimeError, MemoryError):  # F18 at start: fewer helpers, or none
                log.warning("ingest helper thread not started", extra={"started": i})
                break
            self._threads.append(thread)

    def submit(self, fn: Callable[[], T]) -> Task[T] | None:
        """``fn`` queued for a helper, or None when there is none (or after :meth:`close`)."""
        task: Task[T] = Task(fn)
        with self._lock:
            if not self._threads:
                return None
            self._tasks.put(task)  # type: ignore[arg-type]
        return task

    def close(self) -> None:
        """Stop the helpers once the tasks queued so far have run."""
        with self._lock:
            threads, self._threads = self._threads, []
            for _ in threads:
                self._tasks.put(None)
        for thread in threads:
            thread.join()

    def _serve(self) -> None:
        while (task := self._tasks.get()) is not None:
            task.run()
