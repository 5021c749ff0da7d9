"""Start-up recovery on a large spool: spool files no index row names (a crash between the
spool commit and the index commit) are removed, and the node does not hold every key of the
spool and the index in memory to find them (a spool keeps every instance it ever took)."""

from __future__ import annotations

import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert

from gateway.clock import SystemClock
from gateway.ids import new_id
from gateway.index.db import Database
from gateway.index.models import Instance
from gateway.ingest.service import IngestService
from gateway.metrics import Metrics
from gateway.spool.store import Spool
from tests.unit.test_clock_jumps import instance_row, worker_config

T0 = datetime(2026, 5, 1, tzinfo=UTC)
STORED = 20_000
ORPHANS = 40


def test_recovery_removes_only_orphans_and_holds_no_key_list_of_the_spool(
    tmp_path: Path,
) -> None:
    cfg = worker_config(tmp_path, "")
    db = Database(cfg.database_url)
    db.migrate()
    spool = Spool(cfg.spool_dir)
    stored = [new_id() for _ in range(STORED)]
    orphans = [new_id() for _ in range(ORPHANS)]
    with db.session() as s:
        conn = s.connection()
        for i in range(0, STORED, 5000):
            conn.execute(
                insert(Instance),
                [
                    instance_row(T0, spool_key=k, sop_instance_uid=f"1.2.826.0.1.{i + n}")
                    for n, k in enumerate(stored[i : i + 5000])
                ],
            )
    for key in stored + orphans:
        spool.path_of(key).touch()
    left = spool.incoming / "aborted.dcm"
    left.write_bytes(b"partial")
    ingest = IngestService(cfg, db=db, spool=spool, clock=SystemClock(), metrics=Metrics())

    tracemalloc.start()
    try:
        removed = ingest.recover()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert removed == ORPHANS + 1
    assert not any(spool.exists(k) for k in orphans) and not left.exists()
    assert all(spool.exists(k) for k in stored)
    # the keys of 20,000 instances as Python strings in one set are ~2.5 MiB, twice over
    # (index and spool); one folder's worth (~80 here) and one batch's query are not
    assert peak < 1.5 * 2**20, f"recovery peaked at {peak / 2**20:.1f} MiB"
