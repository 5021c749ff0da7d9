"""What a peer node's callers may query and retrieve here: ``[[qr.grants]]`` (pure).

A federated request names the requesting AE title at the peer; the peer channel's client
certificate names the peer. The grants are tried in order: those whose ``peers`` and
``callers`` admit the (peer, caller) pair apply to the request; none does, the request is
refused. Per study, the first of them whose ``match`` holds (the route rule language of
:mod:`gateway.config.rules`, on the index's study attributes and ``CallingAETitle`` = the
requesting AE title) decides that the study is visible, whether it may be retrieved and the
de-identification profile; a study no grant matches is not answered.

With a profile, answers are de-identified with it and the project key, as the instances will
be: keyed UIDs, pseudonymous Patient ID and name, dates as the profile says
(:func:`deidentify_row`), so the UIDs a peer finds are the UIDs of the instances it receives
and nothing the profile removes leaves in an answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.config import GatewayConfig
from gateway.config.model import PeerGrantConfig
from gateway.deid import ProjectKey
from gateway.deid.engine import deidentify
from gateway.deid.profiles import Profile
from gateway.qr import query
from gateway.qr.matching import Matcher, matches, multi_value_matches
from gateway.routing.match import matches as rule_matches

# the class a query answer is de-identified as (a profile item's condition on SOPClassUID
# sees this one); never part of the answer
_ANSWER_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
_PLACEHOLDER_UID = "2.25.0"


def grants_for(cfg: GatewayConfig, peer: str, caller: str) -> list[PeerGrantConfig]:
    """The grants that admit ``caller`` at ``peer``, in order (empty: refuse)."""
    return [
        g
        for g in cfg.qr.grants
        if ("*" in g.peers or peer in g.peers) and ("*" in g.callers or caller in g.callers)
    ]


def grant_for_study(
    grants: Sequence[PeerGrantConfig], row: Mapping[str, str], caller: str
) -> PeerGrantConfig | None:
    """The first grant whose ``match`` holds for the study of ``row``."""

    def lookup(attribute: str) -> list[str]:
        if attribute == "CallingAETitle":
            return [caller]
        if attribute == "Modality":
            attribute = "ModalitiesInStudy"
        value = row.get(attribute, "")
        return [v for v in value.split("\\") if v.strip()] if value else []

    for grant in grants:
        if rule_matches(grant.match, lookup):
            return grant
    return None


def deidentify_row(row: Mapping[str, str], profile: Profile, key: ProjectKey) -> dict[str, str]:
    """``row`` (keyword -> text) as the profile leaves it: every keyword of ``row`` with its
    de-identified text, ``""`` for what the profile removed."""
    ds = Dataset()
    for keyword, text in row.items():
        tag = tag_for_keyword(keyword)
        if tag is None or keyword in query.COUNTS:
            continue
        vr = dictionary_VR(tag)
        values = text.split("\\") if text else []
        ds.add_new(tag, vr, values if len(values) > 1 else (values[0] if values else None))
    ds.SOPClassUID = row.get("SOPClassUID") or _ANSWER_SOP_CLASS
    ds.SOPInstanceUID = row.get("SOPInstanceUID") or _PLACEHOLDER_UID
    out, _report = deidentify(ds, profile, key)
    answer: dict[str, str] = {}
    for keyword, text in row.items():
        if keyword in query.COUNTS:
            answer[keyword] = text
            continue
        value = out.get(keyword)
        answer[keyword] = _text(value)
    return answer


def row_matches(row: Mapping[str, str], matchers: Mapping[str, Matcher], level: str) -> bool:
    """Whether ``row`` matches every key of the level and above, in memory (PS3.4 C.2.2.2)."""
    for keyword, matcher in matchers.items():
        attribute = query.ATTRIBUTES.get(keyword)
        if attribute is None or not query.at_or_above(attribute.level, level):
            continue
        stored = row.get(keyword, "")
        if keyword == "ModalitiesInStudy":
            if not multi_value_matches(matcher, stored, vr=attribute.vr):
                return False
        elif not matches(matcher, stored, vr=attribute.vr):
            return False
    return True


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value)


__all__ = ["deidentify_row", "grant_for_study", "grants_for", "row_matches"]
