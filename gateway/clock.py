"""An injectable clock: wall time (UTC, for records) and monotonic time (for timeouts).

The node's clock (:class:`SystemClock`) reads the wall clock once, when it is made, and from
then on answers ``now()`` as that instant plus the monotonic time elapsed since (FAULTS F19).
Everything the node schedules through the index (retry times, lease expiries, a study's last
arrival for its quiet period) and every time it records (audit rows, receipt times) is on
that one time line, which never goes back and never jumps: a step of the system clock while
the node runs (NTP, an operator, a VM restore) moves no deadline and reorders nothing.
``wall_offset()`` says how far the system clock has moved away from it (the node logs and
exports it); restarting the node takes up a corrected system clock. Deadlines written by a
process whose clock was ahead are handled where they are read (see ``horizon`` in
:func:`gateway.index.deliveries.claim` and the router).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

# How far ahead of this node's clock another node sharing the index may be. A deadline
# further ahead than any this node sets, plus this, was written under a clock since set back.
CLOCK_SLACK_SECONDS = 300.0


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall-clock time, for what is recorded."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes back, for deadlines."""


class SystemClock:
    """UTC time anchored once to the wall clock and advanced by the monotonic clock.

    ``wall`` and ``monotonic`` are injectable for tests (seconds, like :func:`time.time`
    and :func:`time.monotonic`)."""

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._anchor_mono = monotonic()
        self._anchor = datetime.fromtimestamp(wall(), UTC)

    def now(self) -> datetime:
        return self._anchor + timedelta(seconds=self._monotonic() - self._anchor_mono)

    def monotonic(self) -> float:
        return self._monotonic()

    def wall_offset(self) -> float:
        """Seconds the system clock is ahead (+) or behind (-) of :meth:`now`."""
        return self._wall() - self.now().timestamp()
