"""Real external DICOM peers for tests: Orthanc and DCMTK tools on loopback.

Everything here talks to 127.0.0.1 only and stops what it starts by pid.
Orthanc 1.10 and DCMTK's storescp bind *all* interfaces, so the test suite is
meant to run inside a private network namespace (``scripts/test`` does
``unshare -n``).

This module must not import ``gateway``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

LOOPBACK = "127.0.0.1"

__all__ = [
    "LOOPBACK",
    "Orthanc",
    "PeerError",
    "StoreSCP",
    "dcmtk",
    "dcmtk_path",
    "free_port",
    "in_private_netns",
    "orthanc_path",
    "wait_for_port",
]


class PeerError(RuntimeError):
    """An external peer failed to start or misbehaved."""


# --------------------------------------------------------------------------- utilities


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def port_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = 30.0, host: str = LOOPBACK) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_accepts(port, host):
            return
        time.sleep(0.05)
    raise PeerError(f"{host}:{port} did not accept connections within {timeout:.0f}s")


def in_private_netns() -> bool:
    """True if the only network interface is loopback (e.g. under ``unshare -n``)."""
    # Not /sys/class/net: sysfs shows the namespace it was mounted in.
    try:
        return [name for _, name in socket.if_nameindex()] == ["lo"]
    except OSError:
        return False


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


def _stop_pid(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate then kill one child process, by pid; reap it."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def dcmtk_path(tool: str) -> str:
    """Absolute path of a DCMTK binary.

    pynetdicom installs Python shims named ``storescu``/``echoscu``/``storescp``
    into the venv's ``bin``; those are skipped (we want the real DCMTK ELF).
    """
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for d in dirs:
        cand = os.path.join(d, tool)
        if os.access(cand, os.X_OK) and _is_elf(cand):
            return cand
    raise PeerError(f"DCMTK tool {tool!r} not found (apt-get install dcmtk)")


def orthanc_path() -> str:
    path = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if path is None:
        raise PeerError("Orthanc not found (apt-get install orthanc)")
    return path


def _peer_env(nodelay: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def dcmtk(
    tool: str,
    *args: str | os.PathLike[str],
    env_nodelay: bool = True,
    timeout: float = 120.0,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool (storescu, echoscu, findscu, ...) and capture its output."""
    cmd = [dcmtk_path(tool), *(os.fspath(a) for a in args)]
    proc = subprocess.run(
        cmd,
        env=_peer_env(env_nodelay),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise PeerError(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


# --------------------------------------------------------------------------- Orthanc


class Orthanc:
    """A throw-away Orthanc server on loopback, configured from scratch.

    ``modalities`` maps a symbolic name to ``(aet, host, port)``.  ``lua`` is Lua
    source code installed as the only Lua script.  The storage survives
    ``stop()``/``start()``, so tests can take Orthanc down and bring it back.
    """

    def __init__(
        self,
        tmp_path: Path,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        lua: str | None = None,
        *,
        stable_age: int = 1,
        extra_config: Mapping[str, Any] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.aet = aet
        self.dir = Path(tempfile.mkdtemp(prefix=f"orthanc-{aet.lower()}-", dir=tmp_path))
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.host = LOOPBACK
        self.url = f"http://{LOOPBACK}:{self.http_port}"
        self.log_path = self.dir / "orthanc.log"
        self.config_path = self.dir / "orthanc.json"
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

        config: dict[str, Any] = {
            "Name": f"test-{aet}",
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"),
            "StorageCompression": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "UnknownSopClassAccepted": True,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "StableAge": stable_age,
            "Plugins": [],
            "LuaScripts": [],
            "SaveJobs": False,
            "ExecuteLuaEnabled": False,
        }
        if lua is not None:
            lua_path = self.dir / "script.lua"
            lua_path.write_text(lua)
            config["LuaScripts"] = [str(lua_path)]
        if extra_config:
            config.update(extra_config)
        self.config = config
        self.config_path.write_text(json.dumps(config, indent=2))

    # -- lifecycle ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Self:
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [orthanc_path(), str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_peer_env(True),
                cwd=self.dir,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise PeerError(f"Orthanc exited with {rc} on start-up:\n{log_tail(self.log_path)}")
            try:
                self.get("/system", timeout=1.0)
                if port_accepts(self.dicom_port):
                    return self
            except (OSError, PeerError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PeerError(
                    f"Orthanc did not come up within {self.start_timeout:.0f}s:\n"
                    f"{log_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after 10 s). Orthanc 1.10 needs ~3.5 s."""
        if self._proc is not None:
            _stop_pid(self._proc)
            self._proc = None

    def kill(self) -> None:
        """Abrupt stop (SIGKILL by pid): simulates a crash; also a fast teardown."""
        if self._proc is not None:
            if self._proc.poll() is None:
                os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
            self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    # -- REST (urllib only) ------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | Mapping[str, Any] | Sequence[Any] | None = None,
        *,
        timeout: float = 30.0,
    ) -> bytes:
        data: bytes | None
        headers: dict[str, str] = {}
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
            headers["Content-Type"] = "application/octet-stream"
        elif isinstance(body, str):
            data = body.encode()
            headers["Content-Type"] = "text/plain"
        else:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload: bytes = resp.read()
                return payload
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise PeerError(f"Orthanc {method} {path} -> HTTP {e.code}: {detail}") from e

    def get(self, path: str, *, timeout: float = 30.0) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def post(self, path: str, body: Any = None, *, timeout: float = 60.0) -> Any:
        raw = self.request("POST", path, body if body is not None else b"", timeout=timeout)
        return json.loads(raw) if raw.strip() else None

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    def instances(self) -> list[str]:
        ids: list[str] = self.get("/instances")
        return ids

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        tags: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return tags

    def sop_instance_uids(self) -> list[str]:
        expanded: list[dict[str, Any]] = self.get("/instances?expand")
        return sorted(str(i["MainDicomTags"]["SOPInstanceUID"]) for i in expanded)

    def instance_id_for_uid(self, sop_instance_uid: str) -> str:
        found: list[dict[str, Any]] = json.loads(
            self.request("POST", "/tools/lookup", sop_instance_uid)
        )
        for item in found:
            if isinstance(item, dict) and item.get("Type") == "Instance":
                return str(item["ID"])
        raise KeyError(sop_instance_uid)

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def wait_for_instances(self, n: int, timeout: float = 30.0) -> int:
        """Wait until Orthanc holds at least ``n`` instances; return the count."""
        deadline = time.monotonic() + timeout
        count = self.count_instances()
        while count < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc has {count} instances, expected {n} within {timeout}s")
            time.sleep(0.1)
            count = self.count_instances()
        return count

    def echo_modality(self, name: str) -> bool:
        """C-ECHO from Orthanc to one of its configured ``DicomModalities``."""
        try:
            self.request("POST", f"/modalities/{name}/echo", b"{}")
            return True
        except PeerError:
            return False

    def store_to_modality(self, name: str, resources: Sequence[str]) -> Any:
        """C-STORE the given Orthanc resource ids to a configured modality."""
        return self.post(f"/modalities/{name}/store", {"Resources": list(resources)})


# --------------------------------------------------------------------------- storescp


class StoreSCP:
    """DCMTK ``storescp`` receiving into ``output_dir`` on a free loopback port."""

    def __init__(
        self,
        output_dir: Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        tls: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        start_timeout: float = 15.0,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.host = LOOPBACK
        self.port = port if port is not None else free_port()
        self.tls = list(tls)
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.log_path = self.output_dir.parent / f"storescp-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        if self.running:
            return self
        cmd = [
            dcmtk_path("storescp"),
            "--aetitle",
            self.aet,
            "--output-directory",
            str(self.output_dir),
            *self.tls,
            *self.extra_args,
            str(self.port),
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_peer_env(True),
            )
        deadline = time.monotonic() + self.start_timeout
        while not port_accepts(self.port):
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise PeerError(f"storescp exited with {rc}:\n{log_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise PeerError(f"storescp did not listen:\n{log_tail(self.log_path)}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            _stop_pid(self._proc)
            self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def files(self) -> list[Path]:
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file())

    def wait_for_files(self, n: int, timeout: float = 30.0) -> list[Path]:
        deadline = time.monotonic() + timeout
        files = self.files()
        while len(files) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"storescp has {len(files)} files, expected {n}")
            time.sleep(0.05)
            files = self.files()
        return files

    def log(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)
