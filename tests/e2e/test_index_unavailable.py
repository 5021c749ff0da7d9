"""The index is locked or unavailable (FAULTS F8): C-STORE answers 0xA700 within the timeout,
nothing is acknowledged that is not indexed, and the node recovers by itself."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from tests.support.datasets import make_ct_study
from tests.support.node import GatewayNode


def _store(node: GatewayNode, path: Path) -> int:
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    ae.dimse_timeout = 30
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_locked_index_answers_out_of_resources_then_recovers(tmp_path: Path) -> None:
    files = make_ct_study(tmp_path / "s", 2, seed=41)
    node = GatewayNode(tmp_path / "node", worker={"enabled": False}, database={"busy_timeout": 1})
    with node:
        db = node.state_dir / "index.sqlite3"
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            started = time.monotonic()
            status = _store(node, files[0])
            took = time.monotonic() - started
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert status == 0xA700
        assert took < 10
        assert _store(node, files[1]) == 0x0000
        objects = list((node.state_dir / "spool" / "objects").rglob("*.dcm"))
        rows = sqlite3.connect(db).execute("select count(*) from instances").fetchone()[0]
    assert rows == 1 and len(objects) == 1  # the refused instance left nothing behind
