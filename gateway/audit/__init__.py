"""Audit: one hash-chained record per DICOM operation and security-relevant event."""

from gateway.audit.chain import AuditRecord, append, verify

__all__ = ["AuditRecord", "append", "verify"]
