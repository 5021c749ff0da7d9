"""A minimal pynetdicom Storage SCP that writes each received data set to a file.

The peer users would write themselves from pynetdicom's documentation, at its best: it
writes the encoded data set as received (no decode/re-encode), sets TCP_NODELAY, accepts
every storage SOP class in the uncompressed syntaxes and serves associations on threads.

    python -m bench.pynetdicom_scp --port N --out DIR [--ae-title PYSCP] [--max-pdu BYTES]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, StoragePresentationContexts, evt

VERIFICATION = "1.2.840.10008.1.1"


def _nodelay(event: Any) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ae-title", default="PYSCP")
    parser.add_argument("--max-pdu", type=int, default=262144)
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    counter = itertools.count(1)
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        with lock:
            n = next(counter)
        with open(out / f"{n:08d}.dcm", "wb") as f:
            f.write(event.encoded_dataset(include_meta=True))
        return 0x0000

    ae = AE(ae_title=args.ae_title)
    ae.maximum_pdu_size = args.max_pdu
    ae.maximum_associations = 16
    ae.supported_contexts = StoragePresentationContexts
    ae.add_supported_context(VERIFICATION)
    handlers: list[Any] = [(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, _nodelay)]
    server = ae.start_server(("127.0.0.1", args.port), block=False, evt_handlers=handlers)
    assert server is not None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
