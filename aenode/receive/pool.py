"""Empty files created and made durable ahead of use, so that a write needs no directory fsync.

A new file's directory entry is durable only after an fsync of its folder (about as dear as
the fdatasync of the data itself). :class:`FilePool` creates a batch of empty files in
``<storage.path>/pool`` and fsyncs that folder once per batch; the spool then writes an
instance into one of them, fdatasyncs it and renames it to its place in the spool without
a directory fsync. The data is durable under one of its two names: a rename lost to a power
cut leaves the written file in the pool, where :func:`aenode.receive.spool.recover_spool`
finds it at start-up and puts it in place.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import deque
from pathlib import Path

__all__ = ["SLOT_SUFFIX", "FilePool", "fsync_dir"]

SLOT_SUFFIX = ".slot"
"""Names of pool files end with this (never ``.dcm``: they are not spool files yet)."""


def fsync_dir(path: Path) -> None:
    """fsync a folder, making the entries created or renamed in it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilePool:
    """Empty files in one folder whose entries are durable; one pool per receiving process.

    Parameters
    ----------
    folder : pathlib.Path
        Where the files are created (on the spool's file system, for the rename).
    batch : int
        Files created per refill (one folder fsync each).
    fsync : bool
        ``storage.fsync``: without it the folder is not fsynced.
    """

    def __init__(self, folder: Path, batch: int = 64, fsync: bool = True) -> None:
        self.folder = folder
        self.batch = batch
        self._fsync = fsync
        self._ready: deque[Path] = deque()
        self._lock = threading.Lock()
        self._prefix = uuid.uuid4().hex[:12]
        self._made = 0
        folder.mkdir(parents=True, exist_ok=True)

    def _refill(self) -> None:
        """Create a batch of empty files and make their entries durable (lock held)."""
        made = []
        for _ in range(self.batch):
            self._made += 1
            path = self.folder / f"{self._prefix}-{self._made:08d}{SLOT_SUFFIX}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
            made.append(path)
        if self._fsync:
            fsync_dir(self.folder)
        self._ready.extend(made)

    def take(self) -> Path:
        """An empty file whose directory entry is on disk; it is the caller's from now on.

        Raises
        ------
        OSError
            If the pool cannot be refilled (for example the disk is full).
        """
        with self._lock:
            if not self._ready:
                self._refill()
            return self._ready.popleft()

    def close(self) -> None:
        """Remove the files not handed out (no fsync: a left-over empty file is harmless)."""
        with self._lock:
            while self._ready:
                self._ready.popleft().unlink(missing_ok=True)
