"""``iscsi-target image``: create, inspect, check, convert, commit and
snapshot disk images (in the spirit of ``qemu-img`` and ``VBoxManage
createmedium/clonemedium/mergemedium``)::

    iscsi-target image create -f FMT [-o K=V[,K=V]] [-b BACKING [-F BFMT]] PATH [SIZE]
    iscsi-target image info [--output human|json] PATH
    iscsi-target image check [--output human|json] PATH          exit 0 ok, 2 errors
    iscsi-target image convert [-f FMT] -O FMT [-o K=V] [-p] SRC DST
    iscsi-target image commit [-p] CHILD
    iscsi-target image snapshot [-f FMT] [-n NAME] PATH
    iscsi-target image mount [--read-only] [--at LAYER] [--list [--json]] IMAGE [MOUNTPOINT]

Every failure is one line on stderr and a non-zero exit status. Long work
(convert, commit) shows a progress bar on stderr when it is a terminal, or
with ``-p``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from target.backends.base import Backend, BackendError, Extent
from target.image_info import human_size as _human
from target.image_info import info_dict, print_info
from target.backends.locking import ImageOpenHere, force_share
from target.image_mount import add_parser as add_mount_parser, run as run_mount
from target.backends.registry import (
    ImageBackend,
    create_image,
    formats,
    open_image,
    parse_size,
)

__all__ = ["ProgressBar", "add_subparser", "commit", "convert", "main", "run", "snapshot"]

#: Bytes moved per read/write while copying.
CHUNK = 1 << 20

_ZERO = bytes(CHUNK)

# Exit statuses (qemu-img check uses the same: 0 clean, 2 corruption).
EXIT_OK = 0
EXIT_FAIL = 1
EXIT_CORRUPT = 2


class CLIError(Exception):
    """A one-line user error."""


class ProgressBar:
    """A one-line progress bar on a terminal: ``(42.00/100%)`` as qemu-img
    prints, redrawn at most every 0.1 s."""

    def __init__(self, total: int, *, enabled: bool, stream: TextIO | None = None,
                 label: str = "") -> None:
        self.total = max(total, 1)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self._last = -1.0
        self._shown = False

    def update(self, done: int) -> None:
        """Report ``done`` units of ``total``."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < self.total:
            return
        self._last = now
        pct = min(100.0, 100.0 * done / self.total)
        width = 30
        fill = int(width * pct / 100)
        self.stream.write(f"\r{self.label}[{'#' * fill}{' ' * (width - fill)}] ({pct:6.2f}/100%)")
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        """Finish the line."""
        if self.enabled:
            self.update(self.total)
            if self._shown:
                self.stream.write("\n")
                self.stream.flush()


def _parse_options(items: Sequence[str] | None) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in items or ():
        for part in item.split(","):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise CLIError(f"-o {part!r}: expected KEY=VALUE")
            opts[key.strip()] = value.strip()
    return opts


def _want_progress(flag: bool) -> bool:
    return flag or sys.stderr.isatty()


# ---------------------------------------------------------------------------
# copying


class _Marker(Backend):
    """A stand-in parent whose every byte reports one fixed mapping state:
    swapping it in for an image's real parent tells which ranges the image
    itself defines (the answer changes with the marker) and which it
    inherits (the answer follows the marker)."""

    def __init__(self, size: int, mapped: bool) -> None:
        self._size = size
        self._mapped = mapped

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def write(self, offset: int, data: Any) -> None:
        raise BackendError("marker parent is read-only")

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        yield Extent(offset, length, self._mapped)


def _split(extents: Iterator[Extent]) -> list[tuple[int, int, bool]]:
    return [(e.offset, e.offset + e.length, e.mapped) for e in extents]


def own_ranges(img: ImageBackend) -> list[tuple[int, int, str]]:
    """The ranges ``img`` defines itself, without its parent: a list of
    (start, end, kind) with kind "data" (stored here) or "zero" (marked as
    zeroes here, hiding the parent). Everything else is inherited."""
    saved = img.parent
    size = img.size
    try:
        img.parent = _Marker(size, True)
        with_mapped = _split(img.extents(0, size))
        img.parent = _Marker(size, False)
        with_unmapped = _split(img.extents(0, size))
    finally:
        img.parent = saved
    # Merge the two boundary lists: a point is "data" when mapped under both
    # markers, "zero" when unmapped under both, inherited otherwise.
    cuts = sorted({0, size} | {a for a, _, _ in with_mapped} | {b for _, b, _ in with_mapped}
                  | {a for a, _, _ in with_unmapped} | {b for _, b, _ in with_unmapped})

    def state_at(lst: list[tuple[int, int, bool]], pos: int, idx: list[int]) -> bool:
        while lst[idx[0]][1] <= pos:
            idx[0] += 1
        return lst[idx[0]][2]

    out: list[tuple[int, int, str]] = []
    ia, ib = [0], [0]
    for a, b in itertools.pairwise(cuts):
        if a >= b:
            continue
        m1 = state_at(with_mapped, a, ia)
        m2 = state_at(with_unmapped, a, ib)
        kind = "data" if m1 and m2 else "zero" if not m1 and not m2 else ""
        if not kind:
            continue
        if out and out[-1][1] == a and out[-1][2] == kind:
            out[-1] = (out[-1][0], b, kind)
        else:
            out.append((a, b, kind))
    return out


def _copy_range(src: Backend, dst: Backend, start: int, end: int, bar: ProgressBar,
                done: int, skip_zero: bool) -> int:
    pos = start
    while pos < end:
        n = min(CHUNK, end - pos)
        data = src.read(pos, n)
        if not (skip_zero and data == _ZERO[:n]):
            dst.write(pos, data)
        pos += n
        done += n
        bar.update(done)
    return done


def convert(src_path: str, dst_path: str, out_fmt: str, *, src_fmt: str | None = None,
            options: dict[str, str] | None = None, progress: bool = False,
            overwrite: bool = False, share: bool = False) -> None:
    """Copy the virtual disk of ``src_path`` (its whole chain, flattened)
    into a new image. Unallocated ranges and all-zero chunks are not
    written, so the copy stays sparse. An existing ``dst_path`` is
    replaced only with ``overwrite`` (like ``create``, a typo must not
    destroy an image), and never when it is a file of the source's chain
    (the image locks refuse that). ``share`` opens the source as
    ``qemu-img convert -U`` does."""
    if os.path.exists(dst_path):
        if os.path.exists(src_path) and os.path.samefile(src_path, dst_path):
            raise CLIError(f"{dst_path}: source and destination are the same file")
        if not overwrite:
            raise CLIError(f"{dst_path}: already exists (use --force to replace it)")
    with force_share() if share else contextlib.nullcontext():
        src = open_image(src_path, read_only=True, fmt=src_fmt)
    with src:
        size = src.size
        try:
            create_image(dst_path, out_fmt, size, options=options)
        except ImageOpenHere:
            raise CLIError(f"{dst_path}: is part of {src_path} (a backing file or extent), "
                           "which is being read; refused") from None
        try:
            with open_image(dst_path, read_only=False, fmt=out_fmt) as dst:
                mapped = [e for e in src.extents(0, size) if e.mapped]
                total = sum(e.length for e in mapped)
                bar = ProgressBar(total, enabled=progress)
                done = 0
                for e in mapped:
                    done = _copy_range(src, dst, e.offset, e.offset + e.length, bar, done, True)
                dst.flush()
                bar.done()
        except BaseException:
            _unlink_quiet(dst_path)
            raise


def _unlink_quiet(path: str) -> None:
    for p in (path, path + ".parent"):
        try:
            os.unlink(p)
        except OSError:
            pass


def commit(child_path: str, *, progress: bool = False, drop: bool = False) -> str:
    """Merge a differencing image into its parent (VBoxManage mergemedium /
    qemu-img commit): every range the child defines - data, or zeroes that
    hide the parent - is written into the parent, which is then flushed.
    The child is kept, as qemu-img keeps it, unless ``drop`` (it now adds
    nothing to its parent). Returns the parent's path."""
    with open_image(child_path, read_only=True) as child:
        parent = child.parent
        if parent is None:
            raise CLIError(f"{child_path}: has no parent image to commit into")
        parent_path = parent.path
        ranges = own_ranges(child)
        # The child's own read-only handle on the parent goes now: the
        # writable one below must be the only one.
        child.parent = None
        parent.close()
        child.parent = _Marker(child.size, False)
        with open_image(parent_path, read_only=False) as target:
            if target.size < child.size:
                raise CLIError(f"{child_path}: parent {parent_path} is smaller ({target.size}) than "
                               f"the child ({child.size})")
            total = sum(b - a for a, b, _ in ranges)
            bar = ProgressBar(total, enabled=progress)
            done = 0
            for a, b, kind in ranges:
                if kind == "data":
                    done = _copy_range(child, target, a, b, bar, done, False)
                else:
                    target.write_zeroes(a, b - a)
                    done += b - a
                    bar.update(done)
            target.flush()
            bar.done()
    if drop:
        _unlink_quiet(child_path)
    return parent_path


_EXT = {"qcow2": ".qcow2", "vdi": ".vdi", "vhd": ".vhd", "vhdx": ".vhdx", "vmdk": ".vmdk", "raw": ".img",
        "parallels": ".hds"}


def snapshot(path: str, *, fmt: str | None = None, name: str | None = None) -> str:
    """Add a differencing child over ``path`` and return its path. The
    child has the parent's format when that format has differencing images
    (VDI, VHD, VHDX, VMDK, qcow2), else qcow2; it gets a new UUID."""
    with open_image(path, read_only=True) as base:
        info = base.info()
    pfmt = info.format
    if fmt is None:
        fmt = pfmt if pfmt in ("vdi", "vhd", "vhdx", "qcow2") or (
            pfmt == "vmdk" and info.subformat in ("monolithicSparse", "twoGbMaxExtentSparse")) \
            else "qcow2"
    if name is None:
        stem = os.path.splitext(path)[0]
        n = 1
        while True:
            name = f"{stem}-snap{n}{_EXT.get(fmt, '.' + fmt)}"
            if not os.path.exists(name):
                break
            n += 1
    elif os.path.exists(name):
        raise CLIError(f"{name}: already exists")
    rel = os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(name)))
    create_image(name, fmt, 0, backing=rel, backing_format=pfmt)
    return name


# ---------------------------------------------------------------------------
# the command line


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``image`` with its sub-commands to an argparse sub-parser set;
    the parsed namespace has ``image_command`` and is run by :func:`run`."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "image", help="create, inspect, check, convert, commit and snapshot disk images",
        description="Disk image tools (qemu-img / VBoxManage style).")
    _fill_parser(p)
    return p


_FORCE_SHARE = ("open the image even if another process is using it (read-only; what is "
                "read may be changing), like qemu-img -U")


def _fill_parser(p: argparse.ArgumentParser) -> None:
    fmts = sorted(formats())
    sub = p.add_subparsers(dest="image_command", required=True)

    c = sub.add_parser("create", help="create a new image")
    c.add_argument("-f", "--format", required=True, choices=fmts)
    c.add_argument("-o", "--options", action="append", metavar="K=V[,K=V]",
                   help="format options, e.g. type=fixed, subformat=monolithicFlat, cluster_size=64k")
    c.add_argument("-b", "--backing", metavar="BACKING", help="create a differencing image over BACKING")
    c.add_argument("-F", "--backing-format", metavar="FMT")
    c.add_argument("path", metavar="PATH")
    c.add_argument("size", metavar="SIZE", nargs="?", help="e.g. 10G (default with -b: the parent's)")

    i = sub.add_parser("info", help="show format, sizes, UUIDs and the parent chain")
    i.add_argument("--output", choices=("human", "json"), default="human")
    i.add_argument("-f", "--format", choices=fmts)
    i.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE)
    i.add_argument("--backing-chain", action="store_true",
                   help="with --output json: a list of the whole chain, as qemu-img prints it")
    i.add_argument("path", metavar="PATH")

    k = sub.add_parser("check", help="check the image's metadata (exit 0 clean, 2 errors)")
    k.add_argument("--output", choices=("human", "json"), default="human")
    k.add_argument("-f", "--format", choices=fmts)
    k.add_argument("-p", "--progress", action="store_true")
    k.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE)
    k.add_argument("path", metavar="PATH")

    v = sub.add_parser("convert", help="copy an image (and its chain) into a new image")
    v.add_argument("-f", "--format", choices=fmts, help="source format (default: detect)")
    v.add_argument("-O", "--output-format", required=True, choices=fmts)
    v.add_argument("-o", "--options", action="append", metavar="K=V[,K=V]")
    v.add_argument("-p", "--progress", action="store_true")
    v.add_argument("--force", action="store_true", help="replace DST if it exists")
    v.add_argument("-U", "--force-share", action="store_true", help=_FORCE_SHARE)
    v.add_argument("src", metavar="SRC")
    v.add_argument("dst", metavar="DST")

    m = sub.add_parser("commit", help="merge a differencing image into its parent")
    m.add_argument("-p", "--progress", action="store_true")
    m.add_argument("-d", "--drop", action="store_true",
                   help="delete the child file afterwards (by default it is kept, as qemu-img does)")
    m.add_argument("path", metavar="CHILD")

    s = sub.add_parser("snapshot", help="add a differencing child and print its name")
    s.add_argument("-f", "--format", choices=fmts, help="child format (default: the parent's, or qcow2)")
    s.add_argument("-n", "--name", metavar="PATH", help="child file name")
    s.add_argument("path", metavar="PATH")
    add_mount_parser(sub)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run a parsed ``image`` command; returns the exit status."""
    out = out if out is not None else sys.stdout
    try:
        return _dispatch(args, out)
    except (CLIError, BackendError) as exc:
        print(f"iscsi-target image: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("iscsi-target image: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace, out: TextIO) -> int:
    # convert shares its source only: the image it writes is locked as usual.
    if getattr(args, "force_share", False) and args.image_command != "convert":
        with force_share():
            return _dispatch_command(args, out)
    return _dispatch_command(args, out)


def _dispatch_command(args: argparse.Namespace, out: TextIO) -> int:
    cmd = args.image_command
    if cmd == "create":
        size = parse_size(args.size) if args.size is not None else 0
        if size == 0 and args.backing is None:
            raise CLIError("create: SIZE is required without -b BACKING")
        if os.path.exists(args.path):
            raise CLIError(f"{args.path}: already exists (remove it first)")
        create_image(args.path, args.format, size, backing=args.backing,
                     backing_format=args.backing_format, options=_parse_options(args.options))
        with open_image(args.path, read_only=True, fmt=args.format) as img:
            info = img.info()
        out.write(f"Formatting '{args.path}', fmt={info.format} size={info.virtual_size}"
                  + (f" backing_file={args.backing}" if args.backing else "")
                  + (f" uuid={info.uuid}" if info.uuid else "") + "\n")
        return EXIT_OK
    if cmd == "info":
        with open_image(args.path, read_only=True, fmt=args.format) as img:
            d = info_dict(img)
        if args.output == "json":
            if args.backing_chain:
                # qemu-img info --backing-chain: a list, the image first.
                chain = [{k: v for k, v in d.items() if k != "backing-chain"}, *d["backing-chain"]]
                out.write(json.dumps(chain, indent=4) + "\n")
            else:
                out.write(json.dumps(d, indent=4) + "\n")
        else:
            print_info(d, out)
            for n, parent in enumerate(d["backing-chain"], 1):
                out.write(f"parent {n}:\n")
                print_info(parent, out, "    ")
        return EXIT_OK
    if cmd == "check":
        return _check(args, out)
    if cmd == "convert":
        convert(args.src, args.dst, args.output_format, src_fmt=args.format,
                options=_parse_options(args.options), progress=_want_progress(args.progress),
                overwrite=args.force, share=args.force_share)
        return EXIT_OK
    if cmd == "commit":
        parent = commit(args.path, progress=_want_progress(args.progress), drop=args.drop)
        out.write(f"Image committed into {parent}\n")
        return EXIT_OK
    if cmd == "snapshot":
        out.write(snapshot(args.path, fmt=args.format, name=args.name) + "\n")
        return EXIT_OK
    if cmd == "mount":
        return run_mount(args, out)
    raise CLIError(f"unknown image command {cmd!r}")  # pragma: no cover


def _check(args: argparse.Namespace, out: TextIO) -> int:
    from target.image_check import check_image

    bar = ProgressBar(1, enabled=_want_progress(args.progress), label="checking ")

    def progress(done: int, total: int) -> None:
        bar.total = max(total, 1)
        bar.update(done)

    res = check_image(args.path, args.format, progress)
    bar.done()
    # Opening the image is a check too: the backend validates its header
    # and chain (UUIDs, parent modification) with its own rules.
    open_error = None
    try:
        with open_image(args.path, read_only=True, fmt=args.format):
            pass
    except BackendError as exc:
        open_error = str(exc)
    errors = list(res.errors) + ([open_error] if open_error else [])
    if args.output == "json":
        out.write(json.dumps({
            "filename": args.path, "format": res.format, "check-errors": 0,
            "corruptions": len(errors), "leaks": len(res.leaks),
            "errors": errors, "leak-details": res.leaks, "notes": res.notes,
            "allocated-clusters": res.allocated, "total-clusters": res.total,
            "cluster-size": res.block_size,
        }, indent=4) + "\n")
    else:
        out.writelines(f"ERROR {e}\n" for e in errors)
        out.writelines(f"Leaked: {leak}\n" for leak in res.leaks)
        out.writelines(f"Note: {note}\n" for note in res.notes)
        if not res.checked:
            out.write(f"{args.path}: {res.format} image, nothing to check\n")
        elif errors:
            out.write(f"\n{len(errors)} errors were found on the image.\n"
                      "Data may be corrupted, or further writes to the image may corrupt it.\n")
        else:
            out.write("No errors were found on the image.\n")
            if res.leaks:
                out.write(f"{len(res.leaks)} leaked block(s): space that is not used; harmless.\n")
        if res.total:
            pct = 100.0 * res.allocated / res.total
            out.write(f"{res.allocated}/{res.total} = {pct:.2f}% allocated "
                      f"({_human(res.block_size)} blocks)\n")
    return EXIT_CORRUPT if errors else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``iscsi-target image ...`` without the ``image`` word
    (``main(["info", "disk.vdi"])``)."""
    parser = argparse.ArgumentParser(prog="iscsi-target image",
                                     description="Disk image tools (qemu-img / VBoxManage style).")
    _fill_parser(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
