"""Fixtures of the unit suite: a migrated SQLite index per test, no network."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from gateway.index.db import Database

_NAME = "index.sqlite3"


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated index file, copied for each test (migrating costs ~0.1 s)."""
    folder = tmp_path_factory.mktemp("index-template")
    database = Database("sqlite:///" + str(folder / _NAME))
    database.migrate()
    database.dispose()  # the last connection to close checkpoints the WAL into the file
    assert not (folder / (_NAME + "-wal")).exists()
    return folder / _NAME


@pytest.fixture
def db(tmp_path: Path, migrated_template: Path) -> Iterator[Database]:
    """A freshly migrated SQLite index in the test's temporary folder."""
    target = tmp_path / _NAME
    shutil.copyfile(migrated_template, target)
    database = Database("sqlite:///" + str(target))
    _no_fsync(database)
    database.migrate()  # a no-op at head; proves the copy is a migrated index
    try:
        yield database
    finally:
        database.dispose()


def _no_fsync(database: Database) -> None:
    """Unit tests need no crash durability: skip fsync (runs after the node's own PRAGMAs)."""

    @event.listens_for(database.engine, "connect")
    def _fast(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=OFF")
        cur.close()
