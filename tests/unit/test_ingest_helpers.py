"""The ingest's helper threads: started with the service and none later; a task's result or
error reaches the thread that waits; with no helper the work runs on the caller's thread."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from gateway.ingest.helpers import Helpers


def test_results_and_errors_reach_the_waiting_thread() -> None:
    helpers = Helpers(2)
    try:
        ran_on: list[str] = []

        def work() -> int:
            ran_on.append(threading.current_thread().name)
            return 7

        task = helpers.submit(work)
        assert task is not None and task.wait() == 7
        assert ran_on[0].startswith("ingest-helper-")

        def fail() -> None:
            raise ValueError("refused")

        failing = helpers.submit(fail)
        assert failing is not None
        assert isinstance(failing.error(), ValueError)
        with pytest.raises(ValueError, match="refused"):
            failing.wait()
    finally:
        helpers.close()


def test_no_thread_is_started_after_the_helpers_are() -> None:
    helpers = Helpers(2)
    try:
        before = threading.active_count()
        tasks = [helpers.submit(lambda i=i: i) for i in range(50)]
        assert [t.wait() for t in tasks if t is not None] == list(range(50))
        assert threading.active_count() == before
    finally:
        helpers.close()


def test_a_helper_that_cannot_start_leaves_fewer_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    real = threading.Thread.start
    started: list[int] = []

    def start_once(self: threading.Thread, *args: Any) -> None:
        if started:
            raise RuntimeError("can't start new thread")  # F18
        started.append(1)
        real(self, *args)

    monkeypatch.setattr(threading.Thread, "start", start_once)
    one = Helpers(2)
    try:
        task = one.submit(lambda: "ran")
        assert task is not None and task.wait() == "ran"
    finally:
        one.close()
    none = Helpers(2)  # start_once has started its one thread: this gets none
    assert none.submit(lambda: "ran") is None
    none.close()


def test_close_runs_what_was_queued_then_stops() -> None:
    helpers = Helpers(1)
    gate = threading.Event()
    first = helpers.submit(gate.wait)
    second = helpers.submit(lambda: "second")
    assert first is not None and second is not None
    gate.set()
    helpers.close()
    assert second.wait() == "second"
    assert helpers.submit(lambda: "late") is None
