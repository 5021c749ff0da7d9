"""The benchmark harness: ``bench/run [options]`` (or ``python -m bench`` inside a private
network namespace).  See ``bench/run --help`` and the README's Benchmarks section."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.scenarios import REGISTRY, SCALE_FACTORS, Settings, by_key
from bench.systems import ORTHANC_SETTINGS, PEER_MAX_PDU
from tests.support.peers import dcmtk_path, in_private_netns, orthanc_path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
QUICK_SCALE = 0.05


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    measured = [s.key for s in REGISTRY if s.run is not None]
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Measure the node beside DCMTK, Orthanc and pynetdicom on loopback.",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="size factor of the data sets: 1 = 500 CT, 2,000 small, a 200-frame (100 MB) "
        "multi-frame (default 1)",
    )
    p.add_argument("--quick", action="store_true", help=f"same as --scale {QUICK_SCALE}")
    p.add_argument(
        "--worker-in-process",
        action="store_true",
        help="forwarding nodes (e2e, sealed transfer) run their delivery workers in the serve "
        "process (default: worker.separate_process = true)",
    )
    p.add_argument("--repeat", type=int, default=3, help="repetitions per measurement (3)")
    p.add_argument(
        "--scenarios",
        type=_csv,
        default=tuple(measured),
        help=f"comma-separated, of {', '.join(measured)} (default all)",
    )
    p.add_argument(
        "--systems",
        type=_csv,
        default=None,
        help="only these systems (ingest: node, node-rx2, dcmtk-storescp, dcmtk-storescp-ignore, "
        "orthanc, pynetdicom-scp; e2e: node-stream, node-study, orthanc-router, direct, "
        "node-stream-basic, node-peer-stream, node-peer-stream-basic; deid: node-basic-file, "
        "node-basic-gate, node-basic-nogate, dicognito, pydicom-deid; sealed-transfer: "
        "peer-sealed, peer-plain-cstore, aes-256-gcm-raw, spool-write-sealed, spool-write-plain)",
    )
    p.add_argument(
        "--datasets",
        type=_csv,
        default=("ct", "small", "multiframe"),
        help="ingest data sets (deid uses ct and small of these)",
    )
    p.add_argument(
        "--concurrency",
        type=lambda v: tuple(int(x) for x in _csv(v)),
        default=(1, 4),
        help="concurrent associations for ingest (default 1,4)",
    )
    p.add_argument(
        "--quiet-seconds",
        type=float,
        default=1.0,
        help="quiet period of the node's study route in the e2e scenario (default 1)",
    )
    p.add_argument(
        "--scale-factors",
        type=lambda v: tuple(int(x) for x in _csv(v)),
        default=SCALE_FACTORS,
        help="CT set sizes of the scale scenario, as multiples of --scale (default 1,4,16)",
    )
    p.add_argument(
        "--out", type=Path, default=BENCH_DIR / "results", help="results folder (bench/results)"
    )
    p.add_argument(
        "--work",
        type=Path,
        default=BENCH_DIR / ".work",
        help="data set cache and receivers' storage (bench/.work)",
    )
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    p.add_argument(
        "--no-profile",
        action="store_true",
        help="skip the untimed py-spy run of each node receiver in the ingest scenario",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.scale = QUICK_SCALE
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    for key in args.scenarios:
        if key not in measured:
            p.error(f"unknown or not yet measured scenario {key!r}")
    return args


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def _commit() -> str:
    head = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return head + ("+uncommitted gateway/ changes" if dirty else "")


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _versions() -> dict[str, str]:
    import pydicom
    import pynetdicom

    return {
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "dicognito": _dist_version("dicognito"),
        "deid": _dist_version("deid"),
        "dcmtk": _first_line([dcmtk_path("storescu"), "--version"]),
        "orthanc": _first_line([orthanc_path(), "--version"]),
    }


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not in_private_netns():
        print(
            "bench: not in a private network namespace; Orthanc and storescp bind all "
            "interfaces. Use bench/run (it runs the harness under `unshare -n`).",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work: Path = args.work
    (work / "data").mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    settings = Settings(
        scale=args.scale,
        repeat=args.repeat,
        work=work,
        systems=frozenset(args.systems) if args.systems else None,
        datasets=args.datasets,
        concurrency=args.concurrency,
        quiet_seconds=args.quiet_seconds,
        scale_factors=args.scale_factors,
        separate_worker=not args.worker_in_process,
        profile=not args.no_profile,
        out=out,
        log=log,
    )
    doc: dict[str, Any] = {
        "meta": {
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
            "load_before": _load(),
            "commit": _commit(),
            "versions": _versions(),
            "scale": args.scale,
            "repeat": args.repeat,
            "argv": sys.argv[1:] if argv is None else argv,
            "peers": {
                "DCMTK": f"TCP_NODELAY=1, storescp --max-pdu {PEER_MAX_PDU}, --fork when "
                "more than one association",
                "Orthanc": f"Debian package, default storage, TCP_NODELAY=1, {ORTHANC_SETTINGS}",
                "pynetdicom-scp": "bench/pynetdicom_scp.py (writes encoded data sets as "
                "received, TCP_NODELAY, max PDU 262144)",
                "node": "dicom-gateway serve, SQLite index, durable spool, audit on, defaults",
                "dicognito / pydicom-deid (deid scenario)": "their defaults (Anonymizer(); the "
                "default deid recipe), one process pinned to one CPU, as the node's basic",
                "node A -> node B (sealed-transfer scenario)": "two nodes as above, study "
                "route, peer destination (HPKE, mutual TLS) or plain C-STORE",
                "node A -> node B -> Orthanc (e2e node-peer-stream*)": "two nodes as above, "
                "stream routes, A to B as a peer destination (HPKE, mutual TLS)",
            },
        },
        "scenarios": {},
        "not_measured": [
            {"key": s.key, "title": s.title, "reason": s.not_measured}
            for s in REGISTRY
            if s.run is None
        ],
    }
    failed = False
    try:
        for key in args.scenarios:
            scenario = by_key(key)
            assert scenario.run is not None
            log(f"scenario {scenario.title}")
            entry: dict[str, Any] = {"title": scenario.title}
            try:
                entry["result"] = scenario.run(settings)
            except Exception as exc:
                failed = True
                entry["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            doc["scenarios"][key] = entry
    finally:
        shutil.rmtree(work / "run", ignore_errors=True)
    doc["meta"]["load_after"] = _load()
    doc["failures"] = settings.failures
    failed = failed or bool(settings.failures)
    doc["node_configs"] = settings.node_configs
    if args.no_charts:
        doc["charts_note"] = "Charts skipped (--no-charts)."
    else:
        try:
            doc["charts"] = report.charts(doc, out)
        except ImportError:
            doc["charts_note"] = (
                "Charts not drawn: matplotlib is not installed in the venv "
                "(it belongs to the [test] extra; run scripts/bootstrap)."
            )
            log(doc["charts_note"])
    report.write_json(doc, out / "latest.json")
    (out / "latest.md").write_text(report.markdown(doc))
    log(f"wrote {out / 'latest.json'} and {out / 'latest.md'}")
    return 1 if failed else 0
