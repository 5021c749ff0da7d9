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
from gateway.dicom.scu import (
    AssociationLost,
    NoAcceptableSyntax,
    OutgoingFile,
    StoreSCU,
    context_groups,
)
from gateway.errors import RetryableError
from gateway.metrics import Metrics


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


class _Stale(Exception):
    """A reused association was lost before its first answer."""


class DicomDestination:
    def __init__(
        self, cfg: DestinationConfig, *, calling_ae_title: str, metrics: Metrics | None = None
    ) -> None:
        self.name = cfg.name
        self.scu = StoreSCU(cfg, calling_ae_title=calling_ae_title)
        if metrics is not None:
            counter = metrics.destination_associations
            self.scu.on_association = lambda kind: counter.labels(cfg.name, kind).inc()

    def deliver(
        self, files: Sequence[OutgoingFile], report: Report, should_stop: Callable[[], bool]
    ) -> None:
        for group in context_groups(files):
            todo = list(group)
            try:
                self._send(files, todo, report, should_stop, reuse=True)
            except _Stale:
                # a kept-open association the destination had dropped meanwhile, before it
                # answered anything: the same instances go on a new association
                self._send(files, todo, report, should_stop, reuse=False)
            if todo:  # stopping
                return

    def _send(
        self,
        files: Sequence[OutgoingFile],
        todo: list[int],
        report: Report,
        should_stop: Callable[[], bool],
        *,
        reuse: bool,
    ) -> None:
        """Send ``files[i]`` for ``i`` in ``todo`` on one association, removing each from
        ``todo`` once answered; ``todo`` is left non-empty when ``should_stop`` ends it."""
        with self.scu.associate([files[i] for i in todo], reuse=reuse) as send:
            while todo:
                i = todo[0]
                if should_stop():
                    return
                try:
                    status = send(files[i])
                except NoAcceptableSyntax as exc:
                    todo.pop(0)
                    report(SendResult(i, "failed", None, str(exc)))
                    continue
                except AssociationLost:
                    if send.reused and send.answered == 0:
                        raise _Stale from None
                    raise
                todo.pop(0)
                kind = st.classify(status)
                if kind is st.StatusClass.SUCCESS:
                    report(SendResult(i, "sent", status, ""))
                elif kind is st.StatusClass.WARNING:
                    report(SendResult(i, "warning", status, f"warning status 0x{status:04X}"))
                elif kind is st.StatusClass.RETRYABLE:
                    raise RetryableError(f"destination answered 0x{status:04X}")
                else:
                    report(SendResult(i, "failed", status, f"refused with 0x{status:04X}"))

    def close(self) -> None:
        self.scu.close()


def build_destinations(
    configs: Sequence[DestinationConfig],
    *,
    calling_ae_title: str,
    metrics: Metrics | None = None,
) -> dict[str, Destination]:
    out: dict[str, Destination] = {}
    for cfg in configs:
        if cfg.type == "dicom":  # peer destinations: gateway.peer.client
            out[cfg.name] = DicomDestination(
                cfg, calling_ae_title=calling_ae_title, metrics=metrics
            )
    return out
