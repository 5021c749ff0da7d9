"""The gateway's exception tree.

Third-party errors are translated at the boundary that meets them and raised ``from`` the
original, so callers only ever see these classes::

    GatewayError
    ├── ConfigError            a configuration file is missing, malformed or invalid
    ├── ProfileError           a de-identification profile does not parse or names an unknown option
    ├── DeidError              de-identifying an instance failed closed: nothing may leave
    │   └── LeakError          the leak gate found an original identifying value in the output
    ├── SpoolError             the spool cannot take or give bytes
    │   └── SpoolFullError     free space is below the high-water mark, or ENOSPC
    ├── IndexError_            the index database failed (connection, lock, constraint)
    ├── IngestError            an incoming instance is refused; carries a DIMSE status
    ├── QueryRetrieveError     a C-FIND/C-MOVE/C-GET is refused; carries a DIMSE status
    ├── TransitionError        a delivery state machine was asked for an unlisted transition
    ├── DeliveryError          a delivery attempt failed
    │   ├── RetryableError     the destination may accept later (A7xx, refused, timeout)
    │   ├── PermanentError     the destination will not accept (A9xx, Cxxx, 0117, no syntax)
    │   └── QuarantineError    preparing an instance failed closed: nothing may leave
    ├── AuditChainError        the audit hash chain does not verify
    ├── AuditExportError       the audit repository cannot be reached or dropped the connection
    └── CryptoError            key material is missing, unsafe or unusable; a seal cannot be made
        └── IntegrityError     authenticated data does not verify (tampered, truncated, wrong key)

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


class ProfileError(GatewayError):
    """A de-identification profile is refused at load; names the file, the line and the reason."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {reason}")


class DeidError(GatewayError):
    """De-identification failed closed; the reason names tags and rules, never values."""


class LeakError(DeidError):
    """The leak gate found original identifying values in the output; ``paths`` are tag paths."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        shown = ", ".join(paths[:10]) + (f" (+{len(paths) - 10} more)" if len(paths) > 10 else "")
        super().__init__(f"leak gate: original identifying value found at {shown}")


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


class QueryRetrieveError(GatewayError):
    """A C-FIND, C-MOVE or C-GET is refused; ``status`` is the DIMSE status to answer."""

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


class TLSRefusedError(RetryableError):
    """The TLS handshake with a destination failed on a certificate (expired, another CA,
    another name, revoked, a weak key): a security event; retried, since a fixed certificate
    makes it go through. ``reason`` is OpenSSL's verification message, never peer bytes."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"TLS handshake with the destination failed: {reason}")


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


class AuditExportError(GatewayError):
    """Sending to the audit repository failed; ``kind`` is connect, tls or send."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(f"{kind}: {message}")


class CryptoError(GatewayError):
    """Key material is missing, unsafe or unusable, or a seal cannot be made or opened.

    The message names the file or key id, never key bytes.
    """


class IntegrityError(CryptoError):
    """Authenticated data does not verify: tampered, truncated, reordered or the wrong key.

    Nothing of the unverified data has been returned to the caller.
    """
