"""gateway.statelock: one serve per state directory, held while any process of its run
lives; the node id its leases are named by."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import statelock
from gateway.errors import GatewayError


def test_the_lock_outlives_serve_in_its_children_and_names_its_holder(tmp_path: Path) -> None:
    statelock.acquire(tmp_path)
    try:
        assert statelock.held()
        (fd,) = statelock.inherited_fds()
        child = subprocess.Popen(["sleep", "60"], pass_fds=(fd,))
    finally:
        statelock.release()  # serve gone (killed): its child still has the open file
    assert not statelock.held()
    try:
        with pytest.raises(GatewayError) as refused:
            statelock.acquire(tmp_path, wait=0.3)
        message = str(refused.value)
        assert str(tmp_path / "serve.lock") in message
        assert f"pid {os.getpid()}" in message
        assert not statelock.held()
    finally:
        child.kill()
        child.wait()
    statelock.acquire(tmp_path, wait=0.3)  # the last process of that run has ended
    try:
        assert statelock.held()
        assert (tmp_path / "serve.lock").read_text() == f"{os.getpid()}\n"
    finally:
        statelock.release()


def test_a_second_holder_in_another_process_is_refused(tmp_path: Path) -> None:
    statelock.acquire(tmp_path)
    try:
        code = (
            "import sys; from pathlib import Path; from gateway import statelock\n"
            "from gateway.errors import GatewayError\n"
            "try:\n"
            f"    statelock.acquire(Path({str(tmp_path)!r}), wait=0.2)\n"
            "except GatewayError as exc:\n"
            "    print(exc); sys.exit(3)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
    finally:
        statelock.release()
    assert proc.returncode == 3, proc.stderr
    assert "another dicom-gateway serve" in proc.stdout


def test_node_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = statelock.node_id(tmp_path)
    assert len(first) == 16 and int(first, 16) >= 0
    assert statelock.node_id(tmp_path) == first
    assert (tmp_path / "node-id").read_text() == first + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["node-id"]
    a, b = statelock.lease_owner_prefix(first), statelock.lease_owner_prefix(first)
    assert a.startswith(f"{first}:") and b.startswith(f"{first}:") and a != b
    (tmp_path / "node-id").write_text("not an id\n")
    with pytest.raises(GatewayError, match="node-id: expected 16 lowercase hex digits"):
        statelock.node_id(tmp_path)
