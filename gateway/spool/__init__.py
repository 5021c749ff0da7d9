"""Durable bytes: the spool of received instances."""

from gateway.spool.store import Spool, SpooledObject

__all__ = ["Spool", "SpooledObject"]
