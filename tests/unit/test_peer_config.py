"""Config of the peer endpoint, [[peers]] and peer destinations."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError

PEERS = """
[node]
name = "node-a"

[peer]
enabled = true
port = 9443
suite = "mlkem768-x25519"

[[peers]]
name = "node-b"
url = "https://127.0.0.1:9444"

[[destinations]]
name = "b"
type = "peer"
peer = "node-b"
"""


def test_peer_config_loads(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, PEERS))
    assert cfg.peer.enabled and cfg.peer.suite == "mlkem768-x25519"
    assert cfg.peer_url == "https://127.0.0.1:9443"
    entry = cfg.peer_entry("node-b")
    assert cfg.peer_dir(entry) == cfg.state_dir / "peers" / "node-b"
    assert cfg.destination("b").type == "peer" and cfg.destination("b").ae_title == ""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('peer = "node-b"', 'peer = "node-c"', "destinations[0].peer"),
        ('url = "https://127.0.0.1:9444"', 'url = "http://127.0.0.1:9444"', "peers[0].url"),
        ('url = "https://127.0.0.1:9444"', 'url = "https://host"', "peers[0].url"),
        ('suite = "mlkem768-x25519"', 'suite = "rsa"', "peer.suite"),
        ("port = 9443", "port = 0", "peer.port"),
    ],
)
def test_peer_config_errors(tmp_path: Path, old: str, new: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, PEERS.replace(old, new)))
    assert f": {key}:" in str(info.value)


def test_repeated_peer_name(tmp_path: Path) -> None:
    text = PEERS + '\n[[peers]]\nname = "node-b"\nurl = "https://127.0.0.1:1"\n'
    with pytest.raises(ConfigError, match=r"peers\[1\]\.name"):
        load_config(_write(tmp_path, text))
