"""The spool: files written temp -> fsync -> rename -> fsync(dir), named by our own ids.

Layout under the spool root::

    incoming/      files being received (pynetdicom writes here); never read as instances
    objects/ab/    committed objects, ``<key>.dcm``, key = :func:`gateway.ids.new_id`

A name in the spool never holds anything a peer sent (AE titles, UIDs): only our keys.

With a keyring (the node always gives one) every file the node writes here is an envelope
(:mod:`gateway.crypto.envelope`: AES-256-GCM segments under a random data key wrapped by the
current key-encryption key): receive buffers are encrypted as they arrive, so plaintext never
touches the disk. Readers get the verified plaintext through :meth:`Spool.open` /
:meth:`Spool.open_path` (seekable, memory bounded); :meth:`Spool.path_of` is the file itself.

Health (FAULTS F7, "fsyncgate"): an fsync that fails (EIO) may have dropped the dirty pages
it could not write and marked them clean, so a second fsync of the same file would succeed
without the data being on disk. The spool therefore never retries an fsync: the file whose
fsync failed is discarded (its instance refused with 0xA700, never acknowledged) and the
spool is marked unhealthy. While unhealthy every write is refused until a probe (a small file
written, fsync'd and its folder fsync'd in ``incoming/``, then removed) succeeds; probes run
at most once per ``probe_interval`` seconds of monotonic time. ``on_health`` hears every
change (the node audits it and sets ``gateway_spool_healthy``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from gateway.crypto.envelope import EnvelopeWriter, open_envelope_file
from gateway.crypto.keys import Keyring
from gateway.durable import fsync_dir
from gateway.errors import CryptoError, IntegrityError, SpoolError, SpoolFullError
from gateway.ids import new_id

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class SpooledObject:
    """A file that is durable on disk but not yet named in the index."""

    key: str
    path: Path
    size: int
    sha256: str


class Spool:
    def __init__(
        self,
        root: Path,
        *,
        min_free_bytes: int = 0,
        keyring: Keyring | None = None,
        reload_keyring: Callable[[], Keyring] | None = None,
        probe_interval: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """Without ``keyring`` files are plaintext (tools and unit tests only).
        ``reload_keyring`` is called once when an envelope names a key-encryption key the
        keyring lacks (``keys rotate`` ran while the node was up and rewrapped it)."""
        self.root = root
        # for holds(), asked at every send's opens
        self._root_text = os.path.abspath(root)
        self._root_prefix = self._root_text.rstrip(os.sep) + os.sep
        self.min_free_bytes = min_free_bytes
        self.keyring = keyring
        self._reload_keyring = reload_keyring
        self.incoming = root / "incoming"
        self.objects = root / "objects"
        for d in (self.incoming, self.objects):
            d.mkdir(parents=True, exist_ok=True)
        self._make_prefix_folders()
        self.probe_interval = probe_interval
        self._monotonic = monotonic
        self._health_lock = threading.Lock()
        self._unhealthy: str | None = None  # the reason, while unhealthy
        self._last_failure = 0.0
        self.on_health: Callable[[bool, str], None] = lambda healthy, reason: None

    def _make_prefix_folders(self) -> None:
        """Every ``objects/xx`` folder, made once with one fsync of ``objects``: otherwise a
        fresh spool paid a mkdir and a second folder fsync for most of its first few hundred
        instances (:meth:`commit` still makes one that has gone missing)."""
        made = False
        for i in range(256):
            folder = self.objects / f"{i:02x}"
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
                made = True
        if made:
            fsync_dir(self.objects)

    # --- health (fsyncgate) --------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._unhealthy is None

    def _failed(
        self,
        what: str,
        exc: OSError,
        before_report: Callable[[SpoolError], None] | None = None,
    ) -> SpoolError:
        """Record a failed fsync (never retried on that file) and return the error to raise.
        ``before_report(error)`` is called before the health change is reported (whose
        audit writes to the index)."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            error: SpoolError = SpoolFullError("spool filesystem is full")
            if before_report is not None:
                before_report(error)
            return error
        reason = f"{what} failed: {errno.errorcode.get(exc.errno or 0, 'error')}"
        with self._health_lock:
            changed = self._unhealthy is None
            self._unhealthy = reason
            self._last_failure = self._monotonic()
        error = SpoolError(f"spool unhealthy: {reason}")
        if before_report is not None:
            before_report(error)
        if changed:
            log.error("spool marked unhealthy", extra={"reason": reason})
            self.on_health(False, reason)
        return error

    def _fsync(self, fd: int, what: str) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            raise self._failed(what, exc) from exc

    def _fsync_dir(
        self, path: Path, before_report: Callable[[SpoolError], None] | None = None
    ) -> None:
        try:
            fsync_dir(path)
        except OSError as exc:
            raise self._failed("fsync of a spool folder", exc, before_report) from exc

    def ensure_healthy(self) -> None:
        """Raise :class:`SpoolError` while the spool is unhealthy and a probe (at most one per
        ``probe_interval``) does not succeed; a successful probe makes it healthy again."""
        if self._unhealthy is None:
            return
        with self._health_lock:
            reason = self._unhealthy
            if reason is None:
                return
            if self._monotonic() - self._last_failure < self.probe_interval:
                raise SpoolError(f"spool unhealthy: {reason}")
            self._last_failure = self._monotonic()
            probe = self.incoming / f".probe-{new_id()}"
            try:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, os.urandom(4096))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fsync_dir(self.incoming)
            except OSError as exc:
                raise SpoolError(f"spool unhealthy: {reason}; probe failed") from exc
            finally:
                with contextlib.suppress(OSError):
                    probe.unlink()
            self._unhealthy = None
        log.warning("spool healthy again (probe succeeded)", extra={"after": reason})
        self.on_health(True, reason)

    # --- writing -------------------------------------------------------------------------
    def check_space(self) -> None:
        """Raise :class:`SpoolFullError` when free space is below the high-water mark."""
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            raise SpoolError(f"spool not accessible: {exc.strerror}") from exc
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes:
            raise SpoolFullError(f"spool free space {free} below the mark {self.min_free_bytes}")

    def digest(self, path: Path) -> tuple[int, str]:
        """Size and SHA-256 of a file's plaintext, read in chunks (IntegrityError if an
        envelope does not verify)."""
        h = hashlib.sha256()
        size = 0
        with self.open_path(path) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
        return size, h.hexdigest()

    def commit(self, temp: Path, *, size: int, sha256: str) -> SpooledObject:
        """Make ``temp`` durable under a fresh key: fsync the file, rename, fsync the folder.

        A failed fsync is never retried (see the module's doc): the file is not renamed, or,
        when the folder's fsync failed, the renamed file is removed again, and SpoolError
        (the spool is now unhealthy) refuses the instance. The three steps are also
        :meth:`sync_file`, :meth:`name` and :meth:`sync_name`, for a caller that does other
        work while one of them waits for the disk."""
        self.sync_file(temp)
        obj = self.name(temp, size=size, sha256=sha256)
        self.sync_name(obj)
        return obj

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """An OSError of a spool write as SpoolFullError (no space) or SpoolError."""
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError("spool filesystem is full") from exc
            raise SpoolError(f"spool write failed: {exc.strerror}") from exc

    def sync_file(self, temp: Path) -> None:
        """The first step of :meth:`commit`: fsync the received file ``temp``."""
        with self.file_sync(temp) as fsync:
            fsync()

    @contextlib.contextmanager
    def file_sync(self, temp: Path) -> Iterator[Callable[[], None]]:
        """:meth:`sync_file` prepared: the spool's health checked and ``temp`` opened on
        entry, the call given fsyncs it, the file closed on exit.

        For a caller that hands CPU work to another thread and then waits in the fsync
        itself: every system call lets the interpreter lock go, and the other thread, woken
        by the hand-over, takes it at the first one (the open). This thread then gets it
        back only when that thread lets it go (its work done, or the interpreter's switch
        interval, 5 ms), and starts the fsync only then. Prepared, nothing but the fsync
        lies between the hand-over and the wait for the disk."""
        self.ensure_healthy()
        with self._writing():
            fd = os.open(temp, os.O_RDONLY)
        try:
            yield lambda: self._fsync(fd, "fsync of a received file")
        finally:
            with self._writing():
                os.close(fd)

    def name(self, temp: Path, *, size: int, sha256: str) -> SpooledObject:
        """The second step of :meth:`commit`: rename the fsync'd ``temp`` to a fresh key.
        The name is not durable until :meth:`sync_name` has returned."""
        key = new_id()
        final = self.path_of(key)
        with self._writing():
            parent = final.parent
            if not parent.exists():
                parent.mkdir(exist_ok=True)
                self._fsync_dir(self.objects)
            os.rename(temp, final)
        return SpooledObject(key=key, path=final, size=size, sha256=sha256)

    def sync_name(
        self, obj: SpooledObject, *, failed: Callable[[SpoolError], None] | None = None
    ) -> None:
        """The last step of :meth:`commit`: fsync the folder that holds ``obj``'s name; when
        that fails, the file is removed again and SpoolError raised. ``failed(error)`` is
        called first, before the spool's health change is reported: that report's audit
        writes to the index, so a caller whose index transaction waits for this fsync on
        another thread must hear of the failure before it."""
        with self.name_sync(obj, failed=failed) as fsync:
            fsync()

    @contextlib.contextmanager
    def name_sync(
        self, obj: SpooledObject, *, failed: Callable[[SpoolError], None] | None = None
    ) -> Iterator[Callable[[], None]]:
        """:meth:`sync_name` prepared, as :meth:`file_sync` prepares :meth:`sync_file`: the
        folder opened on entry (a failed open is a failed fsync of it), the call given
        fsyncs it, the folder closed on exit."""
        folder = obj.path.parent

        def lost(exc: OSError) -> SpoolError:
            with contextlib.suppress(OSError):
                obj.path.unlink()
            return self._failed("fsync of a spool folder", exc, failed)

        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise lost(exc) from exc

        def fsync() -> None:
            try:
                os.fsync(fd)
            except OSError as exc:
                raise lost(exc) from exc

        try:
            yield fsync
        finally:
            with self._writing():
                os.close(fd)

    def write_file(self, target: Path, data: bytes, *, durable: bool = True) -> None:
        """Write ``data`` to ``target`` (inside the spool) encrypted and atomically; with
        ``durable`` fsynced, file and folder. ``durable=False`` is for files no restart reads
        (those prepared per delivery attempt under ``outgoing/``, removed at start): a crash
        loses nothing there, and two fsyncs an instance were most of the write."""
        self.ensure_healthy()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".write-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                if self.keyring is None:
                    f.write(data)
                else:
                    with EnvelopeWriter(f, self.keyring.current) as writer:
                        writer.write(data)
                f.flush()
                if durable:
                    self._fsync(f.fileno(), "fsync of a spool file")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if not durable:
            return
        try:
            self._fsync_dir(target.parent)
        except SpoolError:
            target.unlink(missing_ok=True)
            raise

    # --- reading -------------------------------------------------------------------------
    def open(self, key: str) -> BinaryIO:
        """The verified plaintext of object ``key``, seekable (see :meth:`open_path`)."""
        return self.open_path(self.path_of(key))

    def open_path(self, path: Path) -> BinaryIO:
        """The plaintext of a spool file, seekable: every byte comes from a segment whose
        tag verified (IntegrityError names the segment otherwise; a truncated file fails
        here, at open). Memory stays near two segments whatever the file's size."""
        if self.keyring is None:
            return open(path, "rb")  # the caller closes it
        # Not wrapped in io.BufferedReader: pydicom takes one for a plain file and would
        # re-open its path (the ciphertext) for deferred reads.
        try:
            return cast(BinaryIO, open_envelope_file(path, self.keyring))
        except IntegrityError:
            raise
        except CryptoError:
            if self._reload_keyring is None:
                raise
            self.keyring = self._reload_keyring()
            return cast(BinaryIO, open_envelope_file(path, self.keyring))

    def holds(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` names a file inside this spool (so is an envelope)."""
        try:
            text = os.path.abspath(path)  # normalised: no ".." left to climb out
        except (TypeError, ValueError):
            return False
        return text == self._root_text or text.startswith(self._root_prefix)

    def path_of(self, key: str) -> Path:
        if len(key) != 32 or not all(c in "0123456789abcdef" for c in key):
            raise SpoolError("malformed spool key")
        return self.objects / key[:2] / f"{key}.dcm"

    def exists(self, key: str) -> bool:
        return self.path_of(key).exists()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path_of(key).unlink()

    # --- housekeeping --------------------------------------------------------------------
    def keys(self) -> Iterator[str]:
        for sub in self.objects.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    if f.suffix == ".dcm":
                        yield f.stem

    def remove_orphans(self, known: Callable[[list[str]], Iterable[str]]) -> int:
        """Delete committed files that no index row names (a crash before the commit).

        No Success was sent for them, so nothing acknowledged is lost. ``known(keys)`` says
        which of ``keys`` the index names; it is asked one ``objects/xx`` folder at a time,
        so memory follows the largest folder, not the spool (a set of every key of a spool
        of millions of instances was hundreds of MiB at start-up)."""
        removed = 0
        for sub in sorted(self.objects.iterdir()):
            if not sub.is_dir():
                continue
            files = {f.stem: f for f in sub.iterdir() if f.suffix == ".dcm"}
            if not files:
                continue
            named = set(known(list(files)))
            for key, path in files.items():
                if key not in named:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    removed += 1
        return removed

    def sweep_incoming(self, *, older_than: float, now: float) -> int:
        """Remove receive buffers left by aborted associations or a crash."""
        removed = 0
        for f in self.incoming.iterdir():
            try:
                if now - f.stat().st_mtime >= older_than:
                    f.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
