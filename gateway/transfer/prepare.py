"""The de-identification step of the transfer pipeline (PS3.15 Annex E, fail closed).

For a delivery whose route names a profile, every instance is de-identified into the
delivery's folder under ``spool/outgoing/`` and must pass the leak gate before anything of
the delivery is sent. Any failure raises :class:`~gateway.errors.QuarantineError` with a
reason naming tag paths and error types, never values; the worker then quarantines the
delivery. Profiles are read once at every attempt (at its first instance), so a fixed
profile applies when an admin re-queues a quarantined delivery, and every instance of an
attempt has the same one.

The instance is read as plaintext through the spool (verified envelope segments) and the
prepared output is written back as an envelope under the spool's key-encryption key: a
prepared file is never plaintext on disk either.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from gateway.config import GatewayConfig
from gateway.deid import ProjectKey, deidentify_bytes, generate_secret_file, load_profile
from gateway.deid.profiles import Profile
from gateway.dicom.scu import OutgoingFile
from gateway.errors import ConfigError, DeidError, IntegrityError, ProfileError, QuarantineError
from gateway.spool.store import Spool
from gateway.transfer.pipeline import DeliveryContext

log = logging.getLogger(__name__)


def resolve_profile(cfg: GatewayConfig, name: str) -> Profile:
    """Load a profile by name from ``deid.profiles_dirs`` first, then the shipped folder."""
    for folder in cfg.deid.profiles_dirs:
        if (folder / f"{name}.toml").is_file():
            return load_profile(name, folder)
    return load_profile(name)


def check_profiles(cfg: GatewayConfig) -> None:
    """Fail fast at start-up (and in check-config) on a route or a Q/R grant naming a bad
    profile."""
    for i, route in enumerate(cfg.routes):
        if route.profile:
            try:
                resolve_profile(cfg, route.profile)
            except ProfileError as exc:
                raise ConfigError(str(cfg.source), f"routes[{i}].profile", str(exc)) from exc
    for i, grant in enumerate(cfg.qr.grants):
        if grant.profile:
            try:
                resolve_profile(cfg, grant.profile)
            except ProfileError as exc:
                raise ConfigError(str(cfg.source), f"qr.grants[{i}].profile", str(exc)) from exc


def project_key(cfg: GatewayConfig) -> ProjectKey:
    """The project secret; a development one is generated in the state folder if none is set."""
    path = cfg.deid_secret_file
    if cfg.deid.secret_file is None and not path.exists():
        generate_secret_file(path)
        log.warning(
            "generated a development de-identification secret; set deid.secret_file for "
            "production and back it up",
            extra={"path": str(path)},
        )
    return ProjectKey.from_file(path)


class DeidStep:
    """Pipeline step: de-identify with the delivery's profile, or pass through without one."""

    def __init__(self, cfg: GatewayConfig, *, outgoing_dir: Path, spool: Spool) -> None:
        self.cfg = cfg
        self.outgoing_dir = outgoing_dir
        self.spool = spool
        self._key: ProjectKey | None = None
        self._summaries: dict[str, dict[str, object]] = {}
        # the profile as read at the attempt's first instance, until release(): read and
        # parsed per instance it was ~0.35 ms of each one's ~3 ms
        self._profiles: dict[str, Profile] = {}

    def key(self) -> ProjectKey:
        if self._key is None:
            self._key = project_key(self.cfg)
        return self._key

    def folder(self, delivery_id: str) -> Path:
        return self.outgoing_dir / delivery_id

    def __call__(self, item: OutgoingFile, delivery: DeliveryContext) -> OutgoingFile:
        if not delivery.profile:
            return item
        try:
            profile = self._profiles.get(delivery.delivery_id)
            if profile is None:
                profile = resolve_profile(self.cfg, delivery.profile)
                self._profiles[delivery.delivery_id] = profile
            out_dir = self.folder(delivery.delivery_id)
            out_dir.mkdir(parents=True, exist_ok=True)
            with self.spool.open_path(item.path) as src:
                data = src.read()
            encoded, uid, report = deidentify_bytes(data, profile, self.key())
            del data
            target = out_dir / f"{uid}.dcm"
            # prepared afresh by every attempt and removed at start: no fsync needed
            self.spool.write_file(target, encoded, durable=False)
            summary = self._summaries.setdefault(
                delivery.delivery_id,
                {
                    "profile": profile.name,
                    "profile_sha256": profile.sha256,
                    "key_id": self.key().key_id,
                    "instances": 0,
                },
            )
            summary["instances"] = int(str(summary["instances"])) + 1
        except ProfileError as exc:
            raise QuarantineError(f"profile {delivery.profile!r} cannot be loaded: {exc}") from None
        except DeidError as exc:
            raise QuarantineError(f"de-identification failed closed: {exc}") from None
        except IntegrityError as exc:
            raise QuarantineError(f"spool file integrity check failed: {exc}") from None
        except OSError as exc:
            raise QuarantineError(f"de-identification output: {exc.strerror}") from None
        return OutgoingFile(
            sop_class_uid=item.sop_class_uid,
            sop_instance_uid=uid,
            transfer_syntax_uid=report.transfer_syntax_uid,
            path=target,
        )

    def summary(self, delivery_id: str) -> dict[str, object]:
        """What de-identification did for this attempt (no values), for the audit record."""
        return dict(self._summaries.get(delivery_id, {}))

    def release(self, delivery_id: str) -> None:
        """Remove the delivery's prepared files once an attempt is over."""
        self._summaries.pop(delivery_id, None)
        self._profiles.pop(delivery_id, None)
        shutil.rmtree(self.folder(delivery_id), ignore_errors=True)
