"""gateway.worker_process.run_child: a child process whose stop overruns its grace period
writes every thread's stack to stderr (serve's log) before serve kills it, so that a stop
that hangs says where; a stop in time writes nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = """
import os, sys, time
from types import SimpleNamespace
from pathlib import Path
from prometheus_client import CollectorRegistry
from gateway import worker_process

worker_process.STOP_STACKS_AFTER = 0.3
link_r, link_w = os.pipe()  # serve is there while link_w is open
ready_r, ready_w = os.pipe()

def slow_stop():
    time.sleep(float(sys.argv[1]))

node = SimpleNamespace(metrics=SimpleNamespace(registry=CollectorRegistry()))
sys.exit(
    worker_process.run_child(
        node,
        start=lambda: print("ready", flush=True),  # after SIGTERM's handler is set
        link_fd=link_r,
        on_data=lambda: None,
        ready_fd=ready_w,
        metrics_path=Path(sys.argv[2]) / "child.prom",
        stop=slow_stop,
    )
)
"""


@pytest.mark.parametrize(("stop_seconds", "dumped"), [(1.0, True), (0.0, False)])
def test_a_stop_past_its_grace_writes_the_stacks(
    tmp_path: Path, stop_seconds: float, dumped: bool
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(stop_seconds), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert ("slow_stop" in err and "Thread 0x" in err) == dumped, err
