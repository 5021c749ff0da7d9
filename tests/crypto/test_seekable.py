"""The random-access envelope reader: seeks anywhere, verifies every segment it returns."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest

from gateway.crypto.envelope import (
    TAG_BYTES,
    encrypt_bytes,
    open_envelope_file,
    open_seekable,
    read_header,
)
from gateway.crypto.kek import KeyEncryptionKey
from gateway.errors import CryptoError, IntegrityError

SEG = 1024


@pytest.fixture(scope="module")
def kek() -> KeyEncryptionKey:
    return KeyEncryptionKey.generate("kek-seek-1")


def _hlen(env: bytes) -> int:
    return len(read_header(io.BytesIO(env)).raw)


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 7 * SEG + 5])
def test_length_and_full_read(kek: KeyEncryptionKey, size: int) -> None:
    data = os.urandom(size)
    reader = open_seekable(io.BytesIO(encrypt_bytes(data, kek, segment_size=SEG)), kek)
    assert reader.size == size
    assert reader.seek(0, io.SEEK_END) == size
    reader.seek(0)
    assert reader.read() == data
    assert reader.read(10) == b""


def test_random_seeks(kek: KeyEncryptionKey) -> None:
    data = os.urandom(13 * SEG + 77)
    reader = open_seekable(io.BytesIO(encrypt_bytes(data, kek, segment_size=SEG)), kek)
    rng = random.Random(5)
    for _ in range(500):
        pos = rng.randrange(0, len(data) + 10)
        n = rng.choice([0, 1, 7, SEG - 1, SEG, SEG + 1, 3 * SEG, 10_000])
        whence = rng.choice([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END])
        if whence == io.SEEK_SET:
            reader.seek(pos)
        elif whence == io.SEEK_CUR:
            reader.seek(pos - reader.tell(), io.SEEK_CUR)
        else:
            reader.seek(pos - len(data), io.SEEK_END)
        assert reader.tell() == pos
        assert reader.read(n) == data[pos : pos + n]
        assert reader.tell() == min(len(data), pos + n) if pos <= len(data) else pos
    buf = bytearray(100)
    reader.seek(SEG - 50)
    assert reader.readinto(buf) == 100
    assert bytes(buf) == data[SEG - 50 : SEG + 50]


def test_buffered_wrapper_and_file(tmp_path: Path, kek: KeyEncryptionKey) -> None:
    data = os.urandom(5 * SEG + 3)
    path = tmp_path / "obj"
    path.write_bytes(encrypt_bytes(data, kek, segment_size=SEG))
    with open_envelope_file(path, kek) as raw, io.BufferedReader(raw, 4096) as reader:
        reader.seek(2 * SEG + 1)
        assert reader.read(SEG) == data[2 * SEG + 1 : 3 * SEG + 1]
        reader.seek(0)
        assert reader.read() == data


def test_flipped_bit_in_any_segment_is_detected_when_read(kek: KeyEncryptionKey) -> None:
    data = os.urandom(4 * SEG + 9)
    env = encrypt_bytes(data, kek, segment_size=SEG)
    h = _hlen(env)
    for index in range(5):
        bad = bytearray(env)
        bad[h + index * (SEG + TAG_BYTES) + 3] ^= 0x01
        if index == 4:  # the final segment is verified at open
            with pytest.raises(IntegrityError, match="segment 4"):
                open_seekable(io.BytesIO(bytes(bad)), kek)
            continue
        reader = open_seekable(io.BytesIO(bytes(bad)), kek)
        # bytes of intact segments are returned; the tampered one never is
        for other in range(4):
            if other != index:
                reader.seek(other * SEG)
                assert reader.read(SEG) == data[other * SEG : (other + 1) * SEG]
        reader.seek(index * SEG + SEG - 1)
        with pytest.raises(IntegrityError, match=f"segment {index}"):
            reader.read(1)


def test_header_tamper_and_wrong_key(kek: KeyEncryptionKey) -> None:
    env = encrypt_bytes(os.urandom(3 * SEG), kek, segment_size=SEG)
    bad = bytearray(env)
    bad[12] ^= 0x80  # nonce prefix: associated data of every segment and the wrap
    with pytest.raises(IntegrityError):
        open_seekable(io.BytesIO(bytes(bad)), kek)
    with pytest.raises(CryptoError):
        open_seekable(io.BytesIO(env), KeyEncryptionKey.generate("another"))


@pytest.mark.parametrize("size", [0, SEG, 3 * SEG, 3 * SEG + 100])
def test_truncation_detected_at_open(kek: KeyEncryptionKey, size: int) -> None:
    env = encrypt_bytes(os.urandom(size), kek, segment_size=SEG)
    h = _hlen(env)
    cuts = {h, h + 1, h + TAG_BYTES - 1, len(env) - 1, len(env) - TAG_BYTES}
    cuts |= {h + i * (SEG + TAG_BYTES) for i in range(1, size // SEG + 1)}
    for cut in sorted(c for c in cuts if h <= c < len(env)):
        with pytest.raises(IntegrityError):
            open_seekable(io.BytesIO(env[:cut]), kek)
    with pytest.raises(IntegrityError):
        open_seekable(io.BytesIO(env + b"\x00"), kek)
    with pytest.raises(IntegrityError):
        open_seekable(io.BytesIO(env[: h - 1]), kek)


def test_reordered_segments_detected(kek: KeyEncryptionKey) -> None:
    data = os.urandom(3 * SEG + 1)
    env = encrypt_bytes(data, kek, segment_size=SEG)
    h, step = _hlen(env), SEG + TAG_BYTES
    segs = [env[h + i * step : h + (i + 1) * step] for i in range(4)]
    swapped = env[:h] + segs[1] + segs[0] + segs[2] + segs[3]
    reader = open_seekable(io.BytesIO(swapped), kek)
    reader.seek(2 * SEG)
    assert reader.read(SEG) == data[2 * SEG : 3 * SEG]
    reader.seek(0)
    with pytest.raises(IntegrityError, match="segment 0"):
        reader.read(1)


def test_memory_bounded_cache(kek: KeyEncryptionKey) -> None:
    data = os.urandom(20 * SEG)
    reader = open_seekable(io.BytesIO(encrypt_bytes(data, kek, segment_size=SEG)), kek)
    assert reader.read(10_000) == data[:10_000]
    assert len(reader._cache) <= 2
    reader.close()
    with pytest.raises(ValueError):
        reader.read(1)
