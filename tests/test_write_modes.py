"""VirtualBox write modes (normal, writethrough, immutable, multiattach,
shareable, readonly) and bandwidth groups: backend-level behaviour, and the
proofs over iSCSI (two initiators on one multiattach LUN; an immutable LUN
back to its base content after a target restart)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from target.backends import modes
from target.backends.bandwidth import (
    BandwidthGroup,
    BandwidthGroups,
    ThrottledBackend,
    parse_limit,
)
from target.backends.base import BackendError, OutOfResources
from target.backends.memory import MemoryBackend
from target.backends.modes import (
    ImmutableBackend,
    PerInitiatorBackend,
    WriteMode,
    initiator_scope,
    open_with_mode,
    parse_mode,
)
from target.backends.registry import create_image, open_image
from target.config import LunSpec
from tests.target_fixture import TARGET_NAME, make_config, running_target
from tests.tools import require_tool

MiB = 1 << 20
SIZE = 4 * MiB


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def base_vdi(tmp_path: Path) -> str:
    """A dynamic VDI whose first MiB is 0x42."""
    p = str(tmp_path / "base.vdi")
    create_image(p, "vdi", SIZE)
    with open_image(p) as img:
        img.write(0, b"\x42" * MiB)
    return p


# ---------------------------------------------------------------- modes


def test_parse_mode() -> None:
    assert parse_mode("Write-Through") is WriteMode.WRITETHROUGH
    assert parse_mode("read-only") is WriteMode.READONLY
    assert parse_mode("multiattach") is WriteMode.MULTIATTACH
    with pytest.raises(BackendError, match="not allowed"):
        parse_mode("sometimes")


def test_normal_and_writethrough_write_the_image(base_vdi: str) -> None:
    for mode in ("normal", "writethrough"):
        with open_with_mode(base_vdi, mode) as b:
            b.write(MiB, b"\x01" * 4096)
            b.flush()
        with open_image(base_vdi, read_only=True) as img:
            assert bytes(img.read(MiB, 4096)) == b"\x01" * 4096


def test_readonly_refuses_writes(base_vdi: str) -> None:
    before = _digest(base_vdi)
    with open_with_mode(base_vdi, WriteMode.READONLY) as b:
        assert b.read_only
        with pytest.raises(BackendError):
            b.write(0, b"\0" * 512)
    assert _digest(base_vdi) == before


def test_shareable_accepts_fixed_refuses_dynamic(tmp_path: Path, base_vdi: str) -> None:
    fixed = str(tmp_path / "fixed.vdi")
    create_image(fixed, "vdi", SIZE, options={"type": "fixed"})
    with open_with_mode(fixed, "shareable") as b:
        b.write(0, b"\x05" * 512)
    raw = str(tmp_path / "disk.raw")
    create_image(raw, "raw", SIZE)
    open_with_mode(raw, "shareable").close()
    with pytest.raises(BackendError) as exc:
        open_with_mode(base_vdi, "shareable")
    msg = str(exc.value)
    assert "fixed-size" in msg and "dynamic" in msg and "\n" not in msg


@pytest.mark.parametrize("child_format", [None, "vdi"])
def test_immutable_discards_writes_at_each_start(tmp_path: Path, base_vdi: str,
                                                 child_format: str | None) -> None:
    state = str(tmp_path / "state")
    before = _digest(base_vdi)
    with ImmutableBackend(base_vdi, state, child_format=child_format) as b:
        assert bytes(b.read(0, 512)) == b"\x42" * 512
        b.write(0, b"\x99" * 8192)
        b.flush()
        assert bytes(b.read(0, 8192)) == b"\x99" * 8192
        child = b.child_path
    assert os.path.exists(child)  # kept until the next start, as VirtualBox does
    assert _digest(base_vdi) == before
    with ImmutableBackend(base_vdi, state, child_format=child_format) as b:
        assert bytes(b.read(0, 8192)) == b"\x42" * 8192
    assert _digest(base_vdi) == before


def test_immutable_without_state_dir_cleans_up(base_vdi: str) -> None:
    b = open_with_mode(base_vdi, "immutable")
    assert isinstance(b, ImmutableBackend)
    child = b.child_path
    b.write(0, b"\x01" * 512)
    b.close()
    assert not os.path.exists(os.path.dirname(child))


def test_multiattach_children_are_private(tmp_path: Path, base_vdi: str) -> None:
    state = str(tmp_path / "state")
    before = _digest(base_vdi)
    with PerInitiatorBackend(base_vdi, state) as b:
        a = b.for_initiator("iqn.2026-01.org.example:a")
        a.write(0, b"\xaa" * 4096)
        with initiator_scope("iqn.2026-01.org.example:b"):
            assert bytes(b.read(0, 4096)) == b"\x42" * 4096
            b.write(4096, b"\xbb" * 4096)
            # thin + zero_after_discard: a discard hides the base's data.
            assert b.thin and b.zero_after_discard
            b.discard(65536, 65536)
            assert bytes(b.read(65536, 65536)) == bytes(65536)
        with initiator_scope("IQN.2026-01.ORG.EXAMPLE:A"):  # names are case-insensitive
            assert bytes(b.read(0, 8192)) == b"\xaa" * 4096 + b"\x42" * 4096
        with pytest.raises(BackendError, match="without an initiator"):
            b.read(0, 512)
        b.flush()  # no initiator: flushes every child
        assert b.initiators() == ["iqn.2026-01.org.example:a", "iqn.2026-01.org.example:b"]
    assert _digest(base_vdi) == before
    # Children persist across restarts (unlike immutable) ...
    with PerInitiatorBackend(base_vdi, state) as b, initiator_scope("iqn.2026-01.org.example:a"):
        assert bytes(b.read(0, 4096)) == b"\xaa" * 4096
    # ... unless reset.
    with PerInitiatorBackend(base_vdi, state, reset=True) as b, \
            initiator_scope("iqn.2026-01.org.example:a"):
        assert bytes(b.read(0, 4096)) == b"\x42" * 4096


def test_initiator_context_follows_into_threads(tmp_path: Path, base_vdi: str) -> None:
    seen: list[str | None] = []

    async def main() -> None:
        with initiator_scope("iqn.2026-01.org.example:t"):
            await asyncio.to_thread(lambda: seen.append(modes.current_initiator()))
        seen.append(modes.current_initiator())

    asyncio.run(main())
    assert seen == ["iqn.2026-01.org.example:t", None]


def test_mode_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(BackendError) as exc:
        open_with_mode(str(tmp_path / "missing.vdi"), "immutable")
    assert "\n" not in str(exc.value)
    with pytest.raises(BackendError, match="child format"):
        modes.child_format_for("vdi", "nonsense")


# ---------------------------------------------------------------- bandwidth


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_parse_limit() -> None:
    assert parse_limit("20") == 20_000_000
    assert parse_limit("20M") == 20_000_000
    assert parse_limit("500K") == 500_000
    assert parse_limit("100m") == 12_500_000  # megabits
    with pytest.raises(BackendError):
        parse_limit("fast")


def test_token_bucket_debt_and_live_limit_change() -> None:
    clock = FakeClock()
    g = BandwidthGroup("g", 1_000_000, burst=1_000_000, clock=clock)
    assert g.delay() == 0
    g.charge(3_000_000)  # 1 MB from the bucket, 2 MB of debt
    assert g.delay() == pytest.approx(2.0)
    clock.t = 1.0
    assert g.delay() == pytest.approx(1.0)
    g.set_limit(2_000_000)  # bandwidthctl set: applies to the remaining debt
    assert g.delay() == pytest.approx(0.5)
    g.set_limit(None)
    assert g.delay() == 0


def test_group_rate_over_time_shared_by_two_luns() -> None:
    clock = FakeClock()
    groups = BandwidthGroups()
    g = groups.add("Limit", 2_000_000)
    g._clock = clock  # deterministic time for the test
    g._stamp = 0.0
    luns = [ThrottledBackend(MemoryBackend(8 * MiB), g) for _ in range(2)]
    for i in range(20):
        wait = g.delay()
        clock.t += wait  # what an awaiting caller would do
        luns[i % 2].write(0, bytes(MiB))
    clock.t += g.delay()
    # 20 MiB at 2 MB/s, less the initial burst, whichever LUN moved it.
    expected = (20 * MiB - g._burst()) / 2_000_000
    assert clock.t == pytest.approx(expected, rel=1e-6)
    assert g.total == 20 * MiB
    assert groups.list() == [("Limit", 2_000_000)]
    groups.set("Limit", "10M")
    assert g.limit == 10_000_000
    with pytest.raises(BackendError, match="does not exist"):
        groups.set("Other", "1M")


def test_paused_group_waits_until_raised() -> None:
    async def main() -> None:
        g = BandwidthGroup("p", 0, burst=0)
        b = ThrottledBackend(MemoryBackend(MiB), g)
        b.write(0, b"\1" * 4096)
        assert g.delay() == float("inf")
        waiter = asyncio.ensure_future(b.throttle())
        await asyncio.sleep(0)  # let it park on the group
        assert not waiter.done()
        g.set_limit(None)
        await asyncio.wait_for(waiter, 5)

    asyncio.run(main())


def test_blocking_wait_times_out_while_paused() -> None:
    g = BandwidthGroup("p", 0, burst=0)
    g.charge(1)
    assert g.wait_blocking(timeout=0.01) is False
    g.set_limit(None)
    assert g.wait_blocking(timeout=0.01) is True


def test_throttled_backend_forwards() -> None:
    inner = MemoryBackend(MiB)
    b = ThrottledBackend(inner, BandwidthGroup("u", None), blocking=True)
    b.write(512, b"\x07" * 512)
    assert bytes(b.read(512, 512)) == b"\x07" * 512
    assert b.size == MiB and b.group.total == 1024
    b.discard(0, MiB)
    assert list(b.extents(0, MiB)) == list(inner.extents(0, MiB))


# ---------------------------------------------------------------- over iSCSI

INI_A = "iqn.2026-01.org.example:initiator-a"
INI_B = "iqn.2026-01.org.example:initiator-b"


def _qemu_io(port: int, initiator: str, *cmds: str) -> str:
    exe = require_tool("qemu-io")
    opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{port},target={TARGET_NAME},"
            f"lun=0,initiator-name={initiator}")
    args = [exe, "--image-opts"]
    for c in cmds:
        args += ["-c", c]
    proc = subprocess.run([*args, opts], capture_output=True, text=True, timeout=60, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "fail" not in out.lower() and "error" not in out.lower(), out
    return out


def _multiattach_proof(base: str, config_luns: list[LunSpec]) -> None:
    before = _digest(base)
    with running_target(make_config(config_luns)) as t:
        _qemu_io(t.port, INI_A, "write -P 0xaa 0 64k")
        _qemu_io(t.port, INI_B, "write -P 0xbb 0 64k", "read -P 0x42 64k 64k")
        _qemu_io(t.port, INI_A, "read -P 0xaa 0 64k", "read -P 0x42 64k 64k")
        _qemu_io(t.port, INI_B, "read -P 0xbb 0 64k")
    assert _digest(base) == before


def _immutable_proof(base: str, config_luns: list[LunSpec], state_dir: str | None) -> None:
    before = _digest(base)
    cfg = make_config(config_luns, state_dir=state_dir)
    with running_target(cfg) as t:
        _qemu_io(t.port, INI_A, "write -P 0x99 0 128k", "read -P 0x99 0 128k")
    with running_target(cfg) as t:
        _qemu_io(t.port, INI_A, "read -P 0x42 0 128k")
    assert _digest(base) == before


def _lun_with_mode(path: str, mode: str) -> LunSpec:
    return LunSpec(lun=0, path=path, mode=mode)


@pytest.mark.interop
def test_multiattach_configured_lun(base_vdi: str) -> None:
    _multiattach_proof(base_vdi, [_lun_with_mode(base_vdi, "multiattach")])


@pytest.mark.interop
def test_immutable_configured_lun(base_vdi: str, tmp_path: Path) -> None:
    _immutable_proof(base_vdi, [_lun_with_mode(base_vdi, "immutable")], str(tmp_path / "st"))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_multiattach_overlays_are_bounded(tmp_path: Path, base_vdi: str) -> None:
    """300 initiator names: at most max_overlays overlays, open files
    bounded, early initiators keep their data, later ones are refused with
    OutOfResources (not a medium error for everyone)."""
    now = [0.0]
    fds = _open_fds()
    with PerInitiatorBackend(base_vdi, str(tmp_path / "state"), max_overlays=64, max_open=16,
                             clock=lambda: now[0]) as b:
        refused = 0
        for i in range(300):
            now[0] += 61.0  # each name arrives after the others went idle
            name = f"iqn.2026-01.org.example:n{i}"
            try:
                b.for_initiator(name).write(0, bytes([i & 0xFF]) * 512)
            except OutOfResources as exc:
                assert "64 multiattach overlays" in str(exc)
                refused += 1
        assert refused == 300 - 64
        assert len(b.overlays()) == 64
        assert len(b.initiators()) <= 16
        assert _open_fds() - fds <= 16 * 4 + 4
        # An early initiator's overlay is reopened with its data.
        with initiator_scope("iqn.2026-01.org.example:n3"):
            assert bytes(b.read(0, 512)) == bytes([3]) * 512
        # A refused one stays refused; an existing one is never affected.
        with pytest.raises(OutOfResources):
            b.for_initiator("iqn.2026-01.org.example:n299")


def test_busy_overlays_stay_open(tmp_path: Path, base_vdi: str) -> None:
    """Overlays used within IDLE_CLOSE are not closed (views of their files
    may still be on the way to the initiator), even past max_open."""
    with PerInitiatorBackend(base_vdi, str(tmp_path / "state"), max_open=2,
                             clock=lambda: 0.0) as b:
        for i in range(5):
            b.for_initiator(f"iqn.2026-01.org.example:busy{i}")
        assert len(b.initiators()) == 5


def test_overlay_limit_is_insufficient_resources_over_iscsi(tmp_path: Path,
                                                           base_vdi: str) -> None:
    from iscsi.pdu import ScsiCommand, ScsiResponse
    from tests.rawclient import RawClient

    lun = LunSpec(lun=0, path=base_vdi, mode="multiattach", max_overlays=1)
    cfg = make_config([lun], state_dir=str(tmp_path / "st"))
    read10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])

    def read_status(initiator: str) -> tuple[int, bytes]:
        with RawClient(t.host, t.port) as c:
            c.login(TARGET_NAME, initiator=initiator)
            for itt in (1, 2):  # the first may report the power-on unit attention
                c.send(ScsiCommand(itt=itt, cdb=read10, read=True,
                                   expected_data_transfer_length=512,
                                   cmdsn=c.next_cmdsn(), expstatsn=c.statsn))
                while True:
                    pdu = c.recv()
                    if isinstance(pdu, ScsiResponse) or getattr(pdu, "status_present", False):
                        break
                status = pdu.status  # type: ignore[attr-defined]
                sense = pdu.sense if isinstance(pdu, ScsiResponse) else b""
                if not (sense and sense[2] & 0x0F == 6):
                    return status, sense
            return status, sense

    with running_target(cfg) as t:
        assert read_status("iqn.2026-01.org.example:first")[0] == 0
        status, sense = read_status("iqn.2026-01.org.example:second")
        assert status == 2 and sense[2] & 0x0F == 5 and sense[12:14] == b"\x55\x03"
        assert read_status("iqn.2026-01.org.example:first")[0] == 0
