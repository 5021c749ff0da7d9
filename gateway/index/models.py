"""The index schema: the one source of truth for instances, studies, deliveries and audit.

Bytes live in the spool; rows here name spool objects by a key the gateway made
(:func:`gateway.ids.new_id`), never by anything a peer sent.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            value = value.astimezone(UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, datetime):
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value


class Base(DeclarativeBase):
    pass


UID = String(64)
AE = String(16)


class Instance(Base):
    """One received SOP instance version as it sits in the spool."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    spool_key: Mapped[str] = mapped_column(String(32), unique=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    instance_number: Mapped[str] = mapped_column(String(12), default="")
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    calling_ae_title: Mapped[str] = mapped_column(AE)
    called_ae_title: Mapped[str] = mapped_column(AE)
    calling_address: Mapped[str] = mapped_column(String(64))
    association_id: Mapped[str] = mapped_column(String(32))


class Study(Base):
    """Study-level summary, kept current by ingest."""

    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    modalities: Mapped[str] = mapped_column(String(128), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class Series(Base):
    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[str] = mapped_column(String(12), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)


class RouteCandidate(Base):
    """An instance that matched a route when it arrived and awaits (or got) a delivery."""

    __tablename__ = "route_candidates"
    __table_args__ = (
        UniqueConstraint("instance_id", "route_name"),
        Index("ix_route_candidates_pending", "route_name", "routed"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    route_name: Mapped[str] = mapped_column(String(64))
    routed: Mapped[int] = mapped_column(Integer, default=0)


class Delivery(Base):
    """A durable job: send a set of instances of one study to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_claim", "state", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    route_name: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(64), index=True)
    profile: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(24))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_error: Mapped[str] = mapped_column(Text, default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    sent_count: Mapped[int] = mapped_column(Integer, default=0)
    warning_count: Mapped[int] = mapped_column(Integer, default=0)
    failed_count: Mapped[int] = mapped_column(Integer, default=0)


class DeliveryItem(Base):
    __tablename__ = "delivery_items"
    __table_args__ = (UniqueConstraint("delivery_id", "instance_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("deliveries.id"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("deliveries.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime())
    outcome: Mapped[str] = mapped_column(String(24))
    reason: Mapped[str] = mapped_column(Text, default="")
    sent: Mapped[int] = mapped_column(Integer, default=0)
    warnings: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)


class AuditEvent(Base):
    """One hash-chained audit record; ``seq`` is dense and ordered."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    event_type: Mapped[str] = mapped_column(String(32), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    node: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(64), default="", index=True)
    called_ae_title: Mapped[str] = mapped_column(String(64), default="")
    address: Mapped[str] = mapped_column(String(64), default="")
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    delivery_id: Mapped[str] = mapped_column(String(32), default="")
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="{}")
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's last sequence number and hash; its row lock orders audit writers."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class PeerPackage(Base):
    """A package received from a peer node and ingested, with the receipt this node signed.

    The package id is unique across senders: the same id from another sender is a replay.
    """

    __tablename__ = "peer_packages"

    package_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sender: Mapped[str] = mapped_column(String(64))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[str] = mapped_column(Text)
    receipt: Mapped[str] = mapped_column(Text)
    instance_count: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PeerReceipt(Base):
    """The signed receipt a peer returned for a delivery this node sent it as a package."""

    __tablename__ = "peer_receipts"

    delivery_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    peer: Mapped[str] = mapped_column(String(64))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    receipt: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AuditExportCursor(Base):
    """How far the audit exporter has sent the chain to one repository (``host:port``).

    ``seq`` is the last row whose message was written and acknowledged by the repository's
    TCP stack; it only moves forward, and is committed after the send, never with the row.
    """

    __tablename__ = "audit_export_cursors"

    repository: Mapped[str] = mapped_column(String(300), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
