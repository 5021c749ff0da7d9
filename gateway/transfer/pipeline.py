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
