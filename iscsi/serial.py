"""32-bit sequence numbers: RFC 1982 serial arithmetic and the counters built on it.

iSCSI's CmdSN, ExpCmdSN, MaxCmdSN, StatSN, DataSN and R2TSN are all 32-bit
serial numbers compared "in serial arithmetic sense" (RFC 7143 §4.2.2 and
§4.2.2.1, which refer to RFC 1982 with SERIAL_BITS = 32).

RFC 1982 §3.2 leaves the comparison of two numbers exactly 2**31 apart
undefined. This module resolves it one consistent way: such a pair is
*neither* less nor greater (nor equal), so ``sn_lt(a, b)``, ``sn_gt(a, b)``,
``sn_le(a, b)`` and ``sn_ge(a, b)`` are all False, and ``sn_diff`` raises
:class:`SerialUndefined`. A peer cannot make us believe a number half the
space away is "newer", which is the safe choice for window checks.

Nothing here reads the clock or does I/O.
"""

from __future__ import annotations

__all__ = [
    "RESERVED_TAG",
    "SERIAL_BITS",
    "SERIAL_HALF",
    "SERIAL_MOD",
    "CmdWindow",
    "SequenceCounter",
    "SerialUndefined",
    "TagAllocator",
    "sn_add",
    "sn_diff",
    "sn_ge",
    "sn_gt",
    "sn_in_range",
    "sn_le",
    "sn_lt",
]

SERIAL_BITS = 32
SERIAL_MOD = 1 << SERIAL_BITS
SERIAL_HALF = 1 << (SERIAL_BITS - 1)
_MASK = SERIAL_MOD - 1
# RFC 7143 §11.2.1.8 / §11.7.4: 0xffffffff is the reserved Initiator Task Tag
# (used by unsolicited target NOP-In) and the reserved Target Transfer Tag.
RESERVED_TAG = 0xFFFFFFFF


class SerialUndefined(ValueError):
    """The two serial numbers are exactly 2**31 apart (RFC 1982 §3.2)."""


def _check(value: int, name: str) -> None:
    if not 0 <= value <= _MASK:
        raise ValueError(f"{name}={value!r} is not a 32-bit serial number")


def sn_add(s: int, n: int) -> int:
    """Return ``s + n`` in serial arithmetic (RFC 1982 §3.1).

    ``n`` must lie in ``0 .. 2**31 - 1``; adding more is undefined by the RFC
    and is refused rather than silently wrapped past a comparison horizon.
    """
    _check(s, "s")
    if not 0 <= n < SERIAL_HALF:
        raise ValueError(f"serial addend {n} outside 0..2**31-1 (RFC 1982 §3.1)")
    return (s + n) & _MASK


def sn_diff(a: int, b: int) -> int:
    """Return the signed distance ``a - b`` in ``-(2**31 - 1) .. 2**31 - 1``.

    Positive when ``a`` is after ``b``. Raises :class:`SerialUndefined` when
    the distance is exactly 2**31, where the order is undefined.
    """
    _check(a, "a")
    _check(b, "b")
    d = (a - b) & _MASK
    if d == SERIAL_HALF:
        raise SerialUndefined(
            f"serial numbers {a:#x} and {b:#x} are 2**31 apart; order undefined"
        )
    return d - SERIAL_MOD if d > SERIAL_HALF else d


def sn_lt(a: int, b: int) -> bool:
    """``a < b`` in serial arithmetic (False at the undefined distance 2**31)."""
    d = (b - a) & _MASK
    return 0 < d < SERIAL_HALF


def sn_gt(a: int, b: int) -> bool:
    """``a > b`` in serial arithmetic (False at the undefined distance 2**31)."""
    d = (a - b) & _MASK
    return 0 < d < SERIAL_HALF


def sn_le(a: int, b: int) -> bool:
    """``a <= b`` in serial arithmetic (False at the undefined distance 2**31)."""
    return ((b - a) & _MASK) < SERIAL_HALF


def sn_ge(a: int, b: int) -> bool:
    """``a >= b`` in serial arithmetic (False at the undefined distance 2**31)."""
    return ((a - b) & _MASK) < SERIAL_HALF


def sn_in_range(value: int, low: int, high: int) -> bool:
    """True when ``low <= value <= high`` in serial sense.

    Computed as an offset from ``low`` so it stays right across the wrap and
    for a range of up to 2**31 - 1 numbers. An empty range (``high`` =
    ``low - 1``) contains nothing.
    """
    span = (high - low) & _MASK
    if span >= SERIAL_HALF:
        # high is before low (or undefined): the range is empty.
        return False
    return ((value - low) & _MASK) <= span


class CmdWindow:
    """The command window ExpCmdSN .. MaxCmdSN (RFC 7143 §4.2.2.1).

    Both roles use it. The target owns the numbers: :meth:`advance` as
    commands are delivered in CmdSN order and :meth:`set_depth` /
    :meth:`set_max_cmdsn` to open or close the window. The initiator mirrors
    them from every response with :meth:`update`, which applies the RFC's
    rules for stale and invalid values, and asks :meth:`in_window` before it
    sends a non-immediate command.

    ``MaxCmdSN == ExpCmdSN - 1`` means the window is closed (size 0); a
    ``MaxCmdSN`` further behind than that is invalid.
    """

    __slots__ = ("_exp", "_max")

    def __init__(self, exp_cmdsn: int, max_cmdsn: int | None = None) -> None:
        """Start with ``exp_cmdsn``; ``max_cmdsn`` defaults to a one-command window."""
        _check(exp_cmdsn, "ExpCmdSN")
        if max_cmdsn is None:
            max_cmdsn = exp_cmdsn
        _check(max_cmdsn, "MaxCmdSN")
        if not self._valid(exp_cmdsn, max_cmdsn):
            raise ValueError(
                f"MaxCmdSN {max_cmdsn:#x} is behind ExpCmdSN - 1 ({exp_cmdsn:#x} - 1)"
            )
        self._exp = exp_cmdsn
        self._max = max_cmdsn

    @staticmethod
    def _valid(exp: int, mx: int) -> bool:
        # §4.2.2.1: MaxCmdSN < ExpCmdSN - 1 (serial) is invalid. The size
        # MaxCmdSN - ExpCmdSN + 1 must therefore be 0 .. 2**31 - 1.
        return ((mx - exp + 1) & _MASK) < SERIAL_HALF

    @property
    def exp_cmdsn(self) -> int:
        """The next CmdSN the target expects."""
        return self._exp

    @property
    def max_cmdsn(self) -> int:
        """The highest CmdSN the target will accept now."""
        return self._max

    @property
    def size(self) -> int:
        """How many CmdSNs the window holds (0 when closed)."""
        return (self._max - self._exp + 1) & _MASK

    @property
    def closed(self) -> bool:
        """True when MaxCmdSN = ExpCmdSN - 1: no new non-immediate command."""
        return self.size == 0

    def in_window(self, cmdsn: int) -> bool:
        """True when ExpCmdSN <= ``cmdsn`` <= MaxCmdSN (serial)."""
        return ((cmdsn - self._exp) & _MASK) < self.size

    def is_duplicate(self, cmdsn: int) -> bool:
        """True when ``cmdsn`` is before ExpCmdSN: already received (§4.2.2.1:
        outside the window, silently ignored by the target)."""
        return sn_lt(cmdsn, self._exp)

    def advance(self, n: int = 1) -> int:
        """Move ExpCmdSN forward by ``n`` (target: commands delivered in order).

        ExpCmdSN may reach MaxCmdSN + 1 (window then closed) but never pass it.
        Returns the new ExpCmdSN.
        """
        if n < 0:
            raise ValueError("cannot move ExpCmdSN backwards")
        if n > self.size:
            raise ValueError(
                f"advancing ExpCmdSN by {n} would pass MaxCmdSN + 1 (window size {self.size})"
            )
        self._exp = (self._exp + n) & _MASK
        return self._exp

    def set_max_cmdsn(self, max_cmdsn: int) -> None:
        """Set MaxCmdSN (target side); it may not fall behind ExpCmdSN - 1."""
        _check(max_cmdsn, "MaxCmdSN")
        if not self._valid(self._exp, max_cmdsn):
            raise ValueError(
                f"MaxCmdSN {max_cmdsn:#x} is behind ExpCmdSN - 1 ({self._exp:#x} - 1)"
            )
        self._max = max_cmdsn

    def set_depth(self, depth: int) -> None:
        """Open the window to ``depth`` commands from ExpCmdSN (0 closes it)."""
        if not 0 <= depth < SERIAL_HALF:
            raise ValueError(f"window depth {depth} outside 0..2**31-1")
        self._max = (self._exp + depth - 1) & _MASK

    def update(self, exp_cmdsn: int, max_cmdsn: int) -> bool:
        """Apply ExpCmdSN/MaxCmdSN from a received PDU (initiator side).

        RFC 7143 §4.2.2.1: if the PDU's MaxCmdSN < ExpCmdSN - 1 both are
        ignored; otherwise each local value only ever moves forward (a stale
        PDU that overtook a newer one must not shrink the window). Returns
        False when the pair was ignored as invalid.
        """
        _check(exp_cmdsn, "ExpCmdSN")
        _check(max_cmdsn, "MaxCmdSN")
        if not self._valid(exp_cmdsn, max_cmdsn):
            return False
        if sn_gt(max_cmdsn, self._max):
            self._max = max_cmdsn
        if sn_gt(exp_cmdsn, self._exp):
            self._exp = exp_cmdsn
        return True

    def __repr__(self) -> str:
        return f"CmdWindow(exp_cmdsn={self._exp:#x}, max_cmdsn={self._max:#x})"


class SequenceCounter:
    """A 32-bit wrapping counter: StatSN per connection, DataSN / R2TSN per task.

    :meth:`next` hands out the current value and moves on; :meth:`accept`
    is the receiver's in-order check (e.g. DataSN of Data-In, RFC 7143
    §11.7.5, or StatSN against ExpStatSN, §4.2.2.2).
    """

    __slots__ = ("_value",)

    def __init__(self, start: int = 0) -> None:
        """Start counting at ``start``."""
        _check(start, "start")
        self._value = start

    @property
    def value(self) -> int:
        """The value :meth:`next` will return (the "expected" number)."""
        return self._value

    def next(self) -> int:
        """Return the current value and advance by one (wrapping at 2**32)."""
        v = self._value
        self._value = (v + 1) & _MASK
        return v

    def reset(self, value: int = 0) -> None:
        """Restart at ``value`` (e.g. DataSN after a recovery R2T, §7.6)."""
        _check(value, "value")
        self._value = value

    def accept(self, received: int) -> bool:
        """Advance and return True when ``received`` is the expected number;
        return False (no change) otherwise."""
        if received != self._value:
            return False
        self._value = (received + 1) & _MASK
        return True

    def __repr__(self) -> str:
        return f"SequenceCounter({self._value:#x})"


class TagAllocator:
    """Hands out Initiator / Target Transfer Tags unique among those in use.

    Never returns the reserved tag 0xffffffff (RFC 7143 §11.2.1.8,
    §11.7.4) and skips tags still in use after the counter wraps.
    """

    __slots__ = ("_in_use", "_limit", "_next")

    def __init__(self, start: int = 0, *, limit: int | None = None) -> None:
        """``start`` is the first candidate tag; ``limit`` caps the number of
        tags outstanding at once (None: the whole 2**32 - 1 space)."""
        if not 0 <= start < RESERVED_TAG:
            raise ValueError(f"start tag {start!r} outside 0..0xfffffffe")
        max_tags = RESERVED_TAG  # 2**32 - 1 usable tags
        if limit is not None and not 1 <= limit <= max_tags:
            raise ValueError(f"tag limit {limit} outside 1..{max_tags}")
        self._next = start
        self._in_use: set[int] = set()
        self._limit = max_tags if limit is None else limit

    def allocate(self) -> int:
        """Return a free tag and mark it in use.

        Raises RuntimeError when ``limit`` tags are outstanding.
        """
        if len(self._in_use) >= self._limit:
            raise RuntimeError(f"all {self._limit} tags are in use")
        tag = self._next
        in_use = self._in_use
        # Terminates: fewer than 2**32 - 1 tags are in use (checked above).
        while tag == RESERVED_TAG or tag in in_use:
            tag = (tag + 1) & _MASK
        in_use.add(tag)
        nxt = (tag + 1) & _MASK
        self._next = 0 if nxt == RESERVED_TAG else nxt
        return tag

    def release(self, tag: int) -> None:
        """Return ``tag`` to the pool; releasing a tag not in use is an error."""
        try:
            self._in_use.remove(tag)
        except KeyError:
            raise ValueError(f"tag {tag:#x} is not in use") from None

    def discard(self, tag: int) -> None:
        """Release ``tag`` if it is in use; do nothing otherwise."""
        self._in_use.discard(tag)

    def __contains__(self, tag: object) -> bool:
        return tag in self._in_use

    def __len__(self) -> int:
        return len(self._in_use)

    def __repr__(self) -> str:
        return f"TagAllocator(next={self._next:#x}, in_use={len(self._in_use)})"
