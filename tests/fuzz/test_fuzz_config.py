"""Any TOML document, and any text at all, gives a configuration or a ConfigError naming the
file (and, for a document that is TOML, the key) -- never another exception."""

from __future__ import annotations

import datetime
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.config import GatewayConfig
from gateway.config.loader import load_config
from gateway.errors import ConfigError

from .settings import fuzz
from .toml_text import dumps, paths

DEFAULT = Path(__file__).resolve().parents[2] / "config" / "gateway.toml"
BASE: dict[str, Any] = tomllib.loads(DEFAULT.read_text())

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 4095, 4096, 65535, 65536, 2**31, 2**63 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "*",
            "GATEWAY",
            "127.0.0.1",
            "::1",
            "10.0.0.0/33",
            "a" * 17,
            "../x",
            "https://h:1",
            "(",
            "basic",
            "stream",
            "study",
            "peer",
            "dicom",
        ]
    ),
    st.dates(),
    st.datetimes(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=12), inner, max_size=4),
    ),
    max_leaves=12,
)


PATHS = paths(BASE)
KEYS = sorted({p[-1] for p in PATHS if isinstance(p[-1], str)})


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """The default configuration with a few values replaced, removed or added."""
    import copy

    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        parent: Any = doc
        try:
            for part in path[:-1]:
                parent = parent[part]
            action = draw(st.sampled_from(["replace", "remove", "add"]))
            if action == "replace":
                parent[path[-1]] = draw(values)
            elif action == "remove" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, dict):
                parent[draw(st.sampled_from(KEYS) | st.text(min_size=1, max_size=8))] = draw(values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced what this path went through
    for section in ("destinations", "routes", "peers"):
        if draw(st.booleans()):
            doc[section] = draw(
                st.lists(
                    st.dictionaries(st.sampled_from([*KEYS, "match", "tls", "type"]), values),
                    max_size=2,
                )
            )
    return doc


def _check(text: str, *, is_toml: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gateway.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            assert exc.path == str(path), exc
            assert str(path) in str(exc)
            if is_toml:
                assert exc.key, f"a TOML document's error names a key: {exc}"
            return
        assert isinstance(cfg, GatewayConfig)


def _is_toml(text: str) -> bool:
    try:
        tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError):
        return False
    return True


@fuzz(ci_examples=150)
@given(mutated())
@example({**BASE, "dicom": {**BASE["dicom"], "port": 2**63 - 1}})
@example({**BASE, "node": {"name": datetime.date(2020, 1, 1)}})
def test_mutated_default_config(doc: dict[str, Any]) -> None:
    text = dumps(doc)
    _check(text, is_toml=_is_toml(text))


NESTED_ARRAY = "x = " + "[" * 2000 + "]" * 2000 + "\n"  # tomllib: RecursionError (was escaping)


@fuzz(ci_examples=150)
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(
            st.sampled_from(
                [
                    "[dicom]",
                    "[[dicom.allow]]",
                    "port = 1",
                    "x = [",
                    "]",
                    "{",
                    "}",
                    "=",
                    '"',
                    "[node]",
                    "name = 'a'",
                    "\n",
                    "[[routes]]",
                    "match = {",
                    "not = {",
                    "all = [",
                    "[",
                    "a.b.c = 1",
                    "'''",
                    "\\u0000",
                ]
            ),
            max_size=40,
        ).map("\n".join),
    )
)
@example(NESTED_ARRAY)
@example("[dicom]\nallow = " + "[" * 500 + "]" * 500)
@example("[[routes]]\nname='r'\ndestinations=['d']\nmatch = " + "{not = " * 300 + "{}" + "}" * 300)
def test_any_text(text: str) -> None:
    _check(text, is_toml=_is_toml(text))
