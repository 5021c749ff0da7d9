"""[[qr.federation]] and [[qr.grants]]: parsed into frozen objects, every mistake names the file
and the key (exit 2 from check-config), and the grant policy picks grants as documented."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway.config import GatewayConfig, load_config
from gateway.config.rules import OneOf
from gateway.errors import ConfigError
from gateway.qr.policy import grant_for_study, grants_for

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / ".venv" / "bin" / "dicom-gateway"

BASE = """
[node]
name = "node-a"
state_dir = "state"

[[peers]]
name = "node-b"
url = "https://10.0.0.2:8443"

[[peers]]
name = "node-c"
url = "https://10.0.0.3:8443"

[qr]
grant_scan_limit = 500
"""

GOOD = (
    BASE
    + """
[[qr.federation]]
peer = "node-b"
callers = ["WS1", "WS2"]
timeout = 2.5

[[qr.grants]]
name = "b-ct"
peers = ["node-b"]
callers = ["WS1"]
profile = "basic"
match = { attribute = "Modality", one_of = ["CT"] }

[[qr.grants]]
name = "anyone-query-only"
peers = ["*"]
retrieve = false
"""
)


def _load(tmp_path: Path, text: str) -> GatewayConfig:
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return load_config(path)


def test_federation_and_grants_parse(tmp_path: Path) -> None:
    cfg = _load(tmp_path, GOOD)
    (fed,) = cfg.qr.federation
    assert (fed.peer, fed.callers, fed.timeout, fed.retrieve_timeout) == (
        "node-b",
        ("WS1", "WS2"),
        2.5,
        300.0,
    )
    first, second = cfg.qr.grants
    assert first.profile == "basic" and first.retrieve
    assert first.match == OneOf("Modality", ("CT",))
    assert second.peers == ("*",) and second.callers == ("*",) and not second.retrieve
    assert cfg.qr.grant_scan_limit == 500
    # the policy: grants admitting (peer, caller), then the first whose match holds
    assert [g.name for g in grants_for(cfg, "node-b", "WS1")] == ["b-ct", "anyone-query-only"]
    assert [g.name for g in grants_for(cfg, "node-c", "WS1")] == ["anyone-query-only"]
    grants = grants_for(cfg, "node-b", "WS1")
    ct = grant_for_study(grants, {"ModalitiesInStudy": "MR\\CT"}, "WS1")
    mr = grant_for_study(grants, {"ModalitiesInStudy": "MR"}, "WS1")
    assert ct is not None and ct.name == "b-ct"
    assert mr is not None and mr.name == "anyone-query-only"


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ('[[qr.federation]]\npeer = "node-x"\n', "qr.federation[0].peer", "[[peers]]"),
        ('[[qr.federation]]\npeer = "node-b"\ntimeout = "5"\n', "federation[0].timeout", "number"),
        ('[[qr.federation]]\npeer = "node-b"\ntimeout = 0\n', "qr.federation[0].timeout", "than 0"),
        ('[[qr.federation]]\npeer = "node-b"\nwait = 1\n', "qr.federation[0].wait", "no such key"),
        ('[[qr.federation]]\npeer = "node-b"\ncallers = []\n', "qr.federation[0].callers", "AE"),
        ('[[qr.federation]]\npeer = "node-b"\ncallers = ["A\\\\B"]\n', "callers[0]", "AE title"),
        ('[[qr.grants]]\nname = "g"\n', "qr.grants[0].peers", "required"),
        ('[[qr.grants]]\nname = "g"\npeers = ["nobody"]\n', "qr.grants[0].peers[0]", "[[peers]]"),
        ('[[qr.grants]]\nname = "g"\npeers = "node-b"\n', "qr.grants[0].peers", "an array"),
        ('[[qr.grants]]\nname = "g"\npeers = ["*"]\nretrieve = 1\n', "retrieve", "true or false"),
        (
            '[[qr.grants]]\nname = "g"\npeers = ["*"]\nmatch = { attribute = "No", equals = 1 }\n',
            "qr.grants[0].match.attribute",
            "DICOM keyword",
        ),
        (
            '[[qr.grants]]\nname = "g"\npeers = ["*"]\n[[qr.grants]]\nname = "g"\npeers = ["*"]\n',
            "qr.grants[1].name",
            "unique",
        ),
        ("grant_scan_limit = -1\n", "qr.grant_scan_limit", "than 0"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, extra: str, key: str, expected: str) -> None:
    text = (
        BASE + extra
        if not extra.startswith("grant_scan_limit")
        else BASE.replace("grant_scan_limit = 500\n", extra)
    )
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert key in message and expected in message, message
    assert str(tmp_path / "gw.toml") in message


def test_check_config_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(BASE + '[[qr.grants]]\nname = "g"\npeers = ["*"]\nprofile = "no-such"\n')
    proc = subprocess.run(
        [str(CLI), "check-config", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and "qr.grants[0].profile" in proc.stderr
