"""A network fault proxy on loopback: an asyncio TCP relay that can misbehave on purpose.

tc/netem and iptables are not available here, so link faults between the node and a
destination come from this relay (FAULTS_AND_ATTACKS.md, "Test matrix"). Modes apply to
the upstream direction (client -> server) unless noted, and can change between connections:

* ``pass``       relay as is
* ``delay``      hold each chunk ``delay`` seconds
* ``throttle``   at most ``rate`` bytes/s in both directions
* ``blackhole``  accept and read, never forward nor answer
* ``truncate``   forward ``after`` bytes, then close both sides (FIN)
* ``reset``      forward ``after`` bytes, then reset the client (SO_LINGER 0, RST)
* ``corrupt``    flip one bit of the byte at offset ``after``

Independently of the mode, :meth:`FaultProxy.hold_next_response` arms a one-shot hold: the
next chunk the server sends after the first one of its connection (so after A-ASSOCIATE-AC:
a C-STORE-RSP) is never relayed, nor anything after it on that connection, and ``held`` is
set. The server has answered; the client never learns it (F4: a crash between the
destination's answer and its record).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Self

from tests.support.peers import free_port


@dataclass
class Fault:
    mode: str = "pass"
    after: int = 0
    rate: float = 0.0
    delay: float = 0.0
    connections: int = 0  # apply to this many new connections, then back to pass; 0 = all


@dataclass
class FaultProxy:
    target_port: int
    target_host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    fault: Fault = field(default_factory=Fault)
    connections_seen: int = 0
    held: threading.Event = field(default_factory=threading.Event)
    upstream_bytes: int = 0  # relayed client -> server, all connections

    def __post_init__(self) -> None:
        self._hold_armed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def set(self, fault: Fault) -> None:
        self.fault = fault

    def hold_next_response(self) -> None:
        """Arm a one-shot hold of the next server response (see the module docstring)."""
        self.held.clear()
        self._hold_armed = True

    def disarm(self) -> None:
        self._hold_armed = False

    def start(self) -> Self:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self._loop
        )
        self._server = fut.result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_seen += 1
        fault = self.fault
        if fault.connections and self.connections_seen > fault.connections:
            fault = Fault()
        try:
            up_r, up_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_w, fault, upstream=True, client=writer),
            self._pipe(up_r, writer, fault, upstream=False, client=writer),
            return_exceptions=True,
        )

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        fault: Fault,
        *,
        upstream: bool,
        client: asyncio.StreamWriter,
    ) -> None:
        sent = 0
        holding = False
        try:
            while chunk := await src.read(65536):
                if upstream and fault.mode == "blackhole":
                    continue
                if not upstream and (holding or (self._hold_armed and sent > 0)):
                    if not holding:  # this connection swallows the answer and all after it
                        holding, self._hold_armed = True, False
                        self.held.set()
                    continue
                if fault.mode == "throttle" and fault.rate > 0:
                    await asyncio.sleep(len(chunk) / fault.rate)
                if upstream and fault.mode == "delay":
                    await asyncio.sleep(fault.delay)
                if (
                    upstream
                    and fault.mode in ("truncate", "reset")
                    and sent + len(chunk) > fault.after
                ):
                    dst.write(chunk[: max(0, fault.after - sent)])
                    with contextlib.suppress(OSError):
                        await dst.drain()
                    if fault.mode == "reset":
                        sock = client.get_extra_info("socket")
                        if sock is not None:
                            sock.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                    client.close()
                    dst.close()
                    return
                if upstream and fault.mode == "corrupt" and sent <= fault.after < sent + len(chunk):
                    i = fault.after - sent
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0x01]) + chunk[i + 1 :]
                dst.write(chunk)
                await dst.drain()
                sent += len(chunk)
                if upstream:
                    self.upstream_bytes += len(chunk)
        finally:
            with contextlib.suppress(Exception):
                dst.close()
