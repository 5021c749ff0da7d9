"""HPKE sealing of instances, signed manifests and receipts."""

from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from gateway.crypto.envelope import TAG_BYTES, copy_with_new_header, decrypt_bytes, read_header
from gateway.crypto.kek import KeyEncryptionKey
from gateway.crypto.keys import init_node_keys, load_hpke_hybrid_key, load_hpke_key
from gateway.crypto.seal import (
    HpkeSuite,
    InstanceEntry,
    Manifest,
    Receipt,
    RecipientPrivateKey,
    document_sha256,
    hpke_open,
    hpke_seal,
    open_instance,
    open_instance_to,
    recipient_unwrapper,
    seal_instance,
    sign_manifest,
    sign_receipt,
    verify_manifest,
    verify_receipt,
)
from gateway.errors import CryptoError, IntegrityError

SEG = 1024
NOW = datetime(2026, 5, 9, 7, 35, 25, 123456, tzinfo=UTC)


def x25519_key() -> RecipientPrivateKey:
    return RecipientPrivateKey.from_x25519(x25519.X25519PrivateKey.generate())


def hybrid_key() -> RecipientPrivateKey:
    return RecipientPrivateKey.from_hybrid(
        mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    )


@pytest.mark.parametrize("make_key", [x25519_key, hybrid_key], ids=["x25519", "hybrid"])
def test_hpke_single_shot_round_trip_and_wrong_key(make_key: object) -> None:
    assert callable(make_key)
    key: RecipientPrivateKey = make_key()
    sealed = hpke_seal(b"hello", key.public, info=b"ctx")
    assert hpke_open(sealed, key, info=b"ctx") == b"hello"
    with pytest.raises(IntegrityError):
        hpke_open(sealed, key, info=b"other ctx")
    other: RecipientPrivateKey = make_key()
    with pytest.raises(IntegrityError):
        hpke_open(sealed, other, info=b"ctx")


@pytest.mark.parametrize("make_key", [x25519_key, hybrid_key], ids=["x25519", "hybrid"])
def test_sealed_instance_round_trip(make_key: object) -> None:
    assert callable(make_key)
    key: RecipientPrivateKey = make_key()
    data = b"DICM" + os.urandom(5 * SEG + 3)
    sealed = io.BytesIO()
    entry = seal_instance(
        io.BytesIO(data), sealed, key.public, package_id="pkg-1", index=0, segment_size=SEG
    )
    assert entry == InstanceEntry(hashlib.sha256(data).hexdigest(), len(data))
    assert b"DICM" not in sealed.getvalue()
    sealed.seek(0)
    out = io.BytesIO()
    open_instance_to(sealed, out, key, package_id="pkg-1", index=0, expected=entry)
    assert out.getvalue() == data


def test_sealed_instance_refusals() -> None:
    key = x25519_key()
    data = os.urandom(3 * SEG)
    sealed = io.BytesIO()
    entry = seal_instance(
        io.BytesIO(data), sealed, key.public, package_id="pkg-1", index=2, segment_size=SEG
    )
    raw = sealed.getvalue()

    def open_(blob: bytes, k: RecipientPrivateKey, pid: str = "pkg-1", idx: int = 2) -> bytes:
        return open_instance(io.BytesIO(blob), k, package_id=pid, index=idx).read()

    assert open_(raw, key) == data
    with pytest.raises(IntegrityError):
        open_(raw, x25519_key())  # another node's key
    with pytest.raises(IntegrityError):
        open_(raw, key, pid="pkg-2")  # moved to another package
    with pytest.raises(IntegrityError):
        open_(raw, key, idx=1)  # moved to another position
    flipped = bytearray(raw)
    flipped[len(read_header(io.BytesIO(raw)).raw) + 10] ^= 1
    with pytest.raises(IntegrityError):
        open_(bytes(flipped), key)
    with pytest.raises(IntegrityError):
        open_(raw[: -(SEG + TAG_BYTES)], key)
    # The plaintext verifies but does not match the manifest entry.
    wrong = InstanceEntry(hashlib.sha256(b"x").hexdigest(), entry.size)
    with pytest.raises(IntegrityError, match="manifest entry"):
        open_instance_to(
            io.BytesIO(raw), io.BytesIO(), key, package_id="pkg-1", index=2, expected=wrong
        )


def test_sealed_instance_moves_into_spool_by_header_rewrite(tmp_path: Path) -> None:
    init_node_keys(tmp_path)
    key = RecipientPrivateKey.from_x25519(load_hpke_key(tmp_path))
    hybrid = RecipientPrivateKey.from_hybrid(*load_hpke_hybrid_key(tmp_path))
    assert hybrid.public.key_id != key.public.key_id
    data = os.urandom(2 * SEG + 9)
    sealed = io.BytesIO()
    seal_instance(io.BytesIO(data), sealed, key.public, package_id="p", index=0, segment_size=SEG)
    sealed.seek(0)
    spooled = io.BytesIO()
    kek = KeyEncryptionKey.generate("0123456789abcdef")
    copy_with_new_header(sealed, spooled, recipient_unwrapper(key, package_id="p", index=0), kek)
    h_old = len(read_header(io.BytesIO(sealed.getvalue())).raw)
    h_new = len(read_header(io.BytesIO(spooled.getvalue())).raw)
    assert spooled.getvalue()[h_new:] == sealed.getvalue()[h_old:]
    assert decrypt_bytes(spooled.getvalue(), kek) == data


# --- manifests and receipts ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sender_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def recipient_signing_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def make_manifest(**overrides: object) -> Manifest:
    fields: dict[str, object] = {
        "package_id": "pkg-0001",
        "sender": "node-a",
        "recipient": "node-b",
        "instances": (
            InstanceEntry(hashlib.sha256(b"one").hexdigest(), 3),
            InstanceEntry(hashlib.sha256(b"two").hexdigest(), 3),
        ),
        "profile_name": "basic",
        "profile_sha256": hashlib.sha256(b"profile").hexdigest(),
        "created": NOW,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_manifest_sign_verify_round_trip(sender_key: ed25519.Ed25519PrivateKey) -> None:
    manifest = make_manifest()
    doc = sign_manifest(manifest, sender_key)
    assert doc == sign_manifest(manifest, sender_key)  # canonical and deterministic
    got = verify_manifest(doc, sender_keys={"node-a": sender_key.public_key()}, recipient="node-b")
    assert got == manifest
    assert got.instance_count == 2
    payload = json.loads(doc)["payload"]
    assert payload["created"] == "2026-05-09T07:35:25.123456Z"
    assert payload["profile"] == {"name": "basic", "sha256": manifest.profile_sha256}


def test_manifest_refusals(sender_key: ed25519.Ed25519PrivateKey) -> None:
    doc = sign_manifest(make_manifest(), sender_key)
    keys = {"node-a": sender_key.public_key()}
    with pytest.raises(CryptoError, match="not 'node-c'"):
        verify_manifest(doc, sender_keys=keys, recipient="node-c")
    with pytest.raises(CryptoError, match="no trusted key"):
        verify_manifest(doc, sender_keys={}, recipient="node-b")
    impostor = {"node-a": ed25519.Ed25519PrivateKey.generate().public_key()}
    with pytest.raises(IntegrityError, match="signature"):
        verify_manifest(doc, sender_keys=impostor, recipient="node-b")

    # Any edit of the signed payload breaks the signature.
    edits = [
        doc.replace(b'"instance_count":2', b'"instance_count":1'),
        doc.replace(b'"name":"basic"', b'"name":"none"'),
        doc.replace(b'"recipient":"node-b"', b'"recipient":"node-x"'),
        doc.replace(b'"trace_id":"4bf9', b'"trace_id":"5bf9'),
    ]
    for edited in edits:
        assert edited != doc
        with pytest.raises(CryptoError):
            verify_manifest(edited, sender_keys=keys, recipient="node-b")
    for offset in range(0, len(doc), 7):
        flipped = bytearray(doc)
        flipped[offset] ^= 0x01
        with pytest.raises(CryptoError):
            verify_manifest(bytes(flipped), sender_keys=keys, recipient="node-b")
    # Duplicated keys and extra fields are refused even if the signature could be kept.
    with pytest.raises(IntegrityError):
        verify_manifest(
            b'{"payload":{},"payload":{},"signature":""}', sender_keys=keys, recipient="node-b"
        )


def test_manifest_count_must_match(sender_key: ed25519.Ed25519PrivateKey) -> None:
    manifest = make_manifest()
    payload = manifest.payload()
    payload["instance_count"] = 5
    from gateway.crypto import seal

    doc = seal._sign(seal.MANIFEST_FORMAT, payload, sender_key)
    with pytest.raises(IntegrityError, match="count"):
        verify_manifest(doc, sender_keys={"node-a": sender_key.public_key()}, recipient="node-b")


def test_receipt_round_trip_and_refusals(
    sender_key: ed25519.Ed25519PrivateKey, recipient_signing_key: ed25519.Ed25519PrivateKey
) -> None:
    manifest_doc = sign_manifest(make_manifest(), sender_key)
    receipt = Receipt(
        package_id="pkg-0001",
        sender="node-a",
        recipient="node-b",
        manifest_sha256=document_sha256(manifest_doc),
        instance_count=2,
        received=NOW,
    )
    doc = sign_receipt(receipt, recipient_signing_key)
    keys = {"node-b": recipient_signing_key.public_key()}
    assert verify_receipt(doc, recipient_keys=keys, manifest_document=manifest_doc) == receipt
    with pytest.raises(IntegrityError):
        verify_receipt(
            doc.replace(b'"instance_count":2', b'"instance_count":3'),
            recipient_keys=keys,
            manifest_document=manifest_doc,
        )
    with pytest.raises(CryptoError, match="no trusted key"):
        verify_receipt(
            doc, recipient_keys={"node-a": sender_key.public_key()}, manifest_document=manifest_doc
        )
    other_manifest = sign_manifest(make_manifest(trace_id="other"), sender_key)
    with pytest.raises(CryptoError, match="manifest_sha256"):
        verify_receipt(doc, recipient_keys=keys, manifest_document=other_manifest)


def test_suite_names_are_stable() -> None:
    assert [s.value for s in HpkeSuite] == ["x25519", "mlkem768-x25519"]
