"""Smoke run of the benchmark harness (bench/run) in its smallest mode, so it cannot rot.

The figures are not checked against targets (benchmarks never decide the suite's result);
only that the harness runs, measures something and writes its outputs in the documented
shape.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.node import child_pids, process_gone
from tests.support.peers import in_private_netns

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "bench" / "run"
STOP_GRACE = 15
"""Seconds a harness that overran gets to stop what it started after SIGTERM; each test's
pytest timeout leaves this and a margin after the harness's own."""


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (nodes and peers run in sessions of their own, so a
    process group would not hold them)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        children = child_pids(todo.pop())
        found.extend(children)
        todo.extend(children)
    return found


def _stop_harness(proc: subprocess.Popen[str]) -> list[int]:
    """A harness that overran its time: SIGTERM, on which it stops what it started;
    after :data:`STOP_GRACE` whatever of it is left is SIGKILLed by pid, the harness last (its
    processes, once orphaned, could no longer be found through it). Returns the pids
    found below it when it was stopped."""
    started = _descendants(proc.pid)
    proc.terminate()
    try:
        proc.communicate(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        for pid in _descendants(proc.pid):  # started since (``started`` follows)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.communicate()
    for pid in started:  # what the harness left behind although it exited
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return started


def _positive(summary: dict[str, dict[str, float]], key: str) -> None:
    stats = summary[key]
    assert set(stats) == {"median", "min", "max"}, stats
    assert 0 < stats["min"] <= stats["median"] <= stats["max"], (key, stats)


def _start_harness(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """``bench/run --scale 0.004 --repeat 1 ARGS`` into ``tmp_path``, started."""
    if not in_private_netns() and not _can_unshare():
        pytest.skip("needs a private network namespace (scripts/test) or unshare -n")
    return subprocess.Popen(
        [
            str(RUN),
            *("--scale", "0.004", "--repeat", "1"),
            *args,
            *("--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")),
        ],
        cwd=REPO,
        env={**os.environ, "BENCH_SKIP_BOOTSTRAP": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_bench(tmp_path: Path, *args: str, timeout: float) -> dict[str, Any]:
    """``bench/run --scale 0.004 --repeat 1 ARGS`` into ``tmp_path``; its latest.json. A run
    past ``timeout`` is stopped with everything it started, then fails the test."""
    proc = _start_harness(tmp_path, *args)
    out = tmp_path / "results"
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_harness(proc)
        raise
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    doc: dict[str, Any] = json.loads((out / "latest.json").read_text())
    return doc


@pytest.mark.timeout(150)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results"
    started = time.monotonic()
    doc = _run_bench(
        tmp_path,
        # Not sealed-transfer: its key material and two node pairs take ~25 s even at
        # this scale (test_sealed_transfer_offline covers its report and ratios).
        *("--scenarios", "ingest,e2e,deid", "--datasets", "small", "--concurrency", "1"),
        "--systems",
        "node,node-rx2,dcmtk-storescp-ignore,node-stream,direct,node-basic-file,dicognito,"
        "pydicom-deid",
        timeout=120,
    )
    elapsed = time.monotonic() - started
    # ~47 s here, of it ~16 s the profiled runs (two ingest nodes, one e2e node)
    assert elapsed < 80, f"smoke run took {elapsed:.0f} s"

    assert {"meta", "scenarios", "not_measured"} <= set(doc)
    assert doc["meta"]["repeat"] == 1
    assert doc["meta"]["host"]["cpus"] >= 1

    ingest = doc["scenarios"]["ingest"]["result"]
    assert ingest["systems"] == ["node", "node-rx2", "dcmtk-storescp-ignore"]
    assert [d["name"] for d in ingest["datasets"]] == ["small"]
    assert ingest["datasets"][0]["instances"] == 8
    assert len(ingest["rows"]) == 3
    for row in ingest["rows"]:
        assert row["dataset"] == "small" and row["concurrency"] == 1
        assert len(row["runs"]) == 1
        for key in ("seconds", "instances_per_s", "mb_per_s", "peak_rss_mib"):
            _positive(row["summary"], key)
        assert row["summary"]["cpu_seconds"]["median"] >= 0
    assert [(r["node"], r["peer"]) for r in ingest["ratios"]] == [
        ("node", "dcmtk-storescp-ignore"),
        ("node-rx2", "dcmtk-storescp-ignore"),
    ]
    for ratio in ingest["ratios"]:
        assert ratio["instances_per_s"] > 0 and ratio["peak_rss"] > 0
    # the untimed traced run: the node syncs the file, its folder and the index per instance
    # (strace is installed by scripts/bootstrap); storescp --ignore writes nothing to sync
    durable = {r["system"]: r for r in ingest["durability"]["rows"]}
    assert set(durable) == {"node", "node-rx2", "dcmtk-storescp-ignore"}, ingest["durability"]
    for node in (durable["node"], durable["node-rx2"]):
        assert node["instances"] == 8
        for target in ("file", "folder", "index"):
            assert node[f"{target}_syncs_per_instance"] >= 1, node
        assert node["sync_ms_per_instance"] > 0
    assert durable["dcmtk-storescp-ignore"]["syncs_per_instance"] == 0
    assert "| data set | receiver | data file | folder | index |" in (out / "latest.md").read_text()
    # the untimed profiled run: py-spy (a [test] extra) sampled the node receivers' processes,
    # the receiver processes of node-rx2 too, in the node's own ingest code
    profiled = {r["system"]: r for r in ingest["profile"]["rows"]}
    assert set(profiled) == {"node", "node-rx2"}, ingest["profile"]
    for row in profiled.values():
        assert row["instances"] == 8 and row["samples"] > 0, row
        assert abs(sum(p["share"] for p in row["by_part"]) - 1) < 0.01
        # the ingest's code is in the stacks (the C-STORE's thread or its helper thread)
        assert "/gateway/ingest/service.py" in (out / row["raw"]).read_text()
        assert row["total_gateway"], row
        assert all(" (gateway/" in t["name"] for t in row["total_gateway"]), row
    assert "Where the node's Python time goes" in (out / "latest.md").read_text()

    e2e = doc["scenarios"]["e2e"]["result"]
    assert [r["system"] for r in e2e["rows"]] == ["node-stream", "direct"]
    for row in e2e["rows"]:
        _positive(row["summary"], "seconds")
        _positive(row["summary"], "sender_seconds")
    assert [(r["node"], r["peer"]) for r in e2e["ratios"]] == [("node-stream", "direct")]
    assert e2e["ratios"][0]["time"] > 0
    assert e2e["quiet_seconds"] > 0
    # one more node-stream run, profiled: serve and its worker process, forwarding included
    (streamed,) = e2e["profile"]["rows"]
    assert streamed["system"] == "node-stream" and streamed["samples"] > 0, streamed
    # the ingest's code and the worker's are in the stacks (8 instances: too few samples for
    # either to be sure of a place among the top functions)
    stacks = (out / "profile-e2e-node-stream.txt").read_text()
    assert "/gateway/ingest/service.py" in stacks and "/gateway/transfer/worker.py" in stacks
    assert streamed["total_gateway"], streamed
    assert all(" (gateway/" in t["name"] for t in streamed["total_gateway"]), streamed

    deid = doc["scenarios"]["deid"]["result"]
    assert deid["systems"] == ["node-basic-file", "dicognito", "pydicom-deid"]
    assert [d["name"] for d in deid["datasets"]] == ["small"]
    assert [r["system"] for r in deid["rows"]] == deid["systems"]
    for row in deid["rows"]:
        assert row["dataset"] == "small" and len(row["runs"]) == 1
        for key in ("seconds", "instances_per_s", "cpu_ms_per_instance", "peak_rss_mib"):
            _positive(row["summary"], key)
    (ratio,) = deid["ratios"]
    assert ratio["node"] == "node-basic-file" and ratio["target"] == 2.0
    assert ratio["faster"] > 0 and ratio["faster_peer"] in ("dicognito", "pydicom-deid")
    assert ratio["dicognito"] > 0 and ratio["pydicom-deid"] > 0

    not_measured = {item["key"] for item in doc["not_measured"]}
    assert "deid" not in not_measured
    assert not {"pixels", "scale"} & not_measured  # measured: test_bench_smoke_pixels_scale
    assert "sealed-transfer" not in not_measured and "sealed-transfer" not in doc["scenarios"]
    assert all(item["reason"] for item in doc["not_measured"])

    md = (out / "latest.md").read_text()
    assert "| small | 1 | node |" in md
    assert ("## Not measured yet" in md) == bool(doc["not_measured"])
    if doc.get("charts"):
        for name in doc["charts"]:
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib" in doc["charts_note"]


@pytest.mark.timeout(120)
def test_bench_smoke_e2e_peer(tmp_path: Path) -> None:
    """Scenario 2 through two nodes (2 CT instances): storescu -> node A -> peer channel ->
    node B -> Orthanc, without a profile and with ``basic`` on A's route, beside direct."""
    out = tmp_path / "results"
    systems = ["node-peer-stream", "node-peer-stream-basic"]
    doc = _run_bench(
        tmp_path,
        *("--scenarios", "e2e", "--systems", ",".join([*systems, "direct"]), "--no-charts"),
        timeout=95,
    )

    e2e = doc["scenarios"]["e2e"]["result"]
    assert [r["system"] for r in e2e["rows"]] == [*systems, "direct"]
    for row in e2e["rows"][:2]:
        assert len(row["runs"]) == 1
        summary = row["summary"]
        for key in (
            "seconds",
            "sender_seconds",
            "router_cpu_ms_per_instance",
            "router_peak_rss_mib",
            "node_a_cpu_ms_per_instance",
            "node_b_cpu_ms_per_instance",
            "node_a_peak_rss_mib",
            "node_b_peak_rss_mib",
            "peer_deliveries",  # A -> B over the peer channel
            "deliveries",  # B -> Orthanc
        ):
            _positive(summary, key)
    assert [(r["node"], r["peer"]) for r in e2e["ratios"]] == [(s, "direct") for s in systems]
    assert all(r["time"] > 0 for r in e2e["ratios"])

    configs = doc["node_configs"]
    for system in systems:
        a, b = configs[f"e2e {system} node A"], configs[f"e2e {system} node B"]
        assert 'type = "peer"' in a and 'mode = "stream"' in a
        assert ('profile = "basic"' in a) == system.endswith("-basic")
        assert "[peer]\nenabled = true" in b and 'mode = "stream"' in b and "profile" not in b

    md = (out / "latest.md").read_text()
    assert "| node-peer-stream-basic | direct |" in md
    assert "Node A -> node B over the peer channel" in md


@pytest.mark.timeout(150)
def test_bench_smoke_pixels_scale(tmp_path: Path) -> None:
    """Scenarios 4 and 6 at their smallest (2 frames per cine; 2 and 4 CT instances)."""
    out = tmp_path / "results"
    doc = _run_bench(
        tmp_path, *("--scenarios", "pixels,scale", "--scale-factors", "1,2"), timeout=125
    )

    pixels = doc["scenarios"]["pixels"]["result"]
    assert pixels["frames"] == 2
    assert {(r["frame"], r["kind"]) for r in pixels["rows"]} == {
        (f, k) for f in ("640x480", "1024x768") for k in ("RGB", "mono")
    }
    for row in pixels["rows"]:
        assert len(row["runs"]) == 1
        for key in ("masking_frames_per_s", "masking_ocr_frames_per_s"):
            _positive(row["summary"], key)
        assert row["summary"]["masking_ocr_cpu_ms_per_frame"]["median"] > 0

    scale = doc["scenarios"]["scale"]["result"]
    assert [(r["factor"], r["instances"]) for r in scale["rows"]] == [(1, 2), (2, 4)]
    for row in scale["rows"]:
        for key in ("instances_per_s", "ms_per_instance", "peak_rss_mib"):
            _positive(row["summary"], key)
    assert [g["factor"] for g in scale["growth"]] == [1, 2]
    assert scale["growth"][0]["ms_per_instance_vs_first"] == 1.0

    md = (out / "latest.md").read_text()
    assert "## 4. Pixels" in md and "## 6. Scale" in md
    assert "| 2x | 4 |" in md
    if doc.get("charts"):
        assert "scale.png" in doc["charts"]
        assert (out / "scale.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_summary_of_raw_stacks() -> None:
    """py-spy's collapsed stacks: each sample goes to the part its innermost frame is in;
    self counts the innermost frame, total the node's frames once per sample."""
    from bench import profile

    site = "/srv/venv/lib/python3.11/site-packages"
    std = "/usr/lib/python3.11"
    node = "/work/gw/gateway"
    store = f"IngestService.store ({node}/ingest/service.py:280)"
    raw = "\n".join(
        [
            f'process 7:"dicom-gateway serve";run ({std}/threading.py:975);{store};'
            f"dcmread ({site}/pydicom/filereader.py:1000) 6",
            f'process 7:"dicom-gateway serve";{store};_index ({node}/ingest/service.py:400);'
            f"_index ({node}/ingest/service.py:410) 3",
            f'process 9:"receiver";wait ({std}/threading.py:320) 1',
            'process 7:"dicom-gateway serve";a broken line',
            "",
        ]
    )
    parsed = profile.parse(raw)
    assert parsed.samples == 10
    assert dict(parsed.by_part) == {"pydicom": 6, "gateway.ingest": 3, "stdlib": 1}
    assert parsed.self_samples["dcmread (pydicom/filereader.py)"] == 6
    assert parsed.total_samples["IngestService.store (gateway/ingest/service.py)"] == 9
    assert parsed.total_samples["_index (gateway/ingest/service.py)"] == 3  # once per sample
    summary = profile.summary(parsed)
    assert summary["by_part"][0] == {"name": "pydicom", "share": 0.6}
    assert profile.part(f"{site}/SQLAlchemy/orm/session.py") == "sqlalchemy"
    assert profile.part(f"{node}/cli.py") == "gateway"


def test_split_and_alternating() -> None:
    from bench.scenarios import alternating, summarize
    from bench.systems import split

    files = [Path(f"{i}.dcm") for i in range(10)]
    chunks = split(files, 4)
    assert len(chunks) == 4 and {len(c) for c in chunks} == {2, 3}
    assert [f for c in chunks for f in c] == files
    assert split(files[:2], 4) == [[files[0]], [files[1]]]
    assert alternating(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert alternating(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert summarize([{"x": 3.0}, {"x": 1.0}, {"x": 2.0}]) == {
        "x": {"median": 2.0, "min": 1.0, "max": 3.0}
    }


def test_wait_storescu_waits_blocking_and_kills_at_its_timeout() -> None:
    """The senders' exit codes (a blocking wait, not Popen's 50 ms polling); past the
    timeout every sender is killed and TimeoutExpired raised."""
    from bench.systems import wait_storescu

    done = [subprocess.Popen(["sh", "-c", f"exit {code}"]) for code in (0, 3)]
    assert wait_storescu(done, 30) == [0, 3]
    stuck = [subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sh", "-c", "exit 0"])]
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            wait_storescu(stuck, 0.3)
        assert stuck[0].wait(5) == -signal.SIGKILL
    finally:
        for p in stuck:
            p.kill()
            p.wait()


def test_tree_monitor_counts_children() -> None:
    from bench.procstat import TreeMonitor

    # A shell whose child burns ~0.3 s of CPU and holds ~40 MiB.
    script = (
        "import time; b = bytearray(40 * 1024 * 1024); t = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\n"
        "time.sleep(0.3)"
    )
    proc = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "{script}"; true'])
    try:
        monitor = TreeMonitor(proc.pid, interval=0.01).start()
        # Wait for the shell to exit without reaping it: its zombie still reports the
        # child's CPU (cutime), as a receiver's tree does while the harness measures it.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        usage = monitor.stop()
    finally:
        proc.kill()
        proc.wait()
    assert usage.cpu_seconds >= 0.25
    assert usage.peak_rss_mib >= 40


def test_sealed_transfer_offline(tmp_path: Path) -> None:
    """Scenario 5 without its two nodes: the crypto and spool measurements, ratios, table and
    chart (the node-to-node part is exercised by running bench/run --scenarios
    sealed-transfer)."""
    from bench import report
    from bench.scenarios import RAW_AES, SPOOL_PLAIN, SPOOL_SEALED, Settings, by_key

    settings = Settings(
        scale=0.004,
        repeat=2,
        work=tmp_path / "work",
        systems=frozenset({RAW_AES, SPOOL_SEALED, SPOOL_PLAIN}),
        log=lambda msg: None,
    )
    scenario = by_key("sealed-transfer")
    assert scenario.run is not None
    result = scenario.run(settings)
    assert [r["system"] for r in result["rows"]] == [RAW_AES, SPOOL_SEALED, SPOOL_PLAIN]
    for row in result["rows"]:
        assert len(row["runs"]) == 2
        _positive(row["summary"], "mb_per_s")
    (ratio,) = result["ratios"]
    assert (ratio["numerator"], ratio["denominator"]) == (SPOOL_SEALED, SPOOL_PLAIN)
    assert ratio["mb_per_s"] > 0
    doc: dict[str, Any] = {
        "scenarios": {"sealed-transfer": {"title": scenario.title, "result": result}}
    }
    md = "\n".join(report.RENDERERS["sealed-transfer"](result))
    assert f"| {RAW_AES} |" in md and "spool write sealed / plain" in md
    try:
        charts = report.charts(doc, tmp_path)
    except ImportError:
        return
    assert charts == ["sealed_transfer.png"]
    assert (tmp_path / "sealed_transfer.png").read_bytes()[:4] == b"\x89PNG"


def test_a_forwarding_node_that_exited_fails_the_run_at_once(tmp_path: Path) -> None:
    """A run whose forwarding node has exited fails naming it, instead of waiting out its
    timeout for instances that cannot arrive (a smoke run once timed out so)."""
    from bench.scenarios import RunFailed, _check_running
    from tests.support.node import GatewayNode

    alive = GatewayNode(tmp_path / "a", name="node-a")
    gone = GatewayNode(tmp_path / "b", name="node-b")
    gone.log_path.write_text("peer endpoint did not start\n")
    gone.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    gone.proc.wait(10)
    _check_running("node-peer-stream", [alive])  # not started: nothing to say
    with pytest.raises(RunFailed, match=r"node node-b exited \(1\)\n.*did not start"):
        _check_running("node-peer-stream", [alive, gone])


@pytest.mark.timeout(120)
def test_a_harness_stopped_midway_leaves_no_process(tmp_path: Path) -> None:
    """What a smoke run that overran does: the harness is stopped in the middle of an
    end-to-end run (a node, its worker and two Orthancs up), and nothing it started is
    left running (nodes and peers run in sessions of their own, out of its process group)."""
    proc = _start_harness(tmp_path, "--scenarios", "e2e", "--systems", "node-stream,direct")
    deadline = time.monotonic() + 60
    nodes: list[int] = []
    while not nodes:
        assert proc.poll() is None, f"harness ended first:\n{proc.communicate()}"
        assert time.monotonic() < deadline, "no node started within 60 s"
        time.sleep(0.05)
        nodes = [p for p in _descendants(proc.pid) if "dicom-gateway" in _cmdline(p)]
    started = _stop_harness(proc)
    assert set(nodes) <= set(started)
    deadline = time.monotonic() + 10
    left = [p for p in started if not process_gone(p, max(0.0, deadline - time.monotonic()))]
    assert not left, [_cmdline(p) for p in left]
    assert proc.poll() is not None


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""
