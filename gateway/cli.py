"""``dicom-gateway``: run a node and administer its queue and audit log."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from gateway import __version__, cli_keys, cli_peers, cli_pixels, statelock
from gateway.audit.chain import verify
from gateway.config import GatewayConfig, load_config
from gateway.errors import AuditChainError, ConfigError, GatewayError, TransitionError
from gateway.index import deliveries
from gateway.index.db import Database
from gateway.index.models import AuditEvent, Delivery, DeliveryAttempt, DeliveryItem, Instance
from gateway.index.states import State


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-gateway", description=__doc__)
    p.add_argument("--version", action="version", version=f"dicom-gateway {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "-c", "--config", required=True, metavar="FILE", help="the node's TOML configuration"
        )
        return sp

    with_config(sub.add_parser("serve", help="run the node (listener, router, worker)"))
    with_config(sub.add_parser("check-config", help="validate a configuration file"))
    worker = with_config(
        sub.add_parser(
            "worker",
            help="the delivery worker process that serve starts itself with "
            "worker.separate_process (not run by hand)",
        )
    )
    worker.add_argument("--wake-fd", type=int, required=True, help=argparse.SUPPRESS)
    worker.add_argument("--ready-fd", type=int, required=True, help=argparse.SUPPRESS)
    worker.add_argument("--config-sha256", default="", help=argparse.SUPPRESS)
    receiver = with_config(
        sub.add_parser(
            "receiver",
            help="a DICOM receiver process that serve starts itself with "
            "dicom.receiver_processes above 1 (not run by hand)",
        )
    )
    receiver.add_argument("--index", type=int, required=True, help=argparse.SUPPRESS)
    receiver.add_argument(
        "--listen-fd", type=int, action="append", required=True, help=argparse.SUPPRESS
    )
    receiver.add_argument("--link-fd", type=int, required=True, help=argparse.SUPPRESS)
    receiver.add_argument("--ready-fd", type=int, required=True, help=argparse.SUPPRESS)
    receiver.add_argument("--config-sha256", default="", help=argparse.SUPPRESS)

    queue = sub.add_parser("queue", help="deliveries: list, show, retry, cancel")
    qsub = queue.add_subparsers(dest="action", required=True)
    ql = with_config(qsub.add_parser("list", help="list deliveries"))
    ql.add_argument("--state", choices=[s.value for s in State])
    ql.add_argument("--limit", type=int, default=100)
    ql.add_argument("--json", action="store_true")
    for name, text in (
        ("show", "one delivery with its items and attempts"),
        ("retry", "re-queue a failed, cancelled or quarantined delivery"),
        ("cancel", "cancel a delivery that is not finished"),
    ):
        sp = with_config(qsub.add_parser(name, help=text))
        sp.add_argument("delivery_id")
        sp.add_argument("--json", action="store_true")

    audit = sub.add_parser("audit", help="the audit log: verify, list")
    asub = audit.add_subparsers(dest="action", required=True)
    with_config(asub.add_parser("verify", help="check the hash chain"))
    al = with_config(asub.add_parser("list", help="list audit records"))
    al.add_argument("--since", type=_when, help="ISO 8601 date or time (UTC if no zone)")
    al.add_argument("--until", type=_when)
    al.add_argument("--ae", help="calling or called AE title")
    al.add_argument("--study", help="Study Instance UID")
    al.add_argument("--type", dest="event_type", help="event type, e.g. c-store")
    al.add_argument("--limit", type=int, default=1000)
    al.add_argument("--json", action="store_true")

    cli_keys.add_parsers(sub, with_config)
    cli_peers.add_parsers(sub, with_config)

    de = sub.add_parser(
        "deid", help="de-identify files or folders by a profile, with the leak gate"
    )
    de.add_argument("-c", "--config", metavar="FILE", help="node configuration (for its state dir)")
    de.add_argument("--profile", required=True, help="a name in deid_profiles/ or a path")
    de.add_argument("--out", required=True, metavar="DIR", help="output folder")
    de.add_argument("--secret", metavar="FILE", help="project secret file")
    de.add_argument("--report", metavar="FILE", help="write the JSON report here")
    de.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders (recursive)")
    cli_pixels.add_parsers(sub)
    return p


def _when(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 date or time, got {text!r}"
        ) from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "deid":
        return _deid(args)
    if args.command == "ca":
        return cli_keys.run_ca(args)
    if args.command == "pixels":
        return cli_pixels.run(args)
    try:
        cfg = load_config(args.config)
        if args.command in ("check-config", "serve"):
            from gateway.transfer.prepare import check_profiles

            check_profiles(cfg)
    except ConfigError as exc:
        print(f"dicom-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "check-config":
            print(
                f"{args.config}: OK ({len(cfg.destinations)} destination(s), "
                f"{len(cfg.routes)} route(s))"
            )
            return 0
        if args.command == "serve":
            return _serve(cfg)
        if args.command in ("worker", "receiver"):
            return _child(cfg, args)
        if args.command == "keys":
            return cli_keys.run_keys(cfg, args)
        if args.command == "peers":
            return cli_peers.run_peers(cfg, args)
        db = Database(cfg.database_url, busy_timeout=cfg.database.busy_timeout)
        try:
            db.migrate()
            if args.command == "queue":
                return _queue(db, args)
            return _audit(db, args)
        finally:
            db.dispose()
    except GatewayError as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return 1


def _child(cfg: GatewayConfig, args: argparse.Namespace) -> int:
    """A process that serve starts itself: its delivery worker or a receiver."""
    from gateway.logging import configure
    from gateway.receiver_process import run_receiver
    from gateway.worker_process import run_worker

    configure()
    if args.command == "worker":
        return run_worker(
            cfg, wake_fd=args.wake_fd, ready_fd=args.ready_fd, config_sha256=args.config_sha256
        )
    return run_receiver(
        cfg,
        index=args.index,
        listen_fds=args.listen_fd,
        link_fd=args.link_fd,
        ready_fd=args.ready_fd,
        config_sha256=args.config_sha256,
    )


def _serve(cfg: GatewayConfig) -> int:
    from gateway.app import Node
    from gateway.logging import configure
    from gateway.worker_process import ChildStartError, stop_signals

    configure()
    statelock.acquire(cfg.state_dir)  # before anything is made or swept in the state dir
    node = Node(cfg)
    # new associations refused as soon as a stop is asked for, by each process
    stop = stop_signals(
        [signal.SIGTERM, signal.SIGINT], at_once=node.server.refuse_new_associations
    )
    try:
        node.start()
    except ChildStartError as exc:  # its worker or a receiver process did not start
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        node.stop(grace=1.0)
        return 1
    print(
        f"dicom-gateway: {cfg.dicom.ae_title} listening on {cfg.dicom.host}:{node.server.port}"
        + (f", TLS on port {node.server.tls_port}" if node.server.tls_port else ""),
        file=sys.stderr,
        flush=True,
    )
    stop.wait()  # stop_signals wakes it whichever thread the kernel gave the signal to
    node.stop()
    return 0


def _delivery_row(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "state": d.state,
        "destination": d.destination,
        "route": d.route_name,
        "profile": d.profile,
        "study_instance_uid": d.study_instance_uid,
        "instances": d.instance_count,
        "sent": d.sent_count,
        "warnings": d.warning_count,
        "failed": d.failed_count,
        "attempts": d.attempts,
        "next_attempt_at": d.next_attempt_at.isoformat(),
        "created_at": d.created_at.isoformat(),
        "updated_at": d.updated_at.isoformat(),
        "last_error": d.last_error,
    }


def _queue(db: Database, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    if args.action == "list":
        with db.session() as s:
            q = select(Delivery).order_by(Delivery.created_at.desc()).limit(args.limit)
            if args.state:
                q = q.where(Delivery.state == args.state)
            rows = [_delivery_row(d) for d in s.execute(q).scalars()]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'ID':32}  {'STATE':23}  {'DESTINATION':16}  {'SENT':>9}  {'TRIES':>5}  ERROR")
            for r in rows:
                print(
                    f"{r['id']:32}  {r['state']:23}  {r['destination']:16}  "
                    f"{r['sent']:>4}/{r['instances']:<4}  {r['attempts']:>5}  {r['last_error']}"
                )
        return 0
    with db.session() as s:
        d = s.get(Delivery, args.delivery_id)
        if d is None:
            print(f"dicom-gateway: no delivery {args.delivery_id!r}", file=sys.stderr)
            return 1
        try:
            if args.action == "retry":
                deliveries.admin_retry(s, d, now=now)
            elif args.action == "cancel":
                deliveries.admin_cancel(d, now=now)
        except TransitionError as exc:
            print(
                f"dicom-gateway: cannot {args.action} delivery {d.id} in state {d.state}: {exc}",
                file=sys.stderr,
            )
            return 1
        row = _delivery_row(d)
        if args.action == "show":
            items = s.execute(
                select(DeliveryItem, Instance.sop_instance_uid)
                .join(Instance, Instance.id == DeliveryItem.instance_id)
                .where(DeliveryItem.delivery_id == d.id)
                .order_by(DeliveryItem.id)
            )
            row["items"] = [
                {
                    "sop_instance_uid": uid,
                    "state": it.state,
                    "status": it.status,
                    "reason": it.reason,
                }
                for it, uid in items
            ]
            row["attempt_log"] = [
                {
                    "number": a.number,
                    "worker": a.worker,
                    "outcome": a.outcome,
                    "reason": a.reason,
                    "started_at": a.started_at.isoformat(),
                    "finished_at": a.finished_at.isoformat(),
                    "sent": a.sent,
                    "warnings": a.warnings,
                    "failed": a.failed,
                }
                for a in s.execute(
                    select(DeliveryAttempt)
                    .where(DeliveryAttempt.delivery_id == d.id)
                    .order_by(DeliveryAttempt.id)
                ).scalars()
            ]
    if args.json or args.action == "show":
        print(json.dumps(row, indent=2))
    else:
        print(f"delivery {row['id']}: {row['state']}")
    return 0


def _audit(db: Database, args: argparse.Namespace) -> int:
    if args.action == "verify":
        with db.session() as s:
            try:
                count = verify(s)
            except AuditChainError as exc:
                print(f"audit chain BROKEN at row {exc.sequence}: {exc.reason}", file=sys.stderr)
                return 1
        print(f"audit chain OK: {count} record(s)")
        return 0
    with db.session() as s:
        q = select(AuditEvent).order_by(AuditEvent.seq)
        if args.since:
            q = q.where(AuditEvent.recorded_at >= args.since)
        if args.until:
            q = q.where(AuditEvent.recorded_at <= args.until)
        if args.ae:
            q = q.where(
                (AuditEvent.calling_ae_title == args.ae) | (AuditEvent.called_ae_title == args.ae)
            )
        if args.study:
            q = q.where(AuditEvent.study_instance_uid == args.study)
        if args.event_type:
            q = q.where(AuditEvent.event_type == args.event_type)
        rows = [
            {
                "seq": e.seq,
                "recorded_at": e.recorded_at.isoformat(),
                "event_type": e.event_type,
                "outcome": e.outcome,
                "node": e.node,
                "calling_ae_title": e.calling_ae_title,
                "called_ae_title": e.called_ae_title,
                "address": e.address,
                "sop_class_uid": e.sop_class_uid,
                "sop_instance_uid": e.sop_instance_uid,
                "study_instance_uid": e.study_instance_uid,
                "delivery_id": e.delivery_id,
                "status": e.status,
                "detail": json.loads(e.detail),
            }
            for e in s.execute(q.limit(args.limit)).scalars()
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            status = "" if r["status"] is None else f"0x{r['status']:04X}"
            print(
                f"{r['seq']:>7}  {r['recorded_at']}  {r['event_type']:16}  {r['outcome']:9}  "
                f"{r['calling_ae_title']:>16} -> {r['called_ae_title']:16}  {status:6}  "
                f"{r['sop_instance_uid'] or r['study_instance_uid']}"
            )
    return 0


def _deid(args: argparse.Namespace) -> int:
    """``deid``: de-identify inputs into ``--out``; exit 1 naming every quarantined file."""
    from pathlib import Path

    from gateway.deid import ProjectKey, deidentify_file, generate_secret_file, load_profile
    from gateway.errors import DeidError, ProfileError

    try:
        cfg = load_config(args.config) if args.config else None
        if cfg is not None:
            from gateway.transfer.prepare import resolve_profile

            profile = resolve_profile(cfg, args.profile)
        else:
            profile = load_profile(args.profile)
        if args.secret:
            secret = Path(args.secret)
        elif cfg is not None and cfg.deid.secret_file is not None:
            secret = cfg.deid.secret_file
        else:
            # the node's development secret, so the CLI and the node make the same pseudonyms
            secret = cfg.deid_secret_file if cfg is not None else Path("var/deid-secret.key")
            if not secret.exists():
                generate_secret_file(secret)
            print(
                f"dicom-gateway: WARNING: no --secret; using the development secret {secret}",
                file=sys.stderr,
            )
        key = ProjectKey.from_file(secret)
    except (ConfigError, ProfileError, DeidError, OSError) as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return 2
    files: list[Path] = []
    for name in args.inputs:
        p = Path(name)
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    report: dict[str, Any] = {"profile": profile.name, "key_id": key.key_id, "files": []}
    quarantined = 0
    for n, f in enumerate(files, 1):
        entry: dict[str, Any] = {"input": str(f)}
        try:
            result = deidentify_file(f, args.out, profile, key)
            entry.update(output=str(result.path), **result.report.to_dict())
        except DeidError as exc:
            quarantined += 1
            entry["quarantined"] = str(exc)
            print(f"\rdicom-gateway: QUARANTINED {f}: {exc}", file=sys.stderr)
        report["files"].append(entry)
        done = int(30 * n / len(files))
        print(f"\r[{'#' * done}{'.' * (30 - done)}] {n}/{len(files)}", end="", file=sys.stderr)
    print(file=sys.stderr)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    print(f"{len(files) - quarantined} clean, {quarantined} quarantined", file=sys.stderr)
    return 1 if quarantined else 0


if __name__ == "__main__":
    sys.exit(main())
