"""Target-side sessions: TSIH, ISID, the CmdSN window and the connections
that belong to one I_T nexus (RFC 7143 §4.2, §6.3.5).

A session orders non-immediate commands by CmdSN across its connections and
advances MaxCmdSN as commands complete, so an initiator never has more than
``queue_depth`` commands outstanding (RFC 7143 §4.2.2.1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from iscsi.serial import sn_add, sn_gt, sn_le, sn_lt

if TYPE_CHECKING:
    from .connection import TargetConnection


@dataclass(eq=False)
class Session:
    """One iSCSI session on the target."""

    tsih: int
    isid: int
    initiator_name: str
    target_name: str
    discovery: bool
    portal_group_tag: int
    queue_depth: int
    expcmdsn: int
    params: Any = None
    target: Any = None  # the TargetRuntime this session logged in to
    nexus: Any = None  # target.scsi.types.Nexus, built on first use
    connections: dict[int, TargetConnection] = field(default_factory=dict)
    #: Non-immediate commands in flight (counted against the window).
    active: int = 0
    #: Commands that arrived ahead of ExpCmdSN (multi-connection sessions),
    #: keyed by CmdSN, delivered once the gap closes.
    held: dict[int, tuple[TargetConnection, Callable[[], None]]] = field(default_factory=dict)
    closed: bool = False

    @property
    def maxcmdsn(self) -> int:
        """ExpCmdSN - 1 + free slots: the window closes as commands queue up
        and reopens as they complete, never moving backwards."""
        # May equal ExpCmdSN - 1 (window closed), so plain modular
        # arithmetic rather than an RFC 1982 addition.
        return (self.expcmdsn - 1 + max(self.queue_depth - self.active, 0)) & 0xFFFFFFFF

    @property
    def initiator_port(self) -> str:
        """The SCSI initiator port name (RFC 7143 §4.4.2)."""
        return f"{self.initiator_name},i,0x{self.isid:012x}"

    def admit(self, cmdsn: int, immediate: bool, conn: TargetConnection,
              run: Callable[[], None]) -> bool:
        """Deliver a command in CmdSN order.

        Returns False when the command is outside the window and must be
        silently ignored (RFC 7143 §4.2.2.1). Immediate commands are
        delivered at once and do not advance ExpCmdSN.
        """
        if immediate:
            run()
            return True
        # ExpCmdSN itself lies outside the window when the window is closed
        # (MaxCmdSN = ExpCmdSN - 1, RFC 7143 §4.2.2.1): such a command is
        # ignored like any other beyond MaxCmdSN.
        if cmdsn == self.expcmdsn and self.active < self.queue_depth:
            self.expcmdsn = sn_add(self.expcmdsn, 1)
            self.active += 1
            run()
            while self.expcmdsn in self.held:
                c, held_run = self.held.pop(self.expcmdsn)
                self.expcmdsn = sn_add(self.expcmdsn, 1)
                self.active += 1
                if not c.closed:
                    held_run()
            return True
        if sn_gt(cmdsn, self.expcmdsn) and sn_le(cmdsn, self.maxcmdsn) and cmdsn not in self.held:
            self.held[cmdsn] = (conn, run)
            return True
        return False

    def complete(self) -> None:
        """A non-immediate command finished: one more slot in the window."""
        if self.active > 0:
            self.active -= 1

    def is_stale(self, cmdsn: int) -> bool:
        """True for a CmdSN below ExpCmdSN (a duplicate)."""
        return sn_lt(cmdsn, self.expcmdsn)
