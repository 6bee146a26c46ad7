"""The target's CmdSN window for one session (RFC 7143 §4.2.2.1, §3.2.2.1).

Non-immediate commands are delivered in CmdSN order across all of a
session's connections. The window's size is the session's queue depth: a
slot is taken when a command *runs* and given back when it completes, so
MaxCmdSN = ExpCmdSN - 1 + free slots closes as work queues up and reopens
as it finishes, never moving backwards. A command that arrives ahead of
ExpCmdSN (possible with several connections, or a hostile peer) is held
without taking a slot; it takes one only when the gap closes and it runs.

A held command remembers the connection it came on: when that connection
ends (failure, logout, reinstatement) its held commands are discarded
(:meth:`CmdSNWindow.discard`), so the initiator may retry those CmdSNs on
another connection with their original CmdSN and ITT (RFC 7143 §7.2.1;
§11.14.1: the target discards requests not yet acknowledged).
"""

from __future__ import annotations

from collections.abc import Callable

from ..serial import sn_add, sn_gt, sn_le, sn_lt

#: Commands held ahead of ExpCmdSN are bounded by the window itself (only
#: CmdSNs within [ExpCmdSN+1, MaxCmdSN] are held), so this is never large.
Runner = Callable[[], None]


class CmdSNWindow:
    """ExpCmdSN/MaxCmdSN bookkeeping and in-order delivery for one session."""

    __slots__ = ("expcmdsn", "depth", "active", "held", "owners")

    def __init__(self, expcmdsn: int, depth: int) -> None:
        self.expcmdsn = expcmdsn & 0xFFFFFFFF
        self.depth = depth
        #: Non-immediate commands running (each holds one slot).
        self.active = 0
        #: CmdSN -> runner, for commands that arrived ahead of ExpCmdSN.
        self.held: dict[int, Runner] = {}
        #: CmdSN -> the connection (engine) a held command arrived on.
        self.owners: dict[int, object] = {}

    @property
    def maxcmdsn(self) -> int:
        """ExpCmdSN - 1 + free slots (may equal ExpCmdSN - 1: window closed,
        so plain modular arithmetic rather than an RFC 1982 addition)."""
        return (self.expcmdsn - 1 + max(self.depth - self.active, 0)) & 0xFFFFFFFF

    def admit(self, cmdsn: int, immediate: bool, run: Runner, owner: object = None) -> bool:
        """Deliver a command in CmdSN order.

        ``run`` is called once, when the command's turn comes; a
        non-immediate command then holds a slot until :meth:`release`.
        Returns False when the command is outside the window and must be
        ignored (§4.2.2.1); True when it ran or is held. ``owner`` names
        the connection, for :meth:`discard`.
        """
        if immediate:
            run()
            return True

        # ExpCmdSN itself lies outside the window when it is closed
        # (MaxCmdSN = ExpCmdSN - 1).
        if cmdsn == self.expcmdsn and self.active < self.depth:
            self._run(run)
            self._drain()
            return True
        if sn_gt(cmdsn, self.expcmdsn) and sn_le(cmdsn, self.maxcmdsn) and cmdsn not in self.held:
            self.held[cmdsn] = run
            if owner is not None:
                self.owners[cmdsn] = owner
            return True
        return False

    def _drain(self) -> None:
        """Run held commands whose turn has come, while slots are free."""
        while self.expcmdsn in self.held and self.active < self.depth:
            self.owners.pop(self.expcmdsn, None)
            self._run(self.held.pop(self.expcmdsn))

    def discard(self, owner: object) -> list[int]:
        """Forget the commands held for ``owner`` (a connection that ended)
        and return their CmdSNs: they never ran, so the initiator may send
        them again on another connection (§7.2.1) and they will run then."""
        gone = [sn for sn, o in self.owners.items() if o is owner]
        for sn in gone:
            del self.owners[sn]
            del self.held[sn]
        return gone

    def _run(self, run: Runner) -> None:
        self.expcmdsn = sn_add(self.expcmdsn, 1)
        self.active += 1
        run()

    def release(self) -> None:
        """A non-immediate command finished: its slot returns to the window,
        and commands held behind a closed window may now run."""
        if self.active > 0:
            self.active -= 1
        self._drain()

    def cancel(self, cmdsn: int, before: int) -> bool:
        """ABORT TASK for a task that does not exist (RFC 7143 §11.5.1):
        when ``cmdsn`` is within the window, below ``before`` (the TMF's own
        CmdSN) and has not run, it is considered received -- it will never
        run -- and the answer is "Function complete" (True). Otherwise the
        answer is "Task does not exist" (False)."""
        if not (sn_le(self.expcmdsn, cmdsn) and sn_le(cmdsn, self.maxcmdsn)
                and sn_lt(cmdsn, before)):
            return False
        # It takes its turn in order and does nothing; the command itself,
        # should it still arrive, finds its CmdSN taken and is ignored.
        self.held[cmdsn] = self.release
        self.owners.pop(cmdsn, None)
        self._drain()
        return True

    def is_stale(self, cmdsn: int) -> bool:
        """True for a CmdSN below ExpCmdSN (a duplicate)."""
        return sn_lt(cmdsn, self.expcmdsn)
