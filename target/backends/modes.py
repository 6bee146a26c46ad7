"""VirtualBox's write modes as backend wrappers (VirtualBox manual §5.4,
"Special image write modes", and §5.5 "Differencing images").

=============  ==============================================================
mode           what the LUN does
=============  ==============================================================
normal         reads and writes the image (host cache as configured)
writethrough   the same, every write durable before it is acknowledged
               (``write_through=True``: the seed's "host I/O cache off")
immutable      the image is never written: writes go to a differencing image
               that is thrown away each time the target starts
multiattach    every initiator (keyed by its iSCSI initiator name) gets its
               own differencing image, kept across restarts, so one
               initiator's writes are never seen by another
shareable      several initiators at once on one image: fixed-size images
               only, a dynamic image is refused (the seed's rule)
readonly       writes refused (SBC-3 DATA PROTECT)
=============  ==============================================================

The differencing images are ordinary images of our formats created with
:func:`registry.create_image` and a backing file: qcow2 by default (it can
sit over any format), else the base's own format when that one has
differencing images (VDI, VHD, VHDX, VMDK). They live in the LUN's state
directory.

Multiattach needs to know, for each command, which initiator sent it. The
SCSI layer knows the I_T nexus; it tells this module through a context
variable (:data:`CURRENT_INITIATOR`, or the :func:`initiator_scope` context
manager) set around ``ScsiTarget.execute``. A context variable follows the
command into ``asyncio.to_thread`` (flush) and into tasks created while it
is set, and concurrent commands of other sessions each see their own value.
:class:`PerInitiatorBackend` also offers the explicit
:meth:`~PerInitiatorBackend.for_initiator` for callers that prefer to pick
the child themselves. Without an initiator, reads and writes are refused
(MEDIUM ERROR) rather than risk serving one initiator's data to another.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Self

from .base import Backend, BackendError, Buffer, DelegatingBackend, Extent, OutOfResources
from .locking import sharing_writes
from .registry import ImageBackend, create_image, formats, open_image

log = logging.getLogger("aioiscsi.target")

__all__ = [
    "CURRENT_INITIATOR",
    "FIXED_SUBFORMATS",
    "DelegatingBackend",
    "ImmutableBackend",
    "PerInitiatorBackend",
    "WriteMode",
    "child_format_for",
    "create_overlay",
    "current_initiator",
    "initiator_scope",
    "is_fixed",
    "open_with_mode",
    "parse_mode",
]


class WriteMode(enum.StrEnum):
    """The write modes of a LUN (VirtualBox manual §5.4)."""

    NORMAL = "normal"
    WRITETHROUGH = "writethrough"
    IMMUTABLE = "immutable"
    MULTIATTACH = "multiattach"
    SHAREABLE = "shareable"
    READONLY = "readonly"


_ALIASES = {
    "write-through": WriteMode.WRITETHROUGH,
    "write_through": WriteMode.WRITETHROUGH,
    "read-only": WriteMode.READONLY,
    "read_only": WriteMode.READONLY,
    "ro": WriteMode.READONLY,
    "multi-attach": WriteMode.MULTIATTACH,
}


def parse_mode(text: str) -> WriteMode:
    """Parse a mode name (``normal``, ``writethrough``/``write-through``,
    ``immutable``, ``multiattach``, ``shareable``, ``readonly``/``read-only``).
    Raises BackendError naming the allowed values."""
    t = text.strip().lower()
    if t in _ALIASES:
        return _ALIASES[t]
    try:
        return WriteMode(t)
    except ValueError:
        allowed = ", ".join(m.value for m in WriteMode)
        raise BackendError(f"write mode {text!r} is not allowed ({allowed})") from None


#: Sub-formats whose virtual disk is laid out in full in the file(s); raw
#: images are fixed too. Everything else (dynamic, differencing, sparse,
#: qcow2, Parallels) allocates on write.
FIXED_SUBFORMATS = frozenset({"fixed", "monolithicFlat", "twoGbMaxExtentFlat", "vmfs", "flat"})


def is_fixed(img: Backend) -> bool:
    """True when ``img`` is a fixed-size image without a parent (what the
    shareable mode accepts)."""
    if not isinstance(img, ImageBackend):
        return False
    if img.parent is not None:
        return False
    info = img.info()
    return info.format == "raw" or info.subformat in FIXED_SUBFORMATS


# ---------------------------------------------------------------------------
# The initiator of the command being executed


#: Initiator name (RFC 7143 §4.2.7.1) of the command being executed; set by
#: the SCSI layer around each command for multiattach LUNs.
CURRENT_INITIATOR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "aioiscsi_current_initiator", default=None
)


def current_initiator() -> str | None:
    """The initiator name set by :func:`initiator_scope`, or None."""
    return CURRENT_INITIATOR.get()


@contextlib.contextmanager
def initiator_scope(name: str) -> Iterator[None]:
    """Run the body as initiator ``name`` (for :class:`PerInitiatorBackend`)."""
    token = CURRENT_INITIATOR.set(name)
    try:
        yield
    finally:
        CURRENT_INITIATOR.reset(token)


# ---------------------------------------------------------------------------
# Differencing children


# Formats whose images can be differencing children of an image of the same
# format (the fallback when qcow2 is not available).
_SAME_FORMAT_CHILDREN = ("vdi", "vhd", "vhdx", "vmdk", "qcow2")
_EXT = {"qcow2": "qcow2", "vdi": "vdi", "vhd": "vhd", "vhdx": "vhdx", "vmdk": "vmdk"}


def child_format_for(base_format: str, wanted: str | None = None) -> str:
    """Pick the format of a differencing image over a ``base_format`` image:
    ``wanted`` if given, else qcow2 (any backing format), else the base's
    own format when it has differencing images."""
    known = formats()
    if wanted is not None:
        if wanted not in known:
            raise BackendError(f"child format {wanted!r} is not available (known: {', '.join(sorted(known))})")
        return wanted
    if "qcow2" in known:
        return "qcow2"
    if base_format in _SAME_FORMAT_CHILDREN and base_format in known:
        return base_format
    raise BackendError(f"no format available for a differencing image over a {base_format} image")


def create_overlay(base_path: str, child_path: str, *, base_format: str | None = None,
                   child_format: str | None = None) -> str:
    """Create a differencing image ``child_path`` over ``base_path`` (stored
    with an absolute backing name, so the child can live anywhere). Returns
    the child's format."""
    base_abs = os.path.abspath(base_path)
    with open_image(base_abs, read_only=True, fmt=base_format) as base:
        bfmt = base.info().format
        size = base.size
    fmt = child_format_for(bfmt, child_format)
    if fmt not in ("qcow2", "vhdx") and fmt != bfmt:
        raise BackendError(f"{child_path}: a {fmt} differencing image needs a {fmt} parent, "
                           f"{base_path} is {bfmt}")
    create_image(child_path, fmt, size, backing=base_abs, backing_format=bfmt)
    return fmt


def _remove_image(path: str) -> None:
    """Delete an image we created, with the VDI parent sidecar if any."""
    for p in (path, path + ".parent"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


class _StateDir:
    """The directory differencing images live in: the LUN's state directory,
    or a private temporary one removed on close."""

    def __init__(self, state_dir: str | None, label: str) -> None:
        self.temporary = state_dir is None
        if state_dir is None:
            self.path = tempfile.mkdtemp(prefix=f"aioiscsi-{label}-")
        else:
            self.path = state_dir
            try:
                os.makedirs(state_dir, exist_ok=True)
            except OSError as e:
                raise BackendError(f"{state_dir}: cannot create state directory: {e.strerror}") from None

    def cleanup(self) -> None:
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)


def _stem(path: str) -> str:
    name = os.path.basename(path)
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "image"


class ImmutableBackend(DelegatingBackend):
    """An immutable image: writes land in a differencing image that is
    discarded and made afresh every time this backend is opened (each
    target start), so the LUN always starts with the base's content.

    The base is opened read-only through the child; it is never written.
    """

    def __init__(self, base_path: str, state_dir: str | None = None, *,
                 fmt: str | None = None, write_through: bool = False,
                 child_format: str | None = None) -> None:
        self.base_path = base_path
        self._dir = _StateDir(state_dir, "immutable")
        try:
            stem = _stem(base_path)
            # Discard any child a previous run left (VirtualBox manual §5.4:
            # "all changes are lost when the virtual machine is powered on
            # the next time").
            for name in os.listdir(self._dir.path):
                if name.startswith(f"{stem}.immutable."):
                    _remove_image(os.path.join(self._dir.path, name))
            bfmt = fmt
            with open_image(base_path, read_only=True, fmt=fmt) as base:
                bfmt = base.info().format
            cfmt = child_format_for(bfmt, child_format)
            self.child_path = os.path.join(self._dir.path, f"{stem}.immutable.{_EXT.get(cfmt, cfmt)}")
            create_overlay(base_path, self.child_path, base_format=bfmt, child_format=cfmt)
            child = open_image(self.child_path, read_only=False, write_through=write_through, fmt=cfmt)
        except BaseException:
            self._dir.cleanup()
            raise
        super().__init__(child)
        self.path = base_path

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._dir.cleanup()


#: Overlays a multiattach LUN keeps (one per initiator name ever seen).
DEFAULT_MAX_OVERLAYS = 64
#: Overlay files open at once; idle ones beyond it are closed.
DEFAULT_MAX_OPEN_OVERLAYS = 16
#: Seconds unused before an open overlay may be closed.
IDLE_CLOSE = 60.0


class PerInitiatorBackend(Backend):
    """A multiattach image: one differencing child per initiator name.

    Children are created on first use in ``state_dir`` (named after the
    base and a hash of the initiator name) and kept across restarts unless
    ``reset`` is true, as VirtualBox keeps a multiattach image's
    differencing images. The Backend methods act on the child of
    :func:`current_initiator`; ``flush`` without one flushes every child.
    """

    def __init__(self, base_path: str, state_dir: str | None = None, *,
                 fmt: str | None = None, write_through: bool = False,
                 child_format: str | None = None, reset: bool = False,
                 max_overlays: int = DEFAULT_MAX_OVERLAYS,
                 max_open: int = DEFAULT_MAX_OPEN_OVERLAYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = base_path
        self.max_overlays = max_overlays
        self.max_open = max_open
        self._clock = clock
        #: Initiator (lower-cased) -> when its overlay was last used; the
        #: open ones are closed least recently used first.
        self._last_use: dict[str, float] = {}
        self._wt = write_through
        self._dir = _StateDir(state_dir, "multiattach")
        self._children: dict[str, ImageBackend] = {}
        self._refusals = 0
        self._refusal_logged = float("-inf")
        self._lock = threading.Lock()
        self._closed = False
        try:
            # Opened once for its size and as the proof the base is usable;
            # children open their own read-only handle through the chain.
            self._base = open_image(base_path, read_only=True, fmt=fmt)
            self._base_format = self._base.info().format
            self._child_format = child_format_for(self._base_format, child_format)
            self._stem = _stem(base_path)
            if reset:
                for name in os.listdir(self._dir.path):
                    if name.startswith(f"{self._stem}.multiattach."):
                        _remove_image(os.path.join(self._dir.path, name))
        except BaseException:
            self._dir.cleanup()
            raise

    def __enter__(self) -> Self:
        return self

    # -- the hook -------------------------------------------------------------

    def child_path(self, initiator: str) -> str:
        """Where ``initiator``'s differencing image lives. Initiator names
        are case-insensitive (RFC 3722 stringprep folds case), so the key is
        the lower-cased name."""
        key = initiator.strip().lower()
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        ext = _EXT.get(self._child_format, self._child_format)
        return os.path.join(self._dir.path, f"{self._stem}.multiattach.{digest}.{ext}")

    def overlays(self) -> list[str]:
        """Paths of every overlay of this LUN in its state directory."""
        prefix = f"{self._stem}.multiattach."
        return sorted(os.path.join(self._dir.path, n) for n in os.listdir(self._dir.path)
                      if n.startswith(prefix))

    def for_initiator(self, initiator: str) -> ImageBackend:
        """The differencing image of ``initiator`` (created on first use,
        reopened when it was closed for being idle).

        Raises :class:`OutOfResources` when creating it would exceed
        ``max_overlays``: the new initiator is refused, the others go on.
        """
        key = initiator.strip().lower()
        if not key:
            raise BackendError(f"{self.path}: multiattach LUN needs an initiator name")
        child = self._children.get(key)
        if child is not None:
            self._last_use[key] = self._clock()
            return child
        with self._lock:
            if self._closed:
                raise BackendError(f"{self.path}: image is closed")
            child = self._children.get(key)
            if child is None:
                path = self.child_path(key)
                if not os.path.exists(path):
                    if len(self.overlays()) >= self.max_overlays:
                        # One log line a minute however many names arrive
                        # (a flood of new names must not flood the log).
                        self._refusals += 1
                        now = self._clock()
                        if now - self._refusal_logged >= 60.0:
                            log.warning("%s: multiattach overlay for %s refused: %d overlays "
                                        "exist (max_overlays); %d refused in all; remove "
                                        "unused ones from %s or raise the limit", self.path,
                                        initiator, self.max_overlays, self._refusals,
                                        self._dir.path)
                            self._refusal_logged = now
                        raise OutOfResources(f"{self.path}: {self.max_overlays} multiattach "
                                             f"overlays exist; none for {initiator}")
                    create_overlay(self.path, path, base_format=self._base_format,
                                   child_format=self._child_format)
                self._close_idle()
                child = open_image(path, read_only=False, write_through=self._wt,
                                   fmt=self._child_format)
                self._children[key] = child
            self._last_use[key] = self._clock()
            return child

    def _close_idle(self) -> None:
        """Keep at most ``max_open`` - 1 overlays open before opening one
        more: close those unused for ``IDLE_CLOSE`` seconds, least recently
        used first (they reopen on their next command). One in use more
        recently stays open even past the bound -- its data may still be on
        its way to the initiator as views of its file."""
        if len(self._children) < self.max_open:
            return
        now = self._clock()
        for key in sorted(self._children, key=lambda k: self._last_use.get(k, 0.0)):
            if len(self._children) < self.max_open:
                break
            if now - self._last_use.get(key, 0.0) < IDLE_CLOSE:
                break
            child = self._children[key]
            try:
                child.flush()
                child.close()
            except BufferError:  # a view of it is still exported: keep it
                continue
            del self._children[key]

    def initiators(self) -> list[str]:
        """Initiator names (lower-cased) with an open child, sorted."""
        return sorted(self._children)

    def _current(self) -> Backend:
        name = CURRENT_INITIATOR.get()
        if name is None:
            raise BackendError(
                f"{self.path}: multiattach LUN accessed without an initiator "
                f"(the SCSI layer must set target.backends.modes.CURRENT_INITIATOR)"
            )
        return self.for_initiator(name)

    # -- Backend --------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._base.size

    @property
    def thin(self) -> bool:
        # Every child is a differencing image: it allocates on write and
        # can deallocate (reads of a discarded range give zeroes).
        return True

    @property
    def zero_after_discard(self) -> bool:
        return True

    def read(self, offset: int, length: int) -> Buffer:
        return self._current().read(offset, length)

    def write(self, offset: int, data: Buffer) -> None:
        self._current().write(offset, data)

    def discard(self, offset: int, length: int) -> None:
        self._current().discard(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._current().write_zeroes(offset, length)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        return self._current().extents(offset, length)

    def flush(self) -> None:
        name = CURRENT_INITIATOR.get()
        if name is not None:
            self.for_initiator(name).flush()
            return
        for child in list(self._children.values()):
            child.flush()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            children, self._children = list(self._children.values()), {}
        try:
            for child in children:
                child.close()
            self._base.close()
        finally:
            self._dir.cleanup()


def open_with_mode(path: str, mode: WriteMode | str = WriteMode.NORMAL, *,
                   state_dir: str | None = None, fmt: str | None = None,
                   read_only: bool = False, write_cache: bool = True,
                   child_format: str | None = None,
                   max_overlays: int = DEFAULT_MAX_OVERLAYS) -> Backend:
    """Open the image a LUN serves, in a write mode.

    ``state_dir`` holds the differencing images of immutable/multiattach
    LUNs (the server passes ``<state_dir>/<target>/<lun>``); without one a
    temporary directory is used, so multiattach children then last only as
    long as the target runs. ``write_cache=False`` is the seed's "host I/O
    cache off" (fdatasync after every write) in any mode.
    """
    m = parse_mode(mode) if isinstance(mode, str) else mode
    wt = not write_cache
    if m is WriteMode.READONLY or read_only:
        # A read-only LUN never writes, so every mode reduces to this one.
        return open_image(path, read_only=True, write_through=wt, fmt=fmt)
    if m is WriteMode.NORMAL:
        return open_image(path, read_only=False, write_through=wt, fmt=fmt)
    if m is WriteMode.WRITETHROUGH:
        return open_image(path, read_only=False, write_through=True, fmt=fmt)
    if m is WriteMode.SHAREABLE:
        # Other processes (gateways) may write this image too; the
        # initiators coordinate (a cluster file system, reservations).
        with sharing_writes():
            img = open_image(path, read_only=False, write_through=wt, fmt=fmt)
        if not is_fixed(img):
            info = img.info()
            img.close()
            kind = info.subformat or "dynamic"
            raise BackendError(f"{path}: shareable mode needs a fixed-size image, this is a {kind} "
                               f"{info.format} image (convert it with: iscsi-target image convert "
                               f"-O raw {path} NEW)")
        return img
    if m is WriteMode.IMMUTABLE:
        return ImmutableBackend(path, state_dir, fmt=fmt, write_through=wt, child_format=child_format)
    assert m is WriteMode.MULTIATTACH
    return PerInitiatorBackend(path, state_dir, fmt=fmt, write_through=wt,
                               child_format=child_format, max_overlays=max_overlays)
