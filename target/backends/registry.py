"""Image formats: detection, opening (with backing chains) and creation.

Each format is a module of this package exposing ``NAME``, ``probe``,
``open`` and ``create`` (see :class:`FormatModule`); it is listed by
:func:`formats` simply by being importable. Detection is by content only
(never by file name): every format but ``raw`` is probed on the first
64 KiB, and ``raw`` is the fallback.

Backing chains: a format that has a parent calls :func:`open_backing`, which
resolves a relative name against the child's directory and opens the parent
read-only through :func:`open_image` - so chains may mix formats (qcow2 over
raw, VMDK over VMDK...). A file met twice while a chain is being opened, or
two images of one chain carrying the same UUID, is refused: either would make
reads recurse forever or silently read the wrong data.
"""

from __future__ import annotations

import abc
import importlib
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol, Self, cast

from .base import SECTOR, Backend, BackendError, Buffer, Extent, MediumError
from .locking import ImageLock, LockSet, lock_image

__all__ = [
    "MAX_CHAIN_DEPTH",
    "PROBE_SIZE",
    "CreateFunction",
    "CreateRequest",
    "FormatModule",
    "ImageBackend",
    "ImageInfo",
    "align_up",
    "check_options",
    "check_range",
    "cluster_pieces",
    "create_file",
    "create_image",
    "detect",
    "formats",
    "image_creator",
    "merge_extents",
    "open_backing",
    "open_file",
    "open_image",
    "parent_for_create",
    "parse_size",
    "resolve_backing",
    "sync_files",
]

#: Bytes handed to ``probe``.
PROBE_SIZE = 64 * 1024

#: A chain longer than this is refused (qemu has no hard limit, but a chain
#: this deep is certainly a mistake or a loop through distinct paths).
MAX_CHAIN_DEPTH = 64


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What an image says about itself (``qemu-img info`` in short)."""

    format: str
    path: str
    virtual_size: int
    #: Bytes the file really occupies on disk (st_blocks * 512).
    allocated_size: int
    uuid: str | None = None
    parent_uuid: str | None = None
    #: The backing file name as stored in the image (may be relative).
    backing: str | None = None
    backing_format: str | None = None
    #: e.g. "dynamic", "fixed", "monolithicSparse", "1.1".
    subformat: str | None = None
    extra: dict[str, str] = field(default_factory=dict, hash=False)


class ImageBackend(Backend):
    """A backend that is a disk-image file, possibly with a parent.

    ``parent`` is the opened backing image: reads of ranges this image does
    not allocate fall through to it (zeroes beyond its end, or everywhere
    when None); writes only ever go to this image.
    """

    parent: Backend | None = None

    def __enter__(self) -> Self:
        return self

    @abc.abstractmethod
    def info(self) -> ImageInfo:
        """Describe the image (format, sizes, UUIDs, backing file...)."""

    def member_files(self) -> list[str]:
        """The files this image itself is made of (not its parents'): the
        image file, and for a VMDK its extents. The registry locks them all,
        as qemu does, so a user of any one of them sees the image in use."""
        return [self.path]

    def chain(self) -> Iterator[Backend]:
        """Yield this image, then its parent, grandparent..."""
        node: Backend | None = self
        while node is not None:
            yield node
            node = node.parent if isinstance(node, ImageBackend) else None

    # -- helpers for subclasses ---------------------------------------------

    def _read_backing(self, offset: int, length: int) -> Buffer:
        """Read ``length`` bytes of what lies under this image at ``offset``:
        the parent's data, zeroes past the parent's end or without one."""
        parent = self.parent
        if parent is None:
            return bytes(length)
        psize = parent.size
        if offset + length <= psize:
            return parent.read(offset, length)
        out = bytearray(length)
        if offset < psize:
            n = psize - offset
            out[:n] = parent.read(offset, n)
        return out

    def _backing_extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Extents of the parent over a range this image leaves unallocated;
        unmapped past the parent's end or without one."""
        parent = self.parent
        end = offset + length
        if parent is not None:
            pend = min(end, parent.size)
            if offset < pend:
                yield from parent.extents(offset, pend - offset)
                offset = pend
        if offset < end:
            yield Extent(offset, end - offset, False)

    def _close_parent(self) -> None:
        parent, self.parent = self.parent, None
        if parent is not None:
            parent.close()


def check_range(backend: Backend, offset: int, length: int) -> None:
    """Refuse a request outside the virtual disk with a BackendError."""
    if offset < 0 or length < 0 or offset + length > backend.size:
        raise BackendError(
            f"{backend.path or 'backend'}: request [{offset}, +{length}) is outside "
            f"the {backend.size}-byte disk"
        )


def align_up(value: int, to: int) -> int:
    """Round ``value`` up to a multiple of ``to``."""
    return -(-value // to) * to


# -- helpers for format modules: opening and creating files ------------------


def open_file(path: str, *, read_only: bool, write_through: bool = False) -> int:
    """Open an image file for a format module; a BackendError when it
    cannot be. ``write_through`` opens it ``O_DSYNC`` (each write durable
    when it returns, in the same syscall)."""
    flags = os.O_RDONLY if read_only else os.O_RDWR
    if write_through and not read_only:
        flags |= os.O_DSYNC
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BackendError(f"{path}: no such file") from None
    except OSError as e:
        raise BackendError(f"{path}: cannot open: {e.strerror or e}") from None


def create_file(path: str) -> int:
    """Create (or truncate) the file of a new image; returns the fd."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise BackendError(f"{path}: cannot create: {e.strerror or e}") from None


# -- the create entry point of format modules --------------------------------


class CreateFunction(Protocol):
    """The ``create`` every format module exposes (see :func:`image_creator`)."""

    def __call__(
        self,
        path: str,
        size: int,
        *,
        backing: str | None = None,
        backing_format: str | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        """Create a new, empty image of ``size`` bytes at ``path``."""
        ...


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """The arguments of a format module's ``create``, with the checks every
    format makes of them."""

    path: str
    size: int
    backing: str | None = None
    backing_format: str | None = None
    options: dict[str, str] | None = field(default=None, hash=False)

    def checked_options(self, allowed: set[str]) -> dict[str, str]:
        """A copy of the options (or {}), unknown keys refused."""
        return check_options(self.path, self.options, allowed)

    def refuse_backing(self, fmt: str) -> None:
        """Refuse a backing file for a format that cannot have one."""
        if self.backing is not None:
            raise BackendError(f"{self.path}: {fmt} images cannot have a backing file")

    def check_size(self, size: int, what: str = "image") -> None:
        """Refuse a size that is not a positive multiple of SECTOR (formats
        pass the size they settled on: 0 may have become the parent's)."""
        _check_size(self.path, size, what)


def _check_size(path: str, size: int, what: str) -> None:
    if size <= 0 or size % SECTOR:
        raise BackendError(f"{path}: {what} size {size} must be a positive multiple of {SECTOR}")


def image_creator(impl: Callable[[CreateRequest], None]) -> CreateFunction:
    """Turn ``impl(request)`` into a format module's public ``create``
    (one signature for all formats, the docstring of ``impl``)."""

    def create(
        path: str,
        size: int,
        *,
        backing: str | None = None,
        backing_format: str | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        impl(CreateRequest(path, size, backing, backing_format, options))

    create.__doc__ = impl.__doc__
    create.__module__ = impl.__module__
    create.__name__ = create.__qualname__ = impl.__name__
    return create


def check_options(path: str, options: dict[str, str] | None, allowed: set[str]) -> dict[str, str]:
    """Return a copy of the create ``options`` (or {}) after refusing
    unknown keys."""
    opts = dict(options or {})
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise BackendError(
            f"{path}: unknown create option(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))})"
        )
    return opts


def parent_for_create(
    path: str, backing: str, backing_format: str | None, fmt: str, what: str
) -> tuple[ImageInfo, int]:
    """For formats whose child must be of the parent's own format (VDI,
    VHD, VMDK): check ``backing_format``, open the parent read-only and
    return its info and size. ``what`` names the child in messages ("a
    differencing VDI")."""
    if backing_format not in (None, fmt):
        raise BackendError(f"{path}: {what} needs a {fmt.upper()} parent, not {backing_format}")
    parent = open_backing(path, backing, fmt)
    try:
        return parent.info(), parent.size
    finally:
        parent.close()


def cluster_pieces(offset: int, length: int, cluster: int) -> Iterator[tuple[int, int, int, int]]:
    """Split [offset, offset+length) at ``cluster`` boundaries (any
    positive size: Parallels has clusters of 63 sectors): yields (cluster
    index, offset in cluster, length, offset in the request) per piece."""
    pos = offset
    end = offset + length
    while pos < end:
        idx, inner = divmod(pos, cluster)
        n = min(cluster - inner, end - pos)
        yield idx, inner, n, pos - offset
        pos += n


def sync_files(path: str, fds: Iterable[int]) -> None:
    """Make completed writes to ``fds`` durable (SYNCHRONIZE CACHE, FUA).
    ``fdatasync`` is enough: it also flushes the file size and whatever
    else reading the data back needs. An error is a MediumError."""
    try:
        for fd in fds:
            os.fdatasync(fd)
    except OSError as e:
        raise MediumError(f"{path}: flush failed: {e.strerror or e}") from None


_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, what: str = "size") -> int:
    """Parse a size option as qemu-img writes them: ``65536``, ``64k``,
    ``2M``, ``1G`` (binary multiples); BackendError when malformed."""
    t = text.strip().lower()
    t = t.removesuffix("ib")
    unit = t[-1:] if t[-1:].isalpha() else ""
    try:
        value = int(t[: len(t) - len(unit)], 0)
        mult = _SUFFIXES[unit]
    except (ValueError, KeyError):
        raise BackendError(f"{what} {text!r} is not a size (e.g. 65536, 64k, 2M)") from None
    if value < 0:
        raise BackendError(f"{what} {text!r} is negative")
    return value * mult


def merge_extents(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Join adjacent extents with the same ``mapped`` state."""
    cur: Extent | None = None
    for e in extents:
        if e.length <= 0:
            continue
        if cur is not None and cur.mapped == e.mapped and cur.offset + cur.length == e.offset:
            cur = Extent(cur.offset, cur.length + e.length, cur.mapped)
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


class FormatModule(Protocol):
    """What a format module exposes (module-level names)."""

    NAME: str

    def probe(self, head: bytes, path: str) -> bool:
        """True when ``head`` (the first 64 KiB) is an image of this format."""
        ...

    def open(self, path: str, *, read_only: bool, write_through: bool) -> ImageBackend:
        """Open an image of this format."""
        ...

    #: Create a new, empty image of ``size`` bytes (made by :func:`image_creator`).
    create: CreateFunction


#: Registered formats by name, ``raw`` last (it accepts anything, so it is
#: the fallback). Filled on first use - detect/open_image/create_image or
#: calling :func:`formats` - not at import time: format modules import
#: this module, and loading them from here at import would make the import
#: order matter.
_FORMATS: dict[str, FormatModule] = {}
_loaded = False

_FORMAT_NAMES = ("qcow2", "parallels", "vdi", "vhd", "vhdx", "vmdk", "raw")

# Paths (realpath) being opened on this thread, outermost first: a chain that
# comes back to one of them is a loop.
_opening = threading.local()


def _stack() -> list[str]:
    st = getattr(_opening, "stack", None)
    if st is None:
        st = []
        _opening.stack = st
    return cast(list[str], st)


def _read_head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(PROBE_SIZE)
    except FileNotFoundError:
        raise BackendError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BackendError(f"{path}: is a directory, not an image") from None
    except OSError as e:
        raise BackendError(f"{path}: cannot read: {e.strerror or e}") from None


def detect(path: str) -> str:
    """Return the format name of the image at ``path`` (by content)."""
    head = _read_head(path)
    for name, mod in formats().items():
        if name == "raw":
            continue
        if mod.probe(head, path):
            return name
    return "raw"


def _format(fmt: str, path: str) -> FormatModule:
    mod = formats().get(fmt)
    if mod is None:
        known = ", ".join(sorted(formats()))
        raise BackendError(f"{path}: unknown image format {fmt!r} (known: {known})")
    return mod


def open_image(
    path: str,
    *,
    read_only: bool = False,
    write_through: bool = False,
    fmt: str | None = None,
) -> ImageBackend:
    """Open an image (detecting its format unless ``fmt`` is given), with
    its whole backing chain. Raises BackendError with one line when the
    file is missing, unsupported or damaged."""
    path = os.fspath(path)
    stack = _stack()
    real = os.path.realpath(path)
    if real in stack:
        chain = " -> ".join([*stack, real])
        raise BackendError(f"{path}: backing chain loops back to itself ({chain})")
    if len(stack) >= MAX_CHAIN_DEPTH:
        raise BackendError(f"{path}: backing chain deeper than {MAX_CHAIN_DEPTH} images")
    if fmt is None:
        fmt = detect(path)
    mod = _format(fmt, path)
    # qemu-compatible locks before anything is read or written: a writer
    # elsewhere makes what we would read meaningless (locking.py).
    lock = lock_image(path, write=not read_only)
    stack.append(real)
    try:
        img = _opened(path, fmt, mod, read_only=read_only, write_through=write_through)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    finally:
        stack.pop()
    img.image_lock = lock
    try:
        _lock_members(img, path, lock, write=not read_only)
        _check_uuids(img)
    except BackendError:
        img.close()
        raise
    return img


def _lock_members(img: ImageBackend, path: str, lock: ImageLock | None, *, write: bool) -> None:
    """Lock the files besides ``path`` that ``img`` is made of (a VMDK's
    extents). They are what a writer elsewhere would change, and unlike a
    descriptor (rewritten by renaming a new file over it) they keep their
    inode, so the image stays locked however it is updated."""
    main = os.path.realpath(path)
    extra = [p for p in dict.fromkeys(img.member_files()) if os.path.realpath(p) != main]
    if not extra:
        return
    locks = LockSet([lock] if lock is not None else [])
    img.image_lock = locks
    for member in extra:
        more = lock_image(member, write=write)
        if more is not None:
            locks.add(more)


def _opened(path: str, fmt: str, mod: FormatModule, *, read_only: bool,
            write_through: bool) -> ImageBackend:
    try:
        return mod.open(path, read_only=read_only, write_through=write_through)
    except BackendError:
        raise
    except FileNotFoundError:
        raise BackendError(f"{path}: no such file") from None
    except PermissionError:
        raise BackendError(f"{path}: permission denied") from None
    except OSError as e:
        raise BackendError(f"{path}: cannot open {fmt} image: {e.strerror or e}") from None
    except (struct.error, IndexError, ValueError, OverflowError, zlib.error) as e:
        # A parser bug or a damaged file must still surface as one line.
        raise BackendError(f"{path}: damaged {fmt} image ({type(e).__name__}: {e})") from None


def _check_uuids(img: ImageBackend) -> None:
    seen: dict[str, str] = {}
    for node in img.chain():
        if not isinstance(node, ImageBackend):
            continue
        uuid = node.info().uuid
        if not uuid or uuid.strip("0-") == "":
            continue
        if uuid in seen:
            raise BackendError(
                f"{img.path}: images {seen[uuid]} and {node.path} of one backing chain "
                f"have the same UUID {uuid}"
            )
        seen[uuid] = node.path


def resolve_backing(child_path: str, backing: str) -> str:
    """Resolve a backing file name as stored in ``child_path``: absolute
    names stay, relative ones are relative to the child's directory."""
    if backing.startswith("json:") or "://" in backing:
        raise BackendError(f"{child_path}: backing file {backing!r} is a protocol URL, not a file")
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(os.path.abspath(child_path)), backing)


def open_backing(child_path: str, backing: str, backing_format: str | None) -> ImageBackend:
    """Open the parent of ``child_path`` read-only (for format modules)."""
    ppath = resolve_backing(child_path, backing)
    if not os.path.exists(ppath):
        raise BackendError(f"{child_path}: backing file {backing!r} not found (looked for {ppath})")
    fmt = backing_format or None
    if fmt is not None and fmt not in formats():
        raise BackendError(f"{child_path}: backing file {backing!r} has unsupported format {fmt!r}")
    return open_image(ppath, read_only=True, fmt=fmt)


def create_image(
    path: str,
    fmt: str,
    size: int,
    *,
    backing: str | None = None,
    backing_format: str | None = None,
    options: dict[str, str] | None = None,
) -> None:
    """Create an empty image. ``size`` 0 with a backing file takes the
    backing file's size; a backing format is detected when not given."""
    path = os.fspath(path)
    mod = _format(fmt, path)
    if backing is not None:
        bpath = resolve_backing(path, backing)
        if backing_format is None or size == 0:
            with open_image(bpath, read_only=True, fmt=backing_format) as parent:
                if size == 0:
                    size = parent.size
                if backing_format is None and isinstance(parent, ImageBackend):
                    backing_format = parent.info().format
    _check_size(path, size, "image")
    # An existing file is replaced only when nobody uses it: the check comes
    # before anything truncates it (qemu-img create refuses the same way).
    lock = lock_image(path, write=True) if os.path.exists(path) else None
    try:
        mod.create(path, size, backing=backing, backing_format=backing_format, options=options)
    finally:
        if lock is not None:
            lock.release()


def formats() -> dict[str, FormatModule]:
    """The registered formats (loading the format modules on first call)."""
    global _loaded
    if not _loaded:
        _loaded = True
        try:
            _load_formats()
        except BaseException:
            _loaded = False
            raise
    return _FORMATS


def _load_formats() -> None:
    for name in _FORMAT_NAMES:
        full = f"{__package__}.{name}"
        try:
            mod: ModuleType = importlib.import_module(full)
        except ModuleNotFoundError as e:
            # Only a format not written yet is skipped; a module that exists
            # but fails to import is a bug that must show.
            if e.name == full:
                continue
            raise
        _FORMATS[name] = cast(FormatModule, mod)
