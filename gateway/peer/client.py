"""Sending a delivery to a peer node as a sealed package: the sealing step and the destination.

:class:`SealStep` is the pipeline's last step for ``type = "peer"`` destinations: it seals
each prepared (de-identified) instance for the recipient's HPKE key into
``spool/outgoing/sealed/<delivery id>/`` as it comes, streamed, and records its manifest
entry (SHA-256 and size of the plaintext, its index). :class:`PeerDestination` then signs
the manifest (package id = delivery id, sender, recipient, every instance's SHA-256, the
de-identification profile's name and hash, creation time, a trace id) and talks to the
peer's endpoint (see ``server.py`` for the protocol): manifest first, the answer says what
the peer already holds, only the rest is uploaded, then commit. The peer's signed receipt
is verified against the manifest, kept in ``peer_receipts`` with the delivery and audited
(``peer-receipt``) before any instance is reported sent.

Connection failures, timeouts and 5xx answers are retryable (the next attempt resumes);
a refusal (4xx) fails the delivery. A re-sent package creates nothing new at the peer:
it answers the receipt it signed the first time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.audit.chain import AuditRecord, append
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.crypto.seal import (
    HpkeSuite,
    InstanceEntry,
    Manifest,
    document_sha256,
    seal_instance,
    sign_manifest,
    verify_manifest,
    verify_receipt,
)
from gateway.dicom.scu import OutgoingFile
from gateway.errors import (
    CryptoError,
    IntegrityError,
    PermanentError,
    QuarantineError,
    RetryableError,
    TLSRefusedError,
)
from gateway.ids import new_id
from gateway.index.db import Database
from gateway.index.models import Delivery, PeerReceipt
from gateway.peer.channel import client_peer_context
from gateway.peer.material import OwnKeys, PeerTrust
from gateway.preamble import ZeroPreambleReader
from gateway.spool.store import Spool
from gateway.transfer.destinations import Report, SendResult
from gateway.transfer.pipeline import DeliveryContext

log = logging.getLogger(__name__)

NO_PROFILE_SHA256 = "0" * 64
"""The manifest's profile hash when a delivery was sent without de-identification."""


@dataclass
class _Package:
    delivery_id: str
    peer: str
    suite: HpkeSuite
    folder: Path
    thread: int
    entries: list[InstanceEntry] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)


class SealStep:
    """Pipeline step: seal each instance of a peer delivery for the recipient node."""

    def __init__(
        self,
        cfg: GatewayConfig,
        peers: Mapping[str, PeerTrust],
        *,
        folder: Path,
        profile_of: Callable[[str], Mapping[str, object]],
        spool: Spool,
    ) -> None:
        self.peers = peers
        self.spool = spool  # instances are read as verified plaintext through it
        self.folder = folder
        self.suite = HpkeSuite(cfg.peer.suite)
        self.targets = {d.name: d.peer for d in cfg.destinations if d.type == "peer"}
        if cfg.qr.grants:  # federated retrieves go to the asking peer (gateway.qr.responder)
            self.targets.update({f"peer:{p.name}": p.name for p in cfg.peers})
        self._profile_of = profile_of
        # one package per attempt: keyed by the attempt's DeliveryContext object, since two
        # attempts of one delivery may overlap (a lease that expired while preparing)
        self._packages: dict[int, tuple[DeliveryContext, _Package]] = {}
        self._by_path: dict[Path, _Package] = {}
        self._lock = threading.Lock()

    def __call__(self, item: OutgoingFile, delivery: DeliveryContext) -> OutgoingFile:
        peer_name = self.targets.get(delivery.destination)
        if peer_name is None:
            return item
        peer = self.peers[peer_name]
        recipient = peer.hpke.get(self.suite)
        if recipient is None:
            raise PermanentError(f"peer {peer_name} exported no {self.suite.value} HPKE key")
        with self._lock:
            held = self._packages.get(id(delivery))
            if held is None or held[0] is not delivery:
                package = _Package(
                    delivery.delivery_id,
                    peer_name,
                    self.suite,
                    self.folder / delivery.delivery_id / new_id(),
                    threading.get_ident(),
                )
                self._packages[id(delivery)] = (delivery, package)
            else:
                package = held[1]
            index = len(package.entries)
            package.entries.append(InstanceEntry("0" * 64, 0))  # reserved, set below
        package.folder.mkdir(parents=True, exist_ok=True)
        out = package.folder / f"{index}.sealed"
        try:
            with self.spool.open_path(item.path) as src, out.open("wb") as dst:
                # the preamble is never passed on (A18): the peer gets (and the manifest
                # hashes) the instance with a zero preamble
                entry = seal_instance(
                    cast(BinaryIO, ZeroPreambleReader(src)),
                    dst,
                    recipient,
                    package_id=delivery.delivery_id,
                    index=index,
                )
        except IntegrityError as exc:
            raise QuarantineError(f"spool file integrity check failed: {exc}") from None
        except OSError as exc:
            raise RetryableError(f"sealing instance {index}: {exc.strerror}") from None
        with self._lock:
            package.entries[index] = entry
            package.paths.append(out)
            self._by_path[out] = package
        return OutgoingFile(
            sop_class_uid=item.sop_class_uid,
            sop_instance_uid=item.sop_instance_uid,
            transfer_syntax_uid=item.transfer_syntax_uid,
            path=out,
        )

    def package_for(self, files: Sequence[OutgoingFile]) -> tuple[_Package, Mapping[str, object]]:
        with self._lock:
            package = self._by_path.get(files[0].path) if files else None
        if package is None or package.paths != [f.path for f in files]:
            raise PermanentError("peer delivery was not prepared by the sealing step")
        return package, self._profile_of(package.delivery_id)

    def release(self, delivery_id: str) -> None:
        """Drop what this thread prepared for the delivery (an attempt is over)."""
        me = threading.get_ident()
        with self._lock:
            mine = [
                key
                for key, (_ctx, package) in self._packages.items()
                if package.delivery_id == delivery_id and package.thread == me
            ]
            packages = [self._packages.pop(key)[1] for key in mine]
            for package in packages:
                for path in package.paths:
                    self._by_path.pop(path, None)
        for package in packages:
            shutil.rmtree(package.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.folder / delivery_id).rmdir()  # empty unless another attempt runs


class PeerRefused(PermanentError):
    """The peer refused the package (4xx): resending the same will not change that."""


class PeerDestination:
    """Implements the Destination protocol for a ``type = "peer"`` destination."""

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        name: str,
        peer: PeerTrust,
        own: OwnKeys,
        seal: SealStep,
        db: Database,
        clock: Clock,
    ) -> None:
        self.cfg = cfg
        self.name = name
        self.peer = peer
        self.own = own
        self.seal = seal
        self.db = db
        self.clock = clock
        self.ssl_context = client_peer_context(cfg, peer)
        self._own_public: dict[str, ed25519.Ed25519PublicKey] = {
            own.name: own.signing_key.public_key()
        }

    def deliver(
        self, files: Sequence[OutgoingFile], report: Report, should_stop: Callable[[], bool]
    ) -> None:
        if not files:
            return
        package, profile = self.seal.package_for(files)
        trace_id = new_id()
        manifest = Manifest(
            package_id=package.delivery_id,
            sender=self.own.name,
            recipient=self.peer.name,
            instances=tuple(package.entries),
            profile_name=str(profile.get("profile", "")),
            profile_sha256=str(profile.get("profile_sha256", "") or NO_PROFILE_SHA256),
            created=self.clock.now(),
            trace_id=trace_id,
            hpke_suite=package.suite,
        )
        document = sign_manifest(manifest, self.own.signing_key)
        try:
            answer = asyncio.run(self._send(document, package.paths, should_stop))
        except aiohttp.ClientConnectorCertificateError as exc:
            # a security event; retried, so a fixed certificate lets the package go (F14)
            error = exc.certificate_error
            reason = getattr(error, "verify_message", "") or str(error)
            raise TLSRefusedError(f"peer {self.peer.name}: {reason}"[:200]) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryableError(
                f"peer {self.peer.name} unreachable: {exc.__class__.__name__}"
            ) from None
        self._keep_receipt(package, manifest, document, answer, trace_id, files)
        for i in range(len(files)):
            report(SendResult(i, "sent", None, ""))

    async def _send(
        self, document: bytes, paths: Sequence[Path], should_stop: Callable[[], bool]
    ) -> dict[str, Any]:
        base = f"{self.peer.url}/peer/v1/packages/{json.loads(document)['payload']['package_id']}"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.peer.timeout, sock_read=self.peer.timeout
        )
        connector = aiohttp.TCPConnector(ssl=self.ssl_context, limit=1)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            answer = await self._call(
                session.put(
                    f"{base}/manifest",
                    data=document,
                    headers={"Content-Type": "application/json"},
                )
            )
            if answer.get("state") == "complete":
                return answer
            held = {int(i) for i in answer.get("held", [])}
            for index, path in enumerate(paths):
                if index in held:
                    continue
                if should_stop():
                    raise RetryableError("node stopping; the transfer resumes at the next attempt")
                with path.open("rb") as body:
                    await self._call(
                        session.put(
                            f"{base}/instances/{index}",
                            data=body,
                            headers={"Content-Type": "application/octet-stream"},
                        )
                    )
            return await self._call(session.post(f"{base}/commit"))

    async def _call(self, request: Any) -> dict[str, Any]:
        async with request as response:
            try:
                body = await response.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError):
                body = {}
            if not isinstance(body, dict):
                body = {}
            if response.status == 200:
                return body
            reason = f"{body.get('error', response.status)}: {body.get('detail', '')}"
            if response.status >= 500 or body.get("error") in ("incomplete", "no-manifest"):
                raise RetryableError(f"peer {self.peer.name} answered {reason}")
            raise PeerRefused(f"peer {self.peer.name} refused the package: {reason}")

    def _keep_receipt(
        self,
        package: _Package,
        manifest: Manifest,
        document: bytes,
        answer: Mapping[str, Any],
        trace_id: str,
        files: Sequence[OutgoingFile] = (),
    ) -> None:
        try:
            held_doc = str(answer["manifest"]).encode("ascii")
            receipt_doc = str(answer["receipt"]).encode("ascii")
            if held_doc != document:
                # committed by an earlier attempt: that manifest must be one we signed, for
                # this peer, holding every instance of this one
                earlier = verify_manifest(
                    held_doc, sender_keys=self._own_public, recipient=self.peer.name
                )
                if earlier.package_id != manifest.package_id or not {
                    e.sha256 for e in manifest.instances
                } <= {e.sha256 for e in earlier.instances}:
                    raise PermanentError(
                        f"peer {self.peer.name} holds package {manifest.package_id} with "
                        "other content"
                    )
            receipt = verify_receipt(
                receipt_doc,
                recipient_keys={self.peer.name: self.peer.signing_key},
                manifest_document=held_doc,
            )
        except (KeyError, UnicodeEncodeError, CryptoError) as exc:
            raise PermanentError(f"peer {self.peer.name} sent no valid receipt: {exc}") from None
        now = self.clock.now()
        with self.db.session() as s:
            if s.get(PeerReceipt, package.delivery_id) is None:
                s.add(
                    PeerReceipt(
                        delivery_id=package.delivery_id,
                        peer=self.peer.name,
                        manifest_sha256=receipt.manifest_sha256,
                        receipt=receipt_doc.decode("ascii"),
                        received_at=now,
                    )
                )
            append(
                s,
                AuditRecord(
                    "peer-receipt",
                    "success",
                    delivery_id=package.delivery_id,
                    detail={
                        "peer": self.peer.name,
                        "package_id": receipt.package_id,
                        "instances": receipt.instance_count,
                        "manifest_sha256": receipt.manifest_sha256,
                        "receipt_sha256": document_sha256(receipt_doc),
                        "received": receipt.received.isoformat(),
                        "trace_id": trace_id,
                        "hpke_suite": manifest.hpke_suite.value,
                    },
                ),
                node=self.cfg.node.name,
                now=now,
            )
            delivery = s.get(Delivery, package.delivery_id)
            if delivery is not None and delivery.route_name.startswith("qr:"):
                # a federated retrieve: each instance is a sub-operation of the peer's request
                for f in files:
                    append(
                        s,
                        AuditRecord(
                            "sub-operation",
                            "success",
                            sop_class_uid=f.sop_class_uid,
                            sop_instance_uid=f.sop_instance_uid,
                            study_instance_uid=delivery.study_instance_uid,
                            delivery_id=package.delivery_id,
                            detail={
                                "service": delivery.route_name.removeprefix("qr:"),
                                "peer": self.peer.name,
                                "package_id": receipt.package_id,
                                "outcome": "completed",
                            },
                        ),
                        node=self.cfg.node.name,
                        now=now,
                    )
        log.info(
            "peer receipt kept",
            extra={"delivery_id": package.delivery_id, "trace_id": trace_id},
        )


def build_peer_destinations(
    cfg: GatewayConfig,
    *,
    peers: Mapping[str, PeerTrust],
    own: OwnKeys,
    seal: SealStep,
    db: Database,
    clock: Clock,
) -> dict[str, PeerDestination]:
    """The ``type = "peer"`` destinations and, with ``[[qr.grants]]``, one ``peer:<name>``
    per peer for what federated retrieves send back (the seal step's targets)."""
    out = {
        d.name: PeerDestination(
            cfg, name=d.name, peer=peers[d.peer], own=own, seal=seal, db=db, clock=clock
        )
        for d in cfg.destinations
        if d.type == "peer"
    }
    for name, peer in seal.targets.items():
        if name not in out:
            out[name] = PeerDestination(
                cfg, name=name, peer=peers[peer], own=own, seal=seal, db=db, clock=clock
            )
    return out
