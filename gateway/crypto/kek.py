"""Key-encryption keys and the seam through which envelopes wrap and unwrap data keys.

An envelope's random data key is stored wrapped in its header. The writer wraps it with a
:class:`DataKeyWrapper` and the reader unwraps it with a :class:`DataKeyUnwrapper`, so the
envelope format does not care whether the wrapping key is the node's own key-encryption key
(spool objects) or a recipient node's HPKE public key (sealed packages, see ``seal.py``).

A :class:`KeyEncryptionKey` wraps with AES-256-GCM (a random 96-bit nonce per wrap) whose
associated data is the envelope header up to the wrapped key, so the wrapped key is bound to
the key id, the scheme, the segment size and the nonce prefix of the envelope it sits in.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import CryptoError, IntegrityError

DATA_KEY_BYTES = 32
KEK_BYTES = 32
_WRAP_NONCE_BYTES = 12
_KEK_WRAP_LABEL = b"dicom-gateway/kek-wrap/v1\x00"
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class WrapScheme(enum.IntEnum):
    """How an envelope's data key is wrapped; the value is the header byte."""

    KEK_AES256GCM = 1
    """The node's key-encryption key, AES-256-GCM (spool objects)."""
    HPKE_X25519 = 2
    """HPKE base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM (RFC 9180)."""
    HPKE_MLKEM768_X25519 = 3
    """HPKE base mode, hybrid ML-KEM-768 + X25519 KEM, HKDF-SHA256, AES-256-GCM."""


def check_key_id(key_id: str) -> str:
    """Return ``key_id`` if it is 1-64 characters of ``[A-Za-z0-9_.-]``, else raise CryptoError."""
    if not _KEY_ID.fullmatch(key_id):
        raise CryptoError(f"invalid key id {key_id!r}: expected 1-64 of [A-Za-z0-9_.-]")
    return key_id


class DataKeyWrapper(Protocol):
    """Wraps a fresh data key for an envelope header (writer side)."""

    @property
    def wrap_scheme(self) -> WrapScheme: ...

    @property
    def key_id(self) -> str: ...

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """Return the wrapped ``data_key``, bound to ``context`` (the header before it)."""
        ...


class DataKeyUnwrapper(Protocol):
    """Recovers an envelope's data key (reader side): a keyring or a recipient's private key."""

    def unwrap(self, scheme: WrapScheme, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        """Return the data key.

        Raises CryptoError if no key with ``key_id`` for ``scheme`` is held, IntegrityError if
        the wrapped key or its context does not authenticate.
        """
        ...


@dataclass(frozen=True)
class KeyEncryptionKey:
    """A 256-bit key-encryption key with its id; ``repr`` never shows the key."""

    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_key_id(self.key_id)
        if len(self.secret) != KEK_BYTES:
            raise CryptoError(f"key-encryption key {self.key_id}: expected {KEK_BYTES} bytes")

    @classmethod
    def generate(cls, key_id: str) -> KeyEncryptionKey:
        return cls(key_id, AESGCM.generate_key(bit_length=256))

    @property
    def wrap_scheme(self) -> WrapScheme:
        return WrapScheme.KEK_AES256GCM

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_WRAP_NONCE_BYTES)
        return nonce + AESGCM(self.secret).encrypt(nonce, data_key, _KEK_WRAP_LABEL + context)

    def unwrap(self, scheme: WrapScheme, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        if scheme is not WrapScheme.KEK_AES256GCM or key_id != self.key_id:
            raise CryptoError(f"no key for scheme {scheme.name} and key id {key_id!r}")
        return unwrap_with_kek(self, wrapped, context)


def unwrap_with_kek(kek: KeyEncryptionKey, wrapped: bytes, context: bytes) -> bytes:
    """Unwrap a data key wrapped by :meth:`KeyEncryptionKey.wrap`; IntegrityError if it fails."""
    if len(wrapped) != _WRAP_NONCE_BYTES + DATA_KEY_BYTES + 16:
        raise IntegrityError(f"wrapped data key under {kek.key_id} has a bad length")
    nonce, sealed = wrapped[:_WRAP_NONCE_BYTES], wrapped[_WRAP_NONCE_BYTES:]
    try:
        return AESGCM(kek.secret).decrypt(nonce, sealed, _KEK_WRAP_LABEL + context)
    except InvalidTag as exc:
        raise IntegrityError(f"wrapped data key under {kek.key_id} does not verify") from exc
