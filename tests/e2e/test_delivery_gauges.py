"""The delivery gauges on the metrics endpoint: deliveries by state and the age of the oldest
unfinished one, refreshed once a second whatever ``worker.routing_interval`` is (two queries
over the deliveries table that a short interval would otherwise repeat with every look)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.e2e.test_forward import storescu
from tests.support.datasets import make_ct_study
from tests.support.node import GatewayNode
from tests.support.peers import free_port

_GAUGE = re.compile(r'^gateway_deliveries\{state="(?P<state>\w+)"\} (?P<value>\S+)$', re.M)
_OLDEST = re.compile(r"^gateway_oldest_pending_delivery_seconds (?P<value>\S+)$", re.M)


def _gauges(node: GatewayNode) -> tuple[dict[str, float], float]:
    text = node.metrics()
    states = {m["state"]: float(m["value"]) for m in _GAUGE.finditer(text)}
    oldest = _OLDEST.search(text)
    assert oldest is not None, "gateway_oldest_pending_delivery_seconds missing"
    return states, float(oldest["value"])


def test_gauges_show_an_undelivered_study_and_refresh_once_a_second(tmp_path: Path) -> None:
    files = make_ct_study(tmp_path / "study", 2, seed=71)
    closed = free_port()  # nothing listens: every attempt fails and is retried
    node = GatewayNode(
        tmp_path / "node",
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": closed}],
        routes=[{"name": "all", "destinations": ["pacs"], "mode": "stream"}],
        worker={"routing_interval": 0.05, "poll_interval": 0.05, "backoff_initial": 30},
    )
    with node:
        storescu(node, files)
        deadline = time.monotonic() + 10
        while True:
            states, oldest = _gauges(node)
            unfinished = states.get("retry_wait", 0) + states.get("pending", 0)
            if unfinished >= 1 and oldest > 0:
                break
            assert time.monotonic() < deadline, f"gauges never showed the delivery: {states}"
            time.sleep(0.1)
        assert states.get("delivered", 0) == 0
        # the router looks every 0.05 s; the age it reports moves only when the gauges are
        # refreshed, so over 2.5 s it takes about three values, not fifty
        ages = set()
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            ages.add(_gauges(node)[1])
            time.sleep(0.02)
        assert 2 <= len(ages) <= 5, f"{len(ages)} distinct ages in 2.5 s"
