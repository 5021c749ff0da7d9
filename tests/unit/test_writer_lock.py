"""The index's writer lock: writers of different processes queue on ``flock`` of
``<database>.writer-lock`` (two Database objects in one process hold separate descriptors,
which ``flock`` excludes as it excludes processes), a session inside another on one thread
does not wait for itself, and a folder where the lock file cannot be made leaves the index
usable (SQLite's own locking then)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import text

from gateway.index.db import Database


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def test_writers_with_separate_descriptors_queue(tmp_path: Path) -> None:
    first = Database(_url(tmp_path / "index.sqlite3"))
    second = Database(_url(tmp_path / "index.sqlite3"))
    assert (tmp_path / "index.sqlite3.writer-lock").exists()
    order: list[str] = []
    holding = threading.Event()

    def hold() -> None:
        with first.session():
            order.append("first in")
            holding.set()
            time.sleep(0.3)
            order.append("first out")

    t = threading.Thread(target=hold)
    t.start()
    holding.wait(5)
    started = time.monotonic()
    with second.session():
        order.append("second in")
    waited = time.monotonic() - started
    t.join()
    assert order == ["first in", "first out", "second in"]
    assert waited >= 0.2


def test_a_writer_in_another_process_is_waited_for(tmp_path: Path) -> None:
    db = Database(_url(tmp_path / "index.sqlite3"))
    lock = tmp_path / "index.sqlite3.writer-lock"
    # another process holds the lock file, as a receiver process in a transaction does
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(lock)!r}, os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(0.5)\n",
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"held\n"
    started = time.monotonic()
    with db.session() as s:
        s.execute(text("SELECT 1"))
    assert time.monotonic() - started >= 0.3  # it ended (and let go) first
    assert holder.wait(5) == 0


def test_nested_sessions_on_one_thread(tmp_path: Path) -> None:
    db = Database(_url(tmp_path / "index.sqlite3"))
    done = threading.Event()

    def nested() -> None:
        with db.session(), db.session():
            pass
        done.set()

    threading.Thread(target=nested, daemon=True).start()
    assert done.wait(5), "a session inside another waited for itself"
    other = Database(_url(tmp_path / "index.sqlite3"))
    with other.session():  # and the outermost exit let go of the file lock
        pass


def test_lock_file_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "index.sqlite3.writer-lock").mkdir()  # os.open of a folder for writing fails
    db = Database(_url(tmp_path / "index.sqlite3"))
    with db.session() as s:
        assert s.execute(text("SELECT 1")).scalar() == 1
    assert os.path.isdir(tmp_path / "index.sqlite3.writer-lock")
