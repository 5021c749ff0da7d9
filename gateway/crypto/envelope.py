"""Streamed AES-256-GCM envelopes for spool objects and sealed instances.

The segment layout is the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár, "Online
Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015), with the nonce
split Tink's streaming AEAD uses: each segment is sealed under the object's random data key
with the nonce ``nonce_prefix (7) || segment index (u32) || final flag (u8)`` and the envelope's
fixed header as associated data. Truncation (no final segment), dropped, reordered or
duplicated segments, segments spliced from another envelope and flipped bits all fail the GCM
tag. Plaintext is released one whole verified segment at a time, so memory stays near two
segments whatever the object's size.

Layout (integers big-endian)::

    offset  size  field
    0       6     magic b"DGWENV"
    6       1     version = 1
    7       1     AEAD suite = 1 (AES-256-GCM STREAM, 7+4+1 byte nonce)
    8       4     segment size: plaintext bytes per segment (1 KiB .. 64 MiB)
    12      7     nonce prefix (random)
    --- bytes 0..18 are the fixed header: associated data of every segment
    19      1     wrap scheme (WrapScheme: 1 KEK AES-256-GCM, 2 HPKE X25519, 3 HPKE hybrid)
    20      1     key id length L (1..64)
    21      L     key id (ASCII), e.g. the key-encryption key's id
    21+L    2     wrapped data key length W
    23+L    W     wrapped data key (bound to bytes 0..20+L by the wrap's own AEAD)
    23+L+W  ...   segments: segment_size + 16 bytes each; the last (final flag 1) is shorter
                  or equal, and an empty object is one final segment of 16 bytes

Every header byte is authenticated: bytes 0..18 by each segment, the scheme and key id by the
wrap, the wrapped key by itself. Rewrapping under another key rewrites bytes 19.. only, so
the segments stay untouched (:func:`rewrap_header`).
"""

from __future__ import annotations

import abc
import io
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.crypto.kek import (
    DATA_KEY_BYTES,
    DataKeyUnwrapper,
    DataKeyWrapper,
    WrapScheme,
    check_key_id,
)
from gateway.durable import fsync_dir
from gateway.errors import CryptoError, IntegrityError

MAGIC: Final = b"DGWENV"
VERSION: Final = 1
SUITE_AES256GCM_STREAM: Final = 1
DEFAULT_SEGMENT_SIZE: Final = 1 << 20
MIN_SEGMENT_SIZE: Final = 1 << 10
MAX_SEGMENT_SIZE: Final = 1 << 26
TAG_BYTES: Final = 16
NONCE_PREFIX_BYTES: Final = 7
MAX_SEGMENTS: Final = 1 << 32
MAX_WRAPPED_BYTES: Final = 4096

_FIXED = struct.Struct(">6sBBI7s")
FIXED_HEADER_BYTES: Final = _FIXED.size


@dataclass(frozen=True)
class EnvelopeHeader:
    """A parsed envelope header; ``raw`` is its exact bytes as found."""

    segment_size: int
    nonce_prefix: bytes
    wrap_scheme: WrapScheme
    key_id: str
    wrapped_key: bytes
    raw: bytes

    @property
    def fixed(self) -> bytes:
        """Bytes 0..18: the associated data of every segment."""
        return self.raw[:FIXED_HEADER_BYTES]

    @property
    def wrap_context(self) -> bytes:
        """The header up to the wrapped key's length: what the wrap authenticates."""
        return _wrap_context(self.fixed, self.wrap_scheme, self.key_id)


def _wrap_context(fixed: bytes, scheme: WrapScheme, key_id: str) -> bytes:
    kid = key_id.encode("ascii")
    return fixed + bytes([scheme, len(kid)]) + kid


def _build_header(fixed: bytes, wrapper: DataKeyWrapper, data_key: bytes) -> bytes:
    scheme = WrapScheme(wrapper.wrap_scheme)
    context = _wrap_context(fixed, scheme, check_key_id(wrapper.key_id))
    wrapped = wrapper.wrap(data_key, context)
    if not 0 < len(wrapped) <= MAX_WRAPPED_BYTES:
        raise CryptoError(f"wrapped data key of {len(wrapped)} bytes does not fit a header")
    return context + struct.pack(">H", len(wrapped)) + wrapped


def _read_full(fileobj: BinaryIO, n: int) -> bytes:
    """Read ``n`` bytes, fewer only at end of file (raw files and pipes may return short)."""
    data = fileobj.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n and (more := fileobj.read(n - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _read_exact(fileobj: BinaryIO, n: int, what: str) -> bytes:
    data = _read_full(fileobj, n)
    if len(data) != n:
        raise IntegrityError(f"envelope truncated in the {what}")
    return data


def read_header(fileobj: BinaryIO) -> EnvelopeHeader:
    """Parse the header at the current position; IntegrityError if it is malformed.

    Parsing authenticates nothing by itself: the wrap and the segments do, when opened.
    """
    fixed = _read_exact(fileobj, FIXED_HEADER_BYTES, "header")
    magic, version, suite, segment_size, nonce_prefix = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise IntegrityError("not an envelope (bad magic)")
    if version != VERSION or suite != SUITE_AES256GCM_STREAM:
        raise IntegrityError(f"unsupported envelope version {version} suite {suite}")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise IntegrityError(f"envelope segment size {segment_size} out of range")
    scheme_byte, kid_len = _read_exact(fileobj, 2, "header")
    try:
        scheme = WrapScheme(scheme_byte)
    except ValueError as exc:
        raise IntegrityError(f"unknown wrap scheme {scheme_byte}") from exc
    kid_raw = _read_exact(fileobj, kid_len, "header")
    try:
        key_id = check_key_id(kid_raw.decode("ascii"))
    except (UnicodeDecodeError, CryptoError) as exc:
        raise IntegrityError("envelope header holds an invalid key id") from exc
    (wrapped_len,) = struct.unpack(">H", _read_exact(fileobj, 2, "header"))
    if not 0 < wrapped_len <= MAX_WRAPPED_BYTES:
        raise IntegrityError(f"wrapped data key length {wrapped_len} out of range")
    wrapped = _read_exact(fileobj, wrapped_len, "header")
    raw = fixed + bytes([scheme_byte, kid_len]) + kid_raw + struct.pack(">H", wrapped_len)
    return EnvelopeHeader(segment_size, nonce_prefix, scheme, key_id, wrapped, raw + wrapped)


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    if index >= MAX_SEGMENTS:
        raise CryptoError("envelope exceeds 2**32 segments")
    return prefix + struct.pack(">IB", index, 1 if final else 0)


class EnvelopeWriter:
    """Encrypts a stream into ``fileobj`` as an envelope; the header is written at once.

    Call :meth:`close` to write the final segment: an envelope that is not closed has no
    final segment and will not open. Used as a context manager, an exception in the block
    leaves the envelope unfinished on purpose. ``fileobj`` is not closed.
    """

    def __init__(
        self,
        fileobj: BinaryIO,
        kek: DataKeyWrapper,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
    ) -> None:
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise CryptoError(
                f"segment size {segment_size} outside {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}"
            )
        self._fileobj = fileobj
        self._segment_size = segment_size
        self._prefix = os.urandom(NONCE_PREFIX_BYTES)
        self._fixed = _FIXED.pack(
            MAGIC, VERSION, SUITE_AES256GCM_STREAM, segment_size, self._prefix
        )
        data_key = AESGCM.generate_key(bit_length=DATA_KEY_BYTES * 8)
        self._aead = AESGCM(data_key)
        self._header = _build_header(self._fixed, kek, data_key)
        del data_key
        self._buffer = bytearray()
        self._index = 0
        self._closed = False
        self.plaintext_bytes = 0
        fileobj.write(self._header)

    @property
    def header_bytes(self) -> int:
        return len(self._header)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Buffer ``data`` and seal every segment that is known not to be the last."""
        if self._closed:
            raise CryptoError("write to a closed envelope")
        view = memoryview(data).cast("B")
        size = self._segment_size
        pos = 0
        while pos < len(view):
            if len(self._buffer) == size:
                # More data follows, so the buffered segment is not the final one.
                self._seal(final=False)
            take = min(size - len(self._buffer), len(view) - pos)
            self._buffer += view[pos : pos + take]
            pos += take
        self.plaintext_bytes += len(view)
        return len(view)

    def _seal(self, *, final: bool) -> None:
        nonce = _nonce(self._prefix, self._index, final)
        self._fileobj.write(self._aead.encrypt(nonce, self._buffer, self._fixed))
        self._buffer.clear()
        self._index += 1

    def close(self) -> None:
        """Seal the buffered bytes as the final segment; further writes raise."""
        if self._closed:
            return
        self._seal(final=True)
        self._closed = True
        self._fileobj.flush()

    def abort(self) -> None:
        """Stop without a final segment, so the partial envelope never opens."""
        self._buffer.clear()
        self._closed = True

    def __enter__(self) -> EnvelopeWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class EnvelopeReader:
    """Verified plaintext of an envelope, one authenticated segment at a time.

    :meth:`read` and iteration only ever return bytes from segments whose tag verified.
    IntegrityError is raised where tampering or truncation is found; bytes returned before
    that came from earlier segments that did verify, so a caller streaming to a destination
    must discard what it wrote when the read fails.
    """

    def __init__(self, fileobj: BinaryIO, header: EnvelopeHeader, data_key: bytes) -> None:
        self._fileobj = fileobj
        self.header = header
        self._aead = AESGCM(data_key)
        self._segment_ct = header.segment_size + TAG_BYTES
        self._index = 0
        self._buf = bytearray(self._segment_ct + 1)
        self._lookahead = b""
        self._done = False
        self._plain = b""
        self._pos = 0

    def _fill(self, start: int) -> int:
        """Fill ``self._buf`` from ``start`` to its end or EOF; return the bytes now held."""
        view = memoryview(self._buf)
        readinto = getattr(self._fileobj, "readinto", None)
        pos = start
        while pos < len(view):
            if readinto is not None:
                got = readinto(view[pos:])
            else:
                data = self._fileobj.read(len(view) - pos)
                got = len(data)
                view[pos : pos + got] = data
            if not got:
                break
            pos += got
        return pos

    def _refill(self) -> int:
        self._buf[0:1] = self._lookahead
        return self._fill(1)

    def _next_segment(self) -> bytes | None:
        """Return the next verified segment's plaintext, or None after the final one."""
        if self._done:
            return None
        # One buffer of a segment plus one byte: that byte tells whether more follows.
        held = self._refill() if self._lookahead else self._fill(0)
        final = held <= self._segment_ct
        chunk = memoryview(self._buf)[: min(held, self._segment_ct)]
        self._lookahead = b"" if final else bytes(self._buf[self._segment_ct :])
        if len(chunk) < TAG_BYTES:
            raise IntegrityError(f"envelope truncated at segment {self._index}")
        nonce = _nonce(self.header.nonce_prefix, self._index, final)
        try:
            plain = self._aead.decrypt(nonce, chunk, self.header.fixed)
        except InvalidTag as exc:
            raise IntegrityError(
                f"envelope segment {self._index} does not verify "
                "(tampered, reordered, spliced or truncated)"
            ) from exc
        self._index += 1
        self._done = final
        return plain

    def read(self, n: int = -1) -> bytes:
        """Return up to ``n`` verified bytes (all remaining if ``n`` < 0); b"" at the end."""
        if n < 0:
            parts = [self._plain[self._pos :]]
            self._plain, self._pos = b"", 0
            while (segment := self._next_segment()) is not None:
                parts.append(segment)
            return b"".join(parts)
        while self._pos >= len(self._plain):
            segment = self._next_segment()
            if segment is None:
                return b""
            self._plain, self._pos = segment, 0
        out = self._plain[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def __iter__(self) -> Iterator[bytes]:
        """Yield the remaining plaintext as verified segments (the first may be partial)."""
        if self._pos < len(self._plain):
            rest = self._plain[self._pos :]
            self._plain, self._pos = b"", 0
            yield rest
        while (segment := self._next_segment()) is not None:
            if segment:
                yield segment

    def close(self) -> None:
        self._plain, self._pos, self._done = b"", 0, True

    def __enter__(self) -> EnvelopeReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PositionedReader(io.RawIOBase):
    """A read-only, seekable raw stream of ``size`` bytes at position ``_pos``: subclasses
    set both and implement :meth:`read` (a read past the end returns what there is)."""

    size: int
    _pos: int

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    @abc.abstractmethod
    def read(self, size: int | None = -1) -> bytes: ...

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


class SeekableEnvelopeReader(PositionedReader):
    """Random access to the verified plaintext of an envelope in a seekable file.

    Segment ``i`` lies at ``header_len + i * (segment_size + 16)``. Every segment is
    authenticated with its index and final flag before any byte of it is returned; the final
    segment is verified when the reader opens, which gives the plaintext length and detects
    a truncated or extended file at once. At most two decrypted segments are cached, so
    memory stays near two segments whatever the object's size. ``fileobj`` is closed with
    the reader when ``owns`` is true.
    """

    _CACHE = 2

    def __init__(
        self, fileobj: BinaryIO, header: EnvelopeHeader, data_key: bytes, *, owns: bool = False
    ) -> None:
        super().__init__()
        self._fileobj = fileobj
        self._owns = owns
        self.header = header
        self._aead = AESGCM(data_key)
        self._seg = header.segment_size
        self._seg_ct = header.segment_size + TAG_BYTES
        self._start = len(header.raw)
        body = fileobj.seek(0, io.SEEK_END) - self._start
        if body < TAG_BYTES:
            raise IntegrityError("envelope truncated: no final segment")
        self._count = -(-body // self._seg_ct)
        last_ct = body - (self._count - 1) * self._seg_ct
        if last_ct < TAG_BYTES:
            raise IntegrityError(f"envelope truncated at segment {self._count - 1}")
        self._cache: dict[int, bytes] = {}
        # the segment the last read ended in, and its offset: pydicom reads a data set a
        # few bytes at a time, and most reads are served from it without the general path
        self._current: bytes = b""
        self._current_start = 0
        last = self._segment(self._count - 1)
        self.size = (self._count - 1) * self._seg + len(last)
        self._pos = 0

    def _segment(self, index: int) -> bytes:
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        final = index == self._count - 1
        self._fileobj.seek(self._start + index * self._seg_ct)
        chunk = _read_full(self._fileobj, self._seg_ct)
        if len(chunk) < TAG_BYTES or (not final and len(chunk) != self._seg_ct):
            raise IntegrityError(f"envelope truncated at segment {index}")
        try:
            plain = self._aead.decrypt(
                _nonce(self.header.nonce_prefix, index, final), chunk, self.header.fixed
            )
        except InvalidTag as exc:
            raise IntegrityError(
                f"envelope segment {index} does not verify "
                "(tampered, reordered, spliced or truncated)"
            ) from exc
        if len(self._cache) >= self._CACHE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[index] = plain
        return plain

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed envelope reader")
        pos = self._pos
        if size is not None and size >= 0:
            offset = pos - self._current_start
            if 0 <= offset and offset + size <= len(self._current):  # within the last segment
                self._pos = pos + size
                return self._current[offset : offset + size]
        end = self.size if size is None or size < 0 else min(self.size, pos + size)
        parts: list[bytes] = []
        while pos < end:
            index, offset = divmod(pos, self._seg)
            segment = self._segment(index)
            take = min(len(segment) - offset, end - pos)
            parts.append(segment[offset : offset + take])
            pos += take
            self._current, self._current_start = segment, index * self._seg
        self._pos = max(self._pos, pos)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if not self.closed:
            self._cache.clear()
            self._current = b""
            if self._owns:
                self._fileobj.close()
        super().close()


def open_seekable(
    fileobj: BinaryIO, keyring: DataKeyUnwrapper, *, owns: bool = False
) -> SeekableEnvelopeReader:
    """Open the envelope in the seekable ``fileobj`` for random access (see the class).

    Raises CryptoError if the keyring lacks the key id, IntegrityError if the header, wrap or
    final segment does not verify (tampered or truncated).
    """
    fileobj.seek(0)
    header = read_header(fileobj)
    data_key = keyring.unwrap(
        header.wrap_scheme, header.key_id, header.wrapped_key, header.wrap_context
    )
    if len(data_key) != DATA_KEY_BYTES:
        raise IntegrityError("unwrapped data key has a bad length")
    return SeekableEnvelopeReader(fileobj, header, data_key, owns=owns)


def open_envelope_file(path: Path, keyring: DataKeyUnwrapper) -> SeekableEnvelopeReader:
    """Open the envelope file at ``path`` for random access; closing the reader closes it."""
    f = open(path, "rb")  # owned by the reader, closed with it
    try:
        return open_seekable(f, keyring, owns=True)
    except BaseException:
        f.close()
        raise


def open_envelope(fileobj: BinaryIO, keyring: DataKeyUnwrapper) -> EnvelopeReader:
    """Read the header at the current position, unwrap the data key and return a reader.

    Raises CryptoError if the keyring lacks the key id, IntegrityError if the header or wrap
    does not verify. ``fileobj`` is not closed.
    """
    header = read_header(fileobj)
    data_key = keyring.unwrap(
        header.wrap_scheme, header.key_id, header.wrapped_key, header.wrap_context
    )
    if len(data_key) != DATA_KEY_BYTES:
        raise IntegrityError("unwrapped data key has a bad length")
    return EnvelopeReader(fileobj, header, data_key)


def rewrap_header(fileobj: BinaryIO, keyring: DataKeyUnwrapper, kek: DataKeyWrapper) -> bool:
    """Rewrap the data key of the envelope in ``fileobj`` (opened ``r+b``) under ``kek``.

    Only the header is rewritten, in place, with one write at offset 0; the segments are not
    touched. Returns False if the envelope is already wrapped under ``kek``. Raises CryptoError
    if the new header would not have the old one's length (then copy with
    :func:`copy_with_new_header` instead), IntegrityError if the old wrap does not verify.
    """
    fileobj.seek(0)
    header = read_header(fileobj)
    if header.wrap_scheme == kek.wrap_scheme and header.key_id == kek.key_id:
        return False
    data_key = keyring.unwrap(
        header.wrap_scheme, header.key_id, header.wrapped_key, header.wrap_context
    )
    new_header = _build_header(header.fixed, kek, data_key)
    if len(new_header) != len(header.raw):
        raise CryptoError(
            f"rewrap under {kek.key_id} changes the header length; copy the envelope instead"
        )
    fileobj.seek(0)
    fileobj.write(new_header)
    fileobj.flush()
    return True


def copy_with_new_header(
    src: BinaryIO, dst: BinaryIO, keyring: DataKeyUnwrapper, kek: DataKeyWrapper
) -> None:
    """Copy the envelope in ``src`` to ``dst`` with its data key rewrapped under ``kek``.

    The segments are copied verbatim, not decrypted: this is how a sealed instance (HPKE
    wrap) becomes a spool object under the node's own key-encryption key without being
    re-encrypted. The copy is no more trusted than the source: segments verify when read.
    """
    header = read_header(src)
    data_key = keyring.unwrap(
        header.wrap_scheme, header.key_id, header.wrapped_key, header.wrap_context
    )
    dst.write(_build_header(header.fixed, kek, data_key))
    while chunk := _read_full(src, header.segment_size + TAG_BYTES):
        dst.write(chunk)
    dst.flush()


def encrypt_file(
    src: Path, dst: Path, kek: DataKeyWrapper, *, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> None:
    """Encrypt the file ``src`` into a new envelope at ``dst``, atomically and durably.

    The envelope is written to a temporary file beside ``dst``, fsynced and renamed over it.
    """
    dst = Path(dst)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as plain:
            writer = EnvelopeWriter(out, kek, segment_size)
            while chunk := plain.read(segment_size):
                writer.write(chunk)
            writer.close()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, dst)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


def decrypt_to(src: Path, dst_fileobj: BinaryIO, keyring: DataKeyUnwrapper) -> int:
    """Write the verified plaintext of the envelope at ``src`` to ``dst_fileobj``.

    Returns the number of bytes written. On IntegrityError, ``dst_fileobj`` holds a verified
    prefix only and must be discarded by the caller.
    """
    total = 0
    with open(src, "rb") as sealed, open_envelope(sealed, keyring) as reader:
        for segment in reader:
            dst_fileobj.write(segment)
            total += len(segment)
    return total


def encrypt_bytes(
    data: bytes, kek: DataKeyWrapper, *, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> bytes:
    """Return ``data`` as an envelope in memory (small objects and tests)."""
    out = io.BytesIO()
    with EnvelopeWriter(out, kek, segment_size) as writer:
        writer.write(data)
    return out.getvalue()


def decrypt_bytes(envelope: bytes, keyring: DataKeyUnwrapper) -> bytes:
    """Return the verified plaintext of an in-memory envelope."""
    with open_envelope(io.BytesIO(envelope), keyring) as reader:
        return reader.read()
