"""The node's audit rows as DICOM Audit Messages (PS3.15 Annex A.5, the IHE ATNA format).

Pure: an :class:`AuditEntry` (one hash-chained row) in, the XML document out. The mapping
from the rows the index records to the PS3.15 A.5.3 messages is :func:`event_for` and the
table in README.md ("Audit export"); codes are DICOM's (DCM, PS3.16 CID 400-405), RFC 3881's
and, where no standard code fits, this product's local scheme ``99DCMGW`` (PS3.16 8.2: a
private coding scheme designator begins with "99").

Every value goes through :func:`xml_safe` and :mod:`xml.etree.ElementTree`: markup
characters are escaped by the library, and characters XML 1.0 cannot carry at all (NUL,
ESC and the other C0 controls, lone surrogates, U+FFFE/U+FFFF) become visible ``\\xNN``
escapes, so a hostile AE title or reason can never make the document ill-formed.
"""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from gateway.index.models import AuditEvent


class Code(NamedTuple):
    """A coded value: PS3.15 A.5.1 CodedValueType (csd-code, codeSystemName, originalText)."""

    value: str
    scheme: str
    meaning: str


LOCAL_SCHEME = "99DCMGW"

# PS3.16 CID 400 Audit Event ID
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
BEGIN_TRANSFERRING = Code("110102", "DCM", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
# PS3.16 CID 403 Security Alert Type and CID 406 User Authentication Type
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
PROTOCOL_VIOLATION = Code("protocol-violation", LOCAL_SCHEME, "DICOM protocol violation")
# PS3.16 CID 402 Audit Active Participant Role ID
ROLE_APPLICATION = Code("110150", "DCM", "Application")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
# PS3.16 CID 404 Audit Participant Object ID Type, and RFC 3881
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")
NODE_ID = Code("110182", "DCM", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
# PS3.15 A.5.1 AuditSourceTypeCode 4
APPLICATION_SERVER = Code("4", "DCM", "Application Server Process or Thread")

# Local event types for rows no DCM Audit Event ID describes (EventID is then 110100)
LOCAL_TYPES = {
    "c-echo": "Verification (C-ECHO)",
    "route": "Routing decision",
    "peer-receipt": "Signed receipt from a peer node",
    "peer-staging-expired": "Abandoned peer package removed from staging",
}

# PS3.4 C.6.1 / C.6.2: the Query/Retrieve SOP classes a c-find/c-move/c-get row names by model
QR_SOP_CLASSES = {
    ("PATIENT", "c-find"): "1.2.840.10008.5.1.4.1.2.1.1",
    ("PATIENT", "c-move"): "1.2.840.10008.5.1.4.1.2.1.2",
    ("PATIENT", "c-get"): "1.2.840.10008.5.1.4.1.2.1.3",
    ("STUDY", "c-find"): "1.2.840.10008.5.1.4.1.2.2.1",
    ("STUDY", "c-move"): "1.2.840.10008.5.1.4.1.2.2.2",
    ("STUDY", "c-get"): "1.2.840.10008.5.1.4.1.2.2.3",
}
NOT_AUTHORIZED = 0x0124  # PS3.4 C.4.2.1.5 / Annex C: Refused: Not Authorized

# EventOutcomeIndicator (PS3.15 A.5.1): 0 success, 4 minor, 8 serious, 12 major failure
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8
_REASON_LIMITS = frozenset({"association-limit", "address-association-limit"})


@dataclass(frozen=True)
class Patient:
    """What the index holds about a study's patient (the audit repository may carry it)."""

    patient_id: str
    patient_name: str = ""


@dataclass(frozen=True)
class AuditEntry:
    """One audit row as read for export, detached from the session."""

    seq: int
    recorded_at: datetime
    event_type: str
    outcome: str
    node: str
    calling_ae_title: str = ""
    called_ae_title: str = ""
    address: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    delivery_id: str = ""
    status: int | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: AuditEvent) -> AuditEntry:
        try:
            detail = json.loads(row.detail or "{}")
        except ValueError:
            detail = {"detail": row.detail}
        if not isinstance(detail, dict):
            detail = {"detail": detail}
        return cls(
            seq=row.seq,
            recorded_at=row.recorded_at,
            event_type=row.event_type,
            outcome=row.outcome,
            node=row.node,
            calling_ae_title=row.calling_ae_title,
            called_ae_title=row.called_ae_title,
            address=row.address,
            sop_class_uid=row.sop_class_uid,
            sop_instance_uid=row.sop_instance_uid,
            study_instance_uid=row.study_instance_uid,
            delivery_id=row.delivery_id,
            status=row.status,
            detail=detail,
        )

    def studies(self) -> list[str]:
        """The study UIDs the row concerns: its own column, or a retrieve's list."""
        listed = self.detail.get("studies")
        found = [str(s) for s in listed] if isinstance(listed, list) else []
        if self.study_instance_uid and self.study_instance_uid not in found:
            found.insert(0, self.study_instance_uid)
        return found


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: who reports (the node), and optionally the site."""

    source_id: str
    enterprise_site_id: str = ""


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant (PS3.15 A.5.2.2)."""

    user_id: str
    is_requestor: bool
    role: Code | None = None
    ae_titles: tuple[str, ...] = ()
    user_name: str = ""
    address: str = ""


@dataclass(frozen=True)
class Event:
    """EventIdentification plus the participants the message names."""

    event_id: Code
    action: str  # EventActionCode: C, R, U, D or E
    outcome: int
    type_codes: tuple[Code, ...] = ()
    description: str = ""
    participants: tuple[Participant, ...] = ()
    object_kind: str = "studies"  # studies | query | alert | none


# outside XML 1.0's Char production, plus DEL and the C1 controls it discourages (2.2)
_XML_ILLEGAL = re.compile("[^\t\n\r\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_safe(value: object) -> str:
    """``value`` as text XML 1.0 can carry: characters outside its Char production, DEL and
    the C1 controls become ``\\xNN`` / ``\\uNNNN`` escapes (markup characters are left for
    the XML library, which escapes them)."""
    text = value if isinstance(value, str) else str(value)

    def escape(m: re.Match[str]) -> str:
        code = ord(m.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _XML_ILLEGAL.sub(escape, text)


# --- the mapping -----------------------------------------------------------------------------


def _remote(entry: AuditEntry, *, role: Code | None, requestor: bool = True) -> Participant:
    """The peer on the other end: its calling AE title and address."""
    ae = entry.calling_ae_title
    return Participant(
        user_id=ae or entry.address or "unknown",
        is_requestor=requestor,
        role=role,
        ae_titles=(ae,) if ae else (),
        address=entry.address,
    )


def _local(entry: AuditEntry, *, role: Code | None, requestor: bool = False) -> Participant:
    """This node: the called AE title it answered as, named by its node name."""
    ae = entry.called_ae_title
    return Participant(
        user_id=ae or entry.node,
        is_requestor=requestor,
        role=role,
        ae_titles=(ae,) if ae else (),
        user_name=entry.node,
    )


def _named(name: str, *, role: Code | None, requestor: bool = False) -> Participant:
    """A participant known only by a name or AE title (a destination, a move destination)."""
    return Participant(user_id=name or "unknown", is_requestor=requestor, role=role)


def _reason(entry: AuditEntry) -> str:
    parts = [str(entry.detail.get("reason", "") or "")]
    error = entry.detail.get("error")
    if error:
        parts.append(str(error))
    if entry.status is not None and entry.outcome not in ("success", "accepted", "started"):
        parts.append(f"status 0x{entry.status:04X}")
    return "; ".join(p for p in parts if p)


def _security_alert(entry: AuditEntry, type_code: Code) -> Event:
    return Event(
        SECURITY_ALERT,
        "E",
        MINOR_FAILURE,
        (type_code,),
        _reason(entry),
        (_remote(entry, role=None), _local(entry, role=ROLE_APPLICATION)),
        "alert",
    )


def _association(entry: AuditEntry) -> Event:
    reason = str(entry.detail.get("reason", ""))
    participants = (_remote(entry, role=None), _local(entry, role=ROLE_APPLICATION))
    if entry.outcome == "accepted":
        return Event(USER_AUTHENTICATION, "E", SUCCESS, (LOGIN,), "", participants, "none")
    if entry.outcome == "rejected":
        if reason in _REASON_LIMITS:
            return Event(
                USER_AUTHENTICATION, "E", MINOR_FAILURE, (LOGIN,), reason, participants, "none"
            )
        return _security_alert(entry, NODE_AUTHENTICATION)
    if reason == "peer-abort":
        return Event(USER_AUTHENTICATION, "E", MINOR_FAILURE, (LOGOUT,), reason, participants)
    return _security_alert(entry, PROTOCOL_VIOLATION)


def _store(entry: AuditEntry) -> Event:
    duplicate = str(entry.detail.get("duplicate", ""))
    action = "C"
    if duplicate == "identical":
        action = "R"  # the receiver already held the instance
    elif duplicate == "different-content-kept":
        action = "U"
    outcome = SUCCESS if entry.outcome == "success" else MINOR_FAILURE
    return Event(
        INSTANCES_TRANSFERRED,
        action,
        outcome,
        description=_reason(entry) if outcome else "",
        participants=(
            _remote(entry, role=ROLE_SOURCE),
            _local(entry, role=ROLE_DESTINATION),
        ),
    )


def _query(entry: AuditEntry) -> Event:
    if entry.outcome == "refused" and entry.status == NOT_AUTHORIZED:
        return _security_alert(entry, USE_OF_RESTRICTED_FUNCTION)
    outcome = SUCCESS if entry.outcome == "success" else MINOR_FAILURE
    return Event(
        QUERY,
        "E",
        outcome,
        description=_reason(entry) if outcome else "",
        participants=(
            _remote(entry, role=ROLE_SOURCE),
            _local(entry, role=ROLE_DESTINATION),
        ),
        object_kind="query",
    )


def _retrieve_destination(entry: AuditEntry) -> Participant:
    destination = str(entry.detail.get("destination", "") or "")
    if entry.event_type == "c-get" or (
        entry.event_type == "sub-operation" and entry.detail.get("service") == "c-get"
    ):
        return _remote(entry, role=ROLE_DESTINATION, requestor=False)
    return _named(destination, role=ROLE_DESTINATION)


def _retrieve(entry: AuditEntry) -> Event:
    if entry.outcome == "refused" and entry.status == NOT_AUTHORIZED:
        return _security_alert(entry, USE_OF_RESTRICTED_FUNCTION)
    requestor = _remote(entry, role=None)
    source = _local(entry, role=ROLE_SOURCE)
    destination = _retrieve_destination(entry)
    participants = (requestor, source, destination)
    if entry.outcome == "started":
        return Event(BEGIN_TRANSFERRING, "E", SUCCESS, participants=participants)
    if "completed" not in entry.detail:  # refused or failed before any sub-operation
        return Event(BEGIN_TRANSFERRING, "E", MINOR_FAILURE, (), _reason(entry), participants)
    if entry.outcome == "success":
        outcome = SUCCESS
    elif int(entry.detail.get("completed") or 0) > 0 or entry.outcome == "cancelled":
        outcome = MINOR_FAILURE
    else:
        outcome = SERIOUS_FAILURE
    description = "" if outcome == SUCCESS else _retrieve_counts(entry)
    return Event(INSTANCES_TRANSFERRED, "R", outcome, (), description, participants)


def _retrieve_counts(entry: AuditEntry) -> str:
    counts = ", ".join(
        f"{k} {int(entry.detail.get(k) or 0)}"
        for k in ("completed", "failed", "warning", "remaining")
    )
    return f"{entry.outcome}: {counts}" + (
        f"; status 0x{entry.status:04X}" if entry.status is not None else ""
    )


def _sub_operation(entry: AuditEntry) -> Event:
    outcome = SUCCESS if entry.outcome == "success" else MINOR_FAILURE
    return Event(
        INSTANCES_TRANSFERRED,
        "R",
        outcome,
        description="" if outcome == SUCCESS else str(entry.detail.get("outcome", "")),
        participants=(
            _remote(entry, role=None),
            _local(entry, role=ROLE_SOURCE),
            _retrieve_destination(entry),
        ),
    )


def _delivery(entry: AuditEntry) -> Event:
    outcome = {"success": SUCCESS, "warning": SUCCESS, "retry": MINOR_FAILURE}.get(
        entry.outcome, SERIOUS_FAILURE
    )
    destination = str(entry.detail.get("destination", "") or "")
    return Event(
        INSTANCES_TRANSFERRED,
        "R",
        outcome,
        description="" if outcome == SUCCESS else _reason(entry),
        participants=(
            Participant(entry.node, True, ROLE_SOURCE, user_name=entry.node),
            _named(destination, role=ROLE_DESTINATION),
        ),
    )


def _peer_package(entry: AuditEntry) -> Event:
    outcome = SUCCESS if entry.outcome == "success" else MINOR_FAILURE
    return Event(
        INSTANCES_TRANSFERRED,
        "C",
        outcome,
        description="" if outcome == SUCCESS else _reason(entry),
        participants=(
            _remote(entry, role=ROLE_SOURCE),
            _local(entry, role=ROLE_DESTINATION),
        ),
        object_kind="none",
    )


def _application_activity(entry: AuditEntry) -> Event:
    meaning = LOCAL_TYPES.get(entry.event_type, "Gateway event")
    ok = entry.outcome in ("success", "accepted", "started", "warning")
    participants: tuple[Participant, ...] = (
        Participant(entry.node, False, ROLE_APPLICATION, user_name=entry.node),
    )
    if entry.calling_ae_title or entry.address:
        participants = (_remote(entry, role=None), *participants)
    return Event(
        APPLICATION_ACTIVITY,
        "E",
        SUCCESS if ok else MINOR_FAILURE,
        (Code(xml_safe(entry.event_type)[:64] or "unknown", LOCAL_SCHEME, meaning),),
        "" if ok else _reason(entry),
        participants,
    )


def _application_start_stop(entry: AuditEntry) -> Event:
    """The node itself started or stopped (PS3.15 A.5.3.1 Application Activity)."""
    return Event(
        APPLICATION_ACTIVITY,
        "E",
        SUCCESS,
        (APPLICATION_START if entry.outcome == "started" else APPLICATION_STOP,),
        "",
        (_local(entry, role=ROLE_APPLICATION),),
    )


def event_for(entry: AuditEntry) -> Event:
    """The PS3.15 A.5.3 event an audit row is reported as (see README "Audit export")."""
    kind = entry.event_type
    if kind == "application":
        return _application_start_stop(entry)
    if kind == "association":
        return _association(entry)
    if kind == "security":
        return _security_alert(entry, NODE_AUTHENTICATION)
    if kind in ("c-store", "peer-store"):
        return _store(entry)
    if kind == "c-find":
        return _query(entry)
    if kind in ("c-move", "c-get"):
        return _retrieve(entry)
    if kind == "sub-operation":
        return _sub_operation(entry)
    if kind == "delivery-attempt":
        return _delivery(entry)
    if kind == "peer-package":
        return _peer_package(entry)
    return _application_activity(entry)


# --- the document ----------------------------------------------------------------------------


def _utc(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {
            "csd-code": xml_safe(code.value),
            "codeSystemName": code.scheme,
            "originalText": xml_safe(code.meaning),
        },
    )


def _participant(root: ET.Element, p: Participant) -> None:
    attrs = {
        "UserID": xml_safe(p.user_id),
        "UserIsRequestor": "true" if p.is_requestor else "false",
    }
    if p.ae_titles:
        attrs["AlternativeUserID"] = xml_safe("AETITLES=" + ";".join(p.ae_titles))
    if p.user_name:
        attrs["UserName"] = xml_safe(p.user_name)
    if p.address:
        attrs["NetworkAccessPointID"] = xml_safe(p.address)
        is_ip = all(c in "0123456789abcdefABCDEF.:" for c in p.address)
        attrs["NetworkAccessPointTypeCode"] = "2" if is_ip else "1"
    element = ET.SubElement(root, "ActiveParticipant", attrs)
    if p.role is not None:
        _code(element, "RoleIDCode", p.role)


def _object(
    root: ET.Element, object_id: str, type_code: int, role: int, id_type: Code
) -> ET.Element:
    element = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": xml_safe(object_id),
            "ParticipantObjectTypeCode": str(type_code),
            "ParticipantObjectTypeCodeRole": str(role),
        },
    )
    _code(element, "ParticipantObjectIDTypeCode", id_type)
    return element


def _study_objects(root: ET.Element, entry: AuditEntry, patients: Mapping[str, Patient]) -> None:
    studies = entry.studies()
    for study in studies:
        element = _object(root, study, 2, 3, STUDY_INSTANCE_UID)  # system object, report
        if entry.sop_class_uid and study == entry.study_instance_uid:
            sop = ET.SubElement(
                element,
                "SOPClass",
                {"UID": xml_safe(entry.sop_class_uid), "NumberOfInstances": "1"},
            )
            if entry.sop_instance_uid:
                ET.SubElement(sop, "Instance", {"UID": xml_safe(entry.sop_instance_uid)})
    seen: set[str] = set()
    for study in studies:
        patient = patients.get(study)
        if patient is None or not patient.patient_id or patient.patient_id in seen:
            continue
        seen.add(patient.patient_id)
        element = _object(root, patient.patient_id, 1, 1, PATIENT_NUMBER)  # person, patient
        if patient.patient_name:
            ET.SubElement(element, "ParticipantObjectName").text = xml_safe(patient.patient_name)


def _query_object(root: ET.Element, entry: AuditEntry) -> None:
    model = str(entry.detail.get("model", "") or "")
    sop_class = QR_SOP_CLASSES.get((model, "c-find"), "") or entry.sop_class_uid or "unknown"
    element = _object(root, sop_class, 2, 24, SOP_CLASS_UID)  # system object, query
    keys = entry.detail.get("keys", {})
    encoded = json.dumps(keys, sort_keys=True, ensure_ascii=True).encode("ascii")
    ET.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(encoded).decode()


def _alert_object(root: ET.Element, entry: AuditEntry) -> None:
    subject = entry.address or entry.calling_ae_title or entry.node
    element = _object(root, subject, 2, 13, NODE_ID)  # system object, security resource
    reason = _reason(entry)
    if reason:
        ET.SubElement(
            element,
            "ParticipantObjectDetail",
            {"type": "Alert Description", "value": base64.b64encode(reason.encode()).decode()},
        )


def build_message(
    entry: AuditEntry, *, source: AuditSource, patients: Mapping[str, Patient] | None = None
) -> bytes:
    """The PS3.15 A.5 AuditMessage for ``entry`` as an XML document (ASCII, UTF-8 declared:
    characters beyond ASCII are character references)."""
    event = event_for(entry)
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": event.action,
            "EventDateTime": _utc(entry.recorded_at),
            "EventOutcomeIndicator": str(event.outcome),
        },
    )
    _code(ident, "EventID", event.event_id)
    for type_code in event.type_codes:
        _code(ident, "EventTypeCode", type_code)
    if event.description:
        ET.SubElement(ident, "EventOutcomeDescription").text = xml_safe(event.description)
    for participant in event.participants:
        _participant(root, participant)
    source_attrs = {"AuditSourceID": xml_safe(source.source_id or entry.node)}
    if source.enterprise_site_id:
        source_attrs["AuditEnterpriseSiteID"] = xml_safe(source.enterprise_site_id)
    _code(
        ET.SubElement(root, "AuditSourceIdentification", source_attrs),
        "AuditSourceTypeCode",
        APPLICATION_SERVER,
    )
    if event.object_kind == "studies":
        _study_objects(root, entry, patients or {})
    elif event.object_kind == "query":
        _query_object(root, entry)
    elif event.object_kind == "alert":
        _alert_object(root, entry)
    body: bytes = ET.tostring(root, encoding="us-ascii", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>' + body


def study_uids(entries: Sequence[AuditEntry]) -> set[str]:
    """Every study UID a batch of rows names (to look their patients up in one query)."""
    return {uid for entry in entries for uid in entry.studies()}
