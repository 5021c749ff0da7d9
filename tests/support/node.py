"""Run a dicom-gateway node as a real process (``dicom-gateway serve``) for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from tests.support.peers import free_port, log_tail, wait_for_port

GATEWAY = str(Path(sys.executable).with_name("dicom-gateway"))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def render_toml(sections: dict[str, Any]) -> str:
    """Render {"dicom": {...}, "destinations": [{...}], ...} as TOML."""
    out: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for entry in body:
                out.append(f"[[{name}]]")
                out += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
                out.append("")
        else:
            tables = {
                k: v
                for k, v in body.items()
                if isinstance(v, list)
                and v
                and isinstance(v[0], dict)
                and k in ("allow", "tls_bindings")
            }
            out.append(f"[{name}]")
            out += [f"{k} = {toml_value(v)}" for k, v in body.items() if k not in tables]
            out.append("")
            for k, entries in tables.items():
                for entry in entries:
                    out.append(f"[[{name}.{k}]]")
                    out += [f"{kk} = {toml_value(vv)}" for kk, vv in entry.items()]
                    out.append("")
    return "\n".join(out)


class GatewayNode:
    """A node in ``root`` with its own ports; ``start()``/``stop()``/``kill()`` by pid."""

    def __init__(
        self,
        root: Path,
        *,
        ae_title: str = "GATEWAY",
        destinations: Sequence[dict[str, Any]] = (),
        routes: Sequence[dict[str, Any]] = (),
        database_url: str = "",
        allow: Sequence[dict[str, Any]] | None = None,
        dicom: dict[str, Any] | None = None,
        ingest: dict[str, Any] | None = None,
        worker: dict[str, Any] | None = None,
        deid: dict[str, Any] | None = None,
        database: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
        name: str = "test-node",
        peer: dict[str, Any] | None = None,
        peers: Sequence[dict[str, Any]] = (),
        audit: dict[str, Any] | None = None,
    ) -> None:
        """``wrapper`` is a command prefix for ``serve`` (e.g. ``unshare -m bash -c ...``);
        it must end by exec'ing its arguments, so ``pid`` stays the node's."""
        self.root = root
        self.wrapper = list(wrapper)
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port()
        # with peer={...}: the peer endpoint's port (one is allocated unless given)
        self.peer_port: int | None = None
        if peer is not None:
            self.peer_port = int(peer.get("port") or free_port())
            peer = {"enabled": True, "handshake_timeout": 3, **peer, "port": self.peer_port}
        self.peer_enabled = peer is not None and bool(peer["enabled"])
        # with dicom={"tls": {...}}: the TLS listener's port (one is allocated unless given)
        self.tls_port: int | None = None
        if dicom and "tls" in dicom:
            self.tls_port = int(dicom["tls"].get("port") or free_port())
            dicom = {**dicom, "tls": {**dicom["tls"], "port": self.tls_port}}
        self.ae_title = ae_title
        self.dicom = dict(dicom or {})
        self.node_name = name
        self.config_path = root / "gateway.toml"
        self.log_path = root / "node.log"
        self.env = env or {}
        sections: dict[str, Any] = {
            "node": {"name": name, "state_dir": str(root / "state")},
            "dicom": {
                "ae_title": ae_title,
                "host": "127.0.0.1",
                "port": self.port,
                "allow": list(allow)
                if allow is not None
                else [{"called_ae": ae_title, "calling_ae": ["*"], "addresses": ["127.0.0.1"]}],
                **(dicom or {}),
            },
            "ingest": {"spool_min_free_bytes": 0, **(ingest or {})},
            "database": {"url": database_url, **(database or {})},
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": self.metrics_port},
            "worker": {
                "poll_interval": 0.2,
                "routing_interval": 0.2,
                "backoff_initial": 0.5,
                "backoff_max": 2,
                **(worker or {}),
            },
        }
        if deid:
            sections["deid"] = dict(deid)
        if peer is not None:
            sections["peer"] = peer
        if peers:
            sections["peers"] = list(peers)
        if audit is not None:
            sections["audit"] = dict(audit)
        if destinations:
            sections["destinations"] = list(destinations)
        if routes:
            sections["routes"] = list(routes)
        self.config_path.write_text(render_toml(sections))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def start(self, timeout: float = 30.0) -> Self:
        log = self.log_path.open("ab")
        offset = log.tell()  # this run's lines start here
        self.proc = subprocess.Popen(
            [*self.wrapper, GATEWAY, "serve", "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,  # its own process group: a wrapper's children die with it
        )
        log.close()
        try:
            wait_for_port(self.port, timeout=timeout)
            # the port takes connects before other receiver processes accept, and the peer
            # endpoint (where a probe's connect would be audited) starts after it
            if self.receiver_processes > 1 or self.peer_enabled:
                self.wait_for_log('"node started"', timeout=timeout, since=offset)
        except Exception as exc:
            self.kill()
            raise RuntimeError(f"node did not start:\n{self.log()}") from exc
        return self

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(10)
        self._signal_group(signal.SIGKILL)  # whatever of the group is left (a wrapper's child)
        self.proc = None

    def kill(self) -> None:
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def receiver_processes(self) -> int:
        return int(self.dicom.get("receiver_processes", 1))

    def wait_for_log(self, text: str, timeout: float = 30.0, *, since: int = 0) -> None:
        """Until ``text`` is in the log from byte ``since`` on."""
        deadline = time.monotonic() + timeout
        while text.encode() not in self.log_path.read_bytes()[since:]:
            if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                raise RuntimeError(f"{text} not in the node's log")
            time.sleep(0.05)

    def log(self, lines: int = 80) -> str:
        return log_tail(self.log_path, lines)

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``dicom-gateway <args> -c <config>``."""
        proc = subprocess.run(
            [GATEWAY, *args, "-c", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} failed: {proc.stderr}")
        return proc

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json", check=True).stdout)

    def deliveries(self) -> list[dict[str, Any]]:
        return list(self.cli_json("queue", "list"))

    def wait_for_deliveries(
        self, state: str, n: int = 1, timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = [d for d in self.deliveries() if d["state"] == state]
            if len(rows) >= n:
                return rows
            time.sleep(0.3)
        raise AssertionError(
            f"expected {n} delivery(ies) {state}, have {self.deliveries()}\n{self.log()}"
        )

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return r.read().decode()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def child_pid(
    node: GatewayNode, command: str, *, exclude: Sequence[int] = (), timeout: float = 30.0
) -> int:
    """The pid of serve's child ``dicom-gateway <command>`` (worker, receiver), waited for
    (a replacement starts a second after the one it replaces died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in child_pids(node.pid):
            if pid in exclude or process_gone(pid, 0):
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if command.encode() in cmdline:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no {command} process under serve ({node.pid})\n{node.log()}")


def process_gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` has ended (or is a zombie) within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
