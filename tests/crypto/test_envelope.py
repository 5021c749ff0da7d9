"""Envelope round trips and every tamper the format must detect."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from gateway.crypto.envelope import (
    TAG_BYTES,
    EnvelopeWriter,
    copy_with_new_header,
    decrypt_bytes,
    decrypt_to,
    encrypt_bytes,
    encrypt_file,
    open_envelope,
    read_header,
    rewrap_header,
)
from gateway.crypto.kek import KeyEncryptionKey
from gateway.errors import CryptoError, IntegrityError

SEG = 1024


@pytest.fixture(scope="module")
def kek() -> KeyEncryptionKey:
    return KeyEncryptionKey.generate("kek-test-1")


def header_len(envelope: bytes) -> int:
    return len(read_header(io.BytesIO(envelope)).raw)


def segments(envelope: bytes, seg: int = SEG) -> tuple[bytes, list[bytes]]:
    h = header_len(envelope)
    body = envelope[h:]
    step = seg + TAG_BYTES
    return envelope[:h], [body[i : i + step] for i in range(0, len(body), step)]


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 7 * SEG + 5])
def test_round_trip_sizes(kek: KeyEncryptionKey, size: int) -> None:
    data = os.urandom(size)
    env = encrypt_bytes(data, kek, segment_size=SEG)
    assert decrypt_bytes(env, kek) == data
    expected_segments = max(1, -(-size // SEG))
    assert len(env) == header_len(env) + size + expected_segments * TAG_BYTES


def test_many_segments_streamed_in_odd_writes(kek: KeyEncryptionKey) -> None:
    data = os.urandom(5 * 1024 * 1024)
    out = io.BytesIO()
    writer = EnvelopeWriter(out, kek, segment_size=64 * 1024)
    view = memoryview(data)
    pos = 0
    for step in [1, 100_000, 65536, 3, 1 << 20]:
        writer.write(view[pos : pos + step])
        pos += step
    writer.write(view[pos:])
    writer.close()
    out.seek(0)
    with open_envelope(out, kek) as reader:
        got = bytearray()
        while chunk := reader.read(50_000):
            assert len(chunk) <= 64 * 1024
            got += chunk
    assert bytes(got) == data
    out.seek(0)
    assert b"".join(open_envelope(out, kek)) == data


def test_ciphertext_hides_plaintext(kek: KeyEncryptionKey) -> None:
    data = b"DICM" * 1000
    assert b"DICM" not in encrypt_bytes(data, kek, segment_size=SEG)


def test_file_helpers(tmp_path: Path, kek: KeyEncryptionKey) -> None:
    src = tmp_path / "plain.dcm"
    src.write_bytes(os.urandom(3 * SEG + 7))
    dst = tmp_path / "obj.env"
    encrypt_file(src, dst, kek, segment_size=SEG)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    out = io.BytesIO()
    assert decrypt_to(dst, out, kek) == 3 * SEG + 7
    assert out.getvalue() == src.read_bytes()


def test_unclosed_or_aborted_writer_never_opens(kek: KeyEncryptionKey) -> None:
    out = io.BytesIO()
    with pytest.raises(RuntimeError), EnvelopeWriter(out, kek, segment_size=SEG) as writer:
        writer.write(b"x" * (3 * SEG))
        raise RuntimeError("producer failed")
    with pytest.raises(IntegrityError):
        decrypt_bytes(out.getvalue(), kek)


def test_unknown_key_id(kek: KeyEncryptionKey) -> None:
    env = encrypt_bytes(b"abc", kek, segment_size=SEG)
    with pytest.raises(CryptoError, match="kek-test-1"):
        decrypt_bytes(env, KeyEncryptionKey.generate("kek-other"))


def test_same_id_different_key_fails(kek: KeyEncryptionKey) -> None:
    env = encrypt_bytes(b"abc", kek, segment_size=SEG)
    with pytest.raises(IntegrityError):
        decrypt_bytes(env, KeyEncryptionKey.generate(kek.key_id))


# --- tampering ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(kek: KeyEncryptionKey) -> tuple[bytes, bytes]:
    data = os.urandom(4 * SEG + 100)
    return data, encrypt_bytes(data, kek, segment_size=SEG)


def flip(buf: bytes, offset: int, bit: int = 0) -> bytes:
    b = bytearray(buf)
    b[offset] ^= 1 << bit
    return bytes(b)


def test_every_header_bit_flip_is_detected(
    kek: KeyEncryptionKey, sample: tuple[bytes, bytes]
) -> None:
    _, env = sample
    for offset in range(header_len(env)):
        for bit in (0, 7):
            with pytest.raises(CryptoError):
                decrypt_bytes(flip(env, offset, bit), kek)


@pytest.mark.parametrize("where", ["first", "middle", "tag_of_last", "last_byte"])
def test_segment_bit_flip(kek: KeyEncryptionKey, sample: tuple[bytes, bytes], where: str) -> None:
    _, env = sample
    h = header_len(env)
    offset = {
        "first": h,
        "middle": h + 2 * (SEG + TAG_BYTES) + 17,
        "tag_of_last": len(env) - TAG_BYTES,
        "last_byte": len(env) - 1,
    }[where]
    with pytest.raises(IntegrityError):
        decrypt_bytes(flip(env, offset), kek)


def test_no_plaintext_of_a_bad_segment_is_released(
    kek: KeyEncryptionKey, sample: tuple[bytes, bytes]
) -> None:
    data, env = sample
    h = header_len(env)
    bad = flip(env, h + SEG + TAG_BYTES + 5)  # second segment
    reader = open_envelope(io.BytesIO(bad), kek)
    got = reader.read(SEG)
    assert got == data[:SEG]
    with pytest.raises(IntegrityError, match="segment 1"):
        reader.read(1)


def test_truncation_at_every_segment_boundary(
    kek: KeyEncryptionKey, sample: tuple[bytes, bytes]
) -> None:
    _, env = sample
    header, segs = segments(env)
    for keep in range(len(segs)):
        with pytest.raises(IntegrityError):
            decrypt_bytes(header + b"".join(segs[:keep]), kek)


def test_truncation_mid_segment_and_appended_bytes(
    kek: KeyEncryptionKey, sample: tuple[bytes, bytes]
) -> None:
    _, env = sample
    for cut in (1, 5, TAG_BYTES, 200):
        with pytest.raises(IntegrityError):
            decrypt_bytes(env[:-cut], kek)
    with pytest.raises(IntegrityError):
        decrypt_bytes(env + b"\x00", kek)


def test_drop_final_segment_of_exact_multiple(kek: KeyEncryptionKey) -> None:
    env = encrypt_bytes(os.urandom(3 * SEG), kek, segment_size=SEG)
    header, segs = segments(env)
    assert len(segs) == 3
    with pytest.raises(IntegrityError):
        decrypt_bytes(header + segs[0] + segs[1], kek)


def test_reorder_and_duplicate_segments(kek: KeyEncryptionKey, sample: tuple[bytes, bytes]) -> None:
    _, env = sample
    header, segs = segments(env)
    swapped = [segs[1], segs[0], *segs[2:]]
    with pytest.raises(IntegrityError):
        decrypt_bytes(header + b"".join(swapped), kek)
    duplicated = [segs[0], segs[0], *segs[2:]]
    with pytest.raises(IntegrityError):
        decrypt_bytes(header + b"".join(duplicated), kek)


def test_splice_segment_from_another_envelope_same_kek(
    kek: KeyEncryptionKey, sample: tuple[bytes, bytes]
) -> None:
    data, env = sample
    other = encrypt_bytes(data, kek, segment_size=SEG)
    header, segs = segments(env)
    _, other_segs = segments(other)
    spliced = [segs[0], other_segs[1], *segs[2:]]
    with pytest.raises(IntegrityError):
        decrypt_bytes(header + b"".join(spliced), kek)
    other_header, _ = segments(other)
    with pytest.raises(IntegrityError):
        decrypt_bytes(other_header + b"".join(segs), kek)


def test_not_an_envelope(kek: KeyEncryptionKey) -> None:
    for junk in (b"", b"DICM", os.urandom(100)):
        with pytest.raises(IntegrityError):
            decrypt_bytes(junk, kek)


# --- rewrapping ---------------------------------------------------------------------------


def test_rewrap_header_in_place_keeps_segments(
    kek: KeyEncryptionKey, sample: tuple[bytes, bytes]
) -> None:
    data, env = sample
    new = KeyEncryptionKey.generate("kek-test-2")  # same id length: same header length
    buf = io.BytesIO(env)
    assert rewrap_header(buf, kek, new) is True
    rewrapped = buf.getvalue()
    h = header_len(env)
    assert rewrapped[h:] == env[h:]
    assert decrypt_bytes(rewrapped, new) == data
    with pytest.raises(CryptoError):
        decrypt_bytes(rewrapped, kek)
    assert rewrap_header(io.BytesIO(rewrapped), new, new) is False


def test_rewrap_refuses_header_length_change(
    kek: KeyEncryptionKey, sample: tuple[bytes, bytes]
) -> None:
    _, env = sample
    buf = io.BytesIO(env)
    with pytest.raises(CryptoError, match="header length"):
        rewrap_header(buf, kek, KeyEncryptionKey.generate("a-much-longer-key-id"))
    assert buf.getvalue() == env
    out = io.BytesIO()
    longer = KeyEncryptionKey.generate("a-much-longer-key-id")
    copy_with_new_header(io.BytesIO(env), out, kek, longer)
    assert decrypt_bytes(out.getvalue(), longer) == sample[0]


def test_segment_size_bounds(kek: KeyEncryptionKey) -> None:
    with pytest.raises(CryptoError):
        EnvelopeWriter(io.BytesIO(), kek, segment_size=10)


class _Trickle:
    """A stream with only ``read``, returning at most 100 bytes per call (like a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(min(n, 100) if n >= 0 else 100)


def test_short_reads_without_readinto(kek: KeyEncryptionKey, sample: tuple[bytes, bytes]) -> None:
    data, env = sample
    reader = open_envelope(_Trickle(env), kek)  # type: ignore[arg-type]
    assert reader.read() == data
    with pytest.raises(IntegrityError):
        open_envelope(_Trickle(env[:-1]), kek).read()  # type: ignore[arg-type]


def test_unbuffered_file(
    tmp_path: Path, kek: KeyEncryptionKey, sample: tuple[bytes, bytes]
) -> None:
    data, env = sample
    path = tmp_path / "obj.env"
    path.write_bytes(env)
    with open(path, "rb", buffering=0) as raw:
        assert b"".join(open_envelope(raw, kek)) == data  # type: ignore[arg-type]
