"""The asking side of federated query/retrieve: fan a caller's request out to peer nodes.

``[[qr.federation]]`` names the peers a calling AE title's C-FIND, C-MOVE and C-GET go to.
Each peer is asked over the peer channel (HTTPS, mutual TLS, the peer's certificate pinned:
:func:`gateway.peer.channel.client_peer_context`) with the identifier as DICOM JSON
(PS3.18 F, pydicom's encoder) and the requesting AE title; all peers are asked at once and
each has its own ``timeout``: a peer that has not answered by then is left out of the answer
(outcome ``timeout``), so one silent peer delays the answer by at most its timeout.

Outcomes per peer: ``answered``, ``refused`` (its policy: HTTP 403), ``timeout``,
``unreachable`` (connection or TLS failure) and ``error`` (any other answer). They go into
the request's audit row and ``gateway_qr_peer_requests_total{peer, outcome}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydicom.dataset import Dataset

from gateway.config import GatewayConfig
from gateway.config.model import FederationPeerConfig
from gateway.peer.channel import client_peer_context
from gateway.peer.material import PeerTrust

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 << 20


@dataclass
class PeerAnswer:
    """One peer's answer to a find (``rows``) or a retrieve (``packages``, ``instances``)."""

    peer: str
    outcome: str  # answered | refused | timeout | unreachable | error
    rows: list[dict[str, str]] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)
    instances: int = 0
    states: dict[str, str] = field(default_factory=dict)  # package id -> delivery state
    reason: str = ""

    def summary(self) -> dict[str, Any]:
        """For the audit row: the outcome and counts, no values."""
        out: dict[str, Any] = {"outcome": self.outcome}
        if self.reason:
            out["reason"] = self.reason
        if self.outcome == "answered":
            out["matches" if not self.packages else "packages"] = (
                len(self.rows) if not self.packages else self.packages
            )
            if self.packages:
                out["instances"] = self.instances
        return out


class FederationClient:
    """Asks the peers of ``[[qr.federation]]``; one event loop per request, all peers at once."""

    def __init__(
        self,
        cfg: GatewayConfig,
        peers: Mapping[str, PeerTrust],
        *,
        on_outcome: Any = None,  # called with (peer, outcome), for metrics
    ) -> None:
        self.cfg = cfg
        self.entries = cfg.qr.federation
        self.urls = {f.peer: peers[f.peer].url for f in self.entries}
        self.contexts: dict[str, ssl.SSLContext] = {
            f.peer: client_peer_context(cfg, peers[f.peer]) for f in self.entries
        }
        self.on_outcome = on_outcome

    def peers_for(self, caller: str) -> list[FederationPeerConfig]:
        return [f for f in self.entries if "*" in f.callers or caller in f.callers]

    def find(self, caller: str, model: str, identifier: Dataset) -> list[PeerAnswer]:
        body = {"requester": caller, "model": model, "identifier": identifier.to_json_dict()}
        return self._ask(self.peers_for(caller), "find", body)

    def retrieve(
        self, caller: str, service: str, model: str, identifier: Dataset, destination: str
    ) -> list[PeerAnswer]:
        body = {
            "requester": caller,
            "service": service,
            "model": model,
            "destination": destination,
            "identifier": identifier.to_json_dict(),
        }
        return self._ask(self.peers_for(caller), "retrieve", body)

    def package_states(self, peer: str, package_ids: Sequence[str]) -> dict[str, str]:
        """The delivery state at ``peer`` of retrieve packages it accepted ({} if it does not
        answer)."""
        entries = [e for e in self.entries if e.peer == peer]
        answers = self._ask(entries, "packages", {"packages": list(package_ids)}, count=False)
        return answers[0].states if answers and answers[0].outcome == "answered" else {}

    def _ask(
        self,
        entries: Sequence[FederationPeerConfig],
        action: str,
        body: dict[str, Any],
        *,
        count: bool = True,
    ) -> list[PeerAnswer]:
        if not entries:
            return []
        document = json.dumps(body).encode()

        async def all_peers() -> list[PeerAnswer]:
            return list(await asyncio.gather(*(self._one(e, action, document) for e in entries)))

        answers = asyncio.run(all_peers())
        for a in answers:
            if a.outcome != "answered":
                log.warning(
                    "peer did not answer a federated request",
                    extra={"peer": a.peer, "outcome": a.outcome, "action": action},
                )
            if self.on_outcome is not None and count:
                self.on_outcome(a.peer, a.outcome)
        return answers

    async def _one(self, entry: FederationPeerConfig, action: str, document: bytes) -> PeerAnswer:
        try:
            return await asyncio.wait_for(self._post(entry, action, document), entry.timeout)
        except TimeoutError:
            return PeerAnswer(entry.peer, "timeout")
        except (aiohttp.ClientError, OSError) as exc:
            return PeerAnswer(entry.peer, "unreachable", reason=exc.__class__.__name__)

    async def _post(self, entry: FederationPeerConfig, action: str, document: bytes) -> PeerAnswer:
        timeout = aiohttp.ClientTimeout(total=entry.timeout)
        connector = aiohttp.TCPConnector(ssl=self.contexts[entry.peer], limit=1)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.post(
                f"{self.urls[entry.peer]}/peer/v1/qr/{action}",
                data=document,
                headers={"Content-Type": "application/json"},
            ) as response,
        ):
            raw = await response.content.read(MAX_ANSWER_BYTES + 1)
            try:
                answer = json.loads(raw) if len(raw) <= MAX_ANSWER_BYTES else None
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                return PeerAnswer(entry.peer, "error", reason=f"http-{response.status}")
            if response.status == 403:
                return PeerAnswer(entry.peer, "refused", reason=str(answer.get("error", ""))[:64])
            if response.status != 200:
                return PeerAnswer(entry.peer, "error", reason=str(answer.get("error", ""))[:64])
            return _answer(entry.peer, answer)


def _answer(peer: str, answer: Mapping[str, Any]) -> PeerAnswer:
    rows = answer.get("matches", [])
    packages = answer.get("packages", [])
    instances = answer.get("instances", 0)
    states = answer.get("states", {})
    if (
        not isinstance(rows, list)
        or not all(
            isinstance(r, dict) and all(isinstance(v, str) for v in r.values()) for r in rows
        )
        or not isinstance(packages, list)
        or not all(isinstance(p, str) for p in packages)
        or not isinstance(instances, int)
        or not isinstance(states, dict)
        or not all(isinstance(v, str) for v in states.values())
    ):
        return PeerAnswer(peer, "error", reason="malformed-answer")
    return PeerAnswer(
        peer, "answered", rows=rows, packages=packages, instances=instances, states=states
    )


__all__ = ["FederationClient", "PeerAnswer"]
