"""FAULTS A18: a preamble polyglot (an ELF header in the 128-byte preamble, CVE-2019-11687).

Whatever came in, nothing the node writes or sends out carries a preamble other than zeros:
the ``deid`` CLI's files, instances forwarded to a DICOM destination (DCMTK storescp), an
instance fetched with C-GET (getscu), and what the node seals for a peer (the package the
remote node ingests; unit level: the sealing step opened with the recipient's key). DIMSE
carries no preamble, so over C-STORE the polyglot's header never reaches the spool at all;
a peer's package is stored as it came (encrypted), and is cleaned on the way out.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom

from gateway.config import GatewayConfig
from gateway.config.model import DestinationConfig
from gateway.crypto.keys import init_node_keys, load_hpke_key, load_keyring
from gateway.crypto.seal import HpkeSuite, RecipientPrivateKey, open_instance_to
from gateway.dicom.scu import OutgoingFile
from gateway.peer.client import SealStep
from gateway.peer.material import PeerTrust
from gateway.preamble import ZeroPreambleReader
from gateway.spool.store import Spool
from gateway.transfer.pipeline import DeliveryContext
from tests.e2e.test_forward import storescu
from tests.support.datasets import make_instance
from tests.support.node import GatewayNode
from tests.support.peers import StoreSCP, dcmtk

ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00\x01\x00\x00\x00"


def polyglot(folder: Path, **kwargs: object) -> Path:
    """A valid DICOM file whose preamble is an ELF header (padded with 0xCC)."""
    path = make_instance(folder, **kwargs)
    data = bytearray(path.read_bytes())
    assert data[128:132] == b"DICM"
    data[:128] = (ELF + b"\xcc" * 128)[:128]
    path.write_bytes(bytes(data))
    return path


def assert_zero_preamble(data: bytes, what: str) -> None:
    assert data[128:132] == b"DICM", f"{what} is not a DICOM file"
    assert data[:128] == bytes(128), f"{what} has a non-zero preamble: {data[:16]!r}"


def test_deid_cli_writes_a_zero_preamble(tmp_path: Path) -> None:
    src = polyglot(tmp_path / "in", seed=181)
    node = GatewayNode(tmp_path / "node")  # only its configuration, for the CLI
    out = tmp_path / "out"
    proc = node.cli("deid", "--profile", "basic", "--out", str(out), str(src))
    assert proc.returncode == 0, proc.stderr
    written = [p for p in out.rglob("*.dcm")]
    assert len(written) == 1
    assert_zero_preamble(written[0].read_bytes(), "the de-identified file")


def test_forwarded_and_retrieved_instances_have_zero_preambles(tmp_path: Path) -> None:
    src = polyglot(tmp_path / "in", seed=182)
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    with StoreSCP(tmp_path / "scp") as scp:
        node = GatewayNode(
            tmp_path / "node",
            destinations=[
                {"name": "scp", "ae_title": scp.aet, "host": "127.0.0.1", "port": scp.port}
            ],
            routes=[{"name": "all", "destinations": ["scp"], "mode": "stream"}],
        )
        with node:
            storescu(node, [src])
            received = scp.wait_for_files(1, timeout=60)
            assert_zero_preamble(received[0].read_bytes(), "the forwarded instance")
            # the spool: ciphertext without the header, and its plaintext's preamble zero
            spool = Spool(node.state_dir / "spool", keyring=load_keyring(node.state_dir))
            keys = list(spool.keys())
            assert len(keys) == 1
            assert ELF[:4] not in spool.path_of(keys[0]).read_bytes()
            with spool.open(keys[0]) as f:
                assert_zero_preamble(f.read(), "the spooled instance")
            # C-GET (getscu writes what it receives)
            got = tmp_path / "got"
            got.mkdir()
            proc = dcmtk(
                "getscu",
                "-S",
                "-aet",
                "WS",
                "-aec",
                node.ae_title,
                "-od",
                str(got),
                "127.0.0.1",
                str(node.port),
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={ds.StudyInstanceUID}",
            )
            assert proc.returncode == 0, proc.stderr
            fetched = [p for p in got.iterdir() if p.is_file()]
            assert len(fetched) == 1, proc.stderr
            assert_zero_preamble(fetched[0].read_bytes(), "the C-GET instance")
            # the same data set went out: only the preamble differs from what was sent
            assert pydicom.dcmread(fetched[0]).PixelData == pydicom.dcmread(src).PixelData


def test_sealed_for_a_peer_with_a_zero_preamble(tmp_path: Path) -> None:
    """The sealing step reads a spooled polyglot (as a peer's package is stored) and the
    recipient opens an instance with a zero preamble whose manifest digest matches it."""
    src = polyglot(tmp_path / "in", seed=183)
    original = src.read_bytes()
    spool = Spool(tmp_path / "spool")  # plaintext spool: the step reads through it either way
    init_node_keys(tmp_path / "recipient")
    key = RecipientPrivateKey.from_x25519(load_hpke_key(tmp_path / "recipient"))
    cfg = GatewayConfig(
        source=tmp_path / "gateway.toml",
        destinations=(DestinationConfig(name="site-b", type="peer", peer="node-b"),),
    )
    trust = PeerTrust(
        name="node-b",
        url="https://127.0.0.1:1",
        timeout=5.0,
        cert_file=tmp_path / "unused.crt",
        certificate_sha256="0" * 64,
        signing_key=None,  # type: ignore[arg-type]  # not used by sealing
        hpke={HpkeSuite.X25519: key.public},
    )
    step = SealStep(
        cfg,
        {"node-b": trust},
        folder=tmp_path / "sealed",
        profile_of=lambda _delivery: {},
        spool=spool,
    )
    ctx = DeliveryContext("pkg-a18", "all", "site-b", "")
    sealed = step(OutgoingFile("1.2", "1.2.3", "1.2.840.10008.1.2.1", src), ctx)
    package, _profile = step.package_for([sealed])
    entry = package.entries[0]
    opened = io.BytesIO()
    with sealed.path.open("rb") as f:
        open_instance_to(f, opened, key, package_id="pkg-a18", index=0, expected=entry)
    data = opened.getvalue()
    assert_zero_preamble(data, "the sealed instance")
    assert data[128:] == original[128:]
    assert entry.sha256 == hashlib.sha256(data).hexdigest()


def test_zero_preamble_reader_passes_non_dicom_bytes_through() -> None:
    raw = b"\x7fELF" + bytes(124) + b"NOPE" + b"rest"
    assert ZeroPreambleReader(io.BytesIO(raw)).read() == raw
    short = b"\x7fELF"
    assert ZeroPreambleReader(io.BytesIO(short)).read(2) == short[:2]
    dicom = b"\x7fELF" + bytes(124) + b"DICM" + b"x" * 10
    reader = ZeroPreambleReader(io.BytesIO(dicom))
    assert reader.read(3) + reader.read(200) + reader.read() == bytes(128) + b"DICM" + b"x" * 10
