"""Selecting and running conformance tests, and the ``iscsi-conformance``
command line."""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import socket
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from iscsi.names import ISCSIURL, default_initiator_name, format_url, parse_url

from . import (  # noqa: F401 (importing a family registers its tests)
    chap,
    digests,
    erl,
    ffp,
    ffp_data,
    ffp_tasks,
    login,
    login_keys,
    mcs,
    tmf,
)
from .context import Context, KitConfig
from .model import (
    REGISTRY,
    Failed,
    NotSupported,
    Outcome,
    TestError,
    TestSpec,
    Verdict,
    Warned,
)
from .report import print_outcome, print_summary, write_json, write_junit
from .wire import PeerClosed, Transcript, TestTimeout


#: Families in the order a run goes through them (login first: when it
#: fails, the rest cannot mean much).
_FAMILY_ORDER = ("login", "chap", "ffp", "tmf", "digests", "erl", "mcs")


def select(patterns: Sequence[str] = ()) -> list[TestSpec]:
    """The registered tests whose id matches any of the fnmatch
    ``patterns`` (all tests when none). A pattern without a dot-free
    wildcard also matches as a prefix (``login`` = ``login.*``)."""
    ordered = sorted(REGISTRY, key=lambda s: _FAMILY_ORDER.index(s.family)
                     if s.family in _FAMILY_ORDER else len(_FAMILY_ORDER))
    if not patterns:
        return ordered
    out = []
    for spec in ordered:
        for p in patterns:
            if fnmatch.fnmatchcase(spec.id, p) or fnmatch.fnmatchcase(spec.id, p + ".*"):
                out.append(spec)
                break
    return out


def run_one(spec: TestSpec, config: KitConfig) -> Outcome:
    """Run one test on fresh connections, within ``config.timeout``."""
    start = time.monotonic()
    transcript = Transcript([], start)
    if spec.dataloss and not config.allow_dataloss:
        return Outcome(spec, Verdict.NOT_SUPPORTED, "writes or resets: needs --allow-dataloss")
    if spec.needs_chap and (config.url.user is None or config.url.password is None):
        return Outcome(spec, Verdict.NOT_SUPPORTED, "needs CHAP credentials in the URL")
    verdict, message, pdu = Verdict.PASS, "", None
    ctx: Context | None = None
    try:
        ctx = Context(config, spec, transcript, start + config.timeout)
        message = spec.func(ctx) or ""
    except Failed as exc:
        verdict, message, pdu = Verdict.FAIL, str(exc), exc.pdu
    except Warned as exc:
        verdict, message = Verdict.WARNING, str(exc)
    except NotSupported as exc:
        verdict, message = Verdict.NOT_SUPPORTED, str(exc)
    except TestError as exc:
        verdict, message = Verdict.ERROR, str(exc)
    except TestTimeout as exc:
        verdict, message = Verdict.ERROR, f"timed out after {config.timeout:g} s: {exc}"
    except PeerClosed as exc:
        verdict, message = Verdict.FAIL, f"target closed the connection unexpectedly: {exc}"
    except (OSError, socket.error) as exc:
        verdict, message = Verdict.ERROR, f"network error: {exc}"
    except Exception as exc:  # a bug in the kit must not stop the run
        verdict, message = Verdict.ERROR, f"kit error: {type(exc).__name__}: {exc}"
    finally:
        if ctx is not None:
            ctx.close_all()
    return Outcome(spec, verdict, message, pdu, time.monotonic() - start, transcript.lines)


def run(config: KitConfig, specs: Sequence[TestSpec], out: TextIO | None = None) -> list[Outcome]:
    """Run ``specs`` in order, printing each outcome to ``out`` if given."""
    outcomes = []
    for spec in specs:
        o = run_one(spec, config)
        outcomes.append(o)
        if out is not None:
            print_outcome(o, out, config.verbose)
            out.flush()
    return outcomes


def public_url(url: ISCSIURL) -> str:
    """The URL without its secrets, for reports."""
    return format_url(ISCSIURL(url.host, url.port, url.target, url.lun,
                               url.user, None, url.target_user, None, url.header_digest))


def _cli_version() -> str:
    try:
        return importlib.metadata.version("aioiscsi")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argparse definition of ``iscsi-conformance`` (also used by
    scripts/gen-docs for the man page and completions)."""
    p = argparse.ArgumentParser(
        prog="iscsi-conformance",
        description="Check an iSCSI target against RFC 7143 at the PDU level: login and key "
                    "negotiation, CHAP, full feature phase, task management, digests.")
    p.add_argument("url", nargs="?", help="iscsi://[user%%secret@]host[:port]/IQN/LUN "
                   "(?target_user=..&target_password=.. for mutual CHAP)")
    p.add_argument("url2", nargs="?", help="a second portal or credentials for tests that "
                   "need a second initiator (default: the first URL)")
    p.add_argument("--version", action="version",
                   version=f"iscsi-conformance {_cli_version()}")
    p.add_argument("--list", action="store_true", help="list the tests (with -t: those selected)")
    p.add_argument("-t", "--test", action="append", default=[], metavar="PATTERN",
                   help="run the tests whose id matches this glob (family.suite.test); repeatable")
    p.add_argument("--allow-dataloss", action="store_true",
                   help="also run tests that write to the LUN or reset it")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--junit", metavar="FILE", help="write the results as JUnit XML")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print the PDUs exchanged by each failing test")
    p.add_argument("--initiator-name", help="our InitiatorName (default: this host's)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time limit of each test (default 10)")
    p.add_argument("--quiet-wait", type=float, default=1.0, metavar="SECONDS",
                   help="how long to watch for an answer that must not come (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``iscsi-conformance``: 0 when no test failed or
    errored, 1 otherwise, 2 for a usage error, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    specs = select(args.test)
    if args.list:
        for s in specs:
            flags = " [dataloss]" if s.dataloss else ""
            print(f"{s.id:<44} {s.section:<22} {s.level.value:<6} {s.description}{flags}")
        return 0
    if not args.url:
        print("iscsi-conformance: a target URL is required (or --list)", file=sys.stderr)
        return 2
    if not specs:
        print(f"iscsi-conformance: no test matches {' '.join(args.test)}", file=sys.stderr)
        return 2
    try:
        url = parse_url(args.url)
        url2 = parse_url(args.url2) if args.url2 else None
    except ValueError as exc:
        print(f"iscsi-conformance: {exc}", file=sys.stderr)
        return 2
    if url.target is None:
        print("iscsi-conformance: the URL must name a target (iscsi://host/IQN/LUN)",
              file=sys.stderr)
        return 2
    if args.timeout <= 0 or args.quiet_wait <= 0:
        print("iscsi-conformance: --timeout and --quiet-wait must be positive", file=sys.stderr)
        return 2
    config = KitConfig(url=url, url2=url2,
                       initiator_name=args.initiator_name or default_initiator_name(),
                       timeout=args.timeout, allow_dataloss=args.allow_dataloss,
                       quiet=min(args.quiet_wait, args.timeout / 2), verbose=args.verbose)
    outcomes: list[Outcome] = []
    interrupted = False
    try:
        for spec in specs:
            o = run_one(spec, config)
            outcomes.append(o)
            print_outcome(o, sys.stdout, config.verbose)
            sys.stdout.flush()
    except KeyboardInterrupt:
        # Reports still cover the tests that ran.
        interrupted = True
        print("iscsi-conformance: interrupted", file=sys.stderr)
    print_summary(outcomes, sys.stdout)
    target = public_url(url)
    try:
        if args.json:
            write_json(args.json, outcomes, target)
        if args.junit:
            write_junit(args.junit, outcomes, target)
    except OSError as exc:
        print(f"iscsi-conformance: cannot write the report: {exc}", file=sys.stderr)
        return 2
    if interrupted:
        return 130
    bad = any(o.verdict in (Verdict.FAIL, Verdict.ERROR) for o in outcomes)
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
