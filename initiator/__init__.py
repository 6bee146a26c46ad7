"""The aioiscsi initiator: remote LUNs as Python objects, block devices, files.

Quick start::

    from initiator import BlockDevice, discover, run

    async def main() -> None:
        for target in await discover("192.0.2.10"):
            print(target.name, *target.portals)
        async with await BlockDevice.open("iscsi://192.0.2.10/iqn.2004-01.org.example:disk/1") as dev:
            print(await dev.read(0, 512))

    run(main())
"""

from __future__ import annotations

from iscsi.discovery import DiscoveredTarget

from .blockdev import BlockDevice, LUNFile
from .errors import (
    CommandTimedOut,
    ConnectionLost,
    InitiatorError,
    LoginFailed,
    LoginRefused,
    LUNNotFound,
    PortalUnreachable,
    SessionFailed,
    TargetProtocolError,
)
from .scsi import LUN, Capacity, SCSICheckCondition, SCSIStatusError
from .discover import discover
from .session import ScsiResult, Session, SessionOptions, run

__all__ = [
    "BlockDevice", "Capacity", "CommandTimedOut", "ConnectionLost", "DiscoveredTarget",
    "InitiatorError", "LUN", "LUNFile", "LUNNotFound", "LoginFailed", "LoginRefused",
    "PortalUnreachable", "SCSICheckCondition", "SCSIStatusError", "ScsiResult", "Session",
    "SessionFailed", "SessionOptions", "TargetProtocolError", "discover", "run",
]
