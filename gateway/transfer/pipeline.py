"""Preparing an instance for a destination: the seam for de-identification and sealing.

The worker runs every instance through a :class:`Pipeline` of steps before it leaves.
Each step takes the file the previous one produced and returns the file to send; a step
that cannot do its job raises :class:`~gateway.errors.QuarantineError` and nothing of that
delivery leaves (fail closed). The de-identification step (a route's profile) and the
sealing step (peer destinations) are added here by their issues; a delivery with no
profile to a DICOM destination sends the spooled bytes as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.dicom.scu import OutgoingFile


@dataclass(frozen=True)
class DeliveryContext:
    delivery_id: str
    route_name: str
    destination: str
    profile: str


class Step(Protocol):
    def __call__(self, item: OutgoingFile, delivery: DeliveryContext) -> OutgoingFile: ...


class Pipeline:
    def __init__(self, steps: Sequence[Step] = ()) -> None:
        self.steps = tuple(steps)

    def prepare(self, item: OutgoingFile, delivery: DeliveryContext) -> OutgoingFile:
        for step in self.steps:
            item = step(item, delivery)
        return item

    def summary(self, delivery_id: str) -> dict[str, object]:
        """What the steps did for this attempt, for its audit record (never values)."""
        out: dict[str, object] = {}
        for step in self.steps:
            describe = getattr(step, "summary", None)
            if describe is not None:
                out.update(describe(delivery_id))
        return out

    def release(self, delivery_id: str) -> None:
        """Let every step drop what it prepared for an attempt that is over."""
        for step in self.steps:
            release = getattr(step, "release", None)
            if release is not None:
                release(delivery_id)
