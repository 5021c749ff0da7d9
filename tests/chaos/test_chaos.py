"""Chaos (FAULTS F5; F1-F4 at named points): SIGKILLs of the node, at random instants and at
named points, while a study is received, de-identified (route profile ``basic``) and
forwarded to Orthanc.

The sender is a pynetdicom SCU that records which instances were answered ``0x0000`` and,
after every restart, resends the rest (and a few acknowledged ones: a retry must be
answered idempotently). Named points come from the outside, without code in the product:

* ``strace -f -yy -e inject=SYSCALL:signal=KILL:when=N`` kills the node on entry to the Nth
  ``write`` / ``fsync`` / ``rename`` / ``fdatasync`` / ``sendto`` of one of its threads
  (strace counts per syscall and per thread); the killed call's file or socket in the strace
  log says which point it was: a write to a receive buffer (mid-receive), the rename of a
  fsync'd buffer into ``spool/objects`` or the fsync of its folder (after fsync, before the
  commit), the fsync of the SQLite WAL (at the commit), the send of a P-DATA from the
  listening port (after the commit, before the C-STORE response), a send towards the
  destination (mid-forward), a de-identified file being written (mid-de-identification);
* the fault proxy between the node and Orthanc swallows one C-STORE-RSP, and the node is
  killed once Orthanc has answered (after the destination's response, before it is recorded),
  or counts the bytes in flight to Orthanc (mid-forward);
* a start that is cut short kills the node while it recovers from the previous kill.

Afterwards: every instance was acknowledged; Orthanc holds each one exactly once, under
the keyed pseudonymous SOP Instance UID that ``dicom-gateway deid`` computes with the
node's secret from the original, with the same data set (SHA-256 of its Explicit VR Little
Endian encoding) and nothing else; the audit chain verifies; the index names each original
once, every delivery is delivered; the spool holds exactly the files the index names and no
receive buffer, prepared file or temp file. After every restart, before anything is sent,
the spool holds no orphan either (start-up recovery).

CI runs 500 instances and at least 20 kills. The soak (``scripts/soak``, or
``CHAOS_SOAK=1 pytest tests/chaos -k soak``) is the same code with ``CHAOS_INSTANCES``
(default 10,000) and ``CHAOS_KILLS`` (default 200).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.support.datasets import make_ct_study
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.node import GATEWAY, GatewayNode
from tests.support.peers import Orthanc

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")

# the named points every run must hit at least once
REQUIRED = (
    "mid-receive",
    "after-fsync-before-commit",
    "after-commit-before-response",
    "mid-forward",
    "after-destination-response",
    "during-start-up",
)
# named points strace aims at: (syscall to kill on, range of N for when=N); the node is
# slow under strace (every syscall of every thread stops), so N stays small
AIM: dict[str, tuple[str, tuple[int, int]]] = {
    "mid-receive": ("write", (2, 24)),
    "after-fsync-before-commit": ("rename", (1, 10)),
    "after-rename-before-commit": ("fsync", (2, 20)),
    "at-commit": ("fdatasync", (2, 20)),
    "after-commit-before-response": ("sendto", (6, 30)),
}
# named points the fault proxy gives, without strace
PROXY_AIMS = ("mid-forward", "after-destination-response")
EXTRA = ("after-rename-before-commit", "at-commit")
CALL = re.compile(r"^(?P<tid>\d+)\s+(?P<call>\w+)\((?P<args>.*)$")
RESUMED = re.compile(r"^(?P<tid>\d+)\s+<\.\.\. (?P<call>\w+) resumed>")
SOCKET = re.compile(r"TCP(?:v6)?:\[[^\]]*?:(?P<local>\d+)->[^\]]*?:(?P<remote>\d+)\]")


# --------------------------------------------------------------------------- the sender


class AckingSender:
    """A C-STORE SCU that knows which instances were answered 0x0000."""

    def __init__(self, files: list[Path], rng: random.Random) -> None:
        self.files = files
        self.rng = rng
        self.acked: set[int] = set()
        self.statuses: Counter[int] = Counter()  # every status received, by code
        self.resent_acked = 0
        self.lock = threading.Lock()

    def pending(self) -> list[int]:
        with self.lock:
            return [i for i in range(len(self.files)) if i not in self.acked]

    def send(self, port: int, stop: threading.Event, *, retries_of_acked: int = 3) -> str:
        """One association: a few already-acknowledged instances, then the pending ones in
        order, until the association breaks, ``stop`` is set or nothing is left. Returns
        how the association went."""
        with self.lock:
            done = sorted(self.acked)
        again = self.rng.sample(done, min(retries_of_acked, len(done)))
        order = again + self.pending()
        if not order:
            return "nothing to send"
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
        except (OSError, RuntimeError) as exc:
            return f"association failed: {type(exc).__name__}"
        if not assoc.is_established:
            return "rejected" if assoc.is_rejected else "not established"
        sent = 0
        try:
            for i in order:
                if stop.is_set() or not assoc.is_established:
                    break
                try:
                    rsp = assoc.send_c_store(self.files[i])
                except (OSError, RuntimeError, ValueError):
                    break
                if "Status" not in rsp:
                    break  # no answer: the association went down
                code = int(rsp.Status)
                sent += 1
                with self.lock:
                    self.statuses[code] += 1
                    if code == 0x0000:
                        if i in self.acked:
                            self.resent_acked += 1
                        self.acked.add(i)
        finally:
            if assoc.is_established:
                assoc.release()
        return f"{sent} answered"


# --------------------------------------------------------------------------- the node's state


def sql(node: GatewayNode, query: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{node.state_dir / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def spool_listing(node: GatewayNode) -> dict[str, list[Path]]:
    spool = node.state_dir / "spool"
    return {
        "objects": sorted((spool / "objects").glob("*/*.dcm")),
        "incoming": sorted((spool / "incoming").glob("*")),
        "outgoing": sorted(p for p in (spool / "outgoing").rglob("*") if p.is_file()),
        "temp": sorted(
            p
            for p in node.state_dir.rglob("*")
            if p.is_file() and (p.name.startswith(".write-") or p.suffix in (".part", ".tmp"))
        ),
    }


def assert_no_orphan(node: GatewayNode, *, outgoing_allowed: bool) -> None:
    """Every spool object is named by an index row and the reverse; no receive buffer, no
    temp file (and, once everything is delivered, no prepared file)."""
    listing = spool_listing(node)
    if outgoing_allowed:  # the worker may be preparing already (temp files of its own)
        listing["temp"] = [p for p in listing["temp"] if "outgoing" not in p.parts]
    on_disk = {p.stem for p in listing["objects"]}
    indexed = {row[0] for row in sql(node, "SELECT spool_key FROM instances")}
    assert on_disk == indexed, (
        f"spool without index row: {len(on_disk - indexed)}, "
        f"index row without file: {len(indexed - on_disk)}"
    )
    assert not listing["incoming"], f"receive buffers left: {listing['incoming'][:3]}"
    assert not listing["temp"], f"temp files left: {listing['temp'][:3]}"
    if not outgoing_allowed:
        assert not listing["outgoing"], f"prepared files left: {listing['outgoing'][:3]}"


def deliveries_done(node: GatewayNode) -> tuple[bool, Counter[str]]:
    rows = sql(node, "SELECT state FROM deliveries")
    states = Counter(r[0] for r in rows)
    return bool(rows) and set(states) == {"delivered"}, states


def undelivered_items(node: GatewayNode) -> int:
    rows = sql(node, "SELECT count(*) FROM delivery_items WHERE state != 'sent'")
    return int(rows[0][0])


# --------------------------------------------------------------------------- expectations


def dataset_sha256(data: bytes) -> str:
    """SHA-256 of the data set (file meta excluded) encoded as Explicit VR Little Endian
    without group lengths: the same content gives the same digest whoever wrote the file."""
    ds = pydicom.dcmread(BytesIO(data))
    for tag in [t for t in ds.keys() if t.element == 0]:
        del ds[tag]
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return hashlib.sha256(fp.getvalue()).hexdigest()


def start_expected_outputs(study: Path, secret: Path, out: Path) -> subprocess.Popen[str]:
    """``dicom-gateway deid`` with the node's secret on the originals, in its own process
    (not the node's code path), started early: it runs while the chaos does."""
    return subprocess.Popen(
        [GATEWAY, "deid", "--profile", "basic", "--secret", str(secret), "--out", str(out), study],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def expected_outputs(proc: subprocess.Popen[str], out: Path) -> dict[str, str]:
    """Pseudonymous SOP Instance UID -> data set SHA-256 of what ``deid`` wrote."""
    _, stderr = proc.communicate(timeout=3600)
    assert proc.returncode == 0, stderr[-2000:]
    expected: dict[str, str] = {}
    for f in out.glob("*.dcm"):
        data = f.read_bytes()
        uid = str(pydicom.dcmread(BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        assert f.stem == uid
        expected[uid] = dataset_sha256(data)
    return expected


def orthanc_holdings(orthanc: Orthanc) -> tuple[Counter[str], dict[str, str]]:
    """(how many Orthanc instances carry each SOP Instance UID, UID -> data set SHA-256)."""
    expanded: list[dict[str, Any]] = orthanc.get("/instances?expand", timeout=120)
    counts: Counter[str] = Counter()
    digests: dict[str, str] = {}
    for item in expanded:
        uid = str(item["MainDicomTags"]["SOPInstanceUID"])
        counts[uid] += 1
        digests[uid] = dataset_sha256(orthanc.instance_file(str(item["ID"])))
    return counts, digests


# --------------------------------------------------------------------------- one kill


@dataclass
class Round:
    aim: str
    point: str = ""
    seconds: float = 0.0
    start_seconds: float = 0.0
    detail: str = ""


@dataclass
class ChaosReport:
    rounds: list[Round] = field(default_factory=list)

    def points(self) -> Counter[str]:
        return Counter(r.point for r in self.rounds)


def classify(trace: Path, node_port: int, dest_port: int) -> tuple[str, str]:
    """Which named point the injected SIGKILL hit, from the strace log ('' if none)."""
    try:
        lines = trace.read_text(errors="replace").splitlines()
    except OSError:
        return "", ""
    unfinished: dict[str, tuple[str, str]] = {}
    killed: tuple[str, str] | None = None
    for raw in lines:
        line = raw.strip()
        m = CALL.match(line)
        if m and line.endswith("<unfinished ...>"):
            unfinished[m["tid"]] = (m["call"], m["args"])
            continue
        if not line.endswith("= ?"):
            continue  # strace writes "= ?" for a call its tracee did not return from
        r = RESUMED.match(line)
        if r and r["tid"] in unfinished:
            killed = unfinished[r["tid"]]
        elif m:
            killed = (m["call"], m["args"])
        if killed is not None:
            break
    if killed is not None:
        call, args = killed
        if call == "write":
            if "/spool/incoming/" in args:
                return "mid-receive", call
            if "/spool/outgoing/" in args:
                return "mid-deid", call
            return "other", f"{call} {args[:60]}"
        if call == "rename":
            if "/spool/incoming/" in args and "/spool/objects/" in args:
                return "after-fsync-before-commit", call
            if "/spool/outgoing/" in args:
                return "mid-deid", call
            return "other", call
        if call in ("fsync", "fdatasync"):
            if "-wal>" in args:
                return "at-commit", call
            if "/spool/incoming/" in args:
                return "mid-receive", call
            if "/spool/objects" in args:
                return "after-fsync-before-commit", call
            if "/spool/outgoing/" in args:
                return "mid-deid", call
            return "other", f"{call} {args[:60]}"
        if call == "sendto":
            sock = SOCKET.search(args)
            if sock is None:
                return "other", f"{call} {args[:60]}"
            pdata = ', "\\4' in args
            if int(sock["local"]) == node_port:
                return ("after-commit-before-response" if pdata else "ingest-association"), call
            if int(sock["remote"]) == dest_port:
                return "mid-forward", call
            return "other", f"{call} {args[:60]}"
        return "other", call
    return "", ""


def attach_strace(pid: int, trace: Path, syscall: str, when: int) -> subprocess.Popen[bytes]:
    """strace attached to every thread of the running node (and those it starts later),
    killing it on entry to the ``when``-th ``syscall`` of one thread; returns once attached
    (attaching after start-up keeps the slow start of a traced Python process out).

    A restarted node forwards at once, so the injection can hit a thread strace holds while
    it still attaches the others: a node that died meanwhile counts as attached (the round
    reads the kill from the trace as any other; before, the wait for every thread of the
    dead node ran out and failed the test)."""
    tracer = subprocess.Popen(
        [
            *("strace", "-f", "-qq", "-yy", "-s", "8", "-o", str(trace)),
            *("-e", f"trace={syscall}", "-e", f"inject={syscall}:signal=KILL:when={when}"),
            *("-p", str(pid)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    untraced: list[str] = []

    def attached() -> bool:
        untraced.clear()
        if _gone(pid):
            return True
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                status = (task / "status").read_text()
                if f"TracerPid:\t{tracer.pid}\n" not in status:
                    untraced.append(f"{task.name} {status.splitlines()[0]}")
        except OSError:
            return _gone(pid)
        return not untraced

    if not wait_for("strace to attach", attached, 15, 0.02):
        raise AssertionError(f"strace did not attach to the node; not traced: {untraced}")
    return tracer


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie not yet reaped counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(") ", 1)[-1][:1] in ("Z", "X")


def wait_for(what: str, check: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return False


# --------------------------------------------------------------------------- the run


def run_chaos(
    tmp_path: Path,
    orthanc: Orthanc,
    *,
    instances: int,
    kills: int,
    seed: int,
    random_share: float = 0.5,
) -> ChaosReport:
    rng = random.Random(seed)
    t0 = time.monotonic()
    study = tmp_path / "study"
    files = make_ct_study(study, instances, seed=seed % 1000)
    secret = tmp_path / "deid-secret.key"
    secret.write_text(os.urandom(32).hex() + "\n")
    secret.chmod(0o600)
    deid = start_expected_outputs(study, secret, tmp_path / "expected")
    print(f"\nchaos: {instances} instances, >= {kills} kills, seed {seed}", flush=True)

    proxy = FaultProxy(orthanc.dicom_port).start()
    node = GatewayNode(
        tmp_path / "node",
        destinations=[
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": proxy.port,
                "connect_timeout": 2,
            }
        ],
        routes=[
            {"name": "research", "destinations": ["pacs"], "mode": "stream", "profile": "basic"}
        ],
        deid={"secret_file": str(secret)},
        worker={
            "lease_seconds": 4,
            "max_attempts": 100000,
            "backoff_initial": 0.2,
            "backoff_max": 1,
        },
    )
    sender = AckingSender(files, rng)
    report = ChaosReport()
    traces = tmp_path / "traces"
    traces.mkdir()
    try:
        while True:
            covered = {r.point for r in report.rounds}
            missing = [p for p in REQUIRED if p not in covered]
            n = len(report.rounds)
            if n >= kills and not missing:
                break
            assert n < kills + 40, f"named points never hit: {missing}; {report.points()}"
            # aim: the named points not hit yet first, then a mix of random and named
            if missing and (n % 2 == 0 or n >= kills):
                aim = missing[n // 2 % len(missing)]
            elif rng.random() < random_share:
                aim = "random"
            else:
                aim = rng.choice([*REQUIRED, *EXTRA])
            report.rounds.append(
                one_round(
                    node,
                    sender,
                    proxy,
                    orthanc,
                    aim,
                    rng,
                    traces / f"{n:04d}.log",
                    quota=max(1, instances // kills),
                )
            )
            r = report.rounds[-1]
            print(
                f"  kill {n + 1:3d}: aim {aim:28s} hit {r.point:28s} after {r.seconds:5.2f}s"
                f" (start {r.start_seconds:4.1f}s)"
                f"  acked {len(sender.acked)}/{instances}  at Orthanc "
                f"{orthanc.count_instances()}  {r.detail}",
                flush=True,
            )
        chaos_done = time.monotonic()

        # the end: resend what is left, then let everything be forwarded
        node.wrapper = []
        node.start()
        assert_no_orphan(node, outgoing_allowed=True)
        for _ in range(20):
            if not sender.pending():
                break
            sender.send(node.port, threading.Event())
        assert not sender.pending(), f"{len(sender.pending())} never acknowledged"

        def finished() -> bool:
            done, _states = deliveries_done(node)
            return done and undelivered_items(node) == 0

        assert wait_for("every delivery delivered", finished, 300, 0.5), (
            f"{deliveries_done(node)[1]}, {undelivered_items(node)} items not sent\n{node.log()}"
        )
        drained = time.monotonic()
        verify = node.cli("audit", "verify")
        node.stop()
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        node.kill()
        proxy.stop()
        if deid.poll() is None and sys.exc_info()[0] is not None:
            deid.kill()

    # every acknowledged instance (all of them, in the end) at Orthanc exactly once
    expected = expected_outputs(deid, tmp_path / "expected")
    assert len(expected) == instances
    counts, digests = orthanc_holdings(orthanc)
    twice = [uid for uid, c in counts.items() if c > 1]
    assert not twice, f"{len(twice)} UIDs held more than once"
    assert set(counts) == set(expected), (
        f"missing at Orthanc: {len(set(expected) - set(counts))}, "
        f"unexpected at Orthanc: {len(set(counts) - set(expected))}"
    )
    wrong = [uid for uid in expected if digests[uid] != expected[uid]]
    assert not wrong, f"{len(wrong)} instances differ from their expected de-identification"
    assert orthanc.count_instances() == instances

    # the index: each original once, one version; the spool: exactly what the index names
    dupes = sql(
        node, "SELECT sop_instance_uid FROM instances GROUP BY sop_instance_uid HAVING count(*) > 1"
    )
    assert not dupes, f"{len(dupes)} originals indexed twice"
    originals = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    indexed = {r[0] for r in sql(node, "SELECT sop_instance_uid FROM instances")}
    assert indexed == originals
    assert_no_orphan(node, outgoing_allowed=False)
    assert sender.statuses.keys() == {0x0000}, dict(sender.statuses)

    points = report.points()
    print(
        f"chaos: {len(report.rounds)} kills {dict(points)}; {sum(sender.statuses.values())} "
        f"C-STORE answers ({sender.resent_acked} re-sends of acknowledged instances answered "
        f"0x0000); chaos {chaos_done - t0:.0f}s, drained {drained - chaos_done:.0f}s, "
        f"verified {time.monotonic() - drained:.0f}s, total {time.monotonic() - t0:.0f}s"
    )
    return report


def one_round(
    node: GatewayNode,
    sender: AckingSender,
    proxy: FaultProxy,
    orthanc: Orthanc,
    aim: str,
    rng: random.Random,
    trace: Path,
    quota: int,
) -> Round:
    rnd = Round(aim)
    node.wrapper = []
    begin = time.monotonic()
    if aim == "during-start-up":
        # killed while it recovers from the previous kill (orphan sweep, migrations, keys)
        try:
            node.start(timeout=rng.uniform(0.2, 1.5))  # kills the node when it is not up yet
        except RuntimeError:
            rnd.point, rnd.seconds = aim, time.monotonic() - begin
            return rnd
        node.kill()
        rnd.point, rnd.detail = "random", "it was up already"
        return rnd
    if aim == "after-commit-before-response":
        # strace counts every sendto: the destination black-holed for this round (its
        # connects accepted, never answered), so the restarted node's forwarding, which
        # resumes at once, does not take the count before the C-STORE-RSPs do
        proxy.set(Fault(mode="blackhole"))
    node.start(timeout=60)
    rnd.start_seconds = time.monotonic() - begin
    # start-up recovery: nothing left of the previous crash before anything arrives
    assert_no_orphan(node, outgoing_allowed=True)
    tracer: subprocess.Popen[bytes] | None = None
    if aim in AIM:
        syscall, (lo, hi) = AIM[aim]
        tracer = attach_strace(node.pid, trace, syscall, rng.randint(lo, hi))
    stop = threading.Event()
    outcome: list[str] = []
    thread = threading.Thread(
        target=lambda: outcome.append(sender.send(node.port, stop)), daemon=True
    )
    thread.start()
    started = time.monotonic()
    proc = node.proc
    assert proc is not None
    if aim == "random":
        # a random instant: mostly once a random number of instances more were acknowledged
        # (so the kills spread over the whole study), else after a random time
        if rng.random() < 0.7:
            acked = len(sender.acked) + rng.randint(1, 2 * quota)
            wait_for("acknowledgements", lambda: len(sender.acked) >= acked, 20, 0.005)
        else:
            time.sleep(rng.uniform(0.05, 3))
        rnd.point = "random"
    elif aim == "mid-forward":
        # kill while the destination is receiving: bytes towards it are in flight
        mark = proxy.upstream_bytes + rng.randint(20_000, 150_000)
        if wait_for("forwarding", lambda: proxy.upstream_bytes >= mark, 10, 0.005):
            rnd.point = aim
        else:
            rnd.point, rnd.detail = "random", "nothing forwarded"
    elif aim == "after-destination-response":
        proxy.hold_next_response()
        if proxy.held.wait(10):
            # Orthanc answered (it stores before it answers): kill before the node hears it
            time.sleep(rng.uniform(0.0, 0.05))
            rnd.point = aim
        else:
            rnd.point, rnd.detail = "random", "no response to hold"
        proxy.disarm()
    else:
        if wait_for("the injected kill", lambda: proc.poll() is not None, 10):
            rnd.point, rnd.detail = classify(trace, node.port, proxy.port)
            assert rnd.point, f"the node exited without an injected kill:\n{node.log()}"
        else:
            rnd.point, rnd.detail = "random", "injection not reached"
    rnd.seconds = time.monotonic() - started
    node.kill()
    proxy.set(Fault())
    if tracer is not None:
        tracer.wait(30)
    stop.set()
    if thread.is_alive():
        thread.join(60)
    assert not thread.is_alive(), "the sender hangs"
    rnd.detail = f"{rnd.detail} sender: {outcome[0] if outcome else '?'}".strip()
    return rnd


# --------------------------------------------------------------------------- the tests


@pytest.mark.timeout(900)
def test_chaos_sigkill_ingest_deid_forward(tmp_path: Path, orthanc: Orthanc) -> None:
    seed = int(os.environ.get("CHAOS_SEED", "0")) or random.SystemRandom().randrange(1, 1 << 30)
    report = run_chaos(tmp_path, orthanc, instances=500, kills=20, seed=seed)
    assert len(report.rounds) >= 20


SOAK = bool(os.environ.get("CHAOS_SOAK"))


@pytest.mark.skipif(not SOAK, reason="soak: set CHAOS_SOAK=1 (scripts/soak)")
@pytest.mark.timeout(0)
def test_chaos_soak(tmp_path: Path, orthanc: Orthanc) -> None:
    seed = int(os.environ.get("CHAOS_SEED", "0")) or random.SystemRandom().randrange(1, 1 << 30)
    instances = int(os.environ.get("CHAOS_INSTANCES", "10000"))
    kills = int(os.environ.get("CHAOS_KILLS", "200"))
    report = run_chaos(tmp_path, orthanc, instances=instances, kills=kills, seed=seed)
    assert len(report.rounds) >= kills
