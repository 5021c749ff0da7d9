"""Power loss cannot be simulated on one machine (FAULTS F21): instead, the order of the
durability syscalls of every acknowledged instance is read from an strace log of the node.

For each instance: fsync(receive file) < rename(into spool/objects) < fsync(its folder) <
fsync of the SQLite WAL (the commit) < the C-STORE response leaving on the socket.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.e2e.test_forward import storescu
from tests.support.datasets import make_ct_study
from tests.support.node import GatewayNode

LINE = re.compile(r"^\s*(?:\d+\s+)?(?P<ts>\d+:\d+:\d+\.\d+)\s+(?P<call>\w+)\((?P<args>.*)")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_each_acknowledged_instance_is_durable_before_its_response(tmp_path: Path) -> None:
    files = make_ct_study(tmp_path / "s", 5, seed=31)
    trace = tmp_path / "strace.log"
    node = GatewayNode(
        tmp_path / "node",
        worker={"enabled": False},
        wrapper=[
            "strace",
            "-f",
            "-tt",
            "-y",
            "-o",
            str(trace),
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2,sendto,sendmsg,write",
        ],
    )
    with node:
        storescu(node, files)
        node.stop()  # SIGTERM: strace flushes its log (a SIGKILL would lose its buffer)
    events = []
    for raw in trace.read_text().splitlines():
        m = LINE.match(raw)  # "PID  HH:MM:SS.us call(args" (pid width varies)
        if m:
            events.append((m["call"], m["args"]))
    renames = [
        i
        for i, (call, args) in enumerate(events)
        if call.startswith("rename") and "/spool/objects/" in args
    ]
    assert len(renames) == len(files), "one rename into the spool per instance"
    responses = [
        i
        for i, (call, args) in enumerate(events)
        if call in ("sendto", "sendmsg", "write") and "socket:" in args
    ]
    for r in renames:
        args = events[r][1]
        incoming = re.search(r'"([^"]*/spool/incoming/[^"]+)"', args)
        final = re.search(r'"([^"]*/spool/objects/[^"]+)"', args)
        assert incoming and final
        folder = str(Path(final.group(1)).parent)
        fsync_file = [
            i
            for i in range(r)
            if events[i][0] in ("fsync", "fdatasync") and incoming.group(1) in events[i][1]
        ]
        assert fsync_file, "the receive file is fsync'd before its rename"
        fsync_dir = next(
            i
            for i in range(r + 1, len(events))
            if events[i][0] == "fsync" and f"<{folder}>" in events[i][1]
        )
        commit = next(
            i
            for i in range(fsync_dir + 1, len(events))
            if events[i][0] in ("fsync", "fdatasync") and "-wal>" in events[i][1]
        )
        response = next(i for i in responses if i > r)
        assert fsync_file[-1] < r < fsync_dir < commit < response, (
            f"order for {final.group(1)}: fsync {fsync_file[-1]}, rename {r}, dir {fsync_dir}, "
            f"commit {commit}, response {response}"
        )
