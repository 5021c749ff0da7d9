"""Destinations: where deliveries go. A small interface, with DICOM (C-STORE SCU) first.

A destination takes prepared files and reports one result per file as it goes. It raises
:class:`~gateway.errors.RetryableError` when the rest may go through later (connection
refused, timeout, out-of-resources status) and :class:`~gateway.errors.PermanentError`
when nothing will change by resending (a permanent association rejection).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.config import DestinationConfig
from gateway.dicom import status as st
from gateway.dicom.scu import NoAcceptableSyntax, OutgoingFile, StoreSCU, context_groups
from gateway.errors import RetryableError


@dataclass(frozen=True)
class SendResult:
    index: int
    outcome: str  # "sent" | "warning" | "failed"
    status: int | None
    reason: str


Report = Callable[[SendResult], None]


class Destination(Protocol):
    name: str

    def deliver(
        self, files: Sequence[OutgoingFile], report: Report, should_stop: Callable[[], bool]
    ) -> None: ...


class DicomDestination:
    def __init__(self, cfg: DestinationConfig, *, calling_ae_title: str) -> None:
        self.name = cfg.name
        self.scu = StoreSCU(cfg, calling_ae_title=calling_ae_title)

    def deliver(
        self, files: Sequence[OutgoingFile], report: Report, should_stop: Callable[[], bool]
    ) -> None:
        for group in context_groups(files):
            with self.scu.associate([files[i] for i in group]) as send:
                for i in group:
                    if should_stop():
                        return
                    try:
                        status = send(files[i])
                    except NoAcceptableSyntax as exc:
                        report(SendResult(i, "failed", None, str(exc)))
                        continue
                    kind = st.classify(status)
                    if kind is st.StatusClass.SUCCESS:
                        report(SendResult(i, "sent", status, ""))
                    elif kind is st.StatusClass.WARNING:
                        report(SendResult(i, "warning", status, f"warning status 0x{status:04X}"))
                    elif kind is st.StatusClass.RETRYABLE:
                        raise RetryableError(f"destination answered 0x{status:04X}")
                    else:
                        report(SendResult(i, "failed", status, f"refused with 0x{status:04X}"))


def build_destinations(
    configs: Sequence[DestinationConfig], *, calling_ae_title: str
) -> dict[str, Destination]:
    out: dict[str, Destination] = {}
    for cfg in configs:
        if cfg.type == "dicom":  # peer destinations: gateway.peer.client
            out[cfg.name] = DicomDestination(cfg, calling_ae_title=calling_ae_title)
    return out
