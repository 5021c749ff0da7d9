"""Syslog messages (RFC 5424) carrying audit documents, framed for TLS (RFC 5425).

Each message is ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [meta sequenceId="N"] MSG``.
Facility 10 (security/authorization, as IHE ATNA uses), severity notice (5) for successes
and warning (4) for failures. The audit row's sequence number travels in RFC 5424's
registered ``meta`` SD-ID (7.3.1 ``sequenceId``), so a repository can de-duplicate the
resends of at-least-once delivery. The MSG is the XML document; it is ASCII (other
characters are XML character references), so no BOM is needed (RFC 5424 6.4).

RFC 5425 4.3 octet-counting framing: ``MSG-LEN SP SYSLOG-MSG``.
"""

from __future__ import annotations

from datetime import UTC, datetime

FACILITY_AUTHPRIV = 10
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
MSGID = "IHE+RFC-3881"  # IHE ITI TF-2 3.20.7.1 (DICOM A.5 documents under the same MSGID)
NILVALUE = "-"


def header_token(value: str, *, limit: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII (33-126), at most ``limit`` octets, or '-'."""
    token = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return token or NILVALUE


def _timestamp(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def syslog_message(
    document: bytes,
    *,
    sequence: int,
    timestamp: datetime,
    hostname: str,
    app_name: str,
    procid: str,
    failure: bool = False,
) -> bytes:
    """One RFC 5424 message around ``document`` with the row ``sequence`` in ``[meta]``."""
    pri = FACILITY_AUTHPRIV * 8 + (SEVERITY_WARNING if failure else SEVERITY_NOTICE)
    header = " ".join(
        [
            f"<{pri}>1",
            _timestamp(timestamp),
            header_token(hostname, limit=255),
            header_token(app_name, limit=48),
            header_token(procid, limit=128),
            MSGID,
            f'[meta sequenceId="{int(sequence)}"]',
        ]
    )
    return header.encode("ascii") + b" " + document


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting: the message's length in octets, a space, the message."""
    return str(len(message)).encode("ascii") + b" " + message
