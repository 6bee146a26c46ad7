"""Media changes for CD/DVD LUNs (ISO images).

Swapping the file behind an ISO LUN while serving -- replacing it on disk
(``mv other.iso disk.iso``), removing it, or putting it back -- is a media
change, as inserting another disc in a drive: initiators see NOT READY TO
READY CHANGE, MEDIUM MAY HAVE CHANGED (28/00) and a NEW MEDIA event in GET
EVENT STATUS NOTIFICATION (MMC-6 §6.7), and read the new image. The file is
polled by ``stat`` once a second (initiators poll removable media about as
often), so no command is needed to trigger it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Protocol

from target.backends.base import Backend, BackendError

from .runtime import TargetRuntime


class MediaOwner(Protocol):
    """The server as the media watcher sees it."""

    targets: dict[str, TargetRuntime]

    def change_medium(self, target: str, lun: int, path: str | None) -> bool:
        """Load ``path`` (None: eject) into a CD/DVD LUN."""

log = logging.getLogger("aioiscsi.target")

#: The identity of a file: a different inode, size or mtime is a new disc.
Stamp = tuple[int, int, int] | None


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class MediaWatcher:
    """Polls the files of every CD/DVD LUN of a server."""

    def __init__(self, server: MediaOwner, interval: float = 1.0) -> None:
        self.server = server
        self.interval = interval
        self._stamps: dict[tuple[str, int], Stamp] = {}
        self._handle: asyncio.TimerHandle | None = None
        for key, path in self._cdrom_luns():
            self._stamps[key] = _stamp(path)

    def _cdrom_luns(self) -> list[tuple[tuple[str, int], str]]:
        from target.scsi.mmc import CdromUnit

        out = []
        for name, rt in self.server.targets.items():
            for spec in rt.spec.luns:
                if spec.path and isinstance(rt.scsi.luns.get(spec.lun), CdromUnit):
                    out.append(((name, spec.lun), spec.path))
        return out

    def start(self) -> None:
        """Begin polling on the running loop (nothing to do without ISOs)."""
        if self._stamps:
            self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def stop(self) -> None:
        """Stop polling."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self.check()
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def check(self) -> int:
        """Look at every ISO file now; returns how many media changed."""
        changed = 0
        for key, path in self._cdrom_luns():
            stamp = _stamp(path)
            if stamp == self._stamps.get(key):
                continue
            self._stamps[key] = stamp
            if self.server.change_medium(key[0], key[1], path if stamp else None):
                changed += 1
        return changed


def open_medium(path: str) -> Backend:
    """Open an ISO image read-only (raises BackendError in one line)."""
    from target.backends import raw

    try:
        return raw.open(path, read_only=True)
    except BackendError:
        raise
    except OSError as exc:
        raise BackendError(f"{path}: cannot open: {exc.strerror}") from None
