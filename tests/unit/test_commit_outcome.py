"""A connection lost while the index commits: the commit may or may not be durable.

PostgreSQL ends the backend of the connection that is about to send COMMIT (as a server
restart or a network fault would). The node cannot know whether the transaction reached the
disk, so it must neither run it again (it would find its own rows, answer "duplicate" and
throw away the file they name) nor delete what its rows would name: the sender gets a failure
status, the spool file stays, and the start-up sweep removes it if no row names it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pytest
from sqlalchemy import event, func, select

from gateway.clock import SystemClock
from gateway.dicom import status as st
from gateway.dicom.server import AssociationInfo, StoreRequest
from gateway.index.db import CommitOutcomeUnknown, Database
from gateway.index.group_commit import GroupCommit
from gateway.index.models import Instance
from gateway.ingest.service import IngestService
from gateway.metrics import Metrics
from gateway.spool.store import Spool
from tests.support.datasets import make_ct_study
from tests.support.pg import pg_conninfo
from tests.unit.test_clock_jumps import worker_config

INFO = AssociationInfo("assoc-1", "MODALITY", "GATEWAY", "127.0.0.1")


@pytest.fixture
def pg(pg_schema_url: tuple[str, str]) -> Iterator[Database]:
    db = Database(pg_schema_url[0])
    db.migrate()
    try:
        yield db
    finally:
        db.dispose()


def _kill_at_next_commit(db: Database, conninfo: str) -> list[int]:
    """Before the next COMMIT is sent, PostgreSQL ends that connection's backend; returns
    the list the killed pid is put in."""
    killed: list[int] = []

    @event.listens_for(db.engine, "commit")
    def _kill(conn: Any) -> None:
        if killed:
            return
        pid = conn.connection.dbapi_connection.info.backend_pid
        with psycopg.connect(conninfo, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))
            deadline = time.monotonic() + 10
            while other.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone() != (0,):
                assert time.monotonic() < deadline, "the backend did not end"
                time.sleep(0.02)
        killed.append(pid)

    return killed


def test_a_commit_that_lost_its_connection_is_not_run_again(pg: Database, pg_url: str) -> None:
    runs: list[int] = []
    killed = _kill_at_next_commit(pg, pg_conninfo(pg_url))
    group = GroupCommit(pg)

    def unit(conn: Any) -> int:
        runs.append(1)
        return int(conn.exec_driver_sql("SELECT 1").scalar_one())

    with pytest.raises(CommitOutcomeUnknown):
        group.run(unit)
    assert killed and runs == [1]  # once: a second run could find the first one's rows
    assert group.run(unit) == 1  # the next transaction runs on a new connection
    group.close()


def test_a_store_whose_commit_outcome_is_unknown_keeps_its_file(
    tmp_path: Path, pg: Database, pg_url: str
) -> None:
    cfg = worker_config(tmp_path, "")
    spool = Spool(cfg.spool_dir)
    ingest = IngestService(cfg, db=pg, spool=spool, clock=SystemClock(), metrics=Metrics())
    (source,) = make_ct_study(tmp_path / "study", 1, seed=5)
    ds = pydicom.dcmread(source, stop_before_pixels=True)

    def request() -> StoreRequest:
        received = spool.incoming / f"{time.monotonic_ns()}.dcm"  # as a receive buffer
        shutil.copyfile(source, received)
        return StoreRequest(
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
            str(ds.file_meta.TransferSyntaxUID),
            received,
        )

    def spooled() -> list[Path]:
        return sorted(spool.objects.rglob("*.dcm"))

    killed = _kill_at_next_commit(pg, pg_conninfo(pg_url))
    with pytest.raises(CommitOutcomeUnknown):
        ingest.store(INFO, request())
    assert killed
    (kept,) = spooled()  # not deleted: had the commit reached the disk, a row would name it

    # the sender, answered a failure, sends again: this commit did not reach the disk, so the
    # instance is stored as new, and the start-up sweep removes the file no row names
    assert ingest.store(INFO, request()) == st.SUCCESS
    assert len(spooled()) == 2
    assert ingest.recover() == 1
    (indexed,) = spooled()
    assert indexed != kept
    with pg.read() as s:
        assert s.execute(select(func.count()).select_from(Instance)).scalar_one() == 1
    ingest.close()


def test_a_session_whose_commit_lost_its_connection_says_so(pg: Database, pg_url: str) -> None:
    """The peer endpoint's package ingest commits through a session: the same error, so its
    files are kept as a C-STORE's are (IngestService.store_batch)."""
    killed = _kill_at_next_commit(pg, pg_conninfo(pg_url))
    with pytest.raises(CommitOutcomeUnknown), pg.session() as s:
        s.execute(select(func.count()).select_from(Instance))
    assert killed
    with pg.session() as s:  # the pool's pre-ping replaced the dead connection
        assert s.execute(select(func.count()).select_from(Instance)).scalar_one() == 0
