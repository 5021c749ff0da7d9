"""Association churn: many connect / A-ASSOCIATE / A-RELEASE / close cycles, fast.

Each cycle sends pre-built PDU bytes over a raw socket (wrapped in TLS with ``ssl`` when a
client context is given) and checks the answers' PDU types: an A-ASSOCIATE-AC, then an
A-RELEASE-RP. Cycles run on several threads (socket I/O and OpenSSL release the GIL), so
the node, not this client, is what is measured.

This module must not import ``gateway``.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tests.support.pdus import RELEASE_RQ, associate_rq, read_pdu


@dataclass
class ChurnResult:
    cycles: int = 0
    seconds: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def per_second(self) -> float:
        return self.cycles / self.seconds if self.seconds else 0.0


def one_cycle(
    port: int,
    rq: bytes,
    tls: ssl.SSLContext | None,
    host: str = "127.0.0.1",
) -> str | None:
    """One association set up and released; None, or what went wrong."""
    try:
        raw = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        return f"connect: {exc.__class__.__name__}"
    sock: socket.socket = raw
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(rq)
        ac = read_pdu(sock)
        if ac[:1] != b"\x02":
            return f"associate answered 0x{ac[:1].hex() or 'closed'}"
        sock.sendall(RELEASE_RQ)
        rp = read_pdu(sock)
        if rp[:1] != b"\x06":
            return f"release answered 0x{rp[:1].hex() or 'closed'}"
        return None
    except OSError as exc:  # ssl.SSLError and TimeoutError included
        return f"{exc.__class__.__name__}"
    finally:
        sock.close()


def churn(
    port: int,
    cycles: int,
    *,
    tls: ssl.SSLContext | None = None,
    workers: int = 6,
    calling: str = "CHURN",
    called: str = "GATEWAY",
) -> ChurnResult:
    """Run ``cycles`` cycles on ``workers`` threads; count failures by kind."""
    rq = associate_rq(calling=calling, called=called)
    result = ChurnResult()
    lock = threading.Lock()
    remaining = [cycles]

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            failure = one_cycle(port, rq, tls)
            with lock:
                result.cycles += 1
                if failure is not None:
                    result.failures[failure] += 1

    started = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(worker) for _ in range(workers)]:
            f.result()
    result.seconds = time.monotonic() - started
    return result
