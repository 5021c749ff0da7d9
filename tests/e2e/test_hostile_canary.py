"""Hostile peers against a node while a TLS canary keeps working (FAULTS_AND_ATTACKS A1-A8).

While 50 hostile connections are held open against the plain and TLS ports (idle, slowloris
at 1 byte/s, half a ClientHello, a ClientHello byte by byte; each reconnects as soon as the
node closes it), the attack cases are sent one after another: oversized, garbage and
malformed PDUs, endless and undecodable DIMSE messages, wrong protocols on both ports, a
flood of 200 associations from one address. Meanwhile a canary -- a C-ECHO over DICOM TLS
with a client certificate, one new association every 100 ms, from another address
(127.0.0.2, a modality elsewhere on the network) -- must never fail. Each case must get its
defined answer within 5 s, and the node's peak resident memory must grow by less than 64 MiB
over the whole attack (all hostile connections together, not each).

Run with ``-s`` to see the figures (canary attempts, failures, latency; memory).
"""

from __future__ import annotations

import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from pynetdicom import AE

from gateway.crypto.tls import IssuedCertificate, ca_init, ca_issue
from tests.support.node import GatewayNode
from tests.support.pdus import (
    RELEASE_RQ,
    VERIFICATION,
    associate_rq,
    client_hello,
    p_data,
    proc_status,
    read_pdu,
    wait_closed,
)

DEADLINE = 5.0  # every hostile case is answered within this
MAX_PDU = 262144  # the node's default dicom.max_pdu_size
CANARY_ADDRESS = "127.0.0.2"
CANARY_INTERVAL = 0.1


@dataclass(frozen=True)
class Pki:
    node: IssuedCertificate
    modality: IssuedCertificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("hostile-pki")
    ca_init(root / "ca")
    return Pki(
        node=ca_issue(root / "ca", "gateway-node", root / "node"),
        modality=ca_issue(root / "ca", "modality", root / "modality"),
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[GatewayNode]:
    gateway = GatewayNode(
        tmp_path_factory.mktemp("hostile") / "node",
        allow=[{"called_ae": "GATEWAY", "calling_ae": ["*"], "addresses": ["127.0.0.0/8"]}],
        dicom={
            "pdu_read_timeout": 2,
            "acse_timeout": 5,
            "network_timeout": 5,
            "max_associations": 16,
            "max_associations_per_address": 8,
            # room for the whole attack (50 held + a 200-association flood): the limit that
            # must hold the flood here is the per-address association limit
            "max_connections": 320,
            # the attack comes from one address: its per-address connection cap would close
            # the cases before they are read (that cap: tests/e2e/test_connection_limits.py)
            "max_connections_per_address": 320,
            "tls": {
                "enabled": True,
                "cert_file": str(pki.node.cert_file),
                "key_file": str(pki.node.key_file),
                "ca_file": str(pki.node.ca_file),
                "handshake_timeout": 3,
            },
        },
        worker={"enabled": False},
    )
    with gateway:
        yield gateway


# --------------------------------------------------------------------------- the canary


@dataclass
class CanaryStats:
    attempts: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def max_latency(self) -> float:
        return max(self.latencies, default=0.0)


class Canary:
    """A C-ECHO over TLS in a new association every 100 ms, from 127.0.0.2."""

    def __init__(self, node: GatewayNode, pki: Pki) -> None:
        assert node.tls_port is not None
        self.port = node.tls_port
        context = ssl.create_default_context(cafile=str(pki.node.ca_file))
        context.load_cert_chain(str(pki.modality.cert_file), str(pki.modality.key_file))
        self.context = context
        self.ae = AE(ae_title="CANARY")
        self.ae.acse_timeout = 10
        self.ae.dimse_timeout = 10
        self.ae.network_timeout = 10
        self.ae.add_requested_context(VERIFICATION)
        self.stats = CanaryStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary", daemon=True)

    def echo_once(self) -> None:
        started = time.monotonic()
        failure = None
        try:
            assoc = self.ae.associate(
                "127.0.0.1",
                self.port,
                ae_title="GATEWAY",
                bind_address=(CANARY_ADDRESS, 0),
                tls_args=(self.context, "localhost"),
            )
            if not assoc.is_established:
                failure = "not established"
            else:
                status = assoc.send_c_echo()
                if "Status" not in status or int(status.Status) != 0:
                    failure = f"echo status {status!r}"
                assoc.release()
        except Exception as exc:
            failure = f"{exc.__class__.__name__}: {exc}"
        elapsed = time.monotonic() - started
        self.stats.attempts += 1
        self.stats.latencies.append(elapsed)
        if failure is not None:
            self.stats.failures.append(f"t={started:.1f} {failure}")

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.echo_once()
            self._stop.wait(max(0.0, CANARY_INTERVAL - (time.monotonic() - started)))

    def __enter__(self) -> Canary:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


# --------------------------------------------------------------------------- held connections


class Holders:
    """Hostile connections kept open: each reconnects as soon as the node closes it."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0  # opened in all, reconnections included
        self._lock = threading.Lock()

    def hold(self, port: int, behaviour: Callable[[socket.socket, threading.Event], None]) -> None:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                except OSError:
                    self._stop.wait(0.2)
                    continue
                with self._lock:
                    self.connections += 1
                try:
                    behaviour(sock, self._stop)
                except OSError:
                    pass  # the node closed it: reconnect
                finally:
                    sock.close()

        thread = threading.Thread(target=run, daemon=True)
        self._threads.append(thread)
        thread.start()

    def __enter__(self) -> Holders:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def idle(sock: socket.socket, stop: threading.Event) -> None:
    """Send nothing; return when the node closes the connection."""
    sock.settimeout(0.5)
    while not stop.is_set():
        try:
            if sock.recv(65536) == b"":
                return
        except TimeoutError:
            continue


def trickle(data: bytes, interval: float = 1.0) -> Callable[[socket.socket, threading.Event], None]:
    """Send ``data`` one byte per ``interval`` s (slowloris); then wait to be closed."""

    def behaviour(sock: socket.socket, stop: threading.Event) -> None:
        for byte in data:
            if stop.wait(interval):
                return
            sock.sendall(bytes([byte]))
        idle(sock, stop)

    return behaviour


def send_then_idle(data: bytes) -> Callable[[socket.socket, threading.Event], None]:
    def behaviour(sock: socket.socket, stop: threading.Event) -> None:
        sock.sendall(data)
        idle(sock, stop)

    return behaviour


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Outcome:
    name: str
    seconds: float
    answer: str


def _answer(data: bytes) -> str:
    if not data:
        return "closed"
    return {
        0x02: "A-ASSOCIATE-AC",
        0x03: "A-ASSOCIATE-RJ",
        0x06: "A-RELEASE-RP",
        0x07: "A-ABORT",
    }.get(data[0], f"0x{data[:1].hex()}")


def plain_case(
    node: GatewayNode, payload: bytes, *, associated: bool = False
) -> tuple[float, bytes]:
    """Send ``payload`` (after an accepted association if asked); seconds until closed, answer."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=DEADLINE) as sock:
        if associated:
            sock.sendall(associate_rq())
            ac = read_pdu(sock)
            assert ac[:1] == b"\x02", ac
        started = time.monotonic()
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started, b""
        try:
            _, data = wait_closed(sock, DEADLINE)
        except ConnectionResetError:
            data = b""
        return time.monotonic() - started, data


def endless_command(node: GatewayNode) -> tuple[float, bytes]:
    """Command fragments whose last-fragment bit never comes (A7)."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=DEADLINE) as sock:
        sock.sendall(associate_rq())
        assert read_pdu(sock)[:1] == b"\x02"
        fragment = p_data((1, 0x01, b"\x00" * 16000))
        started = time.monotonic()
        try:
            while time.monotonic() - started < 2 * DEADLINE:
                sock.sendall(fragment)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started, b"\x07"  # refused: the A-ABORT raced the RST
        _, data = wait_closed(sock, DEADLINE)
        return time.monotonic() - started, data


def tls_case(node: GatewayNode, payload: bytes) -> tuple[float, bytes]:
    assert node.tls_port is not None
    with socket.create_connection(("127.0.0.1", node.tls_port), timeout=DEADLINE) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        try:
            _, data = wait_closed(sock, DEADLINE)
        except ConnectionResetError:
            data = b""
        return time.monotonic() - started, data


def tls_without_certificate(node: GatewayNode, pki: Pki) -> tuple[float, str]:
    assert node.tls_port is not None
    context = ssl.create_default_context(cafile=str(pki.node.ca_file))
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", node.tls_port), timeout=DEADLINE) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(associate_rq())
                data = tls.recv(64)  # TLS 1.3: the refusal arrives after the handshake
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
            return time.monotonic() - started, f"refused ({exc.__class__.__name__})"
    return time.monotonic() - started, "closed" if not data else _answer(data)


def flood(node: GatewayNode, count: int = 200) -> tuple[float, dict[str, int]]:
    """``count`` associations at once from 127.0.0.1: A-ASSOCIATE-AC up to the per-address
    limit, A-ASSOCIATE-RJ transient / local limit (2, 3, 2) beyond; then all released."""
    rq = associate_rq(calling="FLOOD")
    barrier = threading.Barrier(count)
    answers: dict[str, int] = {}
    lock = threading.Lock()
    sockets: list[socket.socket] = []

    def one() -> None:
        sock = socket.create_connection(("127.0.0.1", node.port), timeout=DEADLINE)
        with lock:
            sockets.append(sock)
        barrier.wait(DEADLINE)
        try:
            sock.sendall(rq)
            pdu = read_pdu(sock)
        except OSError as exc:
            pdu = b""
            kind = f"error {exc.__class__.__name__}"
        else:
            kind = _answer(pdu)
            if pdu[:1] == b"\x03":
                kind += f" {tuple(pdu[7:10])}"
        with lock:
            answers[kind] = answers.get(kind, 0) + 1

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(count) as pool:
            for f in [pool.submit(one) for _ in range(count)]:
                f.result()
        elapsed = time.monotonic() - started
    finally:
        for sock in sockets:
            try:
                sock.sendall(RELEASE_RQ)
                read_pdu(sock)
            except OSError:
                pass
            sock.close()
    return elapsed, answers


def _items_past_end() -> bytes:
    rq = bytearray(associate_rq())
    at = rq.index(b"\x20\x00", 74)  # the presentation context item
    rq[at + 2 : at + 4] = b"\xff\xff"  # its length runs past the end of the PDU
    return bytes(rq)


ABORT_OR_CLOSE = {"A-ABORT", "closed"}


# --------------------------------------------------------------------------- the test


def test_attack_cases_answered_while_tls_canary_never_fails(node: GatewayNode, pki: Pki) -> None:
    assert node.tls_port is not None
    canary = Canary(node, pki)
    canary.echo_once()  # warm: the first association imports and builds what later ones reuse
    assert not canary.stats.failures, canary.stats.failures
    canary.stats = CanaryStats()
    time.sleep(0.5)
    before = proc_status(node.pid)

    hello = client_hello()
    rq = associate_rq()
    outcomes: list[Outcome] = []

    def case(name: str, allowed: set[str], run: Callable[[], tuple[float, bytes]]) -> None:
        seconds, data = run()
        answer = _answer(data)
        outcomes.append(Outcome(name, seconds, answer))
        assert answer in allowed, (name, answer, data[:32])
        assert seconds < DEADLINE, (name, seconds)

    with Holders() as holders, Canary(node, pki) as running:
        canary = running
        for _ in range(15):
            holders.hold(node.port, idle)
        for _ in range(10):
            holders.hold(node.port, trickle(rq))
        for _ in range(15):
            holders.hold(node.tls_port, idle)
        for _ in range(5):
            holders.hold(node.tls_port, send_then_idle(hello[: len(hello) // 2]))
        for _ in range(5):
            holders.hold(node.tls_port, trickle(hello))
        time.sleep(1.0)  # all 50 connected and waiting

        garbage = b"\xff" + random.Random(7).randbytes(255)
        case(
            "A4 A-ASSOCIATE-RQ declaring 4 GiB",
            ABORT_OR_CLOSE,
            lambda: plain_case(node, struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF)),
        )
        case("A5 HTTP request", ABORT_OR_CLOSE, lambda: plain_case(node, b"GET / HTTP/1.1\r\n\r\n"))
        case("A5 SSH banner", ABORT_OR_CLOSE, lambda: plain_case(node, b"SSH-2.0-OpenSSH_9.6\r\n"))
        case("A5 random bytes", ABORT_OR_CLOSE, lambda: plain_case(node, garbage))
        case("A5 ClientHello to the plain port", ABORT_OR_CLOSE, lambda: plain_case(node, hello))
        case(
            "A6 unknown PDU type",
            {"A-ABORT"},
            lambda: plain_case(node, b"\xff\x00" + struct.pack(">L", 58) + bytes(58)),
        )
        case(
            "A6 item length past the end", {"A-ABORT"}, lambda: plain_case(node, _items_past_end())
        )
        case(
            "A6 P-DATA before the association",
            {"A-ABORT"},
            lambda: plain_case(node, p_data((1, 0x03, b"\x00" * 8))),
        )
        case(
            "A4 P-DATA over the max PDU",
            {"A-ABORT"},
            lambda: plain_case(
                node, struct.pack(">BBL", 0x04, 0, MAX_PDU + 4096) + bytes(4096), associated=True
            ),
        )
        case(
            "A6 PDV length 0xFFFFFFFF",
            {"A-ABORT"},
            lambda: plain_case(
                node,
                struct.pack(">BBLLBB", 0x04, 0, 10, 0xFFFFFFFF, 1, 0x03) + bytes(4),
                associated=True,
            ),
        )
        case(
            "A6 PDV length 1",
            {"A-ABORT"},
            lambda: plain_case(
                node, struct.pack(">BBLLBB", 0x04, 0, 6, 1, 1, 0x03), associated=True
            ),
        )
        case(
            "A6 undecodable command set",
            {"A-ABORT"},
            lambda: plain_case(node, p_data((1, 0x03, b"\xff" * 40)), associated=True),
        )
        case(
            "A6 context never negotiated",
            {"A-ABORT"},
            lambda: plain_case(node, p_data((9, 0x03, b"\x00" * 8)), associated=True),
        )
        case(
            "A6 a second A-ASSOCIATE-RQ", {"A-ABORT"}, lambda: plain_case(node, rq, associated=True)
        )
        case("A7 endless DIMSE message", {"A-ABORT", "closed"}, lambda: endless_command(node))
        case(
            "A3 slowloris A-ASSOCIATE-RQ", ABORT_OR_CLOSE, lambda: plain_case(node, rq[:6])
        )  # the rest never comes: PDU deadline 2 s
        case("A2 plaintext A-ASSOCIATE-RQ to the TLS port", {"closed"}, lambda: tls_case(node, rq))
        case("A2 half a ClientHello", {"closed"}, lambda: tls_case(node, hello[: len(hello) // 2]))
        case(
            "A5 HTTP request to the TLS port",
            {"closed"},
            lambda: tls_case(node, b"GET / HTTP/1.1\r\n\r\n"),
        )

        seconds, refused = tls_without_certificate(node, pki)
        outcomes.append(Outcome("A11 TLS without a client certificate", seconds, refused))
        assert refused.startswith("refused") or refused == "closed", refused
        assert seconds < DEADLINE

        seconds, answers = flood(node)
        outcomes.append(Outcome("A8 200 associations from one address", seconds, str(answers)))
        assert sum(answers.values()) == 200, answers
        assert answers.get("A-ASSOCIATE-AC", 0) <= 8, answers  # max_associations_per_address
        assert set(answers) <= {"A-ASSOCIATE-AC", "A-ASSOCIATE-RJ (2, 3, 2)"}, answers
        assert seconds < DEADLINE, seconds

        time.sleep(1.0)  # the canary keeps running after the last case too
        during = proc_status(node.pid)
        held = holders.connections

    stats = canary.stats
    time.sleep(1.0)
    after = proc_status(node.pid)
    growth_kib = after["VmHWM"] - before["VmRSS"]
    hostile = held + sum(1 for _ in outcomes) + 200
    print("\nhostile cases (seconds to the answer):")
    for o in outcomes:
        print(f"  {o.name}: {o.answer} in {o.seconds:.2f} s")
    print(
        f"canary: {stats.attempts} attempts, {len(stats.failures)} failures, max latency "
        f"{stats.max_latency * 1000:.0f} ms, median "
        f"{sorted(stats.latencies)[len(stats.latencies) // 2] * 1000:.0f} ms"
    )
    print(
        f"node memory: VmRSS {before['VmRSS'] // 1024} MiB before, {during['VmRSS'] // 1024} MiB "
        f"during, {after['VmRSS'] // 1024} MiB after; VmHWM {after['VmHWM'] // 1024} MiB; peak "
        f"growth {growth_kib / 1024:.1f} MiB over {hostile} hostile connections "
        f"({growth_kib / hostile:.0f} KiB each); threads {before['Threads']} -> "
        f"{during['Threads']} -> {after['Threads']}"
    )
    assert stats.attempts >= 50, stats.attempts
    assert not stats.failures, stats.failures
    assert growth_kib < 64 * 1024, (before, during, after)
    log = node.log(2000)
    assert "Exception in thread" not in log and "gateway.uncaught" not in log
    assert node.proc is not None and node.proc.poll() is None
