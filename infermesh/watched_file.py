"""A file re-read when it changes on disk: credentials and allow-lists rotated without a restart."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_Stamp = tuple[int, int, int] | None  # inode, mtime_ns, size; None when the file cannot be stat'ed


def _stamp(path: Path) -> _Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    # The inode too: an atomic rename (and Kubernetes' swap of a mounted secret) may keep mtime and size.
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class WatchedFile(Generic[T]):
    """A file's parsed content, re-read when the file changes on disk (else only stat'ed: cheap enough to ask
    every second). A version that does not load leaves the last good one in use, with one warning."""

    def __init__(self, path: Path, read: Callable[[Path], T]) -> None:
        self.path = path
        self._read = read
        self._stamp = _stamp(path)
        self.value = read(path)  # a first version that does not load raises: nothing to fall back on

    def refresh(self) -> bool:
        """True when a new version was loaded."""
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.value = self._read(self.path)
        except (OSError, ValueError) as error:
            # Our ValueErrors name place and problem only; an OSError names the path and the errno.
            problem = f"{type(error).__name__}: {error.strerror}" if isinstance(error, OSError) else str(error)
            log.warning("%s not reloaded, the previous version stays in use: %s", self.path, problem)
            return False
        return True
