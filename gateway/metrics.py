"""Prometheus metrics. Labels are bounded sets (our AE titles, destination names, outcomes),
never UIDs, calling AE titles from the wire, or patient data."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.associations = Counter(
            "gateway_associations", "Associations by outcome", ["outcome"], registry=r
        )
        self.instances_received = Counter(
            "gateway_instances_received",
            "C-STORE requests by outcome",
            ["called_ae", "outcome"],
            registry=r,
        )
        self.bytes_received = Counter(
            "gateway_received_bytes", "Bytes of instances stored", ["called_ae"], registry=r
        )
        self.ingest_latency = Histogram(
            "gateway_ingest_latency_seconds",
            "From a complete C-STORE data set to the answer (parse, fsync, commit)",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.instances_forwarded = Counter(
            "gateway_instances_forwarded",
            "Instances sent to destinations by outcome",
            ["destination", "outcome"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "gateway_sent_bytes", "Bytes of instances sent", ["destination"], registry=r
        )
        self.destination_associations = Counter(
            "gateway_destination_associations",
            "Associations to destinations: opened, or reused (kept open from a delivery)",
            ["destination", "kind"],
            registry=r,
        )
        self.delivery_attempts = Counter(
            "gateway_delivery_attempts",
            "Delivery attempts by outcome",
            ["destination", "outcome"],
            registry=r,
        )
        self.deliveries = Gauge("gateway_deliveries", "Deliveries by state", ["state"], registry=r)
        self.oldest_pending = Gauge(
            "gateway_oldest_pending_delivery_seconds",
            "Age of the oldest delivery not yet delivered, failed or cancelled",
            registry=r,
        )
        self.spool_healthy = Gauge(
            "gateway_spool_healthy",
            "1 while the spool takes writes; 0 after a failed fsync until a probe succeeds",
            registry=r,
        )
        self.spool_healthy.set(1)
        self.spool_faults = Counter(
            "gateway_spool_faults", "Failed spool fsyncs (the spool went unhealthy)", registry=r
        )
        self.clock_offset = Gauge(
            "gateway_clock_offset_seconds",
            "How far the system clock has stepped from the node's time line since start",
            registry=r,
        )
        self.security_events = Counter(
            "gateway_security_events",
            "Refused connections, PDUs and associations",
            ["kind"],
            registry=r,
        )

        self.audit_export_lag = Gauge(
            "gateway_audit_export_lag_rows",
            "Audit rows not yet sent to the audit repository (the chain's head minus the cursor)",
            registry=r,
        )
        self.audit_export_messages = Counter(
            "gateway_audit_export_messages",
            "Audit messages written to the audit repository (resends included)",
            registry=r,
        )
        self.audit_export_failures = Counter(
            "gateway_audit_export_failures",
            "Failed connections or sends to the audit repository by kind (connect, tls, send)",
            ["kind"],
            registry=r,
        )

        self.qr_peer_requests = Counter(
            "gateway_qr_peer_requests",
            "Federated query/retrieve requests to peer nodes by outcome",
            ["peer", "outcome"],
            registry=r,
        )

    def serve(self, host: str, port: int, *, relayed: Sequence[Path] = ()) -> None:
        """The endpoint; the metrics files of the node's other processes (``relayed``: its
        worker and receiver processes) are added to this process's own
        (:class:`MergedCollector`)."""
        registry = self.registry
        if relayed:
            registry = CollectorRegistry()
            registry.register(MergedCollector(self.registry, relayed))
        start_http_server(port, addr=host, registry=registry)


class MergedCollector(Collector):
    """This process's metrics with those other processes of the node wrote to ``paths``
    (Prometheus text format, each rewritten whole by :mod:`gateway.worker_process`):
    counters, histograms and their ``_created`` samples are combined (sum; earliest
    creation), a gauge is this process's where it has the sample and the first file's that
    has it otherwise. A missing or unreadable file adds nothing."""

    def __init__(self, own: CollectorRegistry, paths: Sequence[Path]) -> None:
        self.own = own
        self.paths = tuple(paths)

    def collect(self) -> Iterator[Metric]:
        families = list(self.own.collect())
        for path in self.paths:
            families = _merged(families, _read_families(path))
        yield from families


def _read_families(path: Path) -> dict[str, Metric]:
    try:
        text = path.read_text(encoding="utf-8")
        return {m.name: m for m in text_string_to_metric_families(text)}
    except (OSError, ValueError):
        return {}


def _merged(families: list[Metric], relayed: dict[str, Metric]) -> list[Metric]:
    out: list[Metric] = []
    for family in families:
        other = relayed.pop(family.name, None)
        if other is None or other.type != family.type:
            out.append(family)
            continue
        merged = Metric(family.name, family.documentation, family.type, family.unit)
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], Sample] = {}
        for sample in (*family.samples, *other.samples):
            key = (sample.name, tuple(sorted(sample.labels.items())))
            seen = samples.get(key)
            if seen is None:
                samples[key] = sample
            elif family.type == "gauge":
                continue  # the first one's
            elif sample.name.endswith("_created"):
                samples[key] = seen._replace(value=min(seen.value, sample.value))
            else:
                samples[key] = seen._replace(value=seen.value + sample.value)
        merged.samples = list(samples.values())
        out.append(merged)
    out.extend(relayed.values())
    return out
