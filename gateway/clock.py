"""An injectable clock: wall time (UTC, for records) and monotonic time (for timeouts)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall-clock time, for what is recorded."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes back, for deadlines."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()
