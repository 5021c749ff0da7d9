"""A node's key material on disk, under ``<state_dir>/keys`` (mode 0700, files 0600).

Files::

    keys/kek-<id>.key               32 raw bytes: a spool key-encryption key
    keys/kek-current                the id of the key new envelopes are wrapped under
    keys/signing-ed25519.key        PKCS#8 PEM: the node's manifest and receipt signing key
    keys/hpke-x25519.key            PKCS#8 PEM: the node's HPKE (RFC 9180) X25519 private key
    keys/hpke-mlkem768-x25519.key   two PKCS#8 PEM blocks (ML-KEM-768, then X25519): the
                                    hybrid post-quantum HPKE private key

Keys are created with O_EXCL and linked into place, so creation is atomic and never
overwrites; a key file is read only if it is a regular file owned by this user with no group
or other permission bits, else CryptoError names the path. Old key-encryption keys are kept
after rotation: envelopes wrapped under them stay readable until rewrapped.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from gateway.crypto.envelope import rewrap_header
from gateway.crypto.kek import KEK_BYTES, KeyEncryptionKey, WrapScheme, unwrap_with_kek
from gateway.durable import fsync_dir
from gateway.errors import CryptoError

KEYS_DIR = "keys"
CURRENT_KEK = "kek-current"
SIGNING_KEY = "signing-ed25519.key"
HPKE_X25519_KEY = "hpke-x25519.key"
HPKE_HYBRID_KEY = "hpke-mlkem768-x25519.key"
_KEK_FILE = re.compile(r"kek-([0-9a-f]{16})\.key")
_PEM_BLOCK = re.compile(rb"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----\n?", re.DOTALL)


def keys_dir(state_dir: Path) -> Path:
    return Path(state_dir) / KEYS_DIR


# --- safe file primitives -----------------------------------------------------------------


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` mode 0700 if missing; refuse one that others can reach."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(path, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        raise CryptoError(f"{path}: key directory is not a directory")
    _check_private(path, st)
    return path


def _check_private(path: Path, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid():
        raise CryptoError(f"{path}: refusing key material not owned by this user")
    if st.st_mode & 0o077:
        raise CryptoError(
            f"{path}: refusing key material with group/other permissions "
            f"(mode {stat.S_IMODE(st.st_mode):04o}; expected 0600 files, 0700 directory)"
        )


def read_private_file(path: Path) -> bytes:
    """Read a key file, refusing symlinks, non-regular files and any group/other bits."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise CryptoError(f"{path}: key file missing") from exc
    except OSError as exc:
        raise CryptoError(f"{path}: cannot open key file ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CryptoError(f"{path}: key file is not a regular file")
        _check_private(path, st)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def write_private_file(path: Path, data: bytes) -> bool:
    """Create ``path`` mode 0600 holding ``data``, atomically; never overwrite.

    Returns False (and writes nothing) if ``path`` already exists.
    """
    if path.exists() or path.is_symlink():
        return False
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if path appeared meanwhile: never overwrites
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    fsync_dir(path.parent)
    return True


def _replace_private_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _pem_private(key: ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_pem_private(path: Path, data: bytes) -> object:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CryptoError(f"{path}: not an unencrypted PKCS#8 PEM private key") from exc


# --- key-encryption keys and the keyring ------------------------------------------------


class Keyring:
    """The node's key-encryption keys by id, and which one is current.

    Implements ``DataKeyUnwrapper`` for envelopes wrapped under any held KEK.
    """

    def __init__(self, keks: Iterable[KeyEncryptionKey], current_id: str) -> None:
        self._keks: Mapping[str, KeyEncryptionKey] = {k.key_id: k for k in keks}
        if current_id not in self._keks:
            raise CryptoError(f"current key-encryption key {current_id!r} is not in the keyring")
        self._current_id = current_id

    @property
    def current(self) -> KeyEncryptionKey:
        return self._keks[self._current_id]

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keks)

    def get(self, key_id: str) -> KeyEncryptionKey:
        try:
            return self._keks[key_id]
        except KeyError:
            raise CryptoError(f"unknown key-encryption key id {key_id!r}") from None

    def unwrap(self, scheme: WrapScheme, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        if scheme is not WrapScheme.KEK_AES256GCM:
            raise CryptoError(f"the keyring holds no {scheme.name} keys")
        return unwrap_with_kek(self.get(key_id), wrapped, context)

    def __repr__(self) -> str:
        return f"Keyring(current={self._current_id!r}, ids={sorted(self._keks)!r})"


def _new_kek(directory: Path) -> KeyEncryptionKey:
    while True:
        kek = KeyEncryptionKey.generate(secrets.token_hex(8))
        if write_private_file(directory / f"kek-{kek.key_id}.key", kek.secret):
            return kek


def load_keyring(state_dir: Path) -> Keyring:
    """Load every ``kek-<id>.key`` and the current id; CryptoError names what is wrong."""
    directory = keys_dir(state_dir)
    if not directory.is_dir():
        raise CryptoError(f"{directory}: no key directory (run keys init)")
    _check_private(directory, os.stat(directory, follow_symlinks=False))
    keks = []
    for path in sorted(directory.iterdir()):
        match = _KEK_FILE.fullmatch(path.name)
        if match is None:
            continue
        secret = read_private_file(path)
        if len(secret) != KEK_BYTES:
            raise CryptoError(f"{path}: expected {KEK_BYTES} bytes")
        keks.append(KeyEncryptionKey(match.group(1), secret))
    current_path = directory / CURRENT_KEK
    current_id = read_private_file(current_path).decode("ascii", "replace").strip()
    return Keyring(keks, current_id)


def rotate(state_dir: Path) -> Keyring:
    """Create a new key-encryption key, make it current and return the new keyring.

    The old keys stay on disk; rewrap envelopes with :func:`rewrap` and only then retire them.
    """
    directory = ensure_private_dir(keys_dir(state_dir))
    load_keyring(state_dir)  # refuse to rotate a keyring that does not load
    kek = _new_kek(directory)
    _replace_private_file(directory / CURRENT_KEK, kek.key_id.encode("ascii") + b"\n")
    return load_keyring(state_dir)


def rewrap(path: Path, keyring: Keyring) -> bool:
    """Rewrap the envelope at ``path`` under the keyring's current KEK, header only, in place.

    Returns False if it already was. The header is rewritten with one write at offset 0 and
    fsynced; the segments are untouched. The write is far smaller than a disk sector, but POSIX
    does not promise it cannot tear: keep the old KEK until every rewrap has been fsynced.
    """
    with open(path, "r+b") as f:
        changed = rewrap_header(f, keyring, keyring.current)
        if changed:
            os.fsync(f.fileno())
    return changed


# --- signing and HPKE keys ---------------------------------------------------------------


def load_signing_key(state_dir: Path) -> ed25519.Ed25519PrivateKey:
    path = keys_dir(state_dir) / SIGNING_KEY
    key = _load_pem_private(path, read_private_file(path))
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise CryptoError(f"{path}: not an Ed25519 private key")
    return key


def load_hpke_key(state_dir: Path) -> x25519.X25519PrivateKey:
    path = keys_dir(state_dir) / HPKE_X25519_KEY
    key = _load_pem_private(path, read_private_file(path))
    if not isinstance(key, x25519.X25519PrivateKey):
        raise CryptoError(f"{path}: not an X25519 private key")
    return key


def load_hpke_hybrid_key(
    state_dir: Path,
) -> tuple[mlkem.MLKEM768PrivateKey, x25519.X25519PrivateKey]:
    """The ML-KEM-768 + X25519 private key's halves (its own X25519, not the plain HPKE key).

    Returned as halves because ``cryptography``'s combined key cannot give them back, and a
    peer export needs both public halves.
    """
    path = keys_dir(state_dir) / HPKE_HYBRID_KEY
    blocks = _PEM_BLOCK.findall(read_private_file(path))
    if len(blocks) != 2:
        raise CryptoError(f"{path}: expected two PEM blocks (ML-KEM-768, X25519)")
    pq, classic = (_load_pem_private(path, block) for block in blocks)
    if not isinstance(pq, mlkem.MLKEM768PrivateKey) or not isinstance(
        classic, x25519.X25519PrivateKey
    ):
        raise CryptoError(f"{path}: expected an ML-KEM-768 then an X25519 private key")
    return pq, classic


def _new_hybrid_pem() -> bytes:
    pq = mlkem.MLKEM768PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pq + _pem_private(x25519.X25519PrivateKey.generate())


@dataclass(frozen=True)
class InitResult:
    """What :func:`init_node_keys` created (file names) and what it found already there."""

    created: tuple[str, ...]
    existing: tuple[str, ...]


def init_node_keys(state_dir: Path, *, hybrid: bool = True) -> InitResult:
    """Create the node's key material that is missing; never overwrite what exists.

    Creates a first key-encryption key (and ``kek-current``) if there is none, the Ed25519
    signing key, the X25519 HPKE key and, with ``hybrid``, the ML-KEM-768 + X25519 key.
    Running it again creates nothing. TLS keys and certificates come from ``tls.ca_issue``
    or the site's PKI.
    """
    directory = ensure_private_dir(keys_dir(state_dir))
    created: list[str] = []
    existing: list[str] = []

    def put(name: str, make: Callable[[], bytes]) -> None:
        done = not (directory / name).exists() and write_private_file(directory / name, make())
        (created if done else existing).append(name)

    if (directory / CURRENT_KEK).exists():
        existing.append(CURRENT_KEK)
    else:
        first = _new_kek(directory)
        created.append(f"kek-{first.key_id}.key")
        put(CURRENT_KEK, lambda: first.key_id.encode("ascii") + b"\n")
    put(SIGNING_KEY, lambda: _pem_private(ed25519.Ed25519PrivateKey.generate()))
    put(HPKE_X25519_KEY, lambda: _pem_private(x25519.X25519PrivateKey.generate()))
    if hybrid:
        put(HPKE_HYBRID_KEY, _new_hybrid_pem)
    load_keyring(state_dir)  # what was made or found must load
    return InitResult(tuple(created), tuple(existing))
