"""The free space of the disk under the SQLite file, against a threshold.

Below ``min_free_bytes`` the state service refuses writes that grow its data
(:class:`~wsgate.errors.StorageFull`) and reports not ready, so that a filling disk stops
new data cleanly instead of failing commits half way (SQLite's "database or disk is full"
fails whole batches, deletes too). Measured at each check with ``statvfs`` (a system call of
a microsecond or two): the guard lifts by itself as soon as space returns.
"""

from __future__ import annotations

import os
from pathlib import Path

from wsgate.errors import StorageFull


class DiskGuard:
    """The filesystem holding ``path`` (a file, which need not exist yet) must keep
    ``min_free_bytes`` free for unprivileged writers (``f_bavail``)."""

    def __init__(self, path: Path, min_free_bytes: int) -> None:
        if min_free_bytes < 1:
            raise ValueError(f"min_free_bytes must be >= 1, got {min_free_bytes}")
        self.path = path
        self.min_free_bytes = min_free_bytes

    def free_bytes(self) -> int:
        """Bytes free on the filesystem now (raises OSError if it cannot be measured)."""
        found = os.statvfs(_existing(self.path))
        return found.f_bavail * found.f_frsize

    def shortfall(self) -> str | None:
        """Why writes are refused now, or None while there is enough space."""
        free = self.free_bytes()
        if free >= self.min_free_bytes:
            return None
        return (
            f"disk low: {free} bytes free under {self.path}, below the threshold of "
            f"{self.min_free_bytes} (WSGATE_MIN_FREE_DISK_BYTES)"
        )

    def check(self) -> None:
        """Raise StorageFull while the free space is below the threshold."""
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise StorageFull(
                f"the state service's disk has {free} bytes free, below its threshold of "
                f"{self.min_free_bytes}: writes are refused until space returns",
                free_bytes=free,
                threshold_bytes=self.min_free_bytes,
            )


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (the file and its directory are made at
    start; the filesystem is the same)."""
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return candidate
    return Path("/")
