"""gateway.worker_process.stop_signals: a stop asked for by SIGTERM takes effect at once,
whichever thread the kernel hands the signal to (Python runs handlers only in the main
thread, when it next runs Python code: a receiver process went on accepting associations
until then)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

CHILD = """
import signal, sys, threading, time
from gateway.worker_process import stop_signals

refused = threading.Event()
stopping = stop_signals([signal.SIGTERM], at_once=refused.set)
# the main thread blocks SIGTERM: the kernel must give it to another thread, and Python's
# own handler would not run until the main thread unblocked it (here: never)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
print("ready", flush=True)
started = time.monotonic()
woke = stopping.wait(30)
print(f"{woke} {refused.is_set()} {time.monotonic() - started:.2f}", flush=True)
"""


def test_sigterm_to_another_thread_stops_at_once() -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    woke, refused, waited = proc.stdout.readline().split()
    assert proc.wait(10) == 0
    assert woke == "True" and refused == "True"
    assert float(waited) < 10  # not the 30 s timeout: the stop came with the signal
