"""The configuration as frozen objects, parsed once from TOML and passed down.

Every field's comment in ``config/gateway.toml`` gives its meaning, default and unit; the
defaults here are the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.config.rules import Condition, MatchAll

DuplicatePolicy = Literal["keep-both", "reject"]
RouteMode = Literal["study", "stream"]
HpkeSuiteName = Literal["x25519", "mlkem768-x25519"]


@dataclass(frozen=True)
class NodeConfig:
    name: str = "gateway"
    state_dir: Path = Path("var")


@dataclass(frozen=True)
class AllowEntry:
    """Calling AE titles admitted on one called AE title, optionally bound to addresses."""

    called_ae: str = "GATEWAY"
    calling_ae: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class DicomTLSConfig:
    """The DICOM TLS listener (PS3.15 Annex B.9, BCP 195 profile); files, never key values."""

    enabled: bool = False
    port: int = 2762
    cert_file: Path | None = None  # None: <state_dir>/keys/tls.crt
    key_file: Path | None = None  # None: <state_dir>/keys/tls.key
    ca_file: Path | None = None
    crl_file: Path | None = None  # PEM CRL(s) of the CA: revoked client certificates refused
    require_client_cert: bool = True
    allow_tls12: bool = False
    handshake_timeout: float = 10.0
    plain: bool = True


@dataclass(frozen=True)
class TLSBinding:
    """A calling AE title bound to a client certificate's subject CN or a SAN value."""

    calling_ae: str
    certificate_name: str


@dataclass(frozen=True)
class DicomConfig:
    ae_title: str = "GATEWAY"
    host: str = "127.0.0.1"
    port: int = 11112
    max_pdu_size: int = 262144
    max_associations: int = 16
    max_associations_per_address: int = 8
    max_connections: int = 64
    max_connections_per_address: int = 32
    max_instance_bytes: int = 4294967296
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    pdu_read_timeout: float = 30.0
    max_associate_pdu_size: int = 1048576
    max_sequence_depth: int = 64
    receiver_processes: int = 1
    allow: tuple[AllowEntry, ...] = ()
    tls: DicomTLSConfig = field(default_factory=DicomTLSConfig)
    tls_bindings: tuple[TLSBinding, ...] = ()


@dataclass(frozen=True)
class IngestConfig:
    duplicate_policy: DuplicatePolicy = "keep-both"
    spool_min_free_bytes: int = 268435456
    incoming_orphan_seconds: float = 600.0
    spool_probe_interval: float = 5.0


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = ""
    busy_timeout: float = 10.0


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9110


@dataclass(frozen=True)
class WorkerConfig:
    enabled: bool = True
    threads: int = 4
    poll_interval: float = 0.5
    lease_seconds: float = 120.0
    max_attempts: int = 8
    backoff_initial: float = 5.0
    backoff_multiplier: float = 2.0
    backoff_max: float = 600.0
    routing_interval: float = 1.0
    separate_process: bool = False


@dataclass(frozen=True)
class DestinationTLSConfig:
    """TLS towards a DICOM destination: the server is always verified (CA, name, pin)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""  # "": the destination's host
    pin_sha256: str = ""  # hex SHA-256 of the server's SubjectPublicKeyInfo; "": no pin
    allow_tls12: bool = False
    crl_file: Path | None = None  # PEM CRL(s) of ca_file's CA: a revoked server is refused


@dataclass(frozen=True)
class PeerServerConfig:
    """The peer endpoint: HTTPS with mutual TLS that receives sealed packages from peers."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8443
    url: str = ""  # "": https://<host>:<port>, what `peers export` tells other nodes
    suite: HpkeSuiteName = "x25519"  # the HPKE suite packages this node sends are sealed with
    allow_tls12: bool = False
    handshake_timeout: float = 10.0
    max_package_bytes: int = 4294967296
    staging_max_age_seconds: float = 604800.0  # an open package's staged instances kept


@dataclass(frozen=True)
class PeerEntry:
    """A trusted peer node: its name, endpoint and the folder holding its exported material."""

    name: str
    url: str
    dir: Path | None = None  # None: <state_dir>/peers/<name> (made by `peers add`)
    timeout: float = 60.0


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    type: Literal["dicom", "peer"] = "dicom"
    peer: str = ""  # type "peer": the name of a [[peers]] entry
    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int = 104
    calling_ae_title: str = ""
    max_associations: int = 2
    max_pdu_size: int = 262144
    connect_timeout: float = 10.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    keep_open_seconds: float = 2.0  # an idle association waits this long for the next delivery
    tls: DestinationTLSConfig | None = None


@dataclass(frozen=True)
class RouteConfig:
    name: str
    destinations: tuple[str, ...]
    match: Condition = field(default_factory=MatchAll)
    mode: RouteMode = "study"
    quiet_seconds: float = 30.0
    profile: str = ""


@dataclass(frozen=True)
class DeidConfig:
    """Where de-identification profiles and the project secret come from."""

    profiles_dirs: tuple[Path, ...] = ()
    secret_file: Path | None = None


@dataclass(frozen=True)
class MoveDestinationConfig:
    """An AE a C-MOVE may name as its Move Destination (PS3.4 C.4.2.1.4.1)."""

    name: str
    ae_title: str
    host: str = "127.0.0.1"
    port: int = 104
    allowed_callers: tuple[str, ...] = ("*",)  # calling AE titles that may move to it


@dataclass(frozen=True)
class UpstreamConfig:
    """A PACS the node queries and retrieves from on behalf of its callers."""

    ae_title: str
    host: str = "127.0.0.1"
    port: int = 104
    calling_ae_title: str = ""  # "": dicom.ae_title; also the Move Destination it knows us by
    timeout: float = 30.0


@dataclass(frozen=True)
class FederationPeerConfig:
    """A peer node this node's C-FIND/C-MOVE/C-GET fan out to, over the peer channel."""

    peer: str  # the name of a [[peers]] entry
    callers: tuple[str, ...] = ("*",)  # calling AE titles whose requests go to it
    timeout: float = 5.0  # seconds for it to answer a C-FIND or accept a retrieve
    retrieve_timeout: float = 300.0  # seconds for a retrieved study to arrive from it


@dataclass(frozen=True)
class PeerGrantConfig:
    """What a peer node's callers may query and retrieve here, and with which profile."""

    name: str
    peers: tuple[str, ...]  # peer node names ([[peers]] entries) or "*"
    callers: tuple[str, ...] = ("*",)  # the requesting AE titles at that peer, or "*"
    match: Condition = field(default_factory=MatchAll)  # study attributes, CallingAETitle
    profile: str = ""  # de-identification applied to answers and instances; "": none
    retrieve: bool = True  # False: may query only


@dataclass(frozen=True)
class QRConfig:
    """Query/retrieve SCP (PS3.4 Annex C) on the node's index, optionally an upstream PACS."""

    enabled: bool = True
    allowed_callers: tuple[str, ...] = ("*",)
    allowed_addresses: tuple[str, ...] = ("127.0.0.0/8", "::1")
    max_results: int = 1000
    retrieve_ae_title: str = ""  # "": dicom.ae_title
    move_to_destinations: bool = False
    move_destinations: tuple[MoveDestinationConfig, ...] = ()
    upstream: UpstreamConfig | None = None
    federation: tuple[FederationPeerConfig, ...] = ()
    grants: tuple[PeerGrantConfig, ...] = ()
    grant_scan_limit: int = 10000


@dataclass(frozen=True)
class AuditExportConfig:
    """Export of the audit rows as DICOM audit messages over syslog TLS (RFC 5424/5425)."""

    enabled: bool = False
    host: str = ""  # the audit repository; required when enabled
    port: int = 6514
    ca_file: Path | None = None  # the repository's certificate must chain to it; required
    cert_file: Path | None = None  # None: the node's TLS certificate, when it exists
    key_file: Path | None = None
    server_name: str = ""  # "": host
    allow_tls12: bool = False
    app_name: str = "dicom-gateway"
    enterprise_site_id: str = ""
    batch_size: int = 100
    poll_interval: float = 1.0
    timeout: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    resend_on_reconnect: int = 100


@dataclass(frozen=True)
class AuditConfig:
    export: AuditExportConfig = field(default_factory=AuditExportConfig)


@dataclass(frozen=True)
class GatewayConfig:
    source: Path
    node: NodeConfig = field(default_factory=NodeConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    deid: DeidConfig = field(default_factory=DeidConfig)
    peer: PeerServerConfig = field(default_factory=PeerServerConfig)
    peers: tuple[PeerEntry, ...] = ()
    destinations: tuple[DestinationConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    qr: QRConfig = field(default_factory=QRConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    @property
    def state_dir(self) -> Path:
        return self.node.state_dir

    @property
    def spool_dir(self) -> Path:
        return self.node.state_dir / "spool"

    @property
    def deid_secret_file(self) -> Path:
        """The project secret for keyed pseudonyms; a development one lives in the state dir."""
        return self.deid.secret_file or self.node.state_dir / "deid-secret.key"

    @property
    def tls_cert_file(self) -> Path:
        """The DICOM TLS listener's certificate; ``keys init`` makes one here if missing."""
        return self.dicom.tls.cert_file or self.node.state_dir / "keys" / "tls.crt"

    @property
    def tls_key_file(self) -> Path:
        return self.dicom.tls.key_file or self.node.state_dir / "keys" / "tls.key"

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.node.state_dir / 'index.sqlite3'}"

    @property
    def peer_url(self) -> str:
        """The URL other nodes reach this node's peer endpoint at."""
        return self.peer.url or f"https://{self.peer.host}:{self.peer.port}"

    def peer_dir(self, entry: PeerEntry) -> Path:
        """The folder holding a peer's trusted material (certificate, public keys)."""
        return entry.dir or self.node.state_dir / "peers" / entry.name

    def peer_entry(self, name: str) -> PeerEntry:
        for entry in self.peers:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def destination(self, name: str) -> DestinationConfig:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    def route(self, name: str) -> RouteConfig:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)
