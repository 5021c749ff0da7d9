"""gateway.config: the shipped default, the schema/comment agreement and every failure mode."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import is_valid_ae_title, load_config, model
from gateway.config.rules import All, Equals, MatchAll, Not, OneOf, Regex, attributes_of
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "config" / "gateway.toml"
CLI = ROOT / ".venv" / "bin" / "dicom-gateway"

GOOD = """
[node]
name = "node-1"
state_dir = "state"

[dicom]
ae_title = "GW"
port = 11112

[[dicom.allow]]
called_ae = "GW"
calling_ae = ["MODALITY1", "*"]
addresses = ["10.0.0.0/24", "::1"]

[[destinations]]
name = "pacs"
ae_title = "PACS"
port = 104

[[destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "10.0.0.9"
port = 11113

[[routes]]
name = "ct"
destinations = ["pacs", "archive"]
mode = "stream"
match = { all = [
    { attribute = "Modality", one_of = ["CT", "MR"] },
    { attribute = "CallingAETitle", equals = "CT1" },
    { not = { attribute = "SeriesDescription", regex = "(?i)scout" } },
] }
"""


def _write(tmp_path: Path, text: str, name: str = "gw.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _fails(tmp_path: Path, text: str) -> ConfigError:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert str(path) in str(err)
    return err


# --- the shipped default ------------------------------------------------------------------


def test_shipped_default_loads() -> None:
    cfg = load_config(DEFAULT)
    assert cfg.source == DEFAULT.resolve()
    assert cfg.dicom.ae_title == "GATEWAY"
    assert cfg.destinations == ()
    assert cfg.routes == ()
    # relative paths are taken from the file's folder
    assert cfg.state_dir == DEFAULT.parent / ".." / "var"
    assert cfg.database_url.startswith("sqlite:///")
    assert len(cfg.dicom.allow) == 1
    assert cfg.dicom.allow[0].calling_ae == ("*",)


def test_shipped_default_values_are_the_dataclass_defaults() -> None:
    cfg = load_config(DEFAULT)
    assert cfg.dicom == model.DicomConfig(allow=cfg.dicom.allow)
    assert cfg.ingest == model.IngestConfig()
    assert cfg.database == model.DatabaseConfig()
    assert cfg.metrics == model.MetricsConfig()
    assert cfg.worker == model.WorkerConfig()
    assert cfg.node.name == model.NodeConfig().name


def _flatten_keys(table: Any, out: set[str]) -> None:
    if isinstance(table, dict):
        for key, value in table.items():
            out.add(key)
            _flatten_keys(value, out)
    elif isinstance(table, list):
        for item in table:
            _flatten_keys(item, out)


def _documented_keys() -> set[str]:
    text = DEFAULT.read_text(encoding="utf-8")
    keys: set[str] = set()
    _flatten_keys(tomllib.loads(text), keys)
    keys |= set(re.findall(r"^#\s*([A-Za-z_][A-Za-z0-9_]*)\s*=", text, flags=re.MULTILINE))
    return keys


@pytest.mark.parametrize(
    "cls",
    [
        model.DicomConfig,
        model.IngestConfig,
        model.DatabaseConfig,
        model.MetricsConfig,
        model.WorkerConfig,
        model.NodeConfig,
        model.AllowEntry,
        model.DestinationConfig,
        model.RouteConfig,
        model.DicomTLSConfig,
        model.TLSBinding,
        model.DestinationTLSConfig,
        model.PeerServerConfig,
        model.PeerEntry,
        model.QRConfig,
        model.MoveDestinationConfig,
        model.UpstreamConfig,
    ],
    ids=lambda c: c.__name__,
)
def test_every_field_is_documented_in_the_default_file(cls: type[Any]) -> None:
    documented = _documented_keys()
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in documented]
    assert not missing, f"{cls.__name__} fields not in config/gateway.toml: {missing}"


def test_top_level_tables_are_documented() -> None:
    text = DEFAULT.read_text(encoding="utf-8")
    for f in dataclasses.fields(model.GatewayConfig):
        if f.name == "source":
            continue
        assert re.search(rf"^#?\s*\[\[?{f.name}\]\]?\s*$", text, flags=re.MULTILINE), f.name


# --- a good file --------------------------------------------------------------------------


def test_good_file_loads(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.node.state_dir == tmp_path.resolve() / "state"
    assert [d.name for d in cfg.destinations] == ["pacs", "archive"]
    assert cfg.destination("archive").port == 11113
    assert cfg.destination("pacs").host == "127.0.0.1"
    route = cfg.route("ct")
    assert route.destinations == ("pacs", "archive")
    assert route.mode == "stream"
    assert isinstance(route.match, All)
    first, second, third = route.match.conditions
    assert first == OneOf("Modality", ("CT", "MR"))
    assert second == Equals("CallingAETitle", "CT1")
    assert isinstance(third, Not) and isinstance(third.condition, Regex)
    assert attributes_of(route.match) == {"Modality", "CallingAETitle", "SeriesDescription"}
    assert cfg.dicom.allow[0].addresses == ("10.0.0.0/24", "::1")
    with pytest.raises(KeyError):
        cfg.destination("nope")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ""))
    assert cfg.dicom == model.DicomConfig()
    assert cfg.worker == model.WorkerConfig()
    assert cfg.node.state_dir == tmp_path.resolve() / "var"


def test_route_without_match_matches_all(tmp_path: Path) -> None:
    text = (
        '[[destinations]]\nname = "p"\nae_title = "P"\n'
        '[[routes]]\nname = "r"\ndestinations = ["p"]\n'
    )
    cfg = load_config(_write(tmp_path, text))
    assert cfg.routes[0].match == MatchAll()
    assert cfg.routes[0].mode == "study"


def test_integer_given_for_float_is_accepted(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "[worker]\nbackoff_initial = 3\n"))
    assert cfg.worker.backoff_initial == 3.0
    assert isinstance(cfg.worker.backoff_initial, float)


# --- failures: each names the file, the dotted key and what was expected -------------------

BAD_CASES: list[tuple[str, str, str, str]] = [
    # (id, toml, key, fragment of the expectation)
    ("unknown-key", "[dicom]\nportt = 1\n", "dicom.portt", "no such key"),
    ("unknown-table", "[bogus]\nx = 1\n", "bogus", "no such key"),
    ("unknown-top-level-source", 'source = "x"\n', "source", "no such key"),
    ("wrong-type-int", '[dicom]\nport = "11112"\n', "dicom.port", "an integer"),
    ("wrong-type-float-for-int", "[dicom]\nport = 11112.0\n", "dicom.port", "an integer"),
    ("wrong-type-bool", '[metrics]\nenabled = "yes"\n', "metrics.enabled", "true or false"),
    ("bool-for-int", "[worker]\nthreads = true\n", "worker.threads", "an integer"),
    ("wrong-type-str", "[dicom]\nae_title = 5\n", "dicom.ae_title", "a string"),
    ("wrong-type-table", "dicom = 5\n", "dicom", "a table"),
    (
        "wrong-type-array",
        '[[dicom.allow]]\ncalling_ae = "X"\n',
        "dicom.allow[0].calling_ae",
        "an array",
    ),
    ("literal", '[ingest]\nduplicate_policy = "drop"\n', "ingest.duplicate_policy", "one of"),
    ("port-zero", "[dicom]\nport = 0\n", "dicom.port", "between 1 and 65535"),
    ("port-70000", "[metrics]\nport = 70000\n", "metrics.port", "between 1 and 65535"),
    (
        "dest-port-70000",
        '[[destinations]]\nname = "p"\nae_title = "P"\nport = 70000\n',
        "destinations[0].port",
        "between 1 and 65535",
    ),
    ("negative-timeout", "[dicom]\nacse_timeout = -1\n", "dicom.acse_timeout", "greater than 0"),
    ("nan-timeout", "[dicom]\nacse_timeout = nan\n", "dicom.acse_timeout", "finite"),
    ("inf-lease", "[worker]\nlease_seconds = inf\n", "worker.lease_seconds", "finite"),
    ("small-pdu", "[dicom]\nmax_pdu_size = 1000\n", "dicom.max_pdu_size", "4096"),
    ("no-receivers", "[dicom]\nreceiver_processes = 0\n", "dicom.receiver_processes", "1 to 32"),
    ("many-receivers", "[dicom]\nreceiver_processes = 33\n", "dicom.receiver_processes", "1 to 32"),
    (
        "multiplier",
        "[worker]\nbackoff_multiplier = 0.5\n",
        "worker.backoff_multiplier",
        "1 or more",
    ),
    (
        "negative-free",
        "[ingest]\nspool_min_free_bytes = -1\n",
        "ingest.spool_min_free_bytes",
        "0 or more",
    ),
    ("empty-path", '[node]\nstate_dir = ""\n', "node.state_dir", "a path"),
    ("ae-17-chars", '[dicom]\nae_title = "ABCDEFGHIJKLMNOPQ"\n', "dicom.ae_title", "AE title"),
    ("ae-backslash", '[dicom]\nae_title = "A\\\\B"\n', "dicom.ae_title", "AE title"),
    ("ae-empty", '[dicom]\nae_title = ""\n', "dicom.ae_title", "AE title"),
    ("ae-blank", '[dicom]\nae_title = "   "\n', "dicom.ae_title", "AE title"),
    ("ae-control", '[dicom]\nae_title = "A\\tB"\n', "dicom.ae_title", "AE title"),
    (
        "calling-ae-backslash",
        '[[dicom.allow]]\ncalling_ae = ["OK", "B\\\\AD"]\n',
        "dicom.allow[0].calling_ae[1]",
        "AE title",
    ),
    (
        "allow-empty-calling",
        "[[dicom.allow]]\ncalling_ae = []\n",
        "dicom.allow[0].calling_ae",
        "at least one",
    ),
    (
        "bad-cidr",
        '[[dicom.allow]]\ncalling_ae = ["*"]\naddresses = ["10.0.0.0/33"]\n',
        "dicom.allow[0].addresses[0]",
        "CIDR",
    ),
    (
        "bad-address",
        '[[dicom.allow]]\ncalling_ae = ["*"]\naddresses = ["::1", "example.org"]\n',
        "dicom.allow[0].addresses[1]",
        "CIDR",
    ),
    (
        "dest-ae-17",
        '[[destinations]]\nname = "p"\nae_title = "ABCDEFGHIJKLMNOPQ"\n',
        "destinations[0].ae_title",
        "AE title",
    ),
    (
        "dest-ae-missing",
        '[[destinations]]\nname = "p"\n',
        "destinations[0].ae_title",
        "AE title",
    ),
    ("dest-name-missing", '[[destinations]]\nae_title = "P"\n', "destinations[0].name", "required"),
    (
        "dest-name-bad",
        '[[destinations]]\nname = "a b"\nae_title = "P"\n',
        "destinations[0].name",
        "a name of",
    ),
    (
        "dest-name-repeats",
        '[[destinations]]\nname = "p"\nae_title = "P"\n'
        '[[destinations]]\nname = "p"\nae_title = "Q"\n',
        "destinations[1].name",
        "unique",
    ),
    (
        "route-undefined-destination",
        '[[destinations]]\nname = "p"\nae_title = "P"\n'
        '[[routes]]\nname = "r"\ndestinations = ["p", "nowhere"]\n',
        "routes[0].destinations[1]",
        "'nowhere' is not defined",
    ),
    (
        "route-no-destinations",
        '[[routes]]\nname = "r"\ndestinations = []\n',
        "routes[0].destinations",
        "at least one",
    ),
    (
        "route-mode",
        '[[routes]]\nname = "r"\ndestinations = ["p"]\nmode = "x"\n',
        "routes[0].mode",
        "one of",
    ),
    (
        "bad-regex",
        '[[routes]]\nname = "r"\ndestinations = ["p"]\n'
        'match = { all = [ { attribute = "Modality", equals = "CT" },'
        ' { attribute = "StudyDescription", regex = "(unclosed" } ] }\n',
        "routes[0].match.all[1].regex",
        "valid regular expression",
    ),
    (
        "bad-keyword",
        '[[routes]]\nname = "r"\ndestinations = ["p"]\n'
        'match = { not = { attribute = "NoSuchKeyword", equals = "CT" } }\n',
        "routes[0].match.not.attribute",
        "DICOM keyword",
    ),
    (
        "two-operators",
        '[[routes]]\nname = "r"\ndestinations = ["p"]\n'
        'match = { attribute = "Modality", equals = "CT", present = true }\n',
        "routes[0].match",
        "exactly one",
    ),
    (
        "bad-range",
        '[[routes]]\nname = "r"\ndestinations = ["p"]\n'
        'match = { any = [ { attribute = "Rows", range = [1, "9"] } ] }\n',
        "routes[0].match.any[0].range",
        "[low, high]",
    ),
    (
        "empty-all",
        '[[routes]]\nname = "r"\ndestinations = ["p"]\nmatch = { all = [] }\n',
        "routes[0].match.all",
        "non-empty",
    ),
    (
        "condition-unknown-key",
        '[[routes]]\nname = "r"\ndestinations = ["p"]\n'
        'match = { attribute = "Modality", equal = "CT" }\n',
        "routes[0].match.equal",
        "no such key",
    ),
    (
        "equals-bool",
        '[[routes]]\nname = "r"\ndestinations = ["p"]\n'
        'match = { attribute = "Modality", equals = true }\n',
        "routes[0].match.equals",
        "a string or a number",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "expected"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_file_names_file_key_and_expectation(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    err = _fails(tmp_path, text)
    assert err.key == key
    assert expected in err.expected
    assert f": {key}: " in str(err)
    assert expected in str(err)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    err = _fails(tmp_path, "[dicom\nport = 1\n")
    assert "valid TOML" in str(err)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[node]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "UTF-8" in str(info.value)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("A", True),
        ("ABCDEFGHIJKLMNOP", True),
        ("ABCDEFGHIJKLMNOPQ", False),
        ("WITH SPACE", True),
        ("", False),
        ("    ", False),
        ("A\\B", False),
        ("A\nB", False),
        ("CAFÉ", False),
    ],
)
def test_is_valid_ae_title(value: str, ok: bool) -> None:
    assert is_valid_ae_title(value) is ok


# --- the CLI ------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "gateway.cli"]
    return subprocess.run(
        [*exe, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


def test_cli_check_config_good(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    result = _cli("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert result.stderr == ""


def test_cli_check_config_bad(tmp_path: Path) -> None:
    path = _write(tmp_path, "[dicom]\nport = 70000\n")
    result = _cli("check-config", "-c", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0]
    assert "dicom.port" in lines[0]
    assert "65535" in lines[0]


def test_keep_open_seconds(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, GOOD)).destinations[0].keep_open_seconds == 2.0
    text = GOOD.replace("port = 104\n", "port = 104\nkeep_open_seconds = 0\n", 1)
    assert load_config(_write(tmp_path, text)).destinations[0].keep_open_seconds == 0.0
    err = _fails(tmp_path, GOOD.replace("port = 104\n", "port = 104\nkeep_open_seconds = -1\n", 1))
    assert "keep_open_seconds" in str(err)
    err = _fails(
        tmp_path,
        GOOD.replace("port = 104\n", "port = 104\nkeep_open_seconds = 5\nnetwork_timeout = 5\n", 1),
    )
    assert "less than network_timeout" in str(err)
