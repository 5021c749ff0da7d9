"""The study router: a study is routed once no instance has arrived for a route's quiet period.

Study completion is a query on the index (like Orthanc's ``StableAge``), not a folder's
mtime. Each instance that matched a route when it arrived is a candidate; when its study
has been quiet for the route's ``quiet_seconds``, the candidates become one delivery per
(study, destination, profile). Instances that arrive later make a follow-up delivery of
just those instances.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import func, or_, select, update

from gateway.audit.chain import AuditRecord, append
from gateway.clock import CLOCK_SLACK_SECONDS, Clock
from gateway.config import GatewayConfig
from gateway.index import deliveries
from gateway.index.db import Database
from gateway.index.models import Delivery, RouteCandidate, Study
from gateway.index.states import OPEN, State
from gateway.metrics import Metrics

log = logging.getLogger(__name__)


class Router:
    def __init__(self, cfg: GatewayConfig, *, db: Database, clock: Clock, metrics: Metrics) -> None:
        self.cfg = cfg
        self.db = db
        self.clock = clock
        self.metrics = metrics

    def run_once(self) -> int:
        """Create deliveries for every quiet study; return how many were created."""
        created = 0
        now = self.clock.now()
        for route in self.cfg.routes:
            if route.mode != "study":
                continue
            cutoff = now - timedelta(seconds=route.quiet_seconds)
            # a last arrival this far ahead was recorded under a clock since set back (F19)
            beyond = now + timedelta(seconds=route.quiet_seconds + CLOCK_SLACK_SECONDS)
            with self.db.session() as s:
                studies = list(
                    s.execute(
                        select(RouteCandidate.study_instance_uid)
                        .join(Study, Study.study_instance_uid == RouteCandidate.study_instance_uid)
                        .where(
                            RouteCandidate.route_name == route.name,
                            RouteCandidate.routed == 0,
                            or_(
                                Study.last_received_at <= cutoff,
                                Study.last_received_at > beyond,
                            ),
                        )
                        .distinct()
                        .limit(200)
                    ).scalars()
                )
            for study_uid in studies:
                created += self._route_study(route.name, study_uid)
        return created

    def _route_study(self, route_name: str, study_uid: str) -> int:
        route = self.cfg.route(route_name)
        now = self.clock.now()
        with self.db.session() as s:
            candidates = list(
                s.execute(
                    select(RouteCandidate)
                    .where(
                        RouteCandidate.route_name == route_name,
                        RouteCandidate.study_instance_uid == study_uid,
                        RouteCandidate.routed == 0,
                    )
                    .order_by(RouteCandidate.instance_id)
                    .with_for_update(skip_locked=True)
                ).scalars()
            )
            if not candidates:
                return 0
            ids = [c.id for c in candidates]
            result = s.execute(
                update(RouteCandidate)
                .where(RouteCandidate.id.in_(ids), RouteCandidate.routed == 0)
                .values(routed=1)
            )
            if getattr(result, "rowcount", len(ids)) != len(ids):
                s.rollback()
                return 0
            instance_ids = [c.instance_id for c in candidates]
            made = []
            for destination in route.destinations:
                d = deliveries.create(
                    s,
                    study_instance_uid=study_uid,
                    route_name=route_name,
                    destination=destination,
                    profile=route.profile,
                    instance_ids=instance_ids,
                    now=now,
                )
                made.append(d.id)
            append(
                s,
                AuditRecord(
                    "route",
                    "success",
                    study_instance_uid=study_uid,
                    detail={
                        "route": route_name,
                        "instances": len(instance_ids),
                        "deliveries": made,
                    },
                ),
                node=self.cfg.node.name,
                now=now,
            )
        log.info("study routed", extra={"route": route_name, "deliveries": len(made)})
        return len(made)

    def update_gauges(self, *, ended: bool = True) -> None:
        """Set the delivery gauges: deliveries by state and the oldest unfinished one's age.

        Unfinished deliveries (pending, in progress, waiting to retry) are few and found
        through the claim index; ``ended=False`` counts only those. The states a delivery
        ends in hold every delivery ever made, and counting them reads an index entry per
        row (45 ms at a million on SQLite): the caller asks for them less often."""
        now = self.clock.now()
        states = tuple(State) if ended else OPEN
        with self.db.read() as s:
            counts = dict(
                s.execute(
                    select(Delivery.state, func.count())
                    .where(Delivery.state.in_([t.value for t in states]))
                    .group_by(Delivery.state)
                ).all()
            )
            oldest = s.execute(
                select(func.min(Delivery.created_at)).where(
                    Delivery.state.in_([t.value for t in OPEN])
                )
            ).scalar()
        for state in states:
            self.metrics.deliveries.labels(state.value).set(counts.get(state.value, 0))
        if oldest is None:
            self.metrics.oldest_pending.set(0)
        else:
            if oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=now.tzinfo)
            self.metrics.oldest_pending.set(max(0.0, (now - oldest).total_seconds()))
