"""The durable spool: each accepted instance as a Part 10 file, recorded in the store.

Write order for one instance: the file meta and the encoded data set are written into an
empty file of the :class:`~aenode.receive.pool.FilePool` (``<storage.path>/pool``, whose
entries were made durable when the pool was filled), fdatasynced, renamed into
``<storage.path>/spool/<study>/<series>/<sop>.dcm`` and recorded in the store, all before
the C-STORE is answered. No directory fsync is on that path: the data is durable under the
pool name or the spool name, and a rename lost to a power cut leaves a written pool file that
:func:`recover_spool` moves into place at start-up. The rename and the insert happen in one
store transaction, so two associations delivering the same SOP Instance UID are serialised.
A crash between the rename and the commit leaves a spool file without a row:
:func:`recover_spool` re-reads its header and records it. A pool file written only in part
(a crash during the write, never acknowledged) fails the structural check and is removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from aenode.assemble import Admission, admit, spooled_paths, stored_instance, touch
from aenode.config import Settings
from aenode.errors import AenodeError
from aenode.receive.check import check_structure
from aenode.receive.header import InstanceHeader, InvalidInstance, read_file_header
from aenode.receive.pool import SLOT_SUFFIX, FilePool, fsync_dir
from aenode.store import Store

__all__ = [
    "Outcome",
    "OutOfSpace",
    "RecoveryReport",
    "Spool",
    "SpoolResult",
    "recover_spool",
]

log = logging.getLogger(__name__)

_PREAMBLE = b"\x00" * 128 + b"DICM"
SPACE_RECHECK_SECONDS = 0.25
"""How long a free-space reading is trusted (well above the floor; see Spool.check_space)."""
SPACE_MARGIN = 512 * 1024 * 1024
"""Room kept for what other processes write between two readings."""
_SAFE_UID = re.compile(r"^[0-9A-Za-z_\-][0-9A-Za-z._\-]{0,63}$")


class OutOfSpace(AenodeError, RuntimeError):
    """Free disk below ``storage.min_free_mb`` (or the disk is full); nothing was written."""


class Outcome(StrEnum):
    """What happened to a received instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    KEPT_FIRST = "kept_first"
    REPLACED = "replaced"


@dataclass(frozen=True)
class SpoolResult:
    """The outcome of :meth:`Spool.put`.

    Attributes
    ----------
    outcome : Outcome
        Stored, identical duplicate, different duplicate kept or replaced.
    path : pathlib.Path
        The spool file holding the instance.
    admission : Admission or None
        Series revision and completion, when a row was written.
    """

    outcome: Outcome
    path: Path
    admission: Admission | None = None


def spool_relpath(header: InstanceHeader) -> str:
    """The spool path of an instance relative to ``storage.path``.

    Raises
    ------
    InvalidInstance
        If a UID holds characters that cannot be part of a file name (names the tag).
    """
    for keyword, uid in (
        ("StudyInstanceUID", header.study_uid),
        ("SeriesInstanceUID", header.series_uid),
        ("SOPInstanceUID", header.sop_instance_uid),
    ):
        if not _SAFE_UID.match(uid):
            raise InvalidInstance(f"{keyword} {uid!r} is not a valid UID")
    return f"spool/{header.study_uid}/{header.series_uid}/{header.sop_instance_uid}.dcm"


_fsync_dir = fsync_dir


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Spool:
    """Durable Part 10 writes with duplicate handling; one per receiving process.

    Parameters
    ----------
    settings : Settings
        ``storage`` (path, fsync, min_free_mb, duplicate_policy) and ``series`` are used.
    store : Store
        The process's store connection.
    """

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.root = Path(settings.storage.path)
        self.tmp = self.root / "tmp"
        self.spool = self.root / "spool"
        for folder in (self.tmp, self.spool):
            folder.mkdir(parents=True, exist_ok=True)
        self._fsync = settings.storage.fsync
        self.pool = FilePool(self.root / "pool", fsync=self._fsync)
        self._hasher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="aenode-hash")
        self._min_free = settings.storage.min_free_mb * 1024 * 1024
        self._dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        self._space_lock = threading.Lock()
        self._space_left = 0
        self._space_until = 0.0

    def check_space(self, size: int) -> None:
        """Raise :class:`OutOfSpace` if writing ``size`` bytes would go below the floor.

        The free space is read (``statvfs``) at most every :data:`SPACE_RECHECK_SECONDS`
        while it is more than :data:`SPACE_MARGIN` above the floor; in between, what this
        process wrote is counted off it. Near the floor every write reads it again.
        """
        now = time.monotonic()
        with self._space_lock:
            if now < self._space_until and self._space_left - size >= self._min_free:
                self._space_left -= size
                return
        st = os.statvfs(self.tmp)
        free = st.f_bavail * st.f_frsize
        if free - size < self._min_free:
            raise OutOfSpace(
                f"{self.root}: {free // (1024 * 1024)} MB free, storage.min_free_mb is "
                f"{self.settings.storage.min_free_mb}"
            )
        with self._space_lock:
            self._space_left = free - size - SPACE_MARGIN
            self._space_until = now + SPACE_RECHECK_SECONDS

    def _ensure_dir(self, folder: Path) -> None:
        with self._dirs_lock:
            if folder in self._dirs:
                return
            missing = []
            probe = folder
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            folder.mkdir(parents=True, exist_ok=True)
            if self._fsync:
                for created in missing:
                    _fsync_dir(created.parent)
            self._dirs.add(folder)

    def close(self) -> None:
        """Remove the pool files not used and stop the hashing threads (at process stop)."""
        self.pool.close()
        self._hasher.shutdown(wait=True)

    def _write_temp(self, meta: bytes, stream: bytes) -> Path:
        """Write into an empty pool file and fdatasync it; returns the file."""
        tmp = self.pool.take()
        try:
            fd = os.open(tmp, os.O_WRONLY)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        try:
            _write_all(fd, meta)
            _write_all(fd, stream)
            if self._fsync:
                # Data and size; the entry is durable already (see aenode.receive.pool).
                os.fdatasync(fd)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def put(
        self,
        header: InstanceHeader,
        meta: bytes,
        stream: bytes,
        *,
        calling_ae: str | None,
        assoc_id: str | None,
    ) -> SpoolResult:
        """Store one instance durably and record it; returns once both are on disk.

        Parameters
        ----------
        header : InstanceHeader
            The instance's identifying elements.
        meta : bytes
            Preamble, ``DICM`` and the encoded file meta group.
        stream : bytes
            The data set exactly as received (no transcoding).
        calling_ae, assoc_id : str or None
            The delivering peer and association.

        Returns
        -------
        SpoolResult

        Raises
        ------
        OutOfSpace
            Below ``storage.min_free_mb`` or out of disk; no file is left behind.
        InvalidInstance
            If a UID cannot form a file name.
        OSError, sqlite3.Error
            If the disk or the store fails; no row is written.
        """
        rel = spool_relpath(header)
        final = self.root / rel
        policy = self.settings.storage.duplicate_policy
        ctx = {
            "study": header.study_uid,
            "series": header.series_uid,
            "sop_uid": header.sop_instance_uid,
            "peer_ae": calling_ae,
        }
        # Cheap pre-check: an identical re-send needs no write at all.
        known = stored_instance(self.store, header.sop_instance_uid)
        digest: Future[str] | None = None
        if known is None:
            # A new instance: hash it in another thread while this one waits for the disk
            # (hashlib and fdatasync both release the GIL).
            digest = self._hasher.submit(_sha256, stream)
            sha = ""
        else:
            sha = _sha256(stream)
            if known.sha256 == sha or policy == "keep_first":
                return self._duplicate(header, sha, known.sha256, known.path, assoc_id, ctx)
        try:
            self.check_space(len(meta) + len(stream))
            tmp = self._write_temp(meta, stream)
        except OSError as exc:
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise OutOfSpace(f"{self.tmp}: disk full while writing") from exc
            raise
        finally:
            if digest is not None:
                sha = digest.result()
        try:
            now = time.time()
            with self.store.transaction() as conn:
                row = stored_instance(conn, header.sop_instance_uid)
                if row is not None and (row.sha256 == sha or policy == "keep_first"):
                    dup = True
                else:
                    dup = False
                    self._ensure_dir(final.parent)
                    # No folder fsync: a rename lost to a power cut leaves the written pool
                    # file, which recover_spool puts in place.
                    os.rename(tmp, final)
                    admission = admit(
                        conn,
                        self.store,
                        header,
                        path=rel,
                        sha256=sha,
                        size=len(stream),
                        calling_ae=calling_ae,
                        assoc_id=assoc_id,
                        now=now,
                        settings=self.settings.series,
                        root=self.root,
                        replace=row is not None,
                    )
        finally:
            tmp.unlink(missing_ok=True)
        if dup:
            assert row is not None
            return self._duplicate(header, sha, row.sha256, row.path, assoc_id, ctx)
        if row is not None:
            log.warning(
                "duplicate SOP Instance UID with different content: replaced the stored "
                "instance (storage.duplicate_policy=replace)",
                extra=ctx,
            )
            if row.path != rel:
                (self.root / row.path).unlink(missing_ok=True)
            return SpoolResult(Outcome.REPLACED, final, admission)
        if admission.ignored_late:
            log.warning(
                "instance arrived after its series was complete: stored, series not re-opened "
                "(series.late_instances=ignore)",
                extra=ctx,
            )
        elif admission.opened and admission.revision > 0:
            log.info(
                "late instance: series re-opened as revision %d", admission.revision, extra=ctx
            )
        return SpoolResult(Outcome.STORED, final, admission)

    def _duplicate(
        self,
        header: InstanceHeader,
        sha: str,
        stored_sha: str,
        stored_path: str,
        assoc_id: str | None,
        ctx: dict[str, str | None],
    ) -> SpoolResult:
        with self.store.transaction() as conn:
            touch(conn, header.series_uid, assoc_id, time.time())
        if stored_sha == sha:
            log.debug("identical duplicate acknowledged, nothing new stored", extra=ctx)
            return SpoolResult(Outcome.DUPLICATE, self.root / stored_path)
        log.warning(
            "duplicate SOP Instance UID with different content: kept the first "
            "(storage.duplicate_policy=keep_first)",
            extra=ctx,
        )
        return SpoolResult(Outcome.KEPT_FIRST, self.root / stored_path)


@dataclass(frozen=True)
class RecoveryReport:
    """What :func:`recover_spool` did.

    Attributes
    ----------
    recovered : int
        Spool files without a store row that were recorded.
    removed_temporary : int
        Unfinished temporary files and pool files written only in part removed (never
        acknowledged to a sender).
    placed : int
        Written pool files whose rename was lost (a power cut), moved into the spool.
    quarantined : int
        Spool files that could not be read, moved to ``<storage.path>/quarantine``.
    """

    recovered: int
    removed_temporary: int
    quarantined: int
    placed: int = 0


def _dataset(path: Path) -> bytes:
    data = path.read_bytes()
    # Written by the spool: preamble, DICM, then (0002,0000) UL group length first.
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise InvalidInstance(f"{path}: no file meta group length")
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


def _dataset_sha(path: Path) -> tuple[str, int]:
    stream = _dataset(path)
    return hashlib.sha256(stream).hexdigest(), len(stream)


def _place_pool_files(store: Store, settings: Settings) -> tuple[int, int]:
    """Move written pool files whose rename was lost into the spool; remove the others.

    Returns
    -------
    (int, int)
        Files placed, and files removed that were written only in part.
    """
    root = Path(settings.storage.path)
    pool = root / "pool"
    if not pool.is_dir():
        return 0, 0
    placed = partial = 0
    for slot in sorted(pool.glob(f"*{SLOT_SUFFIX}")):
        if slot.stat().st_size == 0:
            slot.unlink(missing_ok=True)  # never used
            continue
        try:
            header = read_file_header(slot)
            check_structure(_dataset(slot), header.transfer_syntax)
            rel = spool_relpath(header)
        except InvalidInstance as exc:
            # Cut off while being written: its C-STORE was never answered with success.
            slot.unlink(missing_ok=True)
            partial += 1
            log.warning("removed a pool file written only in part: %s", exc)
            continue
        final = root / rel
        row = stored_instance(store, header.sop_instance_uid)
        sha, _ = _dataset_sha(slot)
        newer = (
            row is not None
            and row.sha256 == sha
            and (not final.exists() or _dataset_sha(final)[0] != sha)
        )
        if final.exists() and not newer:
            slot.unlink(missing_ok=True)  # a duplicate, or a copy already in place
            continue
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(slot, final)
        if settings.storage.fsync:
            fsync_dir(final.parent)
        placed += 1
        log.warning(
            "moved a written pool file into the spool (its rename was lost)",
            extra={
                "study": header.study_uid,
                "series": header.series_uid,
                "sop_uid": header.sop_instance_uid,
            },
        )
    return placed, partial


def recover_spool(store: Store, settings: Settings) -> RecoveryReport:
    """Bring the store and the spool folder back in line after a crash (run at start-up).

    Parameters
    ----------
    store : Store
        The store.
    settings : Settings
        ``storage.path`` and ``series`` are used.

    Returns
    -------
    RecoveryReport
    """
    root = Path(settings.storage.path)
    removed = 0
    tmp = root / "tmp"
    if tmp.is_dir():
        for part in tmp.iterdir():
            part.unlink(missing_ok=True)
            removed += 1
    placed, partial = _place_pool_files(store, settings)
    removed += partial
    spool = root / "spool"
    if not spool.is_dir():
        return RecoveryReport(0, removed, 0, placed)
    known = spooled_paths(store)
    recovered = quarantined = 0
    for path in sorted(spool.glob("*/*/*.dcm")):
        rel = path.relative_to(root).as_posix()
        if rel in known:
            continue
        try:
            header = read_file_header(path)
            sha, size = _dataset_sha(path)
            if spool_relpath(header) != rel:
                raise InvalidInstance(f"{path}: its UIDs do not match its place in the spool")
        except InvalidInstance as exc:
            target = root / "quarantine" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(target))
            quarantined += 1
            log.error("unreadable spool file moved to %s: %s", target, exc)
            continue
        with store.transaction() as conn:
            if stored_instance(conn, header.sop_instance_uid) is not None:
                continue
            admit(
                conn,
                store,
                header,
                path=rel,
                sha256=sha,
                size=size,
                calling_ae=None,
                assoc_id=None,
                now=path.stat().st_mtime,
                settings=settings.series,
                root=root,
            )
        recovered += 1
        log.warning(
            "recovered a spool file that had no store row (crash after write)",
            extra={
                "study": header.study_uid,
                "series": header.series_uid,
                "sop_uid": header.sop_instance_uid,
            },
        )
    return RecoveryReport(recovered, removed, quarantined, placed)
