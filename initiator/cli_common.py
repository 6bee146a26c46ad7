"""What the ``iscsi-initiator`` subcommands share: the program name,
transfer sizes and the session options built from the command line and
the URL's credentials."""

from __future__ import annotations

import argparse

from iscsi.names import parse_url

from .session import SessionOptions

PROG = "iscsi-initiator"
CHUNK = 1 << 20
DEPTH = 8


def session_options(args: argparse.Namespace) -> SessionOptions:
    """Session options from the global command-line flags."""
    # --connect-timeout bounds the login too: a portal that accepts the
    # connection and then says nothing fails as fast as one that refuses.
    opts = SessionOptions(nop_interval=None, replacement_timeout=args.replacement_timeout,
                          connect_timeout=args.connect_timeout,
                          login_timeout=args.connect_timeout,
                          command_timeout=args.command_timeout or None,
                          connections=getattr(args, "connections", 1),
                          error_recovery_level=getattr(args, "error_recovery_level", 0))
    if args.initiator_name:
        opts.initiator_name = args.initiator_name
    if args.header_digest:
        opts.header_digest = args.header_digest
    if args.data_digest:
        opts.data_digest = args.data_digest
    if args.error_recovery_level:
        # ERL 1: lost PDUs are found by sequence gaps, and when nothing
        # follows them, by the keepalive's NOP-In (RFC 7143 §7.9).
        opts.error_recovery_level = args.error_recovery_level
        opts.nop_interval = 5.0
    if args.chap_algorithms:
        opts.chap_algorithms = tuple(int(a) for a in args.chap_algorithms.split(","))
    return opts


def with_creds(url: str, opts: SessionOptions) -> SessionOptions:
    """``opts`` with the CHAP credentials the URL carries."""
    u = parse_url(url)
    if u.user is not None:
        opts.chap_user, opts.chap_secret = u.user, u.password
    if u.target_user is not None:
        opts.target_chap_user, opts.target_chap_secret = u.target_user, u.target_password
    return opts


def human_size(n: int) -> str:
    """Bytes in binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return str(n)
