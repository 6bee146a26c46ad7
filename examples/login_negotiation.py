"""The sans-I/O protocol core in a few lines: encode a Login Request,
run a whole login between an initiator and a target state machine in
memory (no sockets), and print what was negotiated.

    python examples/login_negotiation.py
"""

from __future__ import annotations

from iscsi.login import InitiatorLogin, SimpleLoginPolicy, TargetEntry, TargetLogin
from iscsi.framing import decode_pdu

TARGET = "iqn.2026-11.org.aioiscsi.example:disk"

policy = SimpleLoginPolicy(targets={TARGET: TargetEntry(
    TARGET, offers={"HeaderDigest": "CRC32C,None", "MaxBurstLength": "1048576"})})
target = TargetLogin(policy, portal_group_tag=1)
initiator = InitiatorLogin("iqn.2026-11.org.aioiscsi.example:host", TARGET, isid=0x400000000001,
                           offers={"HeaderDigest": "CRC32C,None", "DataDigest": "None"})

request = initiator.start()
while request is not None:
    wire = request.to_bytes()  # what would go on the TCP connection
    print(f"-> {type(request).__name__} {len(wire)} bytes: {bytes(request.data)!r}")
    response = target.receive(decode_pdu(wire))
    print(f"<- {type(response).__name__} status {response.status:#06x}: {bytes(response.data)!r}")
    request = initiator.receive(decode_pdu(response.to_bytes()))

print("\nnegotiated:", initiator.params)
