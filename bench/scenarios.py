"""Scenarios: a registry of what the harness measures, and what it does not measure yet.

A scenario is a function from :class:`Settings` to a JSON-able result with ``rows`` (one per
system and configuration, each with its ``runs`` and a median/min/max ``summary``) and
``ratios`` (node / peer, from medians of the same run).  Later scenarios register here with
``run=None`` and the reason they are not measured; the report lists them as such.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import crypto_throughput, data, durability, profile
from bench.procstat import TreeMonitor, wait_idle
from bench.systems import (
    INGEST_SYSTEMS,
    NODE_DEFAULT_WORKER,
    NodeOptions,
    NodeReceiver,
    OrthancReceiver,
    Receiver,
    start_storescu,
    stop_process,
    wait_storescu,
)
from gateway.crypto.tls import ca_init
from tests.support.node import GatewayNode
from tests.support.peers import LOOPBACK, free_port

MIB = 1024 * 1024
SCALE_FACTORS = (1, 4, 16)
DISCARD_FREE_BYTES = 20 * 1024**3
"""Free disk below which a finished measurement's folder is removed at once, not set aside."""


@dataclass
class Settings:
    scale: float
    repeat: int
    work: Path
    systems: frozenset[str] | None = None
    datasets: tuple[str, ...] = ("ct", "small", "multiframe")
    concurrency: tuple[int, ...] = (1, 4)
    quiet_seconds: float = 1.0
    scale_factors: tuple[int, ...] = SCALE_FACTORS
    worker_interval: float = 0.1
    profile: bool = True
    """Profile the node receivers' ingest with py-spy (:mod:`bench.profile`; ``--no-profile``)."""
    out: Path | None = None
    """The results folder, where files beside latest.json go (the profiles' raw stacks)."""
    separate_worker: bool = True
    """``worker.separate_process`` of the forwarding nodes (e2e, sealed transfer)."""
    timeout: float = 900.0
    log: Callable[[str], None] = print
    failures: list[str] = field(default_factory=list)
    node_configs: dict[str, str] = field(default_factory=dict)
    """The node's TOML configuration per scenario/system, as run (recorded in the results)."""
    _data: dict[str, data.DataSet] = field(default_factory=dict)
    _discarded: int = 0

    def wanted(self, system: str) -> bool:
        return self.systems is None or system in self.systems

    def dataset(self, name: str) -> data.DataSet:
        if name not in self._data:
            self.log(f"data: generating/loading {name} at scale {self.scale}")
            self._data[name] = data.ensure(name, self.scale, self.work / "data")
        return self._data[name]

    def node_worker(self) -> dict[str, Any]:
        """The nodes' ``[worker]`` in the e2e and sealed-transfer runs: config/gateway.toml's
        defaults with the poll and routing intervals at ``worker_interval`` and the workers in
        a process of their own unless ``separate_worker`` is off (``--worker-in-process``)."""
        return {
            **NODE_DEFAULT_WORKER,
            "poll_interval": self.worker_interval,
            "routing_interval": self.worker_interval,
            "separate_process": self.separate_worker,
        }

    def fresh_dir(self, label: str) -> Path:
        path = self.work / "run" / label
        if path.exists():
            self.discard(path)
        path.mkdir(parents=True)
        return path

    def discard(self, path: Path) -> None:
        """Put a finished measurement's folder aside (a rename) for the end of the run, when
        the harness removes ``run/`` whole; removed at once only while the disk has less
        than :data:`DISCARD_FREE_BYTES` free.

        Deleting thousands of files between measurements made the next system's file
        creations slow on this machine's filesystem (ext4 without a journal: allocating an
        inode scans past every inode freed in the last 30 s, 5.5 min while the inode table
        is dirty; 0.3-0.7 ms a file after a few thousand deletions), so a measurement paid
        for the one before it, whichever system that was."""
        if not path.exists():
            return
        if shutil.disk_usage(path).free < DISCARD_FREE_BYTES:
            shutil.rmtree(path, ignore_errors=True)
            return
        self._discarded += 1
        aside = self.work / "run" / ".discarded" / f"{self._discarded:05d}-{path.name}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.rename(aside)
        except OSError:
            shutil.rmtree(path, ignore_errors=True)


class RunFailed(RuntimeError):
    """A measurement did not complete correctly (wrong count, sender error, timeout)."""


MEASUREMENT_ERRORS = (RuntimeError, OSError, subprocess.TimeoutExpired)
"""What fails one system's measurement (a receiver that does not start, a refused store, a
timeout) without stopping the others: RunFailed and tests.support's PeerError are
RuntimeErrors, TimeoutError is an OSError."""


def brief(exc: BaseException) -> str:
    """One line for the report: the exception's type and its last non-empty line (a node
    that does not start ends its message with the log's last line, e.g. its ImportError)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{lines[0]} ... {lines[-1]}" if len(lines) > 1 else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text}".replace("|", "/")[:300]


def summarize(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """median / min / max of every numeric field of the runs."""
    out: dict[str, dict[str, float]] = {}
    for key in runs[0]:
        values = [float(r[key]) for r in runs]
        out[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return out


def _outcome(runs: list[dict[str, float]], error: str | None) -> dict[str, Any]:
    """A row's measurements: runs and summary, or the error that stopped them."""
    if error is not None:
        return {"runs": runs, "error": error}
    return {"runs": runs, "summary": summarize(runs)}


def check_sender(codes: Sequence[int], log: Path) -> None:
    """storescu must exit 0 and log no error (a refused instance is logged with ``E:``)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    errors = [line for line in text.splitlines() if line.startswith(("E:", "F:"))]
    if any(codes) or errors:
        raise RunFailed(f"storescu exited {list(codes)}: {errors[:5]} (see {log})")


def alternating(systems: Sequence[str], rep: int) -> list[str]:
    """Repetition order: forwards on even repetitions, backwards on odd ones."""
    return list(systems) if rep % 2 == 0 else list(reversed(systems))


Runs = dict[str, list[dict[str, float]]]


def measure_alternating(
    settings: Settings,
    systems: Sequence[str],
    what: str,
    once: Callable[[str, int], dict[str, float]],
    describe: Callable[[dict[str, float]], str],
) -> tuple[Runs, dict[str, str]]:
    """Run ``once(system, rep)`` ``settings.repeat`` times per system, systems in alternating
    order; a system that fails is recorded (``settings.failures``) and not run again.
    ``what`` names the measurement in the log and the failures."""
    runs: Runs = {s: [] for s in systems}
    errors: dict[str, str] = {}
    for rep in range(settings.repeat):
        for system in alternating(systems, rep):
            if system in errors:
                continue
            try:
                result = once(system, rep)
            except MEASUREMENT_ERRORS as exc:
                errors[system] = brief(exc)
                settings.failures.append(f"{' '.join(what.split())} {system}: {brief(exc)}")
                settings.log(f"{what} {system:22s} FAILED: {exc}")
                continue
            settings.log(f"{what} {system:22s} rep {rep + 1}: {describe(result)}")
            runs[system].append(result)
    return runs, errors


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


# --------------------------------------------------------------------------- 1. ingest


@contextlib.contextmanager
def _receiving(
    settings: Settings, system: str, concurrency: int, label: str
) -> Iterator[tuple[Receiver, Path]]:
    """Ingest receiver ``system`` started in a fresh folder and idle; stopped afterwards, its
    folder removed when the measurement succeeded."""
    root = settings.fresh_dir(label)
    receiver: Receiver = INGEST_SYSTEMS[system](root, concurrency)
    if isinstance(receiver, NodeReceiver):
        settings.node_configs.setdefault("ingest", receiver.config_text)
    receiver.start()
    try:
        wait_idle(receiver.pid)
        yield receiver, root
    finally:
        receiver.stop()
    settings.discard(root)


def _check_stored(receiver: Receiver, system: str, instances: int) -> None:
    stored = receiver.stored()
    if stored is not None and stored < instances:
        raise RunFailed(f"{system} holds {stored} of {instances} instances")


def _ingest_once(
    settings: Settings, system: str, ds: data.DataSet, concurrency: int, label: str
) -> dict[str, float]:
    with _receiving(settings, system, concurrency, label) as (receiver, root):
        monitor = TreeMonitor(receiver.pid).start()
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        procs = start_storescu(
            receiver.ae_title, receiver.port, ds.files, concurrency, root / "storescu.log"
        )
        codes = wait_storescu(procs, settings.timeout)
        seconds = time.perf_counter() - t0
        usage = monitor.stop()
        check_sender(codes, root / "storescu.log")
        _check_stored(receiver, system, ds.instances)
    return {
        "seconds": seconds,
        "load_1min": load,
        "instances_per_s": ds.instances / seconds,
        "mb_per_s": ds.total_bytes / MIB / seconds,
        "peak_rss_mib": usage.peak_rss_mib,
        "cpu_seconds": usage.cpu_seconds,
        "cpu_ms_per_instance": 1000 * usage.cpu_seconds / ds.instances,
    }


INGEST_NODES = ("node", "node-rx2")
INGEST_ORDER = (
    *INGEST_NODES,
    "dcmtk-storescp",
    "dcmtk-storescp-ignore",
    "orthanc",
    "pynetdicom-scp",
)

POLL = 0.05
"""How often a timed run looks whether the destination holds everything, while the sender
still sends (each look is a query to the destination, a load on the measured system)."""

POLL_TAIL = 0.01
"""The same once the sender has finished: the end is then timed to 10 ms, not 50."""

DURABILITY_INSTANCES = 20
"""Instances each receiver gets in the untimed traced run (:mod:`bench.durability`)."""


def _sender(
    settings: Settings, receiver: Receiver, files: Sequence[Path], root: Path
) -> Callable[[], None]:
    """storescu sending ``files`` to ``receiver`` over one association, checked."""

    def send() -> None:
        procs = start_storescu(receiver.ae_title, receiver.port, files, 1, root / "storescu.log")
        check_sender(wait_storescu(procs, settings.timeout), root / "storescu.log")

    return send


def _untimed(
    settings: Settings,
    what: str,
    systems: Sequence[str],
    once: Callable[[str, data.DataSet], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
    datasets: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """``once(system, data set)`` for each data set (``settings.datasets`` unless given) and
    system, once, untimed; a failure is recorded (``settings.failures``) and the rest go on."""
    rows: list[dict[str, Any]] = []
    for name in datasets if datasets is not None else settings.datasets:
        ds = settings.dataset(name)
        for system in systems:
            try:
                result = once(system, ds)
            except MEASUREMENT_ERRORS as exc:
                settings.failures.append(f"{what} {name} {system}: {brief(exc)}")
                settings.log(f"{what:10s} {name:10s} {system:22s} FAILED: {exc}")
                rows.append({"dataset": name, "system": system, "error": brief(exc)})
                continue
            settings.log(f"{what:10s} {name:10s} {system:22s} {describe(result)}")
            rows.append({"dataset": name, "system": system, **result})
    return rows


def _durability_once(settings: Settings, system: str, ds: data.DataSet) -> dict[str, Any]:
    """``system``'s sync calls per instance while it receives the data set's first
    :data:`DURABILITY_INSTANCES` over one association (untimed, under strace)."""
    files = ds.files[:DURABILITY_INSTANCES]
    with _receiving(settings, system, 1, f"durability-{ds.name}-{system}") as (receiver, root):
        send = _sender(settings, receiver, files, root)
        calls = durability.trace_syncs(receiver.pid, root / "strace.log", send)
        _check_stored(receiver, system, len(files))
    return {"instances": float(len(files)), **durability.per_instance(calls, len(files))}


def _durability(settings: Settings, systems: Sequence[str]) -> dict[str, Any]:
    if not durability.available():
        return {"rows": [], "not_measured": "strace is not installed"}
    rows = _untimed(
        settings,
        "durability",
        systems,
        functools.partial(_durability_once, settings),
        lambda r: (
            f"{r['file_syncs_per_instance']:.2f} file, "
            f"{r['folder_syncs_per_instance']:.2f} folder, "
            f"{r['index_syncs_per_instance']:.2f} index syncs/inst, "
            f"{r['sync_ms_per_instance']:.2f} ms/inst"
        ),
    )
    return {"instances": DURABILITY_INSTANCES, "calls": list(durability.SYNC_CALLS), "rows": rows}


PROFILE_INSTANCES = 400
"""At most this many instances of a data set in each node's profiled run (:mod:`bench.profile`)."""


def _profile_once(settings: Settings, system: str, ds: data.DataSet) -> dict[str, Any]:
    """py-spy's samples of ``system``'s process tree while it takes the data set (its first
    :data:`PROFILE_INSTANCES`) over one association (untimed)."""
    files = ds.files[:PROFILE_INSTANCES]
    with _receiving(settings, system, 1, f"profile-{ds.name}-{system}") as (receiver, root):
        raw = root / "py-spy.txt"
        with profile.recording(receiver.pid, raw):
            _sender(settings, receiver, files, root)()
        samples = profile.parse_file(raw)
        _check_stored(receiver, system, len(files))
        kept = {}
        if settings.out is not None:
            # py-spy's collapsed stacks, for flamegraph.pl or speedscope
            target = settings.out / f"profile-{ds.name}-{system}.txt"
            shutil.copyfile(raw, target)
            kept = {"raw": target.name}
    return {"instances": len(files), **kept, **profile.summary(samples)}


def _no_profile(settings: Settings) -> dict[str, Any] | None:
    """The result of a profile that is not taken (``--no-profile``, no py-spy), else None."""
    if not settings.profile:
        return {"rows": [], "not_measured": "--no-profile"}
    if profile.executable() is None:
        return {"rows": [], "not_measured": "py-spy is not installed"}
    return None


def _profiles(settings: Settings, systems: Sequence[str]) -> dict[str, Any]:
    skipped = _no_profile(settings)
    if skipped is not None:
        return skipped
    rows = _untimed(
        settings,
        "profile",
        [s for s in systems if s in INGEST_NODES],
        functools.partial(_profile_once, settings),
        _describe_profile,
    )
    return {"rate": profile.RATE, "rows": rows}


def _describe_profile(result: dict[str, Any]) -> str:
    parts = ", ".join(f"{p['name']} {100 * p['share']:.0f} %" for p in result["by_part"][:4])
    return f"{result['samples']} samples: {parts}"


def _ingest_rep(
    settings: Settings, ds: data.DataSet, conc: int, system: str, rep: int
) -> dict[str, float]:
    label = f"ingest-{ds.name}-{conc}-{system}-{rep}"
    return _ingest_once(settings, system, ds, conc, label)


def run_ingest(settings: Settings) -> dict[str, Any]:
    systems = [s for s in INGEST_ORDER if settings.wanted(s)]
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for name in settings.datasets:
        ds = settings.dataset(name)
        for conc in settings.concurrency:
            if conc > ds.instances:
                skipped.append(f"{name} with {conc} associations: only {ds.instances} instance(s)")
                continue
            runs, errors = measure_alternating(
                settings,
                systems,
                f"ingest {name:10s} x{conc}",
                functools.partial(_ingest_rep, settings, ds, conc),
                lambda r: (
                    f"{r['instances_per_s']:8.1f} inst/s {r['mb_per_s']:7.1f} MB/s "
                    f"{r['peak_rss_mib']:6.1f} MiB {r['cpu_ms_per_instance']:6.2f} ms CPU/inst"
                ),
            )
            for system in systems:
                rows.append(
                    {
                        "dataset": name,
                        "concurrency": conc,
                        "system": system,
                        **_outcome(runs[system], errors.get(system)),
                    }
                )
    ratios = []
    for node, row in (
        (node, row)
        for node in rows
        if node["system"] in INGEST_NODES and "error" not in node
        for row in rows
        if row["system"] not in INGEST_NODES
        and "error" not in row
        and row["dataset"] == node["dataset"]
        and row["concurrency"] == node["concurrency"]
    ):
        ratios.append(
            {
                "dataset": row["dataset"],
                "concurrency": row["concurrency"],
                "node": node["system"],
                "peer": row["system"],
                "instances_per_s": _ratio(
                    node["summary"]["instances_per_s"]["median"],
                    row["summary"]["instances_per_s"]["median"],
                ),
                "peak_rss": _ratio(
                    node["summary"]["peak_rss_mib"]["median"],
                    row["summary"]["peak_rss_mib"]["median"],
                ),
                "cpu_per_instance": _ratio(
                    node["summary"]["cpu_ms_per_instance"]["median"],
                    row["summary"]["cpu_ms_per_instance"]["median"],
                ),
            }
        )
    return {
        "sender": "DCMTK storescu (TCP_NODELAY=1), one process per association",
        "datasets": [settings.dataset(n).describe() for n in settings.datasets],
        "systems": systems,
        "rows": rows,
        "ratios": ratios,
        "ratio_meaning": "node median / peer median (>1: node faster, uses more RSS/CPU)",
        "skipped": skipped,
        "durability": _durability(settings, systems),
        "profile": _profiles(settings, systems),
    }


# --------------------------------------------------------------------------- 2. end to end

ORIGINAL_CT_PATIENT_ID = "BENCH-CT"

ROUTER_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'dest')
end
"""

E2E_PEER = ("node-peer-stream", "node-peer-stream-basic")
E2E_NODES = ("node-stream", "node-stream-basic", "node-study", *E2E_PEER)
E2E_ORDER = (*E2E_NODES, "orthanc-router", "direct")
E2E_DEFAULT = frozenset(E2E_ORDER)
"""``*-basic`` is the stream route with ``profile = "basic"`` (on node A's route for the peer
systems): the run fails, rather than report a figure, if what arrives at the destination still
carries the original PatientID.  ``node-peer-stream*``: storescu -> node A, whose stream route
sends to node B as a ``peer`` destination (HPKE-sealed packages over mutual TLS) -> node B
(peer endpoint on), whose stream route sends to Orthanc as a DICOM destination."""


def _e2e_route(settings: Settings, system: str) -> dict[str, Any]:
    """The route of a node system's (first) node, without its name and destinations."""
    if system == "node-study":
        return {"mode": "study", "quiet_seconds": settings.quiet_seconds}
    return {"mode": "stream", **({"profile": "basic"} if system.endswith("-basic") else {})}


def _e2e_middle(
    settings: Settings, system: str, root: Path, dest_port: int, keys: Path | None
) -> list[Receiver]:
    """What ``system`` puts between storescu and the destination Orthanc, in path order (not
    started; nothing for ``direct``).  ``keys``: the peer pair's material (_key_material)."""
    if system == "orthanc-router":
        modalities = {"dest": ("DEST", LOOPBACK, dest_port)}
        return [
            OrthancReceiver(
                root / "router",
                aet="ROUTER",
                modalities=modalities,
                lua=ROUTER_LUA,
                name="orthanc-router",
            )
        ]
    if not system.startswith("node-"):
        return []
    destinations = [{"name": "dest", "ae_title": "DEST", "host": LOOPBACK, "port": dest_port}]
    to_dest = {"name": "bench", "destinations": ["dest"]}
    if system in E2E_PEER:
        assert keys is not None, "the peer systems need the pair's key material"
        a, b = _node_pair(
            settings,
            root,
            sealed=True,
            keys=keys,
            a_route=_e2e_route(settings, system),
            b_destinations=destinations,
            b_routes=[{**to_dest, "mode": "stream"}],
        )
        return [NodeReceiver(a, f"{system} node A"), NodeReceiver(b, f"{system} node B")]
    options = NodeOptions(
        destinations=destinations,
        routes=[{**to_dest, **_e2e_route(settings, system)}],
        worker=settings.node_worker(),
    )
    return [NodeReceiver.configured(root / "node", options, name=system)]


def _check_running(system: str, nodes: Sequence[GatewayNode]) -> None:
    """A forwarding node that has exited fails the run at once, with its log's end: its
    start waits only for its first port, and the run would otherwise wait out its timeout
    for instances that cannot arrive."""
    for node in nodes:
        if node.proc is not None and node.proc.poll() is not None:
            raise RunFailed(
                f"{system}: node {node.node_name} exited ({node.proc.returncode})\n{node.log(10)}"
            )


def _e2e_once(
    settings: Settings,
    system: str,
    ds: data.DataSet,
    label: str,
    keys: Path | None = None,
    profile_to: Path | None = None,
) -> dict[str, float]:
    """One run of ``system``; with ``profile_to``, py-spy samples the first node's processes
    (serve, its worker process) from the first byte sent to the last instance held, into
    that file (:mod:`bench.profile`; such a run's times are not comparable)."""
    profiling = contextlib.ExitStack()
    root = settings.fresh_dir(label)
    dest = OrthancReceiver(root / "dest", aet="DEST", name="orthanc-dest")
    middle: list[Receiver] = []
    procs: list[subprocess.Popen[bytes]] = []
    forwarded: dict[str, float] = {}
    dest.start()
    try:
        middle = _e2e_middle(settings, system, root, dest.port, keys)
        nodes = [m for m in middle if isinstance(m, NodeReceiver)]
        for node in nodes:
            settings.node_configs.setdefault(f"e2e {node.name}", node.config_text)
        for hop in reversed(middle):  # the last hop first: up before what sends to it
            hop.start()
        target: Receiver = middle[0] if middle else dest
        for receiver in (dest, *middle):
            wait_idle(receiver.pid)
        monitors = [TreeMonitor(hop.pid).start() for hop in middle]
        if profile_to is not None:
            profiling.enter_context(profile.recording(target.pid, profile_to))
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        procs = start_storescu(target.ae_title, target.port, ds.files, 1, root / "storescu.log")
        sent: float | None = None
        held = 0
        deadline = t0 + settings.timeout
        while True:
            now = time.perf_counter()
            if sent is None and all(p.poll() is not None for p in procs):
                sent = now - t0
                check_sender([p.returncode for p in procs], root / "storescu.log")
            held = dest.server.count_instances()
            if held >= ds.instances:
                done = time.perf_counter() - t0
                break
            _check_running(system, [n.node for n in nodes])
            if now > deadline:
                raise RunFailed(f"{system}: destination holds {held} of {ds.instances}")
            time.sleep(POLL if sent is None else POLL_TAIL)
        profiling.close()
        if sent is None:
            wait_storescu(procs, settings.timeout)
            sent = time.perf_counter() - t0
        usages = [m.stop() for m in monitors]
        if nodes:  # the last node forwards to Orthanc; node A's deliveries went to node B
            forwarded = nodes[-1].forward_counts()
            for node in nodes[:-1]:
                counts = node.forward_counts()
                forwarded.update(
                    {f"peer_{k}": counts[k] for k in ("deliveries", "failed_attempts")}
                )
        if system.endswith("-basic"):
            first = dest.server.instances()[0]
            patient = dest.server.instance_tags(first).get("PatientID")
            if patient == ORIGINAL_CT_PATIENT_ID:
                raise RunFailed("profile basic was not applied: PatientID arrived unchanged")
    finally:
        profiling.close()
        for p in procs:
            stop_process(p, timeout=5)
        for hop in middle:
            hop.stop()
        dest.stop()
    settings.discard(root)
    result = {
        "seconds": done,
        "load_1min": load,
        "sender_seconds": sent,
        "instances_per_s": ds.instances / done,
    }
    if system == "node-study":
        result["seconds_excluding_quiet"] = done - settings.quiet_seconds
    result.update(forwarded)  # the node's associations opened/reused and deliveries
    if usages:  # a node pair's two processes added up (CPU, and peaks: an upper bound)
        result["router_peak_rss_mib"] = sum(u.peak_rss_mib for u in usages)
        result["router_cpu_ms_per_instance"] = (
            1000 * sum(u.cpu_seconds for u in usages) / ds.instances
        )
    if system in E2E_PEER:
        for side, usage in zip(("node_a", "node_b"), usages, strict=True):
            result[f"{side}_cpu_ms_per_instance"] = 1000 * usage.cpu_seconds / ds.instances
            result[f"{side}_peak_rss_mib"] = usage.peak_rss_mib
    return result


E2E_PROFILED = ("node-stream", "node-stream-basic")
"""The e2e systems profiled once more, untimed: the forwarding node's serve and worker."""


def _e2e_profiles(settings: Settings, ds: data.DataSet, systems: Sequence[str]) -> dict[str, Any]:
    """py-spy's samples of the forwarding node (serve and its worker process) while each of
    ``systems`` takes the CT set end to end, once, untimed."""
    skipped = _no_profile(settings)
    if skipped is not None:
        return skipped
    folder = settings.out if settings.out is not None else settings.work
    folder.mkdir(parents=True, exist_ok=True)

    def once(system: str, _ds: data.DataSet) -> dict[str, Any]:
        raw = folder / f"profile-e2e-{system}.txt"
        _e2e_once(settings, system, ds, f"e2e-profile-{system}", profile_to=raw)
        kept = {"raw": raw.name} if settings.out is not None else {}
        return {"instances": ds.instances, **kept, **profile.summary(profile.parse_file(raw))}

    rows = _untimed(settings, "profile", systems, once, _describe_profile, datasets=[ds.name])
    return {"rate": profile.RATE, "rows": rows}


def run_e2e(settings: Settings) -> dict[str, Any]:
    if settings.systems is None:
        systems = [s for s in E2E_ORDER if s in E2E_DEFAULT]
    else:
        systems = [s for s in E2E_ORDER if s in settings.systems]
    ds = settings.dataset("ct")
    keys = None
    if any(s in E2E_PEER for s in systems):
        keys = _key_material(settings, settings.fresh_dir("e2e-peer-keys"))

    def describe(result: dict[str, float]) -> str:
        extra = (
            f" ({result['seconds_excluding_quiet']:.2f} s excluding quiet)"
            if "seconds_excluding_quiet" in result
            else ""
        )
        if "peer_deliveries" in result:
            extra += f", A->B {result['peer_deliveries']:.0f} deliveries"
        if "deliveries" in result:
            extra += (
                f", {result['deliveries']:.0f} deliveries, associations "
                f"{result.get('associations_opened', 0):.0f} opened "
                f"{result.get('associations_reused', 0):.0f} reused"
            )
        return (
            f"{result['seconds']:.2f} s to last instance held{extra}, "
            f"sender done at {result['sender_seconds']:.2f} s"
        )

    runs, errors = measure_alternating(
        settings,
        systems,
        "e2e ct x1",
        lambda system, rep: _e2e_once(settings, system, ds, f"e2e-{system}-{rep}", keys),
        describe,
    )
    rows: list[dict[str, Any]] = [
        {"system": s, **_outcome(runs[s], errors.get(s))} for s in systems
    ]

    def median(system: str) -> float | None:
        for row in rows:
            if row["system"] == system and "error" not in row:
                key = "seconds_excluding_quiet" if system == "node-study" else "seconds"
                value: float = row["summary"][key]["median"]
                return value
        return None

    profiles = _e2e_profiles(settings, ds, [s for s in systems if s in E2E_PROFILED])
    ratios = []
    for node in E2E_NODES:
        for peer in ("orthanc-router", "direct"):
            a, b = median(node), median(peer)
            if a is not None and b is not None:
                ratios.append({"node": node, "peer": peer, "time": _ratio(a, b)})
    return {
        "dataset": ds.describe(),
        "path": (
            "storescu -> [node | node A -> peer channel -> node B | Orthanc auto-router | "
            "nothing] -> Orthanc (AET DEST)"
        ),
        "peer_channel": (
            f"node-peer-stream*: node A's stream route to node B as a {PEER_DESTINATION}; B's "
            f"stream route to Orthanc as a DICOM destination; {PAIR_KEYS}. Router columns: A "
            "and B added up (CPU; peak RSS as the sum of each one's peak)"
        ),
        "measure": (
            "seconds from starting storescu (first byte) to the destination Orthanc holding "
            "every instance (REST /statistics polled every 50 ms)"
        ),
        "quiet_seconds": settings.quiet_seconds,
        "node_worker_intervals": settings.worker_interval,
        "node_worker_process": "separate" if settings.separate_worker else "in serve",
        "router_lua": ROUTER_LUA.strip(),
        "rows": rows,
        "ratios": ratios,
        "profile": profiles,
        "ratio_meaning": "node median time / peer median time (<1: node faster); "
        "node-study uses its time minus quiet_seconds",
    }


# --------------------------------------------------------------------------- 3. de-identification

DEID_ORDER = (
    "node-basic-file",
    "node-basic-gate",
    "node-basic-nogate",
    "dicognito",
    "pydicom-deid",
)
DEID_NODE = ("node-basic-file", "node-basic-gate", "node-basic-nogate")
DEID_PEERS = ("dicognito", "pydicom-deid")
DEID_DATASETS = ("ct", "small")
DEID_TARGET = 2.0
"""Issue 7: ``basic`` at >= 2x the faster of dicognito and pydicom/deid in instances/s."""


def deid_cpu() -> int:
    """The one CPU every de-identification run is pinned to (the last one we may use)."""
    return max(os.sched_getaffinity(0))


def _deid_once(settings: Settings, tool: str, ds: data.DataSet, label: str) -> dict[str, float]:
    root = settings.fresh_dir(label)
    listing = root / "files.txt"
    listing.write_text("".join(f"{f}\n" for f in ds.files))
    load = os.getloadavg()[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.deid_tools",
            tool,
            str(deid_cpu()),
            str(listing),
            str(root / "out"),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=settings.timeout,
        check=False,
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RunFailed(f"{tool} exited {proc.returncode}: {lines[-1] if lines else ''}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    settings.discard(root)
    if result["written"] != ds.instances:
        raise RunFailed(f"{tool} wrote {result['written']} of {ds.instances} files")
    return {
        "seconds": result["seconds"],
        "load_1min": load,
        "instances_per_s": ds.instances / result["seconds"],
        "mb_per_s": ds.total_bytes / MIB / result["seconds"],
        "cpu_ms_per_instance": 1000 * result["cpu_seconds"] / ds.instances,
        "setup_seconds": result["setup_seconds"],
        "peak_rss_mib": result["peak_rss_mib"],
    }


def _deid_ratios(rows: list[dict[str, Any]], dataset: str) -> list[dict[str, Any]]:
    def median(system: str, key: str = "instances_per_s") -> float | None:
        for row in rows:
            if row["dataset"] == dataset and row["system"] == system and "error" not in row:
                value: float = row["summary"][key]["median"]
                return value
        return None

    peers = {p: median(p) for p in DEID_PEERS}
    measured = {p: v for p, v in peers.items() if v is not None}
    faster = max(measured, key=lambda p: measured[p]) if measured else None
    out = []
    for node in DEID_NODE:
        n = median(node)
        if n is None:
            continue
        entry: dict[str, Any] = {"dataset": dataset, "node": node}
        for peer, value in peers.items():
            entry[peer] = _ratio(n, value) if value is not None else None
        if faster is not None:
            ratio = _ratio(n, measured[faster])
            node_cpu = median(node, "cpu_ms_per_instance")
            peer_cpu = median(faster, "cpu_ms_per_instance")
            entry.update(
                faster_peer=faster,
                faster=ratio,
                faster_cpu=_ratio(peer_cpu, node_cpu) if peer_cpu and node_cpu else None,
                target=DEID_TARGET,
                target_met=ratio is not None and ratio >= DEID_TARGET,
            )
        out.append(entry)
    return out


def _deid_rep(settings: Settings, ds: data.DataSet, system: str, rep: int) -> dict[str, float]:
    return _deid_once(settings, system, ds, f"deid-{ds.name}-{system}-{rep}")


def run_deid(settings: Settings) -> dict[str, Any]:
    systems = [s for s in DEID_ORDER if settings.wanted(s)]
    datasets = [d for d in DEID_DATASETS if d in settings.datasets]
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    for name in datasets:
        ds = settings.dataset(name)
        runs, errors = measure_alternating(
            settings,
            systems,
            f"deid {name:10s}",
            functools.partial(_deid_rep, settings, ds),
            lambda r: (
                f"{r['instances_per_s']:8.1f} inst/s {r['cpu_ms_per_instance']:6.2f} ms CPU/inst "
                f"{r['peak_rss_mib']:6.1f} MiB"
            ),
        )
        for system in systems:
            rows.append(
                {"dataset": name, "system": system, **_outcome(runs[system], errors.get(system))}
            )
        ratios += _deid_ratios(rows, name)
    return {
        "datasets": [settings.dataset(n).describe() for n in datasets],
        "systems": systems,
        "cpu": deid_cpu(),
        "method": (
            "each tool in its own process pinned (sched_setaffinity) to one CPU, reading the "
            "data set's files and writing its outputs to an empty folder; seconds: the loop "
            "over the files only (imports, profile/recipe loading excluded, reported as "
            "setup_seconds); every output checked not to hold the original PatientID"
        ),
        "tools": {
            "node-basic-file": "gateway.deid.deidentify_file, profile basic (leak gate, "
            "atomic write with fsync: the path of dicom-gateway deid)",
            "node-basic-gate": "gateway.deid.deidentify_bytes, profile basic (leak gate), "
            "plain write without fsync: the delivery worker's path (it also encrypts)",
            "node-basic-nogate": "dcmread + gateway.deid.deidentify (basic) + save_as, "
            "no leak gate",
            "dicognito": "dicognito.anonymizer.Anonymizer() defaults, dcmread + anonymize + "
            "save_as",
            "pydicom-deid": "deid default recipe (DeidRecipe()), per file get_identifiers + "
            "replace_identifiers(save=True)",
        },
        "rows": rows,
        "ratios": ratios,
        "ratio_meaning": "node median instances/s / peer median instances/s (>1: node faster); "
        f"target: >= {DEID_TARGET}x the faster peer; faster_cpu: the faster peer's CPU ms per "
        "instance / the node's (less sensitive to the machine's load)",
    }


# --------------------------------------------------------------------------- 5. sealed transfer

SEALED_TRANSFER = "peer-sealed"
PLAIN_TRANSFER = "peer-plain-cstore"
RAW_AES = "aes-256-gcm-raw"
SPOOL_SEALED = "spool-write-sealed"
SPOOL_PLAIN = "spool-write-plain"
SEALED_ORDER = (SEALED_TRANSFER, PLAIN_TRANSFER, RAW_AES, SPOOL_SEALED, SPOOL_PLAIN)
SEALED_TRANSFERS = (SEALED_TRANSFER, PLAIN_TRANSFER)
RAW_AES_BYTES = 64 * MIB
"""Bytes AESGCM.encrypt runs over per repetition (1 MiB segments, one core)."""
PEER_DESTINATION = (
    'type = "peer" destination: package sealed for B (HPKE X25519, AES-256-GCM envelopes), '
    "HTTPS with mutual TLS, signed manifest and receipt"
)
PAIR_KEYS = (
    "key material from keys init with one deployment CA and peers export/add both ways, made "
    "once and copied into each run's state folders"
)
"""How the node pair of scenarios 2 (node-peer-stream*) and 5 is described in the results."""


def _trust(giver: GatewayNode, taker: GatewayNode) -> None:
    """``peers export`` on ``giver``, ``peers add`` on ``taker`` (as tests/e2e/test_peer.py)."""
    export = giver.root / f"{giver.node_name}.export.json"
    export.write_text(giver.cli("peers", "export", check=True).stdout)
    taker.cli("peers", "add", str(export), check=True)


def _node_pair(
    settings: Settings,
    root: Path,
    sealed: bool,
    keys: Path | None = None,
    *,
    a_route: dict[str, Any] | None = None,
    b_destinations: Sequence[dict[str, Any]] = (),
    b_routes: Sequence[dict[str, Any]] = (),
) -> tuple[GatewayNode, GatewayNode]:
    """Node A (a route to B: ``type = "peer"`` when ``sealed``, else a DICOM destination) and
    node B (peer endpoint on, ``b_destinations`` and ``b_routes``; none by default), trusting
    each other whichever way A sends.  A's route is ``a_route`` (mode, profile...; by default
    a study route with the quiet period, no profile).  Their key material and peer entries are
    copied from ``keys`` (a pair made by :func:`_key_material`), so a run spends no time on
    ``keys init`` and ``peers add``."""
    a_port, b_port = free_port(), free_port()
    worker = settings.node_worker()
    b = GatewayNode(
        root / "b",
        name="node-b",
        ae_title="NODEB",
        peer={"port": b_port},
        peers=[{"name": "node-a", "url": f"https://{LOOPBACK}:{a_port}"}],
        destinations=b_destinations,
        routes=b_routes,
        worker=worker,
    )
    if sealed:
        destination: dict[str, Any] = {"name": "b", "type": "peer", "peer": "node-b"}
    else:
        destination = {"name": "b", "ae_title": "NODEB", "host": LOOPBACK, "port": b.port}
    a = GatewayNode(
        root / "a",
        name="node-a",
        ae_title="NODEA",
        peer={"port": a_port, "enabled": False},
        peers=[{"name": "node-b", "url": f"https://{LOOPBACK}:{b_port}", "timeout": 120}],
        destinations=[destination],
        routes=[
            {
                "name": "to-b",
                "destinations": ["b"],
                **(a_route or {"mode": "study", "quiet_seconds": settings.quiet_seconds}),
            }
        ],
        worker=worker,
    )
    if keys is not None:
        for node in (a, b):
            shutil.copytree(keys / node.root.name / "state", node.state_dir)
    return a, b


def _key_material(settings: Settings, root: Path) -> Path:
    """A deployment CA (``ca_init``) and, in ``root/a`` and ``root/b``, node A's and node B's
    ``keys init --ca`` and each other's ``peers export``/``peers add``, made once per run of
    the scenario and copied into every pair's fresh state folders."""
    ca_init(root / "ca")
    a, b = _node_pair(settings, root, sealed=True)
    for node in (a, b):
        node.cli("keys", "init", "--ca", str(root / "ca"), check=True)
    _trust(b, a)
    _trust(a, b)
    return root


def _index_count(node: GatewayNode) -> int:
    db = node.state_dir / "index.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        (count,) = conn.execute("SELECT count(*) FROM instances").fetchone()
    return int(count)


def _transfer_once(
    settings: Settings, system: str, ds: data.DataSet, keys: Path, label: str
) -> dict[str, float]:
    root = settings.fresh_dir(label)
    a, b = _node_pair(settings, root, system == SEALED_TRANSFER, keys)
    settings.node_configs.setdefault(f"sealed-transfer {system} node A", a.config_path.read_text())
    settings.node_configs.setdefault(f"sealed-transfer {system} node B", b.config_path.read_text())
    procs: list[subprocess.Popen[bytes]] = []
    try:
        b.start()
        a.start()
        wait_idle(b.pid)
        wait_idle(a.pid)
        monitors = (TreeMonitor(a.pid).start(), TreeMonitor(b.pid).start())
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        procs = start_storescu(a.ae_title, a.port, ds.files, 1, root / "storescu.log")
        sent: float | None = None
        deadline = t0 + settings.timeout
        while True:
            now = time.perf_counter()
            if sent is None and all(p.poll() is not None for p in procs):
                sent = now - t0
                check_sender([p.returncode for p in procs], root / "storescu.log")
            held = _index_count(b)
            if held >= ds.instances:
                done = time.perf_counter() - t0
                break
            _check_running(system, [a, b])
            if now > deadline:
                raise RunFailed(f"{system}: node B holds {held} of {ds.instances}\n{a.log(5)}")
            time.sleep(POLL if sent is None else POLL_TAIL)
        if sent is None:
            wait_storescu(procs, settings.timeout)
            sent = time.perf_counter() - t0
        usage_a, usage_b = (m.stop() for m in monitors)
        if held != ds.instances:
            raise RunFailed(f"{system}: node B holds {held} instances, sent {ds.instances}")
    finally:
        for p in procs:
            stop_process(p, timeout=5)
        for node in (a, b):
            # Their storage is thrown away: SIGKILL by pid (a graceful stop is not measured).
            node.kill()
    settings.discard(root)
    excl_quiet = done - settings.quiet_seconds
    a_to_b = max(done - sent - settings.quiet_seconds, 1e-3)
    mib = ds.total_bytes / MIB
    return {
        "seconds": done,
        "load_1min": load,
        "sender_seconds": sent,
        "seconds_excluding_quiet": excl_quiet,
        "mb_per_s": mib / excl_quiet,
        "a_to_b_seconds": a_to_b,
        "a_to_b_mb_per_s": mib / a_to_b,
        "node_a_cpu_ms_per_instance": 1000 * usage_a.cpu_seconds / ds.instances,
        "node_b_cpu_ms_per_instance": 1000 * usage_b.cpu_seconds / ds.instances,
        "node_a_peak_rss_mib": usage_a.peak_rss_mib,
        "node_b_peak_rss_mib": usage_b.peak_rss_mib,
    }


def _crypto_once(
    settings: Settings, system: str, blobs: list[bytes], label: str
) -> dict[str, float]:
    load = os.getloadavg()[0]
    if system == RAW_AES:
        seconds = crypto_throughput.raw_encrypt_seconds(RAW_AES_BYTES)
        return {"seconds": seconds, "load_1min": load, "mb_per_s": RAW_AES_BYTES / MIB / seconds}
    root = settings.fresh_dir(label)
    seconds = crypto_throughput.spool_write_seconds(
        blobs, root / "spool", encrypted=system == SPOOL_SEALED
    )
    settings.discard(root)
    total = sum(len(b) for b in blobs)
    return {
        "seconds": seconds,
        "load_1min": load,
        "mb_per_s": total / MIB / seconds,
        "files_per_s": len(blobs) / seconds,
    }


def _median_of(rows: list[dict[str, Any]], system: str, key: str) -> float | None:
    for row in rows:
        if row["system"] == system and "error" not in row and key in row["summary"]:
            value: float = row["summary"][key]["median"]
            return value
    return None


def run_sealed_transfer(settings: Settings) -> dict[str, Any]:
    systems = [s for s in SEALED_ORDER if settings.wanted(s)]
    ds = settings.dataset("ct")
    blobs = [f.read_bytes() for f in ds.files] if {SPOOL_SEALED, SPOOL_PLAIN} & set(systems) else []
    keys = settings.work / "run" / "sealed-transfer-keys"
    if any(s in SEALED_TRANSFERS for s in systems):
        keys = _key_material(settings, settings.fresh_dir("sealed-transfer-keys"))

    def once(system: str, rep: int) -> dict[str, float]:
        label = f"sealed-{system}-{rep}"
        if system in SEALED_TRANSFERS:
            return _transfer_once(settings, system, ds, keys, label)
        return _crypto_once(settings, system, blobs, label)

    def describe(result: dict[str, float]) -> str:
        extra = (
            f" (A->B after the sender: {result['a_to_b_mb_per_s']:7.1f} MB/s; "
            f"{result['seconds_excluding_quiet']:.2f} s excl. quiet)"
            if "a_to_b_mb_per_s" in result
            else ""
        )
        return f"{result['mb_per_s']:8.1f} MB/s{extra}"

    runs, errors = measure_alternating(settings, systems, "sealed-transfer", once, describe)
    rows: list[dict[str, Any]] = [
        {"system": s, **_outcome(runs[s], errors.get(s))} for s in systems
    ]
    ratios = []
    for name, (a, b), key in (
        ("sealed / plain C-STORE, storescu -> A -> B", SEALED_TRANSFERS, "mb_per_s"),
        ("sealed / plain C-STORE, A -> B after the sender", SEALED_TRANSFERS, "a_to_b_mb_per_s"),
        ("sealed transfer / raw AES-256-GCM", (SEALED_TRANSFER, RAW_AES), "mb_per_s"),
        ("plain C-STORE / raw AES-256-GCM", (PLAIN_TRANSFER, RAW_AES), "mb_per_s"),
        ("spool write sealed / plain (fsync)", (SPOOL_SEALED, SPOOL_PLAIN), "mb_per_s"),
    ):
        x, y = _median_of(rows, a, key), _median_of(rows, b, "mb_per_s" if b == RAW_AES else key)
        if x is not None and y is not None:
            ratios.append(
                {"ratio": name, "numerator": a, "denominator": b, "mb_per_s": _ratio(x, y)}
            )
    return {
        "dataset": ds.describe(),
        "systems": systems,
        "quiet_seconds": settings.quiet_seconds,
        "node_worker_intervals": settings.worker_interval,
        "node_worker_process": "separate" if settings.separate_worker else "in serve",
        "raw_aes_bytes": RAW_AES_BYTES,
        "method": (
            f"two fresh nodes on loopback per run (SQLite index, encrypted spool, audit; "
            f"{PAIR_KEYS}); storescu (one "
            "association) -> node A, whose study route (quiet_seconds subtracted, no profile) "
            "sends to node B, timed until B's index holds every instance (its SQLite "
            "`instances` polled every 50 ms). MB/s: data set bytes / (seconds - quiet); A->B "
            "MB/s: bytes / (seconds - storescu's own seconds - quiet), the transfer after the "
            "last instance reached A. MB = 2^20 bytes, as in scenario 1"
        ),
        "tools": {
            SEALED_TRANSFER: f"A's destination a {PEER_DESTINATION}",
            PLAIN_TRANSFER: "A's destination a DICOM destination (B's AE NODEB, plain C-STORE)",
            RAW_AES: f"AESGCM.encrypt of {RAW_AES_BYTES // MIB} MiB in 1 MiB segments, one core "
            "(bench/crypto_throughput.py raw_encrypt_seconds)",
            SPOOL_SEALED: "the data set's files written one by one as envelopes (EnvelopeWriter, "
            "1 MiB segments, fresh data key each): temporary file, fsync, rename, fsync of the "
            "folder, as encrypt_file",
            SPOOL_PLAIN: "the same bytes, same steps, without the envelope",
        },
        "rows": rows,
        "ratios": ratios,
        "ratio_meaning": "numerator median MB/s / denominator median MB/s, same run",
    }


# --------------------------------------------------------------------------- registry


# --------------------------------------------------------------------------- 4. pixels

PIXEL_FRAMES = 10
"""Frames per cine at ``--scale 1`` (scaled down, at least 2)."""


def run_pixels(settings: Settings) -> dict[str, Any]:
    """Clean Pixel Data: frames/s of masking and of masking + OCR, in this process (one
    core: numpy and tesseract run single-threaded here), bench.pixels_throughput's cines."""
    from bench import pixels_throughput

    frames = max(2, round(PIXEL_FRAMES * min(1.0, settings.scale * 4)))
    runs = pixels_throughput.measure(frames, repeat=settings.repeat, log=settings.log)
    rows = []
    for frame, kind in sorted({(r["frame"], r["kind"]) for r in runs}):
        mine = [
            {k: v for k, v in r.items() if k not in ("frame", "kind")}
            for r in runs
            if (r["frame"], r["kind"]) == (frame, kind)
        ]
        rows.append({"frame": frame, "kind": kind, **_outcome(mine, None)})
    return {
        "frames": frames,
        "method": "gateway.deid.deidentify_bytes with a Clean Pixel Data profile (one rule "
        'band), ocr = "off" (masking: decode, blank, re-encode) and ocr = "verify" (masking '
        "and the OCR check of every frame, one tesseract); 8-bit uncompressed cines of real "
        "ultrasound frames (bench/pixels_throughput.py)",
        "rows": rows,
    }


# --------------------------------------------------------------------------- 6. scale


def run_scale(settings: Settings) -> dict[str, Any]:
    """The node's ingest of the CT set at 1x, 4x and 16x (of ``--scale``): throughput, peak
    RSS and the seconds per instance against the 1x run (linear: within 10 %). The factors
    alternate between repetitions as the systems of the other scenarios do (1x 4x 16x, then
    16x 4x 1x ...): run one factor after the other, a machine that slowed down over the
    minutes (seen here: 1x at 182, 158, 154 inst/s in a row) read as cost growing with the
    work."""
    sets = {
        f"{factor}x": (factor, data.ensure("ct", settings.scale * factor, settings.work / "data"))
        for factor in settings.scale_factors
    }

    def once(label: str, rep: int) -> dict[str, float]:
        factor, ds = sets[label]
        result = _ingest_once(settings, "node", ds, 1, f"scale-{factor}-{rep}")
        result["ms_per_instance"] = 1000 * result["seconds"] / ds.instances
        return result

    def describe(result: dict[str, float]) -> str:
        return (
            f"{result['instances_per_s']:7.1f} inst/s {result['peak_rss_mib']:6.1f} MiB "
            f"{result['ms_per_instance']:6.2f} ms/inst"
        )

    runs, errors = measure_alternating(settings, list(sets), "scale", once, describe)
    rows: list[dict[str, Any]] = [
        {
            "factor": factor,
            "instances": ds.instances,
            **_outcome(runs[label], errors.get(label)),
        }
        for label, (factor, ds) in sets.items()
    ]
    base = next((r for r in rows if "summary" in r), None)
    growth = []
    for row in rows:
        if base is None or "summary" not in row:
            continue
        ratio = _ratio(
            row["summary"]["ms_per_instance"]["median"],
            base["summary"]["ms_per_instance"]["median"],
        )
        growth.append(
            {
                "factor": row["factor"],
                "ms_per_instance_vs_first": ratio,
                "linear": ratio is not None and ratio <= 1.10,
            }
        )
    return {
        "sender": "DCMTK storescu (TCP_NODELAY=1), one association",
        "rows": rows,
        "growth": growth,
        "growth_meaning": "median ms per instance at this factor / at the smallest factor "
        "(target: <= 1.10 at 16x)",
    }


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    run: Callable[[Settings], dict[str, Any]] | None
    not_measured: str = ""


REGISTRY: tuple[Scenario, ...] = (
    Scenario("ingest", "1. Ingest: storescu -> receiver", run_ingest),
    Scenario("e2e", "2. End to end: storescu -> router -> Orthanc", run_e2e),
    Scenario("deid", "3. De-identification: `basic` vs dicognito and pydicom/deid", run_deid),
    Scenario("pixels", "4. Pixels: frames/s cleaning, cleaning + OCR check", run_pixels),
    Scenario(
        "sealed-transfer",
        "5. Sealed transfer: node to node vs plain C-STORE and raw AES-256-GCM",
        run_sealed_transfer,
    ),
    Scenario("scale", "6. Scale: ingest at 1x, 4x and 16x the CT set", run_scale),
)


def by_key(key: str) -> Scenario:
    for scenario in REGISTRY:
        if scenario.key == key:
            return scenario
    raise KeyError(key)
