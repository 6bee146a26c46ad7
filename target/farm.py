"""A boot farm: one golden image served to many machines, each seeing its
own copy-on-write overlay (what Windows iSCSI Target Server does with
differencing disks, and VirtualBox's multiattach/immutable images, manual
§5.4, do per VM).

:class:`FarmBackend` is a :class:`~target.backends.modes.PerInitiatorBackend`
(the multiattach machinery: one differencing child per key, chosen per
command from :data:`~target.backends.modes.CURRENT_INITIATOR`) with what a
farm adds on top:

- the overlay is made when the initiator logs in (:meth:`FarmBackend.admit`,
  called from the login once CHAP has passed), so the limits refuse the
  *login* -- RFC 7143 §11.13.5 status 0x0302 "out of resources" -- rather
  than failing the machine's first write;
- ``persistent`` mode keys the overlay by initiator name (kept across
  reboots and target restarts); ``reset`` mode gives each new session its
  own fresh overlay, deleted when the session ends (the seeds' "immutable":
  a fresh machine at every boot);
- each overlay has a JSON record beside it naming its initiator and the base
  it was made over, with that base's identity (:func:`base_identity`). An
  overlay whose base is not the farm's current golden image (switched, or
  the golden file changed in place) is never rebased: at its next login it
  is set aside into ``set-aside/`` with a warning, and the machine gets a
  fresh overlay;
- overlays never written are not kept: they are deleted when the last
  session using them ends;
- a bound on the bytes per overlay: a login whose overlay already reached
  it is refused, and writes once it is reached get INSUFFICIENT RESOURCES.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from target.backends.base import Backend, BackendError, Buffer, OutOfResources
from target.backends.modes import (
    _EXT,
    CURRENT_INITIATOR,
    PerInitiatorBackend,
    _remove_image,
    create_overlay,
)
from target.backends.registry import open_image

log = logging.getLogger("aioiscsi.target")

__all__ = ["FarmBackend", "FarmBusy", "FarmMode", "FarmRefused", "OverlayInfo", "base_identity"]

#: Seconds a reset-mode overlay outlives its session, for the session's
#: recovery: an initiator that logs in again with the same ISID (RFC 7143
#: §6.3.5 reinstatement, open-iscsi's replacement_timeout is 120 s by
#: default) gets it back -- unless a login of that initiator with another
#: ISID came in between (a new boot: iPXE picks a random ISID).
RESET_RETAIN = 120.0
#: Bytes hashed at each end of the base for its identity.
_ID_SPAN = 1 << 20
_PREFIX = "farm."
SET_ASIDE = "set-aside"


class FarmMode(enum.StrEnum):
    """What happens to a machine's overlay between sessions."""

    #: Kept across reboots and restarts, one per initiator name.
    PERSISTENT = "persistent"
    #: A fresh overlay at each new session; deleted when the session ends.
    RESET = "reset"


class FarmRefused(OutOfResources):
    """A login the farm's limits refuse (the login answers 0x0302,
    "target out of resources", RFC 7143 §11.13.5)."""


class FarmBusy(BackendError):
    """A login refused for now: the machine's overlay is being committed
    (the login answers 0x0301, "service unavailable": retry later)."""


def base_identity(path: str) -> str:
    """An identity of a base image file: its size, modification time and
    a SHA-256 of its first and last MiB. A base changed in place (or a
    different file at the same path) gets another identity, so an overlay
    made over the old one is recognised as not belonging to it. It is not
    a hash of the whole file: golden images can be many GiB and a login
    must stay fast."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_ID_SPAN))
        if st.st_size > 2 * _ID_SPAN:
            f.seek(st.st_size - _ID_SPAN)
            h.update(f.read(_ID_SPAN))
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()[:32]}"


@dataclass(frozen=True)
class OverlayInfo:
    """One overlay as ``farm list`` shows it."""

    initiator: str
    path: str
    #: Bytes the overlay occupies on disk.
    size: int
    #: Unix time of its last session start or end.
    last_use: float
    #: The base image it was made over.
    base: str
    #: ``current`` (the farm's golden image), ``previous`` (an earlier
    #: golden, still unchanged: a running machine keeps it) or ``changed``
    #: (that file no longer has the identity recorded: never served again).
    base_state: str
    #: Sessions using it now.
    sessions: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


class FarmBackend(PerInitiatorBackend):
    """The LUN of a boot farm (see the module docstring)."""

    def __init__(self, golden: str, state_dir: str | None = None, *,
                 mode: FarmMode | str = FarmMode.PERSISTENT, max_overlays: int = 64,
                 max_overlay_bytes: int | None = None, fmt: str | None = None,
                 wall_clock: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = FarmMode(mode)
        golden = os.path.abspath(golden)
        super().__init__(golden, state_dir, fmt=fmt, max_overlays=max_overlays)
        self.golden = golden
        self.max_overlay_bytes = max_overlay_bytes
        self._wall = wall_clock
        #: TSIH -> (overlay key, initiator name) of each live session.
        self._live: dict[int, tuple[str, str]] = {}
        #: Reset mode: TSIH -> ISID of live sessions; the ISID of each
        #: initiator's latest login; ended sessions' overlays kept for
        #: their recovery, (initiator, ISID) -> (key, when it ended).
        self._isids: dict[int, int] = {}
        self._last_isid: dict[str, int | None] = {}
        self._retained: dict[tuple[str, int], tuple[str, float]] = {}
        self._clock = clock
        #: Keys whose overlay this run created / wrote to.
        self._created: set[str] = set()
        self._written: set[str] = set()
        self._paths: dict[str, str] = {}
        self._serial = 0
        #: Keys whose overlay ``farm commit`` is reading.
        self._committing: set[str] = set()
        self._full_logged = float("-inf")
        self._farm_lock = threading.RLock()
        if self.mode is FarmMode.RESET:
            # Reset overlays never outlive their session; a previous run's
            # (a crash) are dropped.
            for path in self.overlays():
                self._remove(path)

    # -- naming ---------------------------------------------------------------

    def child_path(self, initiator: str) -> str:
        """The overlay file of a key (an initiator name, or in reset mode
        ``name#N`` for its N-th session). Independent of the golden image's
        name, so a switched farm finds the overlays it has to set aside."""
        key = initiator.strip().lower()
        path = self._paths.get(key)
        if path is None:
            digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
            ext = _EXT.get(self._child_format, self._child_format)
            path = self._paths[key] = os.path.join(self._dir.path, f"{_PREFIX}{digest}.{ext}")
        return path

    def overlays(self) -> list[str]:
        """Paths of the farm's overlays (not their records, not set aside)."""
        ext = "." + _EXT.get(self._child_format, self._child_format)
        return sorted(os.path.join(self._dir.path, n) for n in os.listdir(self._dir.path)
                      if n.startswith(_PREFIX) and n.endswith(ext))

    @staticmethod
    def _record_path(overlay: str) -> str:
        return os.path.splitext(overlay)[0] + ".json"

    def _read_record(self, overlay: str) -> dict[str, Any]:
        try:
            with open(self._record_path(overlay), encoding="utf-8") as f:
                rec = json.load(f)
            return rec if isinstance(rec, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_record(self, overlay: str, rec: dict[str, Any]) -> None:
        path = self._record_path(overlay)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rec, f)
        os.replace(tmp, path)

    def _remove(self, overlay: str) -> None:
        _remove_image(overlay)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record_path(overlay))

    # -- sessions -------------------------------------------------------------

    def sessions_of(self, initiator: str) -> list[int]:
        """TSIHs of the live sessions of ``initiator``."""
        name = initiator.strip().lower()
        return sorted(t for t, (_k, n) in self._live.items() if n == name)

    def admit(self, initiator: str, tsih: int, isid: int | None = None) -> str:
        """A new session of ``initiator`` (TSIH ``tsih``, ISID ``isid``)
        logs in: pick or make its overlay and return the key its commands
        use. Raises :class:`FarmRefused` (with the log line already
        written) when a limit refuses it.

        In reset mode a new session gets a fresh overlay, except the
        recovery of a session of this boot (same ISID as the initiator's
        latest login, the old session live or ended less than
        :data:`RESET_RETAIN` ago): it gets the old one back, so a machine
        whose connection dropped does not find its disk reverted."""
        name = initiator.strip().lower()
        if not name:
            raise FarmRefused(f"{self.golden}: a boot farm needs an initiator name")
        with self._farm_lock:
            if name in self._committing:
                log.warning("boot farm %s: login of %s refused for now: its overlay is being "
                            "committed", self.golden, initiator)
                raise FarmBusy(f"the overlay of {initiator} is being committed; retry later")
            if self.mode is FarmMode.PERSISTENT:
                key = name
            else:
                key = self._reset_key(name, isid)
            path = self.child_path(key)
            shared = any(k == key for k, _n in self._live.values())
            # Now, not at start: the golden file may have changed since.
            golden_id = base_identity(self.golden)
            if os.path.exists(path) and not shared:
                rec = self._read_record(path)
                if (rec.get("base"), rec.get("base_id")) != (self.golden, golden_id):
                    self._set_aside(key, path, rec, name)
            if not os.path.exists(path):
                if len(self.overlays()) >= self.max_overlays:
                    log.warning("boot farm %s: login of %s refused: %d overlays exist "
                                "(max_overlays); delete unused ones (iscsi-target farm list / "
                                "farm delete) or raise the limit", self.golden, initiator,
                                self.max_overlays,
                                extra={"event": "farm_refused", "initiator": initiator,
                                       "reason": "max_overlays"})
                    raise FarmRefused(f"{self.max_overlays} overlays exist; none for {initiator}")
                create_overlay(self.golden, path, base_format=self._base_format,
                               child_format=self._child_format)
                self._created.add(key)
                self._write_record(path, {"initiator": name, "base": self.golden,
                                          "base_id": golden_id, "mode": self.mode.value,
                                          "created": self._wall(), "last_use": self._wall()})
                log.info("boot farm %s: new %s overlay for %s", self.golden, self.mode.value,
                         initiator, extra={"event": "farm_overlay", "initiator": initiator})
            elif self._full(path):
                log.warning("boot farm %s: login of %s refused: its overlay %s holds %d bytes "
                            "(max_overlay_bytes %d); reset it (iscsi-target farm reset %s) or "
                            "raise the limit", self.golden, initiator, path,
                            os.path.getsize(path), self.max_overlay_bytes, initiator,
                            extra={"event": "farm_refused", "initiator": initiator,
                                   "reason": "max_overlay_bytes"})
                raise FarmRefused(f"the overlay of {initiator} is full")
            else:
                self._touch(path)
            self._live[tsih] = (key, name)
            if isid is not None:
                self._isids[tsih] = isid
            return key

    def _reset_key(self, name: str, isid: int | None) -> str:
        """Reset mode: the key of a recovered session of this boot, else a
        fresh one (see :meth:`admit`)."""
        self._prune()
        prev = self._last_isid.get(name)
        self._last_isid[name] = isid
        if isid is not None and prev == isid:
            for t, (k, n) in self._live.items():
                if n == name and self._isids.get(t) == isid:
                    return k
            kept = self._retained.pop((name, isid), None)
            if kept is not None:
                return kept[0]
        # A new boot: overlays kept for an older one are of no use now.
        for (n, i) in [r for r in self._retained if r[0] == name]:
            self._drop(self._retained.pop((n, i))[0])
        self._serial += 1
        return f"{name}#{self._serial}"

    def _prune(self) -> None:
        """Delete reset overlays kept longer than RESET_RETAIN."""
        now = self._clock()
        for r, (key, ended) in list(self._retained.items()):
            if now - ended >= RESET_RETAIN:
                del self._retained[r]
                self._drop(key)

    def _set_aside(self, key: str, path: str, rec: dict[str, Any], initiator: str) -> None:
        """Move an overlay made over another base out of the way (never
        rebase it: its clusters mean nothing over a different base)."""
        self._close_child(key)
        aside = os.path.join(self._dir.path, SET_ASIDE)
        os.makedirs(aside, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self._wall()))
        stem = os.path.splitext(os.path.basename(path))[0]
        dest = os.path.join(aside, f"{stem}.{stamp}{os.path.splitext(path)[1]}")
        os.replace(path, dest)
        if os.path.exists(self._record_path(path)):
            os.replace(self._record_path(path), os.path.splitext(dest)[0] + ".json")
        log.warning("boot farm %s: the overlay of %s was made over %s (%s), not the golden image "
                    "served now; it is not rebased: set aside as %s, and %s starts from a fresh "
                    "overlay (commit the old one with: iscsi-target image convert %s NEW)",
                    self.golden, initiator, rec.get("base", "an unknown base"),
                    "unchanged" if rec.get("base") and os.path.exists(str(rec["base"])) and
                    base_identity(str(rec["base"])) == rec.get("base_id") else "since changed",
                    dest, initiator, dest,
                    extra={"event": "farm_set_aside", "initiator": initiator, "path": dest})

    def session_key(self, tsih: int) -> str | None:
        """The overlay key of a live session."""
        entry = self._live.get(tsih)
        return entry[0] if entry is not None else None

    def release(self, tsih: int) -> None:
        """Session ``tsih`` ended: once no other session uses its overlay,
        the overlay is deleted when it was never written; in reset mode a
        written one is kept :data:`RESET_RETAIN` seconds for the session's
        recovery, then deleted."""
        with self._farm_lock:
            entry = self._live.pop(tsih, None)
            isid = self._isids.pop(tsih, None)
            if entry is None:
                return
            key, name = entry
            if any(k == key for k, _n in self._live.values()):
                return
            unwritten = key in self._created and key not in self._written
            if self.mode is FarmMode.RESET and not unwritten and isid is not None and \
                    self._last_isid.get(name) == isid:
                # Kept for the session's recovery (see admit).
                self._retained[(name, isid)] = (key, self._clock())
                self._touch(self.child_path(key))
                return
            if self.mode is FarmMode.RESET or unwritten:
                self._drop(key)
            else:
                self._touch(self.child_path(key))

    def _drop(self, key: str) -> None:
        """Delete the overlay of ``key`` (unless a view of it is still
        exported: then it stays, harmless)."""
        if any(k == key for k, _n in self._live.values()) or not self._close_child(key):
            return
        self._remove(self.child_path(key))
        self._created.discard(key)
        self._written.discard(key)
        self._paths.pop(key, None)

    def _touch(self, path: str) -> None:
        rec = self._read_record(path)
        if rec:
            rec["last_use"] = self._wall()
            self._write_record(path, rec)

    def _close_child(self, key: str) -> bool:
        """Close the open handle of ``key``'s overlay (if any)."""
        with self._lock:
            child = self._children.pop(key, None)
            self._last_use.pop(key, None)
        if child is None:
            return True
        try:
            child.flush()
            child.close()
        except BufferError:
            with self._lock:
                self._children[key] = child
            return False
        return True

    # -- the byte limit -------------------------------------------------------

    def _full(self, path: str) -> bool:
        return self.max_overlay_bytes is not None and os.path.exists(path) and \
            os.path.getsize(path) >= self.max_overlay_bytes

    def _writable(self) -> Backend:
        """The current session's overlay, for a write: refused with
        INSUFFICIENT RESOURCES once it reached ``max_overlay_bytes`` (it may
        pass the bound by at most one write)."""
        name = CURRENT_INITIATOR.get()
        if name is None:
            raise BackendError(f"{self.golden}: boot farm LUN written without an initiator")
        child = self.for_initiator(name)
        key = name.strip().lower()
        if self.max_overlay_bytes is not None and self._full(self.child_path(key)):
            now = time.monotonic()
            if now - self._full_logged >= 60.0:
                self._full_logged = now
                log.warning("boot farm %s: overlay %s reached max_overlay_bytes %d; writes "
                            "refused", self.golden, self.child_path(key), self.max_overlay_bytes)
            raise OutOfResources(f"{self.child_path(key)}: overlay reached "
                                 f"{self.max_overlay_bytes} bytes")
        self._written.add(key)
        return child

    def write(self, offset: int, data: Buffer) -> None:
        self._writable().write(offset, data)

    def discard(self, offset: int, length: int) -> None:
        self._writable().discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._writable().write_zeroes(offset, length)

    # -- administration -------------------------------------------------------

    def list_overlays(self) -> list[OverlayInfo]:
        """Every overlay with its initiator, size on disk, last use, base."""
        out = []
        ids: dict[str, str | None] = {}
        for path in self.overlays():
            rec = self._read_record(path)
            base = str(rec.get("base", ""))
            if base not in ids:
                try:
                    ids[base] = base_identity(base) if base else None
                except OSError:
                    ids[base] = None
            if ids[base] is None or ids[base] != rec.get("base_id"):
                state = "changed"
            else:
                state = "current" if base == self.golden else "previous"
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            name = str(rec.get("initiator", "?"))
            keys = {k for k, _n in self._live.values()
                    if self.child_path(k) == path}
            out.append(OverlayInfo(
                initiator=name, path=path, size=st.st_blocks * 512,
                last_use=float(rec.get("last_use", st.st_mtime)), base=base, base_state=state,
                sessions=sum(1 for k, _n in self._live.values() if k in keys)))
        return out

    def _idle_overlay(self, initiator: str, what: str) -> str:
        """The persistent overlay of ``initiator``, refused while it has a
        session (its data is in use)."""
        name = initiator.strip().lower()
        live = self.sessions_of(name)
        if live:
            raise BackendError(f"farm {what} {initiator}: refused, it has "
                               f"{len(live)} session(s) (TSIH {', '.join(map(str, live))}); "
                               "shut the machine down or kick it first")
        path = self.child_path(name)
        if not os.path.exists(path):
            raise BackendError(f"farm {what} {initiator}: no overlay for this initiator "
                               "(see iscsi-target farm list)")
        self._close_child(name)
        return path

    def reset_overlay(self, initiator: str) -> None:
        """Discard ``initiator``'s changes: its overlay is emptied (made
        afresh over the current golden image)."""
        with self._farm_lock:
            path = self._idle_overlay(initiator, "reset")
            self._remove(path)
            name = initiator.strip().lower()
            create_overlay(self.golden, path, base_format=self._base_format,
                           child_format=self._child_format)
            self._write_record(path, {"initiator": name, "base": self.golden,
                                      "base_id": base_identity(self.golden),
                                      "mode": self.mode.value, "created": self._wall(),
                                      "last_use": self._wall()})
            self._written.discard(name)
        log.info("boot farm %s: overlay of %s reset", self.golden, initiator)

    def delete_overlay(self, initiator: str) -> None:
        """Delete ``initiator``'s overlay (refused while it has a session)."""
        with self._farm_lock:
            self._remove(self._idle_overlay(initiator, "delete"))
            self._written.discard(initiator.strip().lower())
        log.info("boot farm %s: overlay of %s deleted", self.golden, initiator)

    @contextlib.contextmanager
    def committing(self, initiator: str) -> Iterator[str]:
        """The idle overlay file of ``initiator``, closed so it can be read
        whole (``farm commit``); its logins are refused (FarmBusy) until
        the block ends, so the copy is of one consistent disk."""
        name = initiator.strip().lower()
        with self._farm_lock:
            path = self._idle_overlay(initiator, "commit")
            self._committing.add(name)
        try:
            yield path
        finally:
            with self._farm_lock:
                self._committing.discard(name)

    def switch(self, new_golden: str) -> None:
        """Serve ``new_golden`` to new sessions. Running sessions keep the
        overlay (and so the base) they have; overlays over the old golden
        are set aside at their initiator's next login, never rebased.
        The new image must have the same virtual size."""
        new_golden = os.path.abspath(new_golden)
        if not os.path.isfile(new_golden):
            raise BackendError(f"farm switch: {new_golden}: no such file")
        with open_image(new_golden, read_only=True) as img:
            fmt, size = img.info().format, img.size
        if size != self.size:
            raise BackendError(f"farm switch: {new_golden} is {size} bytes, the farm serves "
                               f"{self.size}; the golden images must have the same size")
        with self._farm_lock:
            old = self.golden
            new_base = open_image(new_golden, read_only=True)
            old_base, self._base = self._base, new_base
            self.golden = self.path = new_golden
            self._base_format = fmt
        old_base.close()
        log.info("boot farm: switched from %s to %s for new sessions; %d running session(s) "
                 "keep theirs", old, new_golden, len(self._live))
