"""A syslog-over-TLS receiver (RFC 5425) standing in for a hospital's audit repository.

asyncio + ssl on 127.0.0.1 in a thread of its own, started and stopped by the test (and
restartable on the same port). It parses octet-counted frames (``MSG-LEN SP SYSLOG-MSG``),
keeps every RFC 5424 message with the sequence number from ``[meta sequenceId="N"]``, and
can reset the connection (RST) after reading N frames, as a repository that drops it.
It deliberately does not import ``gateway``: it checks the node from the outside.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.peers import free_port

_MESSAGE = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<timestamp>\S+) (?P<hostname>\S+) (?P<app>\S+) (?P<procid>\S+) "
    rb'(?P<msgid>\S+) \[meta sequenceId="(?P<seq>\d+)"\] (?P<msg>.*)',
    re.DOTALL,
)


@dataclass(frozen=True)
class SyslogMessage:
    pri: int
    timestamp: str
    hostname: str
    app_name: str
    msgid: str
    sequence: int
    document: bytes
    connection: int  # which accepted connection (1, 2, ...) carried it


class SyslogTLSReceiver:
    def __init__(
        self,
        *,
        cert_file: Path,
        key_file: Path,
        client_ca_file: Path | None = None,
        port: int | None = None,
        reset_after: int | None = None,
    ) -> None:
        """``client_ca_file``: require a client certificate chaining to it.
        ``reset_after``: on the first connection, send RST after reading that many frames."""
        self.port = port or free_port()
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self.reset_after = reset_after
        self.messages: list[SyslogMessage] = []
        self.bad_frames: list[bytes] = []
        self.connections = 0  # TLS handshakes completed
        self.client_certificates: list[dict[str, object]] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            ctx.load_verify_locations(self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> SyslogTLSReceiver:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(
                        self._handle,
                        "127.0.0.1",
                        self.port,
                        ssl=self._context(),
                        reuse_address=True,
                    )
                )
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="syslog-receiver", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> SyslogTLSReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- one connection ----------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
            number = self.connections
            peer_cert = writer.get_extra_info("peercert")
            if peer_cert:
                self.client_certificates.append(peer_cert)
        self._writers.add(writer)
        frames = 0
        try:
            while True:
                length = await reader.readuntil(b" ")
                size = int(length[:-1])
                if not 0 < size <= 1 << 20:
                    raise ValueError(f"bad MSG-LEN {length!r}")
                self._record(await reader.readexactly(size), number)
                frames += 1
                if number == 1 and self.reset_after is not None and frames >= self.reset_after:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()  # RST: what was sent but not read is lost
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    def _record(self, raw: bytes, connection: int) -> None:
        m = _MESSAGE.fullmatch(raw)
        with self._lock:
            if m is None:
                self.bad_frames.append(raw)
                return
            self.messages.append(
                SyslogMessage(
                    pri=int(m["pri"]),
                    timestamp=m["timestamp"].decode(),
                    hostname=m["hostname"].decode(),
                    app_name=m["app"].decode(),
                    msgid=m["msgid"].decode(),
                    sequence=int(m["seq"]),
                    document=m["msg"],
                    connection=connection,
                )
            )

    # --- what arrived ------------------------------------------------------------------------
    def received(self) -> list[SyslogMessage]:
        with self._lock:
            return list(self.messages)

    def sequences(self) -> set[int]:
        return {m.sequence for m in self.received()}

    def wait_for(
        self, predicate: Callable[[SyslogTLSReceiver], bool], timeout: float = 30.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return
            time.sleep(0.1)
        raise AssertionError(
            f"receiver: condition not met in {timeout} s; sequences {sorted(self.sequences())}"
        )
