"""The per-project secret and every keyed pseudonym derived from it.

A project secret is a file holding at least 32 bytes (any bytes; text files are read as bytes, one
trailing newline stripped). Its key id is the first 16 hex digits of SHA-256 over ``"key-id"`` and
the secret: recorded in every output and report, so a rotated key can still be matched with the
outputs it made, while the secret itself is never logged, reported or placed in an exception.

Every pseudonym is HMAC-SHA256(secret, purpose ``\\x00`` original), so the same secret gives the
same
mapping on every run and on every node (PS3.15 E.1.1 allows UID replacement to be "internally
consistent within a set of instances"; ours is consistent across sets, by the key):

* UIDs become ``2.25.<integer>`` of the first 128 bits (ITU-T X.667 form, <= 44 characters);
* Patient ID and Patient's Name pseudonyms fill a format with ``{digest:N}`` (N hex digits);
* the date shift of a patient is drawn from a configured inclusive range of days.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from functools import lru_cache
from pathlib import Path

from gateway.errors import DeidError

MIN_SECRET_BYTES = 32
_FORMAT_FIELD = re.compile(r"\{digest:(\d+)\}")


class ProjectKey:
    """A project secret, read once from a file. ``repr`` and ``str`` never show the secret."""

    __slots__ = ("_secret", "key_id", "source")

    def __init__(self, secret: bytes, *, source: str = "<memory>") -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise DeidError(f"secret {source} is shorter than {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self.source = source
        self.key_id = hashlib.sha256(b"key-id\x00" + secret).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ProjectKey:
        """Read the secret file; raise :class:`DeidError` naming the file when it is unusable."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise DeidError(f"cannot read secret file {p}: {exc.strerror}") from None
        if data.endswith(b"\n"):
            data = data[:-1]
        return cls(data, source=str(p))

    def __repr__(self) -> str:
        return f"ProjectKey(key_id={self.key_id!r}, source={self.source!r})"

    def digest(self, purpose: str, value: str) -> bytes:
        return _digest(self._secret, purpose, value)

    def uid(self, uid: str) -> str:
        """The pseudonym of a UID: ``2.25.`` and the first 128 bits of its HMAC as an integer."""
        return "2.25." + str(int.from_bytes(self.digest("uid", uid)[:16], "big"))

    def pseudonym(self, purpose: str, value: str, fmt: str) -> str:
        """Fill ``{digest:N}`` fields of ``fmt`` with N hex digits of the HMAC of ``value``."""
        hexd = self.digest(purpose, value).hex()
        return _FORMAT_FIELD.sub(lambda m: hexd[: int(m.group(1))], fmt)

    def date_shift_days(self, patient_key: str, low: int, high: int) -> int:
        """A day offset in ``[low, high]``, the same for every date of one patient."""
        span = high - low + 1
        return low + int.from_bytes(self.digest("date-shift", patient_key)[:8], "big") % span


@lru_cache(maxsize=1 << 16)
def _digest(secret: bytes, purpose: str, value: str) -> bytes:
    msg = purpose.encode() + b"\x00" + value.encode("utf-8", "surrogateescape")
    return hmac.new(secret, msg, hashlib.sha256).digest()


def generate_secret_file(path: str | os.PathLike[str]) -> Path:
    """Create a new random 32-byte secret file (mode 0600) for development; never overwrite."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return p


def validate_format(fmt: str) -> None:
    """Raise ValueError if a pseudonym format has no ``{digest:N}`` field or a wrong one."""
    fields = _FORMAT_FIELD.findall(fmt)
    if not fields:
        raise ValueError("a pseudonym format needs a {digest:N} field")
    if any(not 4 <= int(n) <= 64 for n in fields):
        raise ValueError("{digest:N} needs 4 <= N <= 64")
    if "{" in _FORMAT_FIELD.sub("", fmt) or "}" in _FORMAT_FIELD.sub("", fmt):
        raise ValueError("only {digest:N} fields are allowed in a pseudonym format")
