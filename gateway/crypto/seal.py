"""Sealing a package for a recipient node: HPKE (RFC 9180) and signed manifests and receipts.

Instances are sealed as envelopes (``envelope.py``) whose random data key is wrapped for the
recipient with HPKE base mode (RFC 9180 section 5.1, single-shot ``Seal``/``Open``), as
provided by ``cryptography.hazmat.primitives.hpke``; this module does no key schedule of its
own. Suites:

* ``x25519``: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM (the default);
* ``mlkem768-x25519``: the hybrid ML-KEM-768 + X25519 KEM, HKDF-SHA256, AES-256-GCM.

Wrapping the data key, not the instance, keeps memory bounded by the envelope's segments
(``cryptography`` offers only single-shot HPKE). The HPKE ``info`` binds the package id, the
instance's index and the envelope's header, so a sealed instance cannot be moved to another
package or position. A wrapped-for-recipient envelope can become a spool object under the
recipient's KEK by rewriting its header only (``envelope.copy_with_new_header``).

Manifests and receipts are canonical JSON (sorted keys, no spaces, ASCII, integers and
strings only) signed with Ed25519 over a domain-separation label and those bytes.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO, Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from gateway.crypto.envelope import DEFAULT_SEGMENT_SIZE, EnvelopeReader, EnvelopeWriter
from gateway.crypto.envelope import open_envelope as _open_envelope
from gateway.crypto.kek import WrapScheme
from gateway.errors import CryptoError, IntegrityError

_MLKEM768_PUBLIC_BYTES: Final = 1184
_X25519_PUBLIC_BYTES: Final = 32
_INFO_LABEL: Final = b"dicom-gateway/seal/v1\x00"
MANIFEST_FORMAT: Final = "dicom-gateway/manifest/v1"
RECEIPT_FORMAT: Final = "dicom-gateway/receipt/v1"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class HpkeSuite(enum.Enum):
    """The HPKE suites a package can be sealed with; the value is the name in manifests."""

    X25519 = "x25519"
    MLKEM768_X25519 = "mlkem768-x25519"

    @property
    def wrap_scheme(self) -> WrapScheme:
        if self is HpkeSuite.X25519:
            return WrapScheme.HPKE_X25519
        return WrapScheme.HPKE_MLKEM768_X25519

    def _suite(self) -> hpke.Suite:
        kem = hpke.KEM.X25519 if self is HpkeSuite.X25519 else hpke.KEM.MLKEM768_X25519
        return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


# --- recipient keys -----------------------------------------------------------------------


@dataclass(frozen=True)
class RecipientKey:
    """A recipient node's HPKE public key as exchanged between peers.

    ``public_bytes`` is the raw X25519 key (32 bytes), or for the hybrid suite the raw
    ML-KEM-768 key (1184 bytes) followed by the raw X25519 key.
    """

    suite: HpkeSuite
    public_bytes: bytes

    def __post_init__(self) -> None:
        expected = _X25519_PUBLIC_BYTES
        if self.suite is HpkeSuite.MLKEM768_X25519:
            expected += _MLKEM768_PUBLIC_BYTES
        if len(self.public_bytes) != expected:
            raise CryptoError(f"{self.suite.value} public key must be {expected} bytes")

    @classmethod
    def from_x25519(cls, key: x25519.X25519PublicKey) -> RecipientKey:
        return cls(HpkeSuite.X25519, key.public_bytes_raw())

    @classmethod
    def from_hybrid(
        cls, pq: mlkem.MLKEM768PublicKey, classic: x25519.X25519PublicKey
    ) -> RecipientKey:
        return cls(HpkeSuite.MLKEM768_X25519, pq.public_bytes_raw() + classic.public_bytes_raw())

    @property
    def key_id(self) -> str:
        """SHA-256 (hex) of the suite name and public bytes: the id in envelope headers."""
        return hashlib.sha256(self.suite.value.encode() + b"\x00" + self.public_bytes).hexdigest()

    def _public_key(self) -> x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey:
        try:
            if self.suite is HpkeSuite.X25519:
                return x25519.X25519PublicKey.from_public_bytes(self.public_bytes)
            pq = mlkem.MLKEM768PublicKey.from_public_bytes(
                self.public_bytes[:_MLKEM768_PUBLIC_BYTES]
            )
            classic = x25519.X25519PublicKey.from_public_bytes(
                self.public_bytes[_MLKEM768_PUBLIC_BYTES:]
            )
        except ValueError as exc:
            raise CryptoError(f"invalid {self.suite.value} public key {self.key_id}") from exc
        return hpke.MLKEM768X25519PublicKey(pq, classic)


@dataclass(frozen=True)
class RecipientPrivateKey:
    """This node's HPKE private key for one suite, with its public half; never printed."""

    public: RecipientKey
    _key: x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey = field(repr=False)

    @classmethod
    def from_x25519(cls, key: x25519.X25519PrivateKey) -> RecipientPrivateKey:
        return cls(RecipientKey.from_x25519(key.public_key()), key)

    @classmethod
    def from_hybrid(
        cls, pq: mlkem.MLKEM768PrivateKey, classic: x25519.X25519PrivateKey
    ) -> RecipientPrivateKey:
        public = RecipientKey.from_hybrid(pq.public_key(), classic.public_key())
        return cls(public, hpke.MLKEM768X25519PrivateKey(pq, classic))


# --- HPKE single shot ---------------------------------------------------------------------


def hpke_seal(plaintext: bytes, recipient: RecipientKey, *, info: bytes) -> bytes:
    """RFC 9180 base-mode single-shot seal: ``enc || ciphertext``."""
    return recipient.suite._suite().encrypt(plaintext, recipient._public_key(), info=info)


def hpke_open(sealed: bytes, key: RecipientPrivateKey, *, info: bytes) -> bytes:
    """Open :func:`hpke_seal`'s output; IntegrityError if the key, info or bytes are wrong."""
    try:
        return key.public.suite._suite().decrypt(sealed, key._key, info=info)
    except InvalidTag as exc:
        raise IntegrityError(
            f"HPKE open failed for key {key.public.key_id[:16]} (wrong key, info or tampered)"
        ) from exc
    except ValueError as exc:
        raise IntegrityError("HPKE ciphertext is malformed") from exc


def _instance_info(package_id: str, index: int, context: bytes) -> bytes:
    pid = package_id.encode("utf-8")
    digest = hashlib.sha256(
        struct.pack(">I", len(pid)) + pid + struct.pack(">Q", index) + context
    ).digest()
    return _INFO_LABEL + digest


@dataclass(frozen=True)
class _HpkeWrapper:
    recipient: RecipientKey
    package_id: str
    index: int

    @property
    def wrap_scheme(self) -> WrapScheme:
        return self.recipient.suite.wrap_scheme

    @property
    def key_id(self) -> str:
        return self.recipient.key_id

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        info = _instance_info(self.package_id, self.index, context)
        return hpke_seal(data_key, self.recipient, info=info)


@dataclass(frozen=True)
class _HpkeUnwrapper:
    key: RecipientPrivateKey = field(repr=False)
    package_id: str
    index: int

    def unwrap(self, scheme: WrapScheme, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        public = self.key.public
        if scheme is not public.suite.wrap_scheme or key_id != public.key_id:
            raise IntegrityError(
                f"instance {self.index} of package {self.package_id} is sealed for another key "
                f"({scheme.name} {key_id[:16]}), not {public.key_id[:16]}"
            )
        info = _instance_info(self.package_id, self.index, context)
        return hpke_open(wrapped, self.key, info=info)


def recipient_unwrapper(key: RecipientPrivateKey, *, package_id: str, index: int) -> _HpkeUnwrapper:
    """A ``DataKeyUnwrapper`` for instance ``index`` of ``package_id`` sealed to ``key``.

    Use with ``envelope.copy_with_new_header`` to move a sealed instance into the spool.
    """
    return _HpkeUnwrapper(key, package_id, index)


# --- sealed instances ---------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceEntry:
    """One instance in a manifest: SHA-256 (hex) and size of its plaintext bytes."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not _SHA256_HEX.fullmatch(self.sha256) or self.size < 0:
            raise CryptoError("instance entry needs a lowercase hex SHA-256 and a size >= 0")


def seal_instance(
    src: BinaryIO,
    dst: BinaryIO,
    recipient: RecipientKey,
    *,
    package_id: str,
    index: int,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> InstanceEntry:
    """Seal the bytes of ``src`` for ``recipient`` into ``dst``; return the manifest entry."""
    digest = hashlib.sha256()
    size = 0
    writer = EnvelopeWriter(dst, _HpkeWrapper(recipient, package_id, index), segment_size)
    while chunk := src.read(segment_size):
        digest.update(chunk)
        size += len(chunk)
        writer.write(chunk)
    writer.close()
    return InstanceEntry(digest.hexdigest(), size)


def open_instance(
    src: BinaryIO, key: RecipientPrivateKey, *, package_id: str, index: int
) -> EnvelopeReader:
    """Open a sealed instance for streaming; segments verify as they are read.

    The reader does not know the manifest: use :func:`open_instance_to` to also check the
    instance's SHA-256 and size against it.
    """
    return _open_envelope(src, recipient_unwrapper(key, package_id=package_id, index=index))


def open_instance_to(
    src: BinaryIO,
    dst: BinaryIO,
    key: RecipientPrivateKey,
    *,
    package_id: str,
    index: int,
    expected: InstanceEntry,
) -> None:
    """Write the verified plaintext of a sealed instance to ``dst`` and check the manifest.

    Raises IntegrityError on any failure, after which ``dst`` must be discarded.
    """
    digest = hashlib.sha256()
    size = 0
    with open_instance(src, key, package_id=package_id, index=index) as reader:
        for segment in reader:
            digest.update(segment)
            size += len(segment)
            dst.write(segment)
    if size != expected.size or digest.hexdigest() != expected.sha256:
        raise IntegrityError(
            f"instance {index} of package {package_id} does not match its manifest entry"
        )


# --- canonical JSON and signatures --------------------------------------------------------


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, ASCII only; integers, strings, lists and objects only."""
    _check_json_types(value)
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _check_json_types(value: object) -> None:
    if isinstance(value, bool) or value is None:
        raise CryptoError("signed documents hold no booleans or nulls")
    if isinstance(value, str | int):
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_json_types(item)
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CryptoError("signed document keys must be strings")
            _check_json_types(v)
        return
    raise CryptoError(f"signed documents hold no {type(value).__name__}")


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise IntegrityError(f"signed document repeats the key {k!r}")
        obj[k] = v
    return obj


def _reject_float(text: str) -> Any:
    raise IntegrityError("signed documents hold no floating-point numbers")


def _sign(label: str, payload: Mapping[str, Any], key: ed25519.Ed25519PrivateKey) -> bytes:
    body = canonical_json(payload)
    signature = key.sign(label.encode("ascii") + b"\n" + body)
    return canonical_json(
        {"payload": payload, "signature": base64.b64encode(signature).decode("ascii")}
    )


def _verify(
    label: str, document: bytes, key_for: Mapping[str, ed25519.Ed25519PublicKey], signer_field: str
) -> dict[str, Any]:
    """Parse ``document``, find the signer's key by ``payload[signer_field]`` and verify."""
    try:
        outer = json.loads(
            document.decode("utf-8"),
            object_pairs_hook=_strict_object,
            parse_float=_reject_float,
            parse_constant=_reject_float,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{label}: not a signed JSON document") from exc
    if not isinstance(outer, dict) or set(outer) != {"payload", "signature"}:
        raise IntegrityError(f"{label}: expected exactly payload and signature")
    payload, signature_b64 = outer["payload"], outer["signature"]
    if not isinstance(payload, dict) or not isinstance(signature_b64, str):
        raise IntegrityError(f"{label}: malformed signed document")
    if payload.get("format") != label:
        raise IntegrityError(f"signed document is not a {label}")
    signer = payload.get(signer_field)
    if not isinstance(signer, str) or signer not in key_for:
        raise CryptoError(f"{label}: no trusted key for {signer_field} {signer!r}")
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        body = canonical_json(payload)
        key_for[signer].verify(signature, label.encode("ascii") + b"\n" + body)
    except (ValueError, CryptoError, InvalidSignature) as exc:
        raise IntegrityError(f"{label}: signature by {signer!r} does not verify") from exc
    return payload


def _rfc3339(when: datetime) -> str:
    if when.tzinfo is None:
        raise CryptoError("timestamps in signed documents must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: object, label: str) -> datetime:
    if not isinstance(text, str):
        raise IntegrityError(f"{label}: timestamp missing")
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError as exc:
        raise IntegrityError(f"{label}: malformed timestamp") from exc


def _fields(payload: Mapping[str, Any], label: str, spec: Mapping[str, type]) -> None:
    if set(payload) != set(spec):
        raise IntegrityError(f"{label}: unexpected or missing fields")
    for name, kind in spec.items():
        if not isinstance(payload[name], kind) or isinstance(payload[name], bool):
            raise IntegrityError(f"{label}: field {name} has the wrong type")


# --- manifests ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """What a package holds and who it is from and for; signed by the sender."""

    package_id: str
    sender: str
    recipient: str
    instances: tuple[InstanceEntry, ...]
    profile_name: str
    profile_sha256: str
    created: datetime
    trace_id: str
    hpke_suite: HpkeSuite = HpkeSuite.X25519

    @property
    def instance_count(self) -> int:
        return len(self.instances)

    def payload(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "package_id": self.package_id,
            "sender": self.sender,
            "recipient": self.recipient,
            "instance_count": self.instance_count,
            "instances": [{"sha256": i.sha256, "size": i.size} for i in self.instances],
            "profile": {"name": self.profile_name, "sha256": self.profile_sha256},
            "created": _rfc3339(self.created),
            "trace_id": self.trace_id,
            "hpke_suite": self.hpke_suite.value,
        }


_MANIFEST_FIELDS: Mapping[str, type] = {
    "format": str,
    "package_id": str,
    "sender": str,
    "recipient": str,
    "instance_count": int,
    "instances": list,
    "profile": dict,
    "created": str,
    "trace_id": str,
    "hpke_suite": str,
}


def sign_manifest(manifest: Manifest, signing_key: ed25519.Ed25519PrivateKey) -> bytes:
    """Return the signed manifest document (canonical JSON bytes)."""
    return _sign(MANIFEST_FORMAT, manifest.payload(), signing_key)


def document_sha256(document: bytes) -> str:
    """SHA-256 (hex) of a signed document's bytes, as a receipt cites its manifest."""
    return hashlib.sha256(document).hexdigest()


def verify_manifest(
    document: bytes,
    *,
    sender_keys: Mapping[str, ed25519.Ed25519PublicKey],
    recipient: str,
) -> Manifest:
    """Verify a signed manifest and return it.

    ``sender_keys`` maps the peers this node trusts to their signing keys. Raises
    IntegrityError if the document is malformed or its signature does not verify, CryptoError
    if the sender is unknown or the package is for another recipient. The caller still
    checks that the sender is the peer the TLS channel authenticated.
    """
    label = MANIFEST_FORMAT
    payload = _verify(label, document, sender_keys, "sender")
    _fields(payload, label, _MANIFEST_FIELDS)
    if payload["recipient"] != recipient:
        raise CryptoError(
            f"package {payload['package_id']} is for recipient {payload['recipient']!r}, "
            f"not {recipient!r}"
        )
    try:
        instances = tuple(
            InstanceEntry(str(entry["sha256"]), int(entry["size"]))
            for entry in payload["instances"]
            if isinstance(entry, dict) and set(entry) == {"sha256", "size"}
        )
        profile = payload["profile"]
        suite = HpkeSuite(payload["hpke_suite"])
    except (CryptoError, ValueError, TypeError) as exc:
        raise IntegrityError(f"{label}: malformed instances, profile or suite") from exc
    if len(instances) != len(payload["instances"]) or payload["instance_count"] != len(instances):
        raise IntegrityError(f"{label}: instance count does not match the instances")
    if set(profile) != {"name", "sha256"} or not _SHA256_HEX.fullmatch(str(profile["sha256"])):
        raise IntegrityError(f"{label}: malformed profile")
    return Manifest(
        package_id=payload["package_id"],
        sender=payload["sender"],
        recipient=payload["recipient"],
        instances=instances,
        profile_name=str(profile["name"]),
        profile_sha256=str(profile["sha256"]),
        created=_parse_time(payload["created"], label),
        trace_id=payload["trace_id"],
        hpke_suite=suite,
    )


# --- receipts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    """The recipient's signed word that it holds a package, citing the manifest's hash."""

    package_id: str
    sender: str
    recipient: str
    manifest_sha256: str
    instance_count: int
    received: datetime

    def payload(self) -> dict[str, Any]:
        return {
            "format": RECEIPT_FORMAT,
            "package_id": self.package_id,
            "sender": self.sender,
            "recipient": self.recipient,
            "manifest_sha256": self.manifest_sha256,
            "instance_count": self.instance_count,
            "received": _rfc3339(self.received),
        }


_RECEIPT_FIELDS: Mapping[str, type] = {
    "format": str,
    "package_id": str,
    "sender": str,
    "recipient": str,
    "manifest_sha256": str,
    "instance_count": int,
    "received": str,
}


def sign_receipt(receipt: Receipt, signing_key: ed25519.Ed25519PrivateKey) -> bytes:
    return _sign(RECEIPT_FORMAT, receipt.payload(), signing_key)


def verify_receipt(
    document: bytes,
    *,
    recipient_keys: Mapping[str, ed25519.Ed25519PublicKey],
    manifest_document: bytes,
) -> Receipt:
    """Verify a receipt against the manifest this node sent; raise as :func:`verify_manifest`.

    The receipt must be signed by the manifest's recipient and cite this manifest's hash,
    package id and instance count.
    """
    label = RECEIPT_FORMAT
    payload = _verify(label, document, recipient_keys, "recipient")
    _fields(payload, label, _RECEIPT_FIELDS)
    sent = json.loads(manifest_document)["payload"]
    expected = {
        "manifest_sha256": document_sha256(manifest_document),
        "package_id": sent["package_id"],
        "sender": sent["sender"],
        "recipient": sent["recipient"],
        "instance_count": sent["instance_count"],
    }
    for name, value in expected.items():
        if payload[name] != value:
            raise CryptoError(f"{label}: {name} does not match the manifest sent")
    return Receipt(
        package_id=payload["package_id"],
        sender=payload["sender"],
        recipient=payload["recipient"],
        manifest_sha256=payload["manifest_sha256"],
        instance_count=payload["instance_count"],
        received=_parse_time(payload["received"], label),
    )
