"""Identifiers the gateway makes itself: never derived from anything a peer sent."""

from __future__ import annotations

import uuid


def new_id() -> str:
    """A random 32-hex-digit id, safe as a file name and a log field."""
    return uuid.uuid4().hex
