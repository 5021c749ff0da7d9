"""The spool holds ciphertext only; tampered or truncated spool files are never forwarded."""

from __future__ import annotations

import time
from pathlib import Path

from tests.e2e.test_forward import orthanc_destination, storescu
from tests.support.datasets import make_ct_study, pixel_bytes, sha256_pixel
from tests.support.node import GatewayNode
from tests.support.peers import Orthanc

MARKER = "ZZPLANTED^MARKERQX"


def _spool_files(node: GatewayNode) -> list[Path]:
    return sorted(p for p in (node.state_dir / "spool" / "objects").rglob("*.dcm"))


def _wait_for_files(node: GatewayNode, n: int, timeout: float = 30.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = _spool_files(node)
        if len(files) >= n:
            return files
        time.sleep(0.2)
    raise AssertionError(f"expected {n} spool file(s)\n{node.log()}")


def _node(root: Path, orthanc: Orthanc, *, worker: bool) -> GatewayNode:
    return GatewayNode(
        root,
        destinations=[orthanc_destination(orthanc)],
        routes=[{"name": "all", "destinations": ["pacs"], "quiet_seconds": 1}],
        worker={"enabled": worker, "max_attempts": 3},
    )


def test_spool_is_ciphertext_and_tampering_quarantines(tmp_path: Path, orthanc: Orthanc) -> None:
    good = make_ct_study(tmp_path / "good", 3, rows=128, cols=128, patient_name=MARKER, seed=3)
    # 2 MiB: three segments, so the flipped one is met mid-send, after segment 0 went out
    flipped = make_ct_study(tmp_path / "flip", 1, rows=1024, cols=1024, patient_name=MARKER, seed=4)
    cut = make_ct_study(tmp_path / "cut", 1, rows=512, cols=512, patient_name=MARKER, seed=5)
    root = tmp_path / "node"
    with _node(root, orthanc, worker=False) as node:
        storescu(node, good)
        _wait_for_files(node, 3)
        # nothing in the spool (received objects, receive buffers) is plaintext
        for path in [*_spool_files(node), *(node.state_dir / "spool").rglob("*")]:
            if not path.is_file():
                continue
            data = path.read_bytes()
            assert b"DICM" not in data, path
            assert MARKER.encode() not in data, path
            for source in good:
                pixels = pixel_bytes(source)
                for offset in range(0, len(pixels) - 32, len(pixels) // 16):
                    assert pixels[offset : offset + 32] not in data, path
        before = set(_spool_files(node))
        storescu(node, flipped)
        (flip_file,) = set(_wait_for_files(node, 4)) - before
        storescu(node, cut)
        (cut_file,) = set(_wait_for_files(node, 5)) - before - {flip_file}
    raw = bytearray(flip_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # a bit in the middle segment
    flip_file.write_bytes(bytes(raw))
    with cut_file.open("r+b") as f:
        f.truncate(cut_file.stat().st_size - 100)

    with _node(root, orthanc, worker=True) as node:
        node.wait_for_deliveries("delivered", 1, timeout=120)
        quarantined = node.wait_for_deliveries("quarantined", 2, timeout=120)
        for d in quarantined:
            assert "integrity" in d["last_error"], d
            assert d["sent"] == 0
    # the intact study arrived whole; nothing of the tampered ones did
    held = {orthanc.instance_tags(oid)["SOPInstanceUID"]: oid for oid in orthanc.instances()}
    assert len(held) == 3
    by_hash = {sha256_pixel(f) for f in good}
    assert {sha256_pixel(orthanc.instance_file(oid)) for oid in held.values()} == by_hash
