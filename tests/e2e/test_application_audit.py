"""The node's own start and stop are audited (ATNA Application Start / Stop), with the
spool files a crash left unacknowledged that the start removed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.node import GatewayNode


def application_rows(node: GatewayNode) -> list[dict[str, Any]]:
    rows = node.cli_json("audit", "list", "--type", "application", "--limit", "1000")
    return sorted(rows, key=lambda r: int(r["seq"]))


def test_start_stop_and_kill_are_in_the_audit(tmp_path: Path) -> None:
    node = GatewayNode(tmp_path / "node", worker={"enabled": False})
    node.start()
    node.stop()  # SIGTERM: a graceful stop
    node.start()
    node.kill()  # SIGKILL: no stop row can be written
    node.start()
    try:
        rows = application_rows(node)
        assert [r["outcome"] for r in rows] == ["started", "stopped", "started", "started"]
        assert all(r["called_ae_title"] == "GATEWAY" for r in rows)
        assert all(r["detail"]["recovered_spool_files"] == 0 for r in rows[::2])
        assert rows[0]["detail"]["version"]
        assert node.cli("audit", "verify").returncode == 0
    finally:
        node.stop()
