"""Target-side sessions: TSIH, ISID, the CmdSN window and the connections
that belong to one I_T nexus (RFC 7143 §4.2, §6.3.5).

A session orders non-immediate commands by CmdSN across its connections
with :class:`iscsi.ffp.window.CmdSNWindow`, whose size is the configured
queue depth (RFC 7143 §4.2.2.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from iscsi.ffp.window import CmdSNWindow
from iscsi.keys import NegotiatedParams

if TYPE_CHECKING:
    from target.scsi.types import Nexus

    from .connection import TargetConnection
    from .server import TargetRuntime


@dataclass(eq=False)
class Session:
    """One iSCSI session on the target."""

    tsih: int
    isid: int
    initiator_name: str
    target_name: str
    discovery: bool
    portal_group_tag: int
    window: CmdSNWindow
    params: NegotiatedParams | None = None
    #: The target this session logged in to (None for Discovery).
    target: TargetRuntime | None = None
    nexus: Nexus | None = None  # built on first use
    connections: dict[int, TargetConnection] = field(default_factory=dict)
    closed: bool = False

    @property
    def initiator_port(self) -> str:
        """The SCSI initiator port name (RFC 7143 §4.4.2)."""
        return f"{self.initiator_name},i,0x{self.isid:012x}"
