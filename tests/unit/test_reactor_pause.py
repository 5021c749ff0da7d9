"""The reactor leaves a sender's response to the sender, whatever the interleaving.

pynetdicom's ``send_*`` methods pause the association's reactor: clear
``_reactor_checkpoint``, wait until ``_is_paused`` is up, send, take the response from the
DIMSE queue, set the checkpoint again. The reactor raises the flag, waits at the
checkpoint and lowers the flag before it takes a message. A sender that clears the
checkpoint just after that wait returned, but before the flag came down, saw the flag up
and sent; the reactor then took its response as an "unexpected C-STORE service message" and
the sender waited out its DIMSE timeout (a full run lost 60 s to it once, a delivery's
C-STORE to a fast storescp). :func:`run_acceptor_reactor` looks at the checkpoint again
once the flag is down. The interleaving is forced here: the checkpoint's wait returns and
the sender acts before the reactor's next step.
"""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace
from typing import Any

from gateway.dicom.reactor import run_acceptor_reactor


class _Dimse:
    def __init__(self) -> None:
        self.msg_queue: queue.Queue[tuple[int, Any]] = queue.Queue()

    def get_msg(self, block: bool = False) -> tuple[int | None, Any]:
        try:
            return self.msg_queue.get(block=block, timeout=1 if block else None)
        except queue.Empty:
            return None, None


class _RacingCheckpoint(threading.Event):
    """The association's checkpoint, with a sender that acts right after the reactor's
    first wait returns (before the reactor's next statement), and finishes at the next."""

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self.set()
        self.assoc = assoc
        self.waits = 0
        self.sender_saw_paused: bool | None = None
        self.sender_got: Any = None

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        assoc = self.assoc
        if self.waits == 1:  # the reactor passed; now the sender, before the flag is down
            self.clear()
            self.sender_saw_paused = assoc._is_paused
            assoc.dimse.msg_queue.put((1, "C-STORE-RSP"))  # its response arrives at once
            return True
        # the reactor is back at the checkpoint (or, taken the response, came round again):
        # the sender takes its response, sets the checkpoint and the association ends
        _cx, self.sender_got = assoc.dimse.get_msg(block=False)
        assoc._kill = True
        self.set()
        return True


def test_a_response_arriving_as_the_reactor_unpauses_is_left_to_the_sender() -> None:
    served: list[Any] = []
    assoc = SimpleNamespace(
        _kill=False,
        _is_paused=False,
        is_established=True,
        dimse=_Dimse(),
        dul=SimpleNamespace(
            activity=threading.Event(),
            is_alive=lambda: True,
            idle_timer_expired=lambda: False,
        ),
        acse=SimpleNamespace(is_release_requested=lambda: False, is_aborted=lambda: False),
    )
    assoc._serve_request = lambda msg, context_id: served.append(msg)
    assoc.kill = lambda: setattr(assoc, "_kill", True)
    checkpoint = _RacingCheckpoint(assoc)
    assoc._reactor_checkpoint = checkpoint
    done = threading.Thread(target=run_acceptor_reactor, args=(assoc,), daemon=True)
    done.start()
    done.join(5)
    assert not done.is_alive(), "the reactor did not end"
    assert checkpoint.sender_saw_paused is True  # the interleaving happened
    assert served == [], "the reactor took the sender's response"
    assert checkpoint.sender_got == "C-STORE-RSP"
