"""The gateway's exception tree.

Third-party errors are translated at the boundary that meets them and raised ``from`` the
original, so callers only ever see these classes::

    GatewayError
    ├── ConfigError            a configuration file is missing, malformed or invalid
    ├── SpoolError             the spool cannot take or give bytes
    │   └── SpoolFullError     free space is below the high-water mark, or ENOSPC
    ├── IndexError_            the index database failed (connection, lock, constraint)
    ├── IngestError            an incoming instance is refused; carries a DIMSE status
    ├── TransitionError        a delivery state machine was asked for an unlisted transition
    ├── DeliveryError          a delivery attempt failed
    │   ├── RetryableError     the destination may accept later (A7xx, refused, timeout)
    │   ├── PermanentError     the destination will not accept (A9xx, Cxxx, 0117, no syntax)
    │   └── QuarantineError    preparing an instance failed closed: nothing may leave
    └── AuditChainError        the audit hash chain does not verify

Messages never hold patient data: they name files, keys, ids and statuses, not values.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A configuration file is missing, malformed or invalid.

    The message names the file, the key and what was expected.
    """

    def __init__(self, path: str, key: str, expected: str) -> None:
        self.path = path
        self.key = key
        self.expected = expected
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {expected}")


class SpoolError(GatewayError):
    """The spool cannot store or return bytes."""


class SpoolFullError(SpoolError):
    """The spool's filesystem is full, or below the configured free-space mark."""


class IndexError_(GatewayError):
    """The index database failed."""


class IngestError(GatewayError):
    """An incoming instance is refused; ``status`` is the DIMSE status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"0x{status:04X}: {reason}")


class TransitionError(GatewayError):
    """A delivery was asked for a transition its state machine does not list."""


class DeliveryError(GatewayError):
    """A delivery attempt failed."""


class RetryableError(DeliveryError):
    """The destination may accept later: retry with backoff."""


class PermanentError(DeliveryError):
    """The destination will not accept this as it is: dead letter at once."""


class QuarantineError(DeliveryError):
    """Preparing an instance for a destination failed closed; the reason holds no PHI."""


class AuditChainError(GatewayError):
    """The audit hash chain does not verify; ``sequence`` is the first bad row."""

    def __init__(self, sequence: int, reason: str) -> None:
        self.sequence = sequence
        self.reason = reason
        super().__init__(f"audit row {sequence}: {reason}")
