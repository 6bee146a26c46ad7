"""Our initiator against LIO, the Linux kernel target (configured through
configfs in the QEMU guest, tests/lio_vm.py): ErrorRecoveryLevel 0, 1 and 2,
CRC32C digests, CHAP, two connections per session -- login, then writes
read back and compared. LIO's negotiated values are asserted: it is the
reference where RFC 7143 leaves room."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from initiator.blockdev import BlockDevice
from initiator.session import Session
from tests.initiator_checks import MiB, opts
from tests.lio_vm import CHAP_SECRET, CHAP_USER, LIO_IQN, LioGuest, start_lio
from tests.tgt import free_port
from tests.tools import require_tool


@pytest.fixture(scope="module")
def lio() -> Iterator[LioGuest]:
    require_tool("qemu-system-x86_64")
    guest = start_lio(free_port(), free_port())
    try:
        yield guest
    finally:
        guest.stop()


async def _verified_io(s: Session) -> None:
    dev = await BlockDevice.from_session(s, 0)
    assert dev.size == 16 * MiB
    data = os.urandom(MiB)
    for off in (0, 5 * MiB + 4096, 15 * MiB):
        await dev.write(off, data)
        assert await dev.read(off, MiB) == data


@pytest.mark.parametrize("erl", [0, 1, 2])
async def test_erl_with_digests(lio: LioGuest, erl: int) -> None:
    s = await Session.connect("127.0.0.1", lio.port, LIO_IQN, opts(
        error_recovery_level=erl, header_digest="CRC32C", data_digest="CRC32C",
        command_timeout=60.0))
    async with s:
        p = s.params
        assert p.error_recovery_level == erl  # LIO offers 2: the Min is ours
        assert p.header_digest and p.data_digest
        await _verified_io(s)


async def test_chap(lio: LioGuest) -> None:
    s = await Session.connect("127.0.0.1", lio.chap_port, LIO_IQN, opts(
        chap_user=CHAP_USER, chap_secret=CHAP_SECRET, command_timeout=60.0))
    async with s:
        await _verified_io(s)


async def test_two_connections_per_session(lio: LioGuest) -> None:
    s = await Session.connect("127.0.0.1", lio.port, LIO_IQN, opts(
        connections=2, error_recovery_level=2, command_timeout=60.0))
    async with s:
        assert s.params.max_connections >= 2
        assert s.connection_count == 2
        await _verified_io(s)


def test_conformance_kit_against_lio(lio: LioGuest) -> None:
    """The kit runs to completion against LIO; what LIO does is recorded
    here (README's table), every failure with the rule it breaks."""
    from initiator.conformance import KitConfig, Verdict, run, select
    from iscsi.names import parse_url

    url = parse_url(f"iscsi://127.0.0.1:{lio.port}/{LIO_IQN}/0")
    outcomes = run(KitConfig(url=url, timeout=5.0, quiet=0.3, allow_dataloss=True), select())
    counts = {v: sum(o.verdict is v for o in outcomes) for v in Verdict}
    failures = sorted(f"{o.spec.id} ({o.spec.section}): {o.message}" for o in outcomes
                      if o.verdict in (Verdict.FAIL, Verdict.ERROR))
    print("LIO:", {v.value: n for v, n in counts.items()}, *failures, sep="\n  ")
    assert counts[Verdict.PASS] > 0 and len(outcomes) == len(select())
