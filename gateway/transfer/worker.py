"""The delivery worker: claim a delivery, prepare its instances, send, record, repeat.

Each attempt holds a lease on its delivery, renewed as results are recorded. Results are
written in small batches; a crash between a destination's answer and its record only
means that instance is sent again under the same SOP Instance UID, which DICOM allows
(no second copy with a new UID is ever made). Receiving never waits on this: the worker
runs on its own threads and only reads the spool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from gateway.audit.chain import AuditRecord, append
from gateway.clock import CLOCK_SLACK_SECONDS, Clock
from gateway.config import GatewayConfig
from gateway.dicom.scu import OutgoingFile
from gateway.errors import (
    GatewayError,
    IndexError_,
    PermanentError,
    QuarantineError,
    RetryableError,
    TLSRefusedError,
)
from gateway.index import deliveries
from gateway.index.db import Database
from gateway.index.models import Delivery
from gateway.index.states import Event, State
from gateway.metrics import Metrics
from gateway.spool.store import Spool
from gateway.transfer.destinations import Destination, SendResult
from gateway.transfer.pipeline import DeliveryContext, Pipeline

log = logging.getLogger(__name__)

_BATCH = 32
_BATCH_SECONDS = 1.0


@dataclass
class _Progress:
    results: list[tuple[int, SendResult]]
    last_flush: float
    lease_lost: bool = False


def backoff(attempt: int, *, initial: float, multiplier: float, cap: float) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (exponential with a cap)."""
    try:
        return float(min(cap, initial * multiplier ** max(0, attempt - 1)))
    except OverflowError:  # a huge attempt number: the cap
        return float(cap)


class Worker:
    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        db: Database,
        spool: Spool,
        clock: Clock,
        metrics: Metrics,
        destinations: Mapping[str, Destination],
        pipeline: Pipeline | None = None,
        name: str = "worker",
        lease_prefix: str = "",
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.spool = spool
        self.clock = clock
        self.metrics = metrics
        self.destinations = destinations
        self.pipeline = pipeline or Pipeline()
        self.name = name
        self.lease_prefix = lease_prefix  # leases are held as <lease_prefix><name>-<thread>
        self.wakeup = threading.Event()
        self._stop = threading.Event()
        self._poll_lock = threading.Lock()
        self._last_poll = -float("inf")
        self._threads: list[threading.Thread] = []
        self.capacity = {d.name: d.max_associations for d in cfg.destinations}

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.cfg.worker.threads):
            t = threading.Thread(
                target=self._loop,
                args=(f"{self.lease_prefix}{self.name}-{i}",),
                name=f"{self.name}-{i}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.wakeup.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for destination in self.destinations.values():
            close = getattr(destination, "close", None)
            if close is not None:  # associations kept open between deliveries
                close()

    def _loop(self, worker_id: str) -> None:
        look = True  # the first look, after work or a wake-up: always
        while not self._stop.is_set():
            worked = False
            if look or self._poll_turn():
                try:
                    worked = self.run_once(worker_id)
                except IndexError_:
                    log.warning("index unavailable; worker backing off", exc_info=True)
                except Exception:  # thread boundary: a bug must not kill the worker thread
                    log.exception("worker iteration failed")
            look = worked
            if not worked and self.wakeup.wait(self.cfg.worker.poll_interval):
                self.wakeup.clear()
                # woken by a streamed instance (or a routed study): a streaming delivery is
                # claimable once its study has been quiet a moment (or after its linger), so
                # look again then. While the study streams, its next instances wake the
                # thread again meanwhile, and its last one makes the look that finds it quiet
                self._stop.wait(deliveries.STREAM_QUIET.total_seconds())
                look = True

    def _poll_turn(self) -> bool:
        """Whether an idle thread whose wait ran out looks for due work now: one look per
        ``poll_interval`` for all threads together (deliveries whose retry time came, leases
        that ran out). Each thread's wait runs out every interval; without this every idle
        thread looked, ``threads`` queries per interval where one finds the same."""
        now = time.monotonic()
        with self._poll_lock:
            if now - self._last_poll < self.cfg.worker.poll_interval * 0.9:
                return False
            self._last_poll = now
            return True

    # --- one delivery ----------------------------------------------------------------------
    def run_once(self, worker_id: str) -> bool:
        now = self.clock.now()
        horizon = max(self.cfg.worker.lease_seconds, self.cfg.worker.backoff_max)
        horizon += CLOCK_SLACK_SECONDS
        with self.db.read() as s:  # idle polls never queue ingest behind the writer lock
            if not deliveries.any_due(s, now=now, horizon=horizon, capacity=self.capacity):
                return False
        with self.db.session() as s:
            claim = deliveries.claim(
                s,
                worker=worker_id,
                now=now,
                lease_seconds=self.cfg.worker.lease_seconds,
                capacity=self.capacity,
                horizon=horizon,
            )
        if claim is None:
            return False
        self._attempt(claim.delivery_id, worker_id, started=now)
        return True

    def _attempt(self, delivery_id: str, worker_id: str, *, started: datetime) -> None:
        progress = _Progress([], time.monotonic())
        done = threading.Event()
        keeper = threading.Thread(
            target=self._keep_lease,
            args=(delivery_id, worker_id, progress, done),
            name=f"{worker_id}-lease",
            daemon=True,
        )
        keeper.start()
        try:
            self._run_attempt(delivery_id, worker_id, started=started, progress=progress)
        finally:
            done.set()
            keeper.join()

    def _keep_lease(
        self, delivery_id: str, worker_id: str, progress: _Progress, done: threading.Event
    ) -> None:
        """Renew the attempt's lease every third of it, whatever the sending does.

        Results renew it too, but a slow destination, a slow disk or a loaded machine can
        leave more than a lease between two of them; another worker would then take the
        delivery over from a live attempt (and count an attempt more). Only a dead process
        (or a lost index) lets a lease run out."""
        every = self.cfg.worker.lease_seconds / 3
        while not done.wait(every):
            until = self.clock.now() + timedelta(seconds=self.cfg.worker.lease_seconds)
            try:
                with self.db.session() as s:
                    if not deliveries.renew(s, delivery_id, worker=worker_id, until=until):
                        progress.lease_lost = True
                        return
            except Exception:  # the index unavailable: the attempt's own writes fail too
                log.warning("lease renewal failed", exc_info=True)

    def _run_attempt(
        self, delivery_id: str, worker_id: str, *, started: datetime, progress: _Progress
    ) -> None:
        with self.db.session() as s:
            delivery = s.get(Delivery, delivery_id)
            assert delivery is not None
            items = deliveries.pending_items(s, delivery_id)
            ctx = DeliveryContext(
                delivery.id, delivery.route_name, delivery.destination, delivery.profile
            )
            study_uid = delivery.study_instance_uid
        destination = self.destinations.get(ctx.destination)
        files: list[OutgoingFile] = []
        item_ids: list[int] = []
        event: Event
        reason = ""
        refused = ""  # a destination's certificate refused at the TLS handshake (F14)
        # results are recorded, and the lease renewed, well before the lease could run out
        renew_every = min(_BATCH_SECONDS, self.cfg.worker.lease_seconds / 3)
        try:
            if destination is None:
                raise PermanentError("destination is no longer configured")
            for item, instance in items:
                source = OutgoingFile(
                    sop_class_uid=instance.sop_class_uid,
                    sop_instance_uid=instance.sop_instance_uid,
                    transfer_syntax_uid=instance.transfer_syntax_uid,
                    path=self.spool.path_of(instance.spool_key),
                )
                files.append(self.pipeline.prepare(source, ctx))
                item_ids.append(item.id)
                if time.monotonic() - progress.last_flush >= renew_every:
                    # preparing (de-identifying) a large delivery can outlast the lease:
                    # renew it as sending does, or another worker takes the delivery over
                    self._flush(delivery_id, worker_id, progress)
                    if progress.lease_lost:
                        break

            def report(result: SendResult) -> None:
                progress.results.append((item_ids[result.index], result))
                self.metrics.instances_forwarded.labels(ctx.destination, result.outcome).inc()
                if result.outcome != "failed":
                    self.metrics.bytes_sent.labels(ctx.destination).inc(_size(files[result.index]))
                if (
                    len(progress.results) >= _BATCH
                    or time.monotonic() - progress.last_flush >= renew_every
                ):
                    self._flush(delivery_id, worker_id, progress)

            if not progress.lease_lost:
                destination.deliver(
                    files, report, lambda: progress.lease_lost or self._stop.is_set()
                )
                self._flush(delivery_id, worker_id, progress)
            if progress.lease_lost:
                # the prepared files stay: the worker that holds the lease now prepares into
                # the same folder and may be sending from it; its release removes them
                log.warning("lease lost; attempt abandoned", extra={"delivery_id": delivery_id})
                return
            event = Event.DELIVERED
        except QuarantineError as exc:
            event, reason = Event.QUARANTINE, str(exc)
        except TLSRefusedError as exc:  # retried: a fixed certificate lets it go
            event, reason, refused = Event.RETRYABLE_FAILURE, str(exc), exc.reason
        except RetryableError as exc:
            event, reason = Event.RETRYABLE_FAILURE, str(exc)
        except PermanentError as exc:
            event, reason = Event.PERMANENT_FAILURE, str(exc)
        except GatewayError as exc:
            event, reason = Event.RETRYABLE_FAILURE, f"{exc.__class__.__name__}: {exc}"
        if progress.results:
            # what the destination already took is recorded before the attempt closes
            self._flush(delivery_id, worker_id, progress)
        try:
            self._finish(
                delivery_id,
                worker_id,
                event,
                reason,
                started,
                study_uid,
                prepared=self.pipeline.summary(delivery_id),
                tls_refused=refused,
            )
        finally:
            self.pipeline.release(delivery_id)

    def _flush(self, delivery_id: str, worker_id: str, progress: _Progress) -> None:
        pending, progress.results = progress.results, []
        progress.last_flush = time.monotonic()
        until = self.clock.now() + timedelta(seconds=self.cfg.worker.lease_seconds)
        with self.db.session() as s:
            deliveries.record_items(
                s, [(item_id, r.outcome, r.status, r.reason) for item_id, r in pending]
            )
            if not deliveries.renew(s, delivery_id, worker=worker_id, until=until):
                progress.lease_lost = True

    def _finish(
        self,
        delivery_id: str,
        worker_id: str,
        event: Event,
        reason: str,
        started: datetime,
        study_uid: str,
        *,
        prepared: dict[str, object] | None = None,
        tls_refused: str = "",
    ) -> None:
        now = self.clock.now()
        with self.db.session() as s:
            delivery = s.execute(
                select(Delivery).where(Delivery.id == delivery_id).with_for_update()
            ).scalar_one()
            if delivery.state != State.IN_PROGRESS.value or delivery.lease_owner != worker_id:
                log.info(
                    "delivery changed under the worker; not recording",
                    extra={"delivery_id": delivery_id},
                )
                return
            deliveries.refresh_counts(s, delivery)
            next_at = None
            unsent = delivery.instance_count - delivery.sent_count - delivery.failed_count
            if event is Event.DELIVERED and unsent > 0:
                # the attempt ended early (the node is stopping): the rest goes next time
                event, reason = (
                    Event.RETRYABLE_FAILURE,
                    f"attempt ended with {unsent} instance(s) not yet sent",
                )
            if event is Event.DELIVERED:
                if delivery.failed_count:
                    event, reason = (
                        Event.PERMANENT_FAILURE,
                        (f"{delivery.failed_count} instance(s) refused by the destination"),
                    )
                elif delivery.warning_count:
                    event = Event.DELIVERED_WITH_WARNINGS
                    reason = f"{delivery.warning_count} instance(s) stored with a warning"
            elif event is Event.RETRYABLE_FAILURE:
                if delivery.attempts >= self.cfg.worker.max_attempts:
                    event = Event.ATTEMPTS_EXHAUSTED
                else:
                    w = self.cfg.worker
                    next_at = now + timedelta(
                        seconds=backoff(
                            delivery.attempts,
                            initial=w.backoff_initial,
                            multiplier=w.backoff_multiplier,
                            cap=w.backoff_max,
                        )
                    )
            deliveries.finish_attempt(
                s,
                delivery,
                event=event,
                worker=worker_id,
                started_at=started,
                now=now,
                reason=reason,
                next_attempt_at=next_at,
            )
            outcome = {
                Event.DELIVERED: "success",
                Event.DELIVERED_WITH_WARNINGS: "warning",
                Event.RETRYABLE_FAILURE: "retry",
            }.get(event, "failure")
            append(
                s,
                AuditRecord(
                    "delivery-attempt",
                    outcome,
                    study_instance_uid=study_uid,
                    delivery_id=delivery_id,
                    detail={
                        "destination": delivery.destination,
                        "attempt": delivery.attempts,
                        "state": delivery.state,
                        "sent": delivery.sent_count,
                        "warnings": delivery.warning_count,
                        "failed": delivery.failed_count,
                        "reason": reason,
                        **({"prepared": prepared} if prepared else {}),
                    },
                ),
                node=self.cfg.node.name,
                now=now,
            )
            if tls_refused:  # a security event of its own, beside the attempt
                append(
                    s,
                    AuditRecord(
                        "security",
                        "failure",
                        delivery_id=delivery_id,
                        detail={
                            "reason": "tls-destination-refused",
                            "destination": delivery.destination,
                            "error": tls_refused,
                        },
                    ),
                    node=self.cfg.node.name,
                    now=now,
                )
                self.metrics.security_events.labels("tls-destination-refused").inc()
            self.metrics.delivery_attempts.labels(delivery.destination, event.value).inc()
        level = logging.INFO if outcome in ("success", "warning") else logging.WARNING
        log.log(
            level,
            "delivery attempt finished",
            extra={"delivery_id": delivery_id, "event": event.value, "reason": reason},
        )


def _size(f: OutgoingFile) -> int:
    try:
        return f.path.stat().st_size
    except OSError:
        return 0
