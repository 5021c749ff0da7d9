"""The answering side of federated query/retrieve: a peer node's C-FIND and retrieve requests.

Requests arrive on the peer channel (``POST /peer/v1/qr/find`` and ``/peer/v1/qr/retrieve``,
see :mod:`gateway.peer.server`), from a peer its client certificate names, on behalf of a
requesting AE title at that peer. The policy (:mod:`gateway.qr.policy`) decides: no grant
for the pair, the request is refused (``QueryRetrieveError`` 0x0124) and audited here as a
``c-find`` / ``c-move`` / ``c-get`` row with outcome ``refused``.

* **find**: with no profile among the pair's grants, the keys are matched in SQL as for a
  local C-FIND and the studies no grant matches are dropped. With a profile, candidate rows
  (at most ``qr.grant_scan_limit``; a StudyInstanceUID key, original or keyed, narrows
  them in SQL) are de-identified with their study's profile and matched in memory on the
  de-identified values, so a key on an identifying attribute finds nothing by its original
  value. The answers are what the profile leaves.
* **retrieve**: the same matching selects studies, series or instances; each series becomes
  one delivery to the peer (route ``qr:c-move`` or ``qr:c-get``, a name no configured route
  can have; the grant's profile), which the worker sends as a sealed package (de-identified
  by :class:`~gateway.transfer.prepare.DeidStep`); the answer lists the package ids (=
  delivery ids) and the instance count, and the requester waits for them to arrive.

The request's audit row is written in the transaction that reads the matches (find) or
creates the deliveries (retrieve).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.audit.chain import AuditRecord, append
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.config.loader import is_valid_ae_title
from gateway.config.model import PeerGrantConfig
from gateway.deid import ProjectKey
from gateway.deid.profiles import Profile
from gateway.dicom.retrieve import IDENTIFIER_MISMATCH, NOT_AUTHORIZED
from gateway.errors import DeidError, ProfileError, QueryRetrieveError
from gateway.index import deliveries
from gateway.index.db import Database
from gateway.index.models import Delivery, Study
from gateway.qr import policy, query
from gateway.qr.matching import Matcher, Single, UIDList, Universal
from gateway.transfer.prepare import resolve_profile

log = logging.getLogger(__name__)

MAX_RETRIEVE_INSTANCES = 100000


def peer_destination(peer: str) -> str:
    """The worker's destination name for sending retrieved instances to ``peer`` (a name
    no configured destination can have: ``:`` is not allowed there)."""
    return f"peer:{peer}"


@dataclass(frozen=True)
class PeerRequest:
    requester: str
    model: str
    identifier: Dataset
    service: str = "c-find"
    destination: str = ""


@dataclass(frozen=True)
class _Answer:
    original: dict[str, str]
    answer: dict[str, str]
    grant: PeerGrantConfig


class PeerQueryResponder:
    """Answers a peer's find and retrieve requests by this node's ``[[qr.grants]]``."""

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        qr: Any,  # gateway.qr.service.QRService: identifier parsing, level checks
        db: Database,
        clock: Clock,
        key_of: Callable[[], ProjectKey],
        on_delivery: Callable[[], None],
    ) -> None:
        self.cfg = cfg
        self.qr = qr
        self.db = db
        self.clock = clock
        self.key_of = key_of
        self.on_delivery = on_delivery

    # --- requests --------------------------------------------------------------------------
    def find(self, peer: str, address: str, body: Mapping[str, Any]) -> dict[str, Any]:
        request = _parse(body, "c-find")
        grants = self._grants(peer, address, request)
        level, matchers, requested = self._identifier(peer, address, request)
        limit = self.cfg.qr.max_results
        wanted_counts = {k for k in requested if k in query.COUNTS}
        with self.db.session() as s:
            answers, truncated = self._matches(s, level, matchers, grants, request.requester)
            truncated = truncated or len(answers) > limit
            answers = answers[:limit]
            rows = []
            for a in answers:
                counts = query.related_counts(s, a.original, wanted_counts)
                rows.append({k: v for k, v in {**a.answer, **counts}.items() if k in requested})
            self._audit(
                s,
                request,
                peer,
                address,
                "success",
                level=level,
                matches=len(rows),
                profiles=sorted({a.grant.profile for a in answers}),
            )
        return {"level": level, "matches": rows, "truncated": truncated}

    def retrieve(self, peer: str, address: str, body: Mapping[str, Any]) -> dict[str, Any]:
        service = str(body.get("service", ""))
        if service not in ("c-move", "c-get"):
            raise QueryRetrieveError(IDENTIFIER_MISMATCH, "bad-request")
        request = _parse(body, service)
        grants = self._grants(peer, address, request)
        level, matchers, _ = self._identifier(peer, address, request)
        if level == "PATIENT" or all(isinstance(m, Universal) for m in matchers.values()):
            self._refuse(peer, address, request, IDENTIFIER_MISMATCH, "no-unique-key")
        packages: list[str] = []
        with self.db.session() as s:
            answers, _ = self._matches(s, level, matchers, grants, request.requester)
            allowed = [a for a in answers if a.grant.retrieve]
            refused = bool(answers) and not allowed
            if refused:
                self._audit(
                    s,
                    request,
                    peer,
                    address,
                    "refused",
                    reason="retrieve-not-granted",
                    status=NOT_AUTHORIZED,
                )
        if refused:
            raise QueryRetrieveError(NOT_AUTHORIZED, "retrieve-not-granted")
        with self.db.session() as s:
            by_series: dict[tuple[str, str, str], list[int]] = {}
            seen: set[int] = set()
            for a in allowed:
                keys: dict[str, Matcher] = {}
                for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                    if keyword in a.original and query.at_or_above(
                        query.ATTRIBUTES[keyword].level, level
                    ):
                        keys[keyword] = Single(a.original[keyword])
                for inst in query.instances_for(
                    s, level="IMAGE", matchers=keys, limit=MAX_RETRIEVE_INSTANCES
                ):
                    if inst.id in seen:
                        continue
                    seen.add(inst.id)
                    group = (inst.study_instance_uid, inst.series_instance_uid, a.grant.profile)
                    by_series.setdefault(group, []).append(inst.id)
            now = self.clock.now()
            for (study_uid, _series, profile), ids in by_series.items():
                d = deliveries.create(
                    s,
                    study_instance_uid=study_uid,
                    route_name=f"qr:{service}",
                    destination=peer_destination(peer),
                    profile=profile,
                    instance_ids=ids,
                    now=now,
                )
                packages.append(d.id)
            studies = sorted({study for study, _s, _p in by_series})
            self._audit(
                s,
                request,
                peer,
                address,
                "started",
                level=level,
                studies=studies,
                packages=packages,
                instances=len(seen),
                profiles=sorted({p for _st, _se, p in by_series}),
            )
        if packages:
            self.on_delivery()
        log.info("peer retrieve queued", extra={"peer": peer, "packages": len(packages)})
        return {"packages": packages, "instances": len(seen)}

    def package_states(self, peer: str, address: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """The delivery state of retrieve packages this node makes for ``peer`` (others' are
        not found), so the asking node stops waiting for one that failed or quarantined."""
        ids = body.get("packages")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(ids) > 1000:
            raise QueryRetrieveError(IDENTIFIER_MISMATCH, "bad-request")
        states: dict[str, str] = {}
        with self.db.session() as s:
            for delivery in s.execute(
                select(Delivery).where(
                    Delivery.id.in_(ids), Delivery.destination == peer_destination(peer)
                )
            ).scalars():
                states[delivery.id] = delivery.state
        return {"states": states}

    # --- policy, identifiers, matching ------------------------------------------------------
    def _grants(self, peer: str, address: str, request: PeerRequest) -> list[PeerGrantConfig]:
        grants = policy.grants_for(self.cfg, peer, request.requester)
        if not grants:
            self._refuse(peer, address, request, NOT_AUTHORIZED, "peer-caller-not-granted")
        return grants

    def _identifier(
        self, peer: str, address: str, request: PeerRequest
    ) -> tuple[str, dict[str, Matcher], list[str]]:
        try:
            level = self.qr.level_of(request.model, request.identifier)
            matchers, requested = self.qr.keys_of(request.identifier)
        except QueryRetrieveError as exc:
            self._refuse(peer, address, request, exc.status, exc.reason)
        return level, matchers, requested

    def _refuse(
        self, peer: str, address: str, request: PeerRequest, status: int, reason: str
    ) -> NoReturn:
        with self.db.session() as s:
            self._audit(s, request, peer, address, "refused", reason=reason, status=status)
        raise QueryRetrieveError(status, reason)

    def _matches(
        self,
        s: Session,
        level: str,
        matchers: dict[str, Matcher],
        grants: list[PeerGrantConfig],
        requester: str,
    ) -> tuple[list[_Answer], bool]:
        """Matching rows with what is answered for each, and whether the scan was cut."""
        limit = self.cfg.qr.max_results + 1
        profiles: dict[str, Profile] = {}

        def profile(name: str) -> Profile:
            if name not in profiles:
                try:
                    profiles[name] = resolve_profile(self.cfg, name)
                except ProfileError as exc:
                    raise QueryRetrieveError(0xC000, "grant-profile-unusable") from exc
            return profiles[name]

        if not any(g.profile for g in grants):
            out = []
            for row in query.find_rows(s, level=level, matchers=matchers, limit=limit):
                grant = policy.grant_for_study(grants, row, requester)
                if grant is not None:
                    out.append(_Answer(row, row, grant))
            return out, False
        scan = self.cfg.qr.grant_scan_limit
        narrowed = self._narrow_by_study(s, matchers)
        candidates = query.find_rows(s, level=level, matchers=narrowed, limit=scan + 1)
        truncated = len(candidates) > scan
        key = self.key_of()
        out = []
        for row in candidates[:scan]:
            grant = policy.grant_for_study(grants, row, requester)
            if grant is None:
                continue
            answer = row
            if grant.profile:
                try:
                    answer = policy.deidentify_row(row, profile(grant.profile), key)
                except DeidError as exc:  # fail closed: a row that cannot be cleaned is left out
                    log.warning("answer not de-identified; left out", extra={"error": str(exc)})
                    continue
            if policy.row_matches(answer, matchers, level):
                out.append(_Answer(row, answer, grant))
                if len(out) >= limit:
                    break
        return out, truncated

    def _narrow_by_study(self, s: Session, matchers: dict[str, Matcher]) -> dict[str, Matcher]:
        """A StudyInstanceUID key as the original UIDs it names (themselves, or the studies
        whose keyed UID it is), so a retrieve does not scan the index."""
        wanted = matchers.get("StudyInstanceUID")
        if isinstance(wanted, Single):
            uids = {wanted.value}
        elif isinstance(wanted, UIDList):
            uids = set(wanted.uids)
        else:
            return {}
        key = self.key_of()
        originals = set(uids)
        for (study_uid,) in s.execute(select(Study.study_instance_uid)):
            if key.uid(study_uid) in uids:
                originals.add(study_uid)
        return {"StudyInstanceUID": UIDList(tuple(sorted(originals)))}

    # --- audit -------------------------------------------------------------------------------
    def _audit(
        self,
        s: Session,
        request: PeerRequest,
        peer: str,
        address: str,
        outcome: str,
        *,
        status: int | None = None,
        **detail: Any,
    ) -> None:
        append(
            s,
            AuditRecord(
                request.service,
                outcome,
                request.requester,
                self.cfg.dicom.ae_title,
                address,
                status=status,
                study_instance_uid=(
                    detail["studies"][0] if len(detail.get("studies", [])) == 1 else ""
                ),
                detail={
                    "peer": peer,
                    "channel": "peer",
                    "model": request.model,
                    "keys": _audit_keys(request.identifier),
                    **({"destination": request.destination} if request.destination else {}),
                    **detail,
                },
            ),
            node=self.cfg.node.name,
            now=self.clock.now(),
        )


def _parse(body: Mapping[str, Any], service: str) -> PeerRequest:
    requester = body.get("requester")
    model = body.get("model")
    identifier = body.get("identifier")
    destination = body.get("destination", "")
    if (
        not isinstance(requester, str)
        or not is_valid_ae_title(requester)
        or model not in ("PATIENT", "STUDY")
        or not isinstance(identifier, dict)
        or not isinstance(destination, str)
        or len(destination) > 16
    ):
        raise QueryRetrieveError(IDENTIFIER_MISMATCH, "bad-request")
    try:
        ds = Dataset.from_json(identifier)
    except Exception as exc:  # any decoding failure of the peer's identifier
        raise QueryRetrieveError(IDENTIFIER_MISMATCH, "identifier-unparseable") from exc
    return PeerRequest(requester.strip(), str(model), ds, service, destination.strip())


def _audit_keys(identifier: Dataset) -> dict[str, str]:
    from gateway.qr.service import audit_keys

    return audit_keys(identifier)


__all__ = ["PeerQueryResponder", "peer_destination"]
