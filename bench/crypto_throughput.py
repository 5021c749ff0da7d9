"""Raw AES-256-GCM and envelope throughput on this machine (printed, never asserted).

    .venv/bin/python -m bench.crypto_throughput [MiB] [segment KiB]

Measures, on one core: AESGCM.encrypt of whole segments (the ceiling), EnvelopeWriter into
memory, EnvelopeReader from memory, and encrypt_file/decrypt_to through the filesystem beside
a plain copy of the same file.  :func:`raw_encrypt_seconds` and :func:`spool_write_seconds`
are also what bench scenario 5 (sealed transfer) measures in its run.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.crypto.envelope import (
    DEFAULT_SEGMENT_SIZE,
    EnvelopeWriter,
    decrypt_to,
    encrypt_file,
    open_envelope,
)
from gateway.crypto.kek import KeyEncryptionKey


class _Null(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:
        return len(memoryview(b))  # type: ignore[arg-type]


def _best_of(runs: int, fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def raw_encrypt_seconds(total: int, segment: int = DEFAULT_SEGMENT_SIZE) -> float:
    """Seconds for AESGCM.encrypt (AES-256-GCM, one core) of ``total`` bytes in segments
    (rounded down to whole segments, at least one)."""
    block = os.urandom(segment)
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    nonce = os.urandom(12)
    t0 = time.perf_counter()
    for _ in range(max(1, total // segment)):
        aead.encrypt(nonce, block, b"")  # nonce reuse is harmless here: output discarded
    return time.perf_counter() - t0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def spool_write_seconds(
    blobs: list[bytes],
    folder: Path,
    *,
    encrypted: bool,
    kek: KeyEncryptionKey | None = None,
    segment: int = DEFAULT_SEGMENT_SIZE,
) -> float:
    """Seconds to write every blob as its own spool file the way encrypt_file does (temporary
    file, fsync, rename, fsync of the folder): as an envelope under ``kek`` (a fresh data key
    per file) when ``encrypted``, else the plaintext bytes with the same steps."""
    folder.mkdir(parents=True, exist_ok=True)
    key = kek or KeyEncryptionKey.generate("bench")
    t0 = time.perf_counter()
    for i, blob in enumerate(blobs):
        dst = folder / f"{i:06d}.bin"
        tmp = folder / f".{i:06d}.bin.tmp"
        with open(tmp, "wb") as out:
            if encrypted:
                writer = EnvelopeWriter(out, key, segment)
                writer.write(blob)
                writer.close()
            else:
                out.write(blob)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
        _fsync_dir(folder)
    return time.perf_counter() - t0


def main() -> None:
    total_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    segment = (int(sys.argv[2]) if len(sys.argv) > 2 else 1024) * 1024
    total = total_mib * 1024 * 1024
    block = os.urandom(segment)
    n_blocks = total // segment
    kek = KeyEncryptionKey.generate("bench")
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    nonce = os.urandom(12)

    sealed_block = aead.encrypt(nonce, block, b"")

    def raw_decrypt() -> None:
        for _ in range(n_blocks):
            aead.decrypt(nonce, sealed_block, b"")

    def write_env() -> None:
        writer = EnvelopeWriter(_Null(), kek, segment)  # type: ignore[arg-type]
        for _ in range(n_blocks):
            writer.write(block)
        writer.close()

    sealed = io.BytesIO()
    writer = EnvelopeWriter(sealed, kek, segment)
    for _ in range(n_blocks):
        writer.write(block)
    writer.close()
    blob = sealed.getvalue()

    def read_env() -> None:
        for _ in open_envelope(io.BytesIO(blob), kek):
            pass

    rows = [
        ("AES-256-GCM raw encrypt", min(raw_encrypt_seconds(total, segment) for _ in range(5))),
        ("AES-256-GCM raw decrypt+verify", _best_of(5, raw_decrypt)),
        ("envelope write (memory)", _best_of(3, write_env)),
        ("envelope read+verify (memory)", _best_of(3, read_env)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst, copy = Path(tmp, "plain"), Path(tmp, "sealed"), Path(tmp, "copy")
        with open(src, "wb") as f:
            for _ in range(n_blocks):
                f.write(block)
        rows.append(("plain file copy", _best_of(3, lambda: shutil.copyfile(src, copy))))
        rows.append(
            (
                "encrypt_file (fsync)",
                _best_of(3, lambda: encrypt_file(src, dst, kek, segment_size=segment)),
            )
        )
        with open(os.devnull, "wb") as sink:
            rows.append(("decrypt_to /dev/null", _best_of(3, lambda: decrypt_to(dst, sink, kek))))

    print(f"{total_mib} MiB, segment {segment // 1024} KiB, best of 3")
    for name, seconds in rows:
        print(f"  {name:32s} {total / seconds / 1e6:9.1f} MB/s")


if __name__ == "__main__":
    main()
