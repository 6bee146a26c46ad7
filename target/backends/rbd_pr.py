"""The RADOS object that holds the persistent reservations of an RBD image
served by several gateways (:mod:`target.scsi.pr_shared`).

One object per image, ``aioiscsi.pr.<image id>``, in the image's pool and
namespace. Compare-and-swap is RADOS's own: a write carries
``assert_version`` of the version read (or an exclusive create when there
was no object), so of two gateways writing at once one fails and runs its
command again. Watch/notify carries each new state to the other gateways.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any

#: How long a notify waits for the other gateways' acknowledgements.
NOTIFY_TIMEOUT_MS = 10_000


class RadosPRStore:
    """:class:`~target.scsi.pr_shared.SharedPRStore` on one RADOS object."""

    def __init__(self, rados: Any, ioctx: Any, oid: str) -> None:
        self._rados = rados
        self._io = ioctx
        self.oid = oid
        # get_last_version() is per I/O context: one caller at a time.
        self._mutex = threading.Lock()
        self._watch: Any = None
        try:
            op = ioctx.create_write_op()
            try:
                op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
                ioctx.operate_write_op(op, oid)
            finally:
                ioctx.release_write_op(op)
        except rados.ObjectExists:
            pass  # another gateway (or an earlier run) made it

    def read(self) -> tuple[bytes | None, int]:
        with self._mutex:
            try:
                data = self._io.read(self.oid, 1 << 20)
            except self._rados.ObjectNotFound:
                return None, 0
            return (bytes(data) or None), int(self._io.get_last_version())

    def write_if(self, blob: bytes, version: int) -> bool:
        rados = self._rados
        with self._mutex:
            op = self._io.create_write_op()
            try:
                op.assert_version(version)
                op.write_full(blob)
                try:
                    self._io.operate_write_op(op, self.oid)
                except rados.Error as exc:
                    if getattr(exc, "errno", None) in (errno.ERANGE, errno.EOVERFLOW):
                        return False  # the version moved: someone else wrote
                    raise
            finally:
                self._io.release_write_op(op)
        return True

    def notify(self, blob: bytes) -> None:
        # The bindings take text; the document is ASCII JSON.
        self._io.notify(self.oid, blob.decode(), NOTIFY_TIMEOUT_MS)

    def watch(self, callback: Callable[[bytes], None]) -> None:
        def on_notify(notify_id: int, notifier_id: int, watch_id: int, data: bytes) -> None:
            callback(bytes(data))

        self._watch = self._io.watch(self.oid, on_notify)

    def close(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            try:
                watch.close()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
