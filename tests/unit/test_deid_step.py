"""The delivery worker's de-identification step reads its profile once per attempt: the
same profile for every instance of the attempt, and a profile changed on disk applies
from the next attempt (an admin's fix of a quarantined delivery's profile, or a change
that breaks one)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from gateway.config import load_config
from gateway.crypto.keys import init_node_keys, load_keyring
from gateway.dicom.scu import OutgoingFile
from gateway.errors import QuarantineError
from gateway.spool.store import Spool
from gateway.transfer import prepare
from gateway.transfer.pipeline import DeliveryContext
from gateway.transfer.prepare import DeidStep
from tests.support.datasets import make_instance

BASIC = Path(__file__).resolve().parents[2] / "deid_profiles" / "basic.toml"


def _step(tmp_path: Path) -> tuple[DeidStep, Spool, Path]:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    site = profiles / "site.toml"
    site.write_text(BASIC.read_text().replace('name = "basic"', 'name = "site"'))
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[node]\nname = "t"\nstate_dir = "{tmp_path / "state"}"\n\n'
        f'[deid]\nprofiles_dirs = ["{profiles}"]\n'
    )
    cfg = load_config(config)
    init_node_keys(cfg.state_dir, hybrid=False)
    spool = Spool(cfg.spool_dir, keyring=load_keyring(cfg.state_dir))
    outgoing = cfg.spool_dir / "outgoing"
    outgoing.mkdir(parents=True, exist_ok=True)
    return DeidStep(cfg, outgoing_dir=outgoing, spool=spool), spool, site


def _items(tmp_path: Path, spool: Spool, n: int) -> list[OutgoingFile]:
    items = []
    for i in range(n):
        plain = make_instance(tmp_path / f"in{i}.dcm", PatientName="Kowalczyk^Anna")
        ds = pydicom.dcmread(plain)
        path = spool.path_of(f"{i:032x}")
        spool.write_file(path, plain.read_bytes())
        items.append(
            OutgoingFile(
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                str(ds.file_meta.TransferSyntaxUID),
                path,
            )
        )
    return items


def test_the_profile_is_read_once_an_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step, spool, site = _step(tmp_path)
    items = _items(tmp_path, spool, 3)
    reads: list[str] = []
    real = prepare.resolve_profile

    def counting(cfg: object, name: str) -> object:
        reads.append(name)
        return real(cfg, name)  # type: ignore[arg-type]

    monkeypatch.setattr(prepare, "resolve_profile", counting)
    leaky = site.read_text() + '\n[[item]]\nname = "oops"\ntag = "PatientName"\naction = "keep"\n'
    ctx = DeliveryContext("d1", "out", "pacs", "site")
    outs = [step(items[0], ctx)]
    site.write_text(leaky)  # changed during the attempt: the attempt keeps what it read
    outs += [step(item, ctx) for item in items[1:]]
    for out in outs:
        assert "Kowalczyk" not in str(pydicom.dcmread(spool.open_path(out.path)).PatientName)
    assert reads == ["site"]
    assert step.summary("d1")["instances"] == 3
    step.release("d1")

    # the next attempt reads the profile again: the changed one applies (its leak is caught)
    with pytest.raises(QuarantineError, match="leak gate"):
        step(items[0], ctx)
    assert reads == ["site", "site"]
