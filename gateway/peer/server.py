"""The peer endpoint: receives sealed packages over HTTPS with mutual TLS, verifies, ingests.

Wire protocol (JSON answers; ``{"error": CODE, "detail": TEXT}`` on refusal)::

    PUT  /peer/v1/packages/{id}/manifest       body: the signed manifest
         -> {"state": "open", "held": [index, ...]}       what is already staged
         -> {"state": "complete", "manifest": DOC, "receipt": DOC}   already ingested
    PUT  /peer/v1/packages/{id}/instances/{i}  body: instance i sealed for this node (HPKE)
         -> {"held": i}
    POST /peer/v1/packages/{id}/commit
         -> {"state": "complete", "manifest": DOC, "receipt": DOC}
         -> 409 {"error": "incomplete", "missing": [index, ...]}
    POST /peer/v1/qr/find                      body: {"requester", "model", "identifier"}
         -> {"level", "matches": [{keyword: text}], "truncated"}   (federated C-FIND)
    POST /peer/v1/qr/retrieve                  body: the same and "service", "destination"
         -> {"packages": [id, ...], "instances": n}   sent to the asker as sealed packages
         -> 403 {"error": "peer-caller-not-granted"}  the policy refuses (``[[qr.grants]]``)
    POST /peer/v1/qr/packages                  body: {"packages": [id, ...]}
         -> {"states": {id: delivery state}}   the asker's retrieve packages only

The client is identified by its certificate (the trust anchors are exactly the peers'
certificates, see ``channel.py``), and a manifest must be signed by that peer, name it as
sender and this node as recipient. Each sealed instance is opened as it arrives, checked
against its manifest entry (SHA-256 and size) and staged in plaintext under
``<state_dir>/peer-staging/`` (a folder named by a hash of sender and package id; files by
the SHA-256 this node computed). Commit ingests the whole package through
``IngestService.store_batch``: spool, index, routes, audit, the package row and its signed
receipt in one transaction. A package id is taken once: the same id again from the same
sender answers the stored receipt (nothing new is made), from another sender it is refused.
Every refusal is audited as a ``security`` event and counted; the endpoint keeps serving.

The TLS handshake runs per connection under ``handshake_timeout`` (asyncio ``start_tls``
on an accepted plain connection), so failures, plaintext HTTP included, are audited too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol, cast

from aiohttp import web
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from gateway.audit.chain import AuditRecord, append
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.crypto.envelope import EnvelopeWriter
from gateway.crypto.seal import (
    Manifest,
    Receipt,
    document_sha256,
    open_instance_to,
    sign_receipt,
    verify_manifest,
)
from gateway.crypto.tls import certificate_sha256
from gateway.dicom.server import AssociationInfo, StoreRequest
from gateway.durable import fsync_dir
from gateway.errors import (
    CryptoError,
    GatewayError,
    IndexError_,
    IngestError,
    IntegrityError,
    QueryRetrieveError,
)
from gateway.ids import new_id
from gateway.index.db import Database
from gateway.index.models import PeerPackage
from gateway.ingest.service import IngestService
from gateway.metrics import Metrics
from gateway.peer.channel import handshake_reason, server_peer_context
from gateway.peer.material import OwnKeys, PeerTrust
from gateway.spool.store import Spool

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES: Final = 16 << 20
_PACKAGE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CHUNK = 1 << 20
_MANIFEST = "manifest.json"
EXPIRY_INTERVAL = 60.0  # seconds between looks for abandoned packages' staging


class Refusal(Exception):
    """A request the endpoint refuses: HTTP status, a bounded reason code, a message."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        security: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.security = security
        self.extra = extra


def _folder_name(sender: str, package_id: str) -> str:
    # never a name from the wire: a hash of the authenticated sender and the package id
    return hashlib.sha256(f"{sender}\0{package_id}".encode()).hexdigest()[:32]


def _staged_summary(folder: Path) -> tuple[str, str, int]:
    """(sender, package id, instance count) of the manifest staged in ``folder`` (verified
    when it was written), or ("", "", 0) without a readable one."""
    try:
        payload = json.loads((folder / _MANIFEST).read_bytes())["payload"]
        sender, package_id, count = (
            payload["sender"],
            payload["package_id"],
            payload["instance_count"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "", "", 0
    if not isinstance(sender, str) or not isinstance(package_id, str) or not isinstance(count, int):
        return "", "", 0
    return sender, package_id, count


def _write_durable(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{new_id()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Receiver:
    """The endpoint's logic, synchronous (run on executor threads), one method per request."""

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        db: Database,
        ingest: IngestService,
        clock: Clock,
        metrics: Metrics,
        own: OwnKeys,
        peers: Mapping[str, PeerTrust],
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.ingest = ingest
        self.clock = clock
        self.metrics = metrics
        self.own = own
        self.by_cert = {p.certificate_sha256: p for p in peers.values()}
        self.staging = cfg.state_dir / "peer-staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self._commit_lock = threading.Lock()
        self._sweep()

    def _sweep(self) -> None:
        """What a crash left in staging: the folder of a package already ingested (killed
        between the commit and the folder's removal) goes; an open package keeps its manifest
        and verified instances for the sender to resume, and loses its temporary files."""
        for folder in sorted(self.staging.iterdir()):
            if not folder.is_dir():
                continue
            if self._ingested(folder) or not (folder / _MANIFEST).exists():
                shutil.rmtree(folder, ignore_errors=True)
                continue
            for leftover in folder.glob(".*"):  # .plain-*, .ingest-*, .tmp-*
                leftover.unlink(missing_ok=True)

    def expire_staging(self, now: float) -> int:
        """Remove the staging of every open package nothing has been added to for
        ``peer.staging_max_age_seconds`` (its sender stopped before the commit and has not
        come back), each removal audited as ``peer-staging-expired``. Returns how many."""
        max_age = self.cfg.peer.staging_max_age_seconds
        removed = 0
        with self._commit_lock:  # never under a commit reading the folder
            for folder in sorted(self.staging.iterdir()):
                try:
                    entries = list(folder.iterdir())
                    idle = now - max(p.stat().st_mtime for p in [folder, *entries])
                except (NotADirectoryError, FileNotFoundError):
                    continue
                if idle < max_age:
                    continue
                sender, package_id, count = _staged_summary(folder)
                held = sum(1 for p in entries if p.suffix == ".dcm")
                # audited first: a removal is never without its row (a failed one is retried)
                with self.db.session() as s:
                    append(
                        s,
                        AuditRecord(
                            "peer-staging-expired",
                            "success",
                            calling_ae_title=sender[:64],
                            called_ae_title=self.own.name,
                            detail={
                                "package_id": package_id,
                                "sender": sender,
                                "instances": count,
                                "instances_held": held,
                                "idle_seconds": int(idle),
                            },
                        ),
                        node=self.cfg.node.name,
                        now=self.clock.now(),
                    )
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
                log.warning(
                    "abandoned peer package removed from staging",
                    extra={"package_id": package_id, "idle_seconds": int(idle)},
                )
        return removed

    def _ingested(self, folder: Path) -> bool:
        sender, package_id, _count = _staged_summary(folder)
        if not sender or _folder_name(sender, package_id) != folder.name:
            return False
        with self.db.session() as s:
            row = s.get(PeerPackage, package_id)
            return row is not None and row.sender == sender

    # --- identity and audit ---------------------------------------------------------------
    def identify(self, der: bytes | None) -> PeerTrust:
        peer = self.by_cert.get(certificate_sha256(der)) if der else None
        if peer is None:
            raise Refusal(403, "unknown-peer-certificate", "client certificate is no peer's")
        return peer

    def audit_refusal(self, peer: str, address: str, refusal: Refusal, package_id: str) -> None:
        self.metrics.security_events.labels(f"peer-{refusal.reason}").inc()
        detail: dict[str, Any] = {"reason": refusal.reason, "error": refusal.message}
        if package_id:
            detail["package_id"] = package_id
        with self.db.session() as s:
            append(
                s,
                AuditRecord(
                    "security" if refusal.security else "peer-package",
                    "failure",
                    calling_ae_title=peer,
                    called_ae_title=self.own.name,
                    address=address,
                    detail=detail,
                ),
                node=self.cfg.node.name,
                now=self.clock.now(),
            )

    def audit_handshake(self, address: str, reason: str) -> None:
        self.metrics.security_events.labels("peer-tls-handshake-failed").inc()
        with self.db.session() as s:
            append(
                s,
                AuditRecord(
                    "security",
                    "failure",
                    address=address,
                    detail={"reason": "tls-handshake-failed", "error": reason, "channel": "peer"},
                ),
                node=self.cfg.node.name,
                now=self.clock.now(),
            )

    # --- helpers --------------------------------------------------------------------------
    def _folder(self, peer: PeerTrust, package_id: str) -> Path:
        return self.staging / _folder_name(peer.name, package_id)

    def _verify(self, peer: PeerTrust, package_id: str, document: bytes) -> Manifest:
        if not _PACKAGE_ID.fullmatch(package_id):
            raise Refusal(400, "bad-package-id", "package id must be 1-64 of [A-Za-z0-9_.-]")
        try:
            claimed = json.loads(document)["payload"]["sender"]
        except (ValueError, KeyError, TypeError):
            claimed = None
        if claimed != peer.name:
            raise Refusal(403, "sender-mismatch", "manifest sender is not the peer that connected")
        try:
            manifest = verify_manifest(
                document, sender_keys={peer.name: peer.signing_key}, recipient=self.own.name
            )
        except IntegrityError as exc:
            raise Refusal(403, "bad-signature", str(exc)) from None
        except CryptoError as exc:
            raise Refusal(403, "wrong-recipient", str(exc)) from None
        if manifest.package_id != package_id:
            raise Refusal(400, "package-id-mismatch", "manifest is for another package id")
        if manifest.hpke_suite not in self.own.hpke:
            raise Refusal(400, "unsupported-suite", f"no {manifest.hpke_suite.value} key here")
        total = sum(e.size for e in manifest.instances)
        if total > self.cfg.peer.max_package_bytes:
            raise Refusal(413, "package-too-large", f"{total} bytes over max_package_bytes")
        return manifest

    def _committed(self, peer: PeerTrust, package_id: str) -> dict[str, Any] | None:
        with self.db.session() as s:
            row = s.get(PeerPackage, package_id)
            if row is None:
                return None
            if row.sender != peer.name:
                raise Refusal(
                    409, "replayed-package-id", "package id already received from another sender"
                )
            return {"state": "complete", "manifest": row.manifest, "receipt": row.receipt}

    def _staged_manifest(self, peer: PeerTrust, package_id: str) -> tuple[Path, bytes, Manifest]:
        folder = self._folder(peer, package_id)
        try:
            document = (folder / _MANIFEST).read_bytes()
        except FileNotFoundError:
            raise Refusal(409, "no-manifest", "send the manifest first", security=False) from None
        return folder, document, self._verify(peer, package_id, document)

    # --- requests -------------------------------------------------------------------------
    def put_manifest(self, peer: PeerTrust, package_id: str, document: bytes) -> dict[str, Any]:
        manifest = self._verify(peer, package_id, document)
        folder = self._folder(peer, package_id)
        done = self._committed(peer, package_id)
        if done is not None:
            shutil.rmtree(folder, ignore_errors=True)  # left by a crash after the commit
            return done
        folder.mkdir(exist_ok=True)
        _write_durable(folder / _MANIFEST, document)
        held = [
            i for i, e in enumerate(manifest.instances) if (folder / f"{e.sha256}.dcm").exists()
        ]
        return {"state": "open", "held": held}

    def instance_limit(self, peer: PeerTrust, package_id: str, index: int) -> tuple[Path, int]:
        """Where to write sealed instance ``index`` and the most bytes it may take."""
        folder, _document, manifest = self._staged_manifest(peer, package_id)
        if not 0 <= index < manifest.instance_count:
            raise Refusal(400, "bad-index", f"no instance {index} in the manifest")
        size = manifest.instances[index].size
        return folder, size + 16 * (size // 1024 + 2) + 8192

    def put_instance(
        self, peer: PeerTrust, package_id: str, index: int, sealed: Path
    ) -> dict[str, Any]:
        folder, _document, manifest = self._staged_manifest(peer, package_id)
        entry = manifest.instances[index]
        target = folder / f"{entry.sha256}.dcm"
        plain = folder / f".plain-{new_id()}"
        keyring = self.ingest.spool.keyring
        try:
            with sealed.open("rb") as src, plain.open("wb") as dst:
                # staged as an envelope under the spool's key: committed to the spool as is
                sink = dst if keyring is None else EnvelopeWriter(dst, keyring.current)
                open_instance_to(
                    src,
                    cast(BinaryIO, sink),
                    self.own.hpke[manifest.hpke_suite],
                    package_id=package_id,
                    index=index,
                    expected=entry,
                )
                if isinstance(sink, EnvelopeWriter):
                    sink.close()
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(plain, target)
            fsync_dir(folder)
        except CryptoError as exc:  # IntegrityError included
            raise Refusal(422, "instance-does-not-verify", str(exc)) from None
        finally:
            plain.unlink(missing_ok=True)
            sealed.unlink(missing_ok=True)
        return {"held": index}

    def commit(self, peer: PeerTrust, address: str, package_id: str) -> dict[str, Any]:
        with self._commit_lock:
            done = self._committed(peer, package_id)
            if done is not None:
                shutil.rmtree(self._folder(peer, package_id), ignore_errors=True)
                return done
            folder, document, manifest = self._staged_manifest(peer, package_id)
            missing = [
                i
                for i, e in enumerate(manifest.instances)
                if not (folder / f"{e.sha256}.dcm").exists()
            ]
            if missing:
                raise Refusal(
                    409,
                    "incomplete",
                    f"{len(missing)} instance(s) not received",
                    security=False,
                    extra={"missing": missing},
                )
            requests = []
            for i, entry in enumerate(manifest.instances):
                link = folder / f".ingest-{i}-{new_id()}"
                os.link(folder / f"{entry.sha256}.dcm", link)
                requests.append(_request_for(link, self.ingest.spool))
            try:
                response = self._ingest(peer, address, document, manifest, requests)
            finally:
                for r in requests:
                    r.dataset_path.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            return response

    def _ingest(
        self,
        peer: PeerTrust,
        address: str,
        document: bytes,
        manifest: Manifest,
        requests: list[StoreRequest],
    ) -> dict[str, Any]:
        info = AssociationInfo(
            association_id=new_id(),
            calling_ae_title=peer.name,
            called_ae_title=self.cfg.dicom.ae_title,
            address=address,
        )
        manifest_sha256 = document_sha256(document)
        receipt_doc: list[bytes] = []

        def within(s: Any, now: Any) -> None:
            receipt = Receipt(
                package_id=manifest.package_id,
                sender=peer.name,
                recipient=self.own.name,
                manifest_sha256=manifest_sha256,
                instance_count=manifest.instance_count,
                received=now,
            )
            doc = sign_receipt(receipt, self.own.signing_key)
            receipt_doc.append(doc)
            s.add(
                PeerPackage(
                    package_id=manifest.package_id,
                    sender=peer.name,
                    manifest_sha256=manifest_sha256,
                    manifest=document.decode("ascii"),
                    receipt=doc.decode("ascii"),
                    instance_count=manifest.instance_count,
                    received_at=now,
                )
            )
            s.flush()  # a package id taken meanwhile fails here, before anything commits
            append(
                s,
                AuditRecord(
                    "peer-package",
                    "success",
                    calling_ae_title=peer.name,
                    called_ae_title=self.own.name,
                    address=address,
                    detail={
                        "package_id": manifest.package_id,
                        "sender": peer.name,
                        "instances": manifest.instance_count,
                        "manifest_sha256": manifest_sha256,
                        "receipt_sha256": document_sha256(doc),
                        "profile": manifest.profile_name,
                        "profile_sha256": manifest.profile_sha256,
                        "trace_id": manifest.trace_id,
                        "hpke_suite": manifest.hpke_suite.value,
                    },
                ),
                node=self.cfg.node.name,
                now=now,
            )

        try:
            self.ingest.store_batch(info, requests, within, event_type="peer-store")
        except IngestError as exc:
            raise Refusal(
                422, "instance-not-accepted", f"{exc.reason} (0x{exc.status:04X})", security=False
            ) from None
        except IndexError_:
            done = self._committed(peer, manifest.package_id)  # a concurrent commit won
            if done is None:
                raise
            return done
        log.info(
            "peer package ingested",
            extra={"package_id": manifest.package_id, "trace_id": manifest.trace_id},
        )
        return {
            "state": "complete",
            "manifest": document.decode("ascii"),
            "receipt": receipt_doc[0].decode("ascii"),
        }


def _request_for(path: Path, spool: Spool) -> StoreRequest:
    try:
        with spool.open_path(path) as fp:
            meta = dcmread(fp, stop_before_pixels=True, specific_tags=[0x00080016]).file_meta
        return StoreRequest(
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            transfer_syntax_uid=str(meta.TransferSyntaxUID),
            dataset_path=path,
        )
    except (InvalidDicomError, AttributeError, OSError, ValueError, CryptoError) as exc:
        path.unlink(missing_ok=True)
        raise Refusal(
            422, "instance-not-dicom", "an instance has no DICOM file meta", security=False
        ) from exc


# --- HTTP -------------------------------------------------------------------------------------


class _TLSAcceptor(asyncio.Protocol):
    """Accepts a plain TCP connection and runs the TLS handshake under a deadline before
    handing the connection to aiohttp; a failed handshake is audited."""

    def __init__(self, server: PeerServer, factory: Callable[[], asyncio.Protocol]) -> None:
        self.server = server
        self.factory = factory

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        peername = transport.get_extra_info("peername")
        address = str(peername[0]) if peername else ""
        handler = self.factory()
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport,
                handler,
                self.server.ssl_context,
                server_side=True,
                ssl_handshake_timeout=self.server.cfg.peer.handshake_timeout,
            )
        except (OSError, asyncio.CancelledError) as exc:
            transport.abort()
            if isinstance(exc, asyncio.CancelledError):
                raise
            reason = handshake_reason(exc)
            log.info("peer TLS handshake failed", extra={"address": address, "reason": reason})
            await loop.run_in_executor(None, self.server.receiver.audit_handshake, address, reason)
            return
        if tls is None:
            transport.abort()
            return
        handler.connection_made(tls)


class QueryResponder(Protocol):
    """Answers federated query/retrieve requests (:mod:`gateway.qr.responder`); raises
    :class:`~gateway.errors.QueryRetrieveError` to refuse (having audited the refusal)."""

    def find(self, peer: str, address: str, body: Mapping[str, Any]) -> dict[str, Any]: ...

    def retrieve(self, peer: str, address: str, body: Mapping[str, Any]) -> dict[str, Any]: ...

    def package_states(
        self, peer: str, address: str, body: Mapping[str, Any]
    ) -> dict[str, Any]: ...


class PeerServer:
    """Runs the endpoint on its own thread and event loop inside the serve process."""

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        db: Database,
        ingest: IngestService,
        clock: Clock,
        metrics: Metrics,
        own: OwnKeys,
        peers: Mapping[str, PeerTrust],
        qr_responder: QueryResponder | None = None,
    ) -> None:
        self.cfg = cfg
        self.qr_responder = qr_responder
        self.metrics = metrics
        self.receiver = Receiver(
            cfg, db=db, ingest=ingest, clock=clock, metrics=metrics, own=own, peers=peers
        )
        self.ssl_context = server_peer_context(cfg, peers.values())
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = cfg.peer.port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._run, name="peer-server", daemon=True)
        self._thread.start()
        self._started.wait(timeout)
        if self._error is not None:
            raise GatewayError(f"peer endpoint did not start: {self._error}") from self._error

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start())
        except (OSError, GatewayError) as exc:
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._cleanup())
            loop.close()

    async def _start(self) -> None:
        app = web.Application(client_max_size=MAX_MANIFEST_BYTES)
        app.router.add_put("/peer/v1/packages/{package_id}/manifest", self._manifest)
        app.router.add_put("/peer/v1/packages/{package_id}/instances/{index}", self._instance)
        app.router.add_post("/peer/v1/packages/{package_id}/commit", self._commit)
        if self.qr_responder is not None:
            app.router.add_post("/peer/v1/qr/find", self._qr_find)
            app.router.add_post("/peer/v1/qr/retrieve", self._qr_retrieve)
            app.router.add_post("/peer/v1/qr/packages", self._qr_packages)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        factory = self._runner.server
        assert factory is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _TLSAcceptor(self, factory),
            host=self.cfg.peer.host,
            port=self.cfg.peer.port,
            reuse_address=True,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        expiry = loop.create_task(self._expire_staging())
        self.tasks.add(expiry)
        expiry.add_done_callback(self.tasks.discard)

    async def _expire_staging(self) -> None:
        """Abandoned packages' staging removed at start and every ``EXPIRY_INTERVAL``."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, self.receiver.expire_staging, time.time())
            except (OSError, IndexError_):
                log.warning("peer staging not expired this time", exc_info=True)
            await asyncio.sleep(EXPIRY_INTERVAL)

    async def _cleanup(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self.tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self, grace: float = 10.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(grace)

    # --- handlers -------------------------------------------------------------------------
    async def _guarded(
        self, request: web.Request, work: Callable[[PeerTrust, str], Any]
    ) -> web.Response:
        loop = asyncio.get_running_loop()
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        peername = transport.get_extra_info("peername") if transport else None
        address = str(peername[0]) if peername else ""
        package_id = request.match_info.get("package_id", "")
        peer_name = ""
        try:
            if not isinstance(ssl_object, ssl.SSLObject):
                raise Refusal(403, "not-tls", "the peer endpoint speaks HTTPS only")
            peer = self.receiver.identify(ssl_object.getpeercert(binary_form=True))
            peer_name = peer.name
            result = await work(peer, address)
            return web.json_response(result)
        except Refusal as refusal:
            log.warning(
                "peer request refused",
                extra={"reason": refusal.reason, "peer": peer_name, "address": address},
            )
            await loop.run_in_executor(
                None,
                self.receiver.audit_refusal,
                peer_name,
                address,
                refusal,
                package_id if _PACKAGE_ID.fullmatch(package_id) else "",
            )
            body = {"error": refusal.reason, "detail": refusal.message, **(refusal.extra or {})}
            return web.json_response(body, status=refusal.status)
        except QueryRetrieveError as exc:  # a federated query refused (audited by the responder)
            self.metrics.security_events.labels("peer-qr-refused").inc()
            log.warning("peer query refused", extra={"reason": exc.reason, "peer": peer_name})
            status = 403 if exc.status == 0x0124 else 400
            return web.json_response(
                {"error": exc.reason, "detail": f"0x{exc.status:04X}"}, status=status
            )
        except GatewayError as exc:
            log.warning("peer request failed", extra={"error": exc.__class__.__name__})
            return web.json_response(
                {"error": "unavailable", "detail": exc.__class__.__name__}, status=503
            )

    async def _manifest(self, request: web.Request) -> web.Response:
        package_id = request.match_info["package_id"]

        async def work(peer: PeerTrust, _address: str) -> Any:
            body = await request.read()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                None, self.receiver.put_manifest, peer, package_id, body
            )

        return await self._guarded(request, work)

    async def _instance(self, request: web.Request) -> web.Response:
        package_id = request.match_info["package_id"]

        async def work(peer: PeerTrust, _address: str) -> Any:
            try:
                index = int(request.match_info["index"])
            except ValueError:
                raise Refusal(400, "bad-index", "instance index must be an integer") from None
            loop = asyncio.get_running_loop()
            folder, limit = await loop.run_in_executor(
                None, self.receiver.instance_limit, peer, package_id, index
            )
            sealed = folder / f".sealed-{new_id()}"
            received = 0
            try:
                with sealed.open("wb") as out:
                    async for chunk in request.content.iter_chunked(_CHUNK):
                        received += len(chunk)
                        if received > limit:
                            raise Refusal(
                                413, "instance-too-large", "sealed instance exceeds its manifest"
                            )
                        out.write(chunk)
            except BaseException:
                sealed.unlink(missing_ok=True)
                raise
            return await loop.run_in_executor(
                None, self.receiver.put_instance, peer, package_id, index, sealed
            )

        return await self._guarded(request, work)

    async def _qr(self, request: web.Request, action: str) -> web.Response:
        responder = self.qr_responder
        assert responder is not None

        async def work(peer: PeerTrust, address: str) -> Any:
            try:
                body = json.loads(await request.read())
            except ValueError:
                raise Refusal(400, "bad-request", "a JSON body", security=False) from None
            if not isinstance(body, dict):
                raise Refusal(400, "bad-request", "a JSON object", security=False)
            loop = asyncio.get_running_loop()
            method = {
                "find": responder.find,
                "retrieve": responder.retrieve,
                "packages": responder.package_states,
            }[action]
            return await loop.run_in_executor(None, method, peer.name, address, body)

        return await self._guarded(request, work)

    async def _qr_find(self, request: web.Request) -> web.Response:
        return await self._qr(request, "find")

    async def _qr_retrieve(self, request: web.Request) -> web.Response:
        return await self._qr(request, "retrieve")

    async def _qr_packages(self, request: web.Request) -> web.Response:
        return await self._qr(request, "packages")

    async def _commit(self, request: web.Request) -> web.Response:
        package_id = request.match_info["package_id"]

        async def work(peer: PeerTrust, address: str) -> Any:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self.receiver.commit, peer, address, package_id)

        return await self._guarded(request, work)
