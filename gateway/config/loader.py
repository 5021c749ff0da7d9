"""Load a TOML file into :class:`GatewayConfig`, failing fast with the file, key and expectation.

The loader walks the frozen dataclasses of :mod:`gateway.config.model` by their type hints,
so the schema is written once. Unknown keys, wrong types and out-of-range values all raise
:class:`~gateway.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import urlsplit

from gateway.config import model
from gateway.config.rules import Condition, RuleError, parse_condition
from gateway.errors import ConfigError

_PORT_KEYS = frozenset({"port"})
_POSITIVE_KEYS = frozenset(
    {
        "max_pdu_size",
        "max_associations",
        "max_associations_per_address",
        "max_connections",
        "max_connections_per_address",
        "max_instance_bytes",
        "acse_timeout",
        "dimse_timeout",
        "network_timeout",
        "pdu_read_timeout",
        "max_associate_pdu_size",
        "max_sequence_depth",
        "incoming_orphan_seconds",
        "spool_probe_interval",
        "busy_timeout",
        "threads",
        "poll_interval",
        "lease_seconds",
        "max_attempts",
        "backoff_initial",
        "backoff_max",
        "routing_interval",
        "connect_timeout",
        "handshake_timeout",
        "timeout",
        "max_package_bytes",
        "staging_max_age_seconds",
        "max_results",
        "retrieve_timeout",
        "grant_scan_limit",
        "batch_size",
    }
)
MAX_RECEIVER_PROCESSES = 32
_NON_NEGATIVE_KEYS = frozenset(
    {"spool_min_free_bytes", "quiet_seconds", "resend_on_reconnect", "keep_open_seconds"}
)


def load_config(path: str | Path) -> model.GatewayConfig:
    """Read and validate ``path``; relative paths inside it are taken from its folder."""
    source = Path(path)
    name = str(source)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(name, "", "file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            name, "", f"a readable UTF-8 TOML file ({exc.__class__.__name__})"
        ) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(name, "", f"valid TOML ({exc})") from exc
    except RecursionError as exc:  # tomllib recurses once per nested array or inline table
        raise ConfigError(name, "", "valid TOML (arrays or tables nested too deeply)") from exc
    if "source" in raw:
        raise ConfigError(name, "source", "no such key (set by the loader, not the file)")
    builder = _Builder(name, source.resolve().parent)
    cfg: model.GatewayConfig = builder.build(
        model.GatewayConfig, {**raw, "source": str(source.resolve())}, ""
    )
    _check_references(name, cfg)
    return cfg


class _Builder:
    def __init__(self, name: str, base_dir: Path) -> None:
        self.name = name
        self.base_dir = base_dir

    def fail(self, key: str, expected: str) -> ConfigError:
        return ConfigError(self.name, key, expected)

    def build(self, cls: type[Any], raw: Any, key: str) -> Any:
        if not isinstance(raw, Mapping):
            raise self.fail(key, "a table")
        hints = typing.get_type_hints(cls, vars(model))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for k in raw:
            if k not in fields:
                raise self.fail(_join(key, k), "no such key (allowed: " + ", ".join(fields) + ")")
        values: dict[str, Any] = {}
        for fname, fdef in fields.items():
            fkey = _join(key, fname)
            if fname not in raw:
                no_default = (
                    fdef.default is dataclasses.MISSING
                    and fdef.default_factory is dataclasses.MISSING
                )
                if no_default:
                    raise self.fail(fkey, "a value (this key is required)")
                if dataclasses.is_dataclass(hints[fname]):  # defaults, paths made relative
                    values[fname] = self.build(hints[fname], {}, fkey)
                elif hints[fname] is Path and isinstance(fdef.default, Path):
                    values[fname] = self.value(Path, str(fdef.default), fkey)
                continue
            values[fname] = self.value(hints[fname], raw[fname], fkey)
        return cls(**values)

    def value(self, hint: Any, raw: Any, key: str) -> Any:
        leaf = key.rsplit(".", 1)[-1].split("[", 1)[0]
        if hint is Condition or hint == Condition:
            try:
                return parse_condition(raw, key)
            except RuleError as exc:
                raise self.fail(exc.key, exc.expected) from exc
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            return self.build(typing.cast(type[Any], hint), raw, key)
        if origin is tuple:
            (item_hint, _ellipsis) = typing.get_args(hint)
            if not isinstance(raw, list):
                raise self.fail(key, "an array")
            return tuple(self.value(item_hint, item, f"{key}[{i}]") for i, item in enumerate(raw))
        if origin is Literal:
            allowed = typing.get_args(hint)
            if raw not in allowed:
                raise self.fail(key, "one of " + ", ".join(repr(a) for a in allowed))
            return raw
        if origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) == 1 and args[0] is Path:  # optional path: "" (TOML has no null)
                return None if raw == "" else self.value(Path, raw, key)
            if len(args) == 1 and dataclasses.is_dataclass(args[0]):  # optional table
                return self.build(typing.cast(type[Any], args[0]), raw, key)
            raise self.fail(key, "a supported type")  # no other unions in the schema
        if hint is bool:
            if not isinstance(raw, bool):
                raise self.fail(key, "true or false")
            return raw
        if hint is int:
            if not isinstance(raw, int) or isinstance(raw, bool):
                raise self.fail(key, "an integer")
            self.check_number(leaf, raw, key)
            return raw
        if hint is float:
            if not isinstance(raw, int | float) or isinstance(raw, bool):
                raise self.fail(key, "a number")
            if not math.isfinite(raw):
                raise self.fail(key, "a finite number")
            self.check_number(leaf, raw, key)
            return float(raw)
        if hint is str:
            if not isinstance(raw, str):
                raise self.fail(key, "a string")
            _STRING_CHECKS.get(leaf, _no_check)(self, raw, key)
            return raw
        if hint is Path:
            if not isinstance(raw, str) or not raw:
                raise self.fail(key, "a path string")
            p = Path(raw)
            return p if p.is_absolute() else self.base_dir / p
        raise self.fail(key, f"a value of type {hint}")

    def check_number(self, leaf: str, value: float, key: str) -> None:
        if leaf in _PORT_KEYS and not 1 <= value <= 65535:
            raise self.fail(key, "a TCP port between 1 and 65535")
        if leaf in _POSITIVE_KEYS and value <= 0:
            raise self.fail(key, "a number greater than 0")
        if leaf in _NON_NEGATIVE_KEYS and value < 0:
            raise self.fail(key, "a number of 0 or more")
        if leaf == "max_pdu_size" and value < 4096:
            raise self.fail(key, "at least 4096 bytes")
        if leaf == "backoff_multiplier" and value < 1:
            raise self.fail(key, "a number of 1 or more")
        if leaf == "receiver_processes" and not 1 <= value <= MAX_RECEIVER_PROCESSES:
            raise self.fail(key, f"a whole number from 1 to {MAX_RECEIVER_PROCESSES}")


def _no_check(builder: _Builder, value: str, key: str) -> None:
    return None


def _check_ae(builder: _Builder, value: str, key: str) -> None:
    if value == "" and key.endswith(("calling_ae_title", "retrieve_ae_title")):
        return
    if value == "*" and ".calling_ae[" in key:
        return
    if not is_valid_ae_title(value):
        raise builder.fail(key, "an AE title: 1-16 printable ASCII characters, no backslash")


def _check_caller(builder: _Builder, value: str, key: str) -> None:
    if value != "*" and not is_valid_ae_title(value):
        raise builder.fail(key, "an AE title (1-16 printable ASCII characters) or '*'")


def _check_address(builder: _Builder, value: str, key: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise builder.fail(key, "an IP address or CIDR network such as 10.0.0.0/24") from exc


def _check_name(builder: _Builder, value: str, key: str) -> None:
    if not value or not all(c.isalnum() or c in "-_." for c in value):
        raise builder.fail(key, "a name of letters, digits, '-', '_' or '.'")


def _check_profile_name(builder: _Builder, value: str, key: str) -> None:
    if value and not all(c.isalnum() or c in "-_./" for c in value):
        raise builder.fail(key, "a profile name from deid_profiles/ or a path to a .toml file")


def _check_calling_ae(builder: _Builder, value: str, key: str) -> None:
    _check_ae(builder, value, key)


def _check_certificate_name(builder: _Builder, value: str, key: str) -> None:
    if not value or not all(0x20 < ord(c) < 0x7F for c in value):
        raise builder.fail(key, "a certificate subject CN or SAN value (printable ASCII)")


def _check_server_name(builder: _Builder, value: str, key: str) -> None:
    if value:
        _check_certificate_name(builder, value, key)


def _check_pin(builder: _Builder, value: str, key: str) -> None:
    if value and not (len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise builder.fail(key, '64 lowercase hex digits (SHA-256 of the public key) or ""')


def _check_peer_name(builder: _Builder, value: str, key: str) -> None:
    if value:
        _check_name(builder, value, key)


def _check_peer_or_any(builder: _Builder, value: str, key: str) -> None:
    if value != "*":
        _check_name(builder, value, key)


def _check_url(builder: _Builder, value: str, key: str) -> None:
    if not (key == "peer.url" or key.startswith("peers[")) or (value == "" and key == "peer.url"):
        return
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "https" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise builder.fail(key, "an https://HOST:PORT URL (the peer endpoint, TLS only)")


def _check_app_name(builder: _Builder, value: str, key: str) -> None:
    if not 0 < len(value) <= 48 or not all(32 < ord(c) < 127 for c in value):
        raise builder.fail(
            key, "1-48 printable ASCII characters without spaces (RFC 5424 APP-NAME)"
        )


_STRING_CHECKS: dict[str, Callable[[_Builder, str, str], None]] = {
    "ae_title": _check_ae,
    "called_ae": _check_ae,
    "calling_ae": _check_calling_ae,
    "calling_ae_title": _check_ae,
    "addresses": _check_address,
    "allowed_callers": _check_caller,
    "allowed_addresses": _check_address,
    "retrieve_ae_title": _check_ae,
    "name": _check_name,
    "destinations": _check_name,
    "profile": _check_profile_name,
    "certificate_name": _check_certificate_name,
    "server_name": _check_server_name,
    "pin_sha256": _check_pin,
    "peer": _check_peer_name,
    "peers": _check_peer_or_any,
    "callers": _check_caller,
    "url": _check_url,
    "app_name": _check_app_name,
}


def is_valid_ae_title(value: str) -> bool:
    """PS3.5 AE VR: up to 16 characters of the default repertoire, no backslash or control."""
    stripped = value.strip(" ")
    return (
        0 < len(value) <= 16
        and bool(stripped)
        and all(0x20 <= ord(c) < 0x7F and c != "\\" for c in value)
    )


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _check_references(name: str, cfg: model.GatewayConfig) -> None:
    peer_names: set[str] = set()
    for i, peer in enumerate(cfg.peers):
        if peer.name in peer_names:
            raise ConfigError(name, f"peers[{i}].name", f"a unique name ('{peer.name}' repeats)")
        peer_names.add(peer.name)
    seen: set[str] = set()
    for i, dest in enumerate(cfg.destinations):
        if dest.name in seen:
            raise ConfigError(
                name, f"destinations[{i}].name", f"a unique name ('{dest.name}' repeats)"
            )
        seen.add(dest.name)
        if dest.type == "peer":
            if dest.peer not in peer_names:
                raise ConfigError(
                    name,
                    f"destinations[{i}].peer",
                    f"the name of a [[peers]] entry ('{dest.peer}' is not defined)",
                )
        elif not dest.ae_title:
            raise ConfigError(name, f"destinations[{i}].ae_title", "the destination's AE title")
        if dest.keep_open_seconds >= dest.network_timeout:
            raise ConfigError(
                name,
                f"destinations[{i}].keep_open_seconds",
                "less than network_timeout (an idle association is dropped after that)",
            )
    route_names: set[str] = set()
    for i, route in enumerate(cfg.routes):
        if route.name in route_names:
            raise ConfigError(name, f"routes[{i}].name", f"a unique name ('{route.name}' repeats)")
        route_names.add(route.name)
        if not route.destinations:
            raise ConfigError(name, f"routes[{i}].destinations", "at least one destination name")
        for j, dname in enumerate(route.destinations):
            if dname not in seen:
                raise ConfigError(
                    name,
                    f"routes[{i}].destinations[{j}]",
                    f"the name of a [[destinations]] entry ('{dname}' is not defined)",
                )
    _check_tls(name, cfg)
    _check_federation(name, cfg, peer_names)
    _check_audit_export(name, cfg)
    for i, entry in enumerate(cfg.dicom.allow):
        if not entry.calling_ae:
            raise ConfigError(name, f"dicom.allow[{i}].calling_ae", "at least one AE title or '*'")


def _check_federation(name: str, cfg: model.GatewayConfig, peer_names: set[str]) -> None:
    for i, fed in enumerate(cfg.qr.federation):
        if fed.peer not in peer_names:
            raise ConfigError(
                name,
                f"qr.federation[{i}].peer",
                f"the name of a [[peers]] entry ('{fed.peer}' is not defined)",
            )
        if not fed.callers:
            raise ConfigError(name, f"qr.federation[{i}].callers", "at least one AE title or '*'")
    grant_names: set[str] = set()
    for i, grant in enumerate(cfg.qr.grants):
        if grant.name in grant_names:
            raise ConfigError(
                name, f"qr.grants[{i}].name", f"a unique name ('{grant.name}' repeats)"
            )
        grant_names.add(grant.name)
        if not grant.peers:
            raise ConfigError(name, f"qr.grants[{i}].peers", "at least one peer name or '*'")
        for j, peer in enumerate(grant.peers):
            if peer != "*" and peer not in peer_names:
                raise ConfigError(
                    name,
                    f"qr.grants[{i}].peers[{j}]",
                    f"the name of a [[peers]] entry or '*' ('{peer}' is not defined)",
                )
        if not grant.callers:
            raise ConfigError(name, f"qr.grants[{i}].callers", "at least one AE title or '*'")


def _check_tls(name: str, cfg: model.GatewayConfig) -> None:
    tls = cfg.dicom.tls
    if not tls.plain and not tls.enabled:
        raise ConfigError(name, "dicom.tls.plain", "true unless dicom.tls.enabled (no listener)")
    if tls.enabled and tls.plain and tls.port == cfg.dicom.port:
        raise ConfigError(name, "dicom.tls.port", "a port other than dicom.port")
    if tls.enabled and tls.require_client_cert and tls.ca_file is None:
        raise ConfigError(
            name, "dicom.tls.ca_file", "the CA file client certificates must chain to"
        )
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError(name, "dicom.tls.key_file", "cert_file and key_file given together")
    for i, binding in enumerate(cfg.dicom.tls_bindings):
        if binding.calling_ae.strip() == "*":
            raise ConfigError(
                name, f"dicom.tls_bindings[{i}].calling_ae", "one AE title (no wildcard here)"
            )
    for i, dest in enumerate(cfg.destinations):
        if dest.tls is not None and (dest.tls.cert_file is None) != (dest.tls.key_file is None):
            raise ConfigError(
                name, f"destinations[{i}].tls.key_file", "cert_file and key_file given together"
            )


def _check_audit_export(name: str, cfg: model.GatewayConfig) -> None:
    export = cfg.audit.export
    if export.enabled and not export.host:
        raise ConfigError(name, "audit.export.host", "the audit repository's host name or address")
    if export.enabled and export.ca_file is None:
        raise ConfigError(
            name, "audit.export.ca_file", "the CA file the repository's certificate must chain to"
        )
    if (export.cert_file is None) != (export.key_file is None):
        raise ConfigError(name, "audit.export.key_file", "cert_file and key_file given together")
    if export.backoff_initial > export.backoff_max:
        raise ConfigError(name, "audit.export.backoff_max", "a number of backoff_initial or more")
