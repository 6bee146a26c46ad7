"""Write the bytes of one TCP session into a pcap file (scapy), so that an
independent dissector (tshark) can check what our codec put on the wire.

The capture is a well-formed TCP conversation: the SYN / SYN-ACK / ACK
handshake, every message as one or more MSS-sized segments with correct
sequence and acknowledgement numbers in both directions, and a FIN exchange
at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.utils import wrpcap

CLIENT_MAC = "02:00:00:00:00:01"
SERVER_MAC = "02:00:00:00:00:02"


@dataclass
class _End:
    ip: str
    port: int
    mac: str
    seq: int


def tcp_session_packets(
    messages: Iterable[tuple[bool, bytes]],
    *,
    client: tuple[str, int] = ("192.0.2.10", 51000),
    server: tuple[str, int] = ("192.0.2.1", 3260),
    mss: int = 1448,
    start_time: float = 1_700_000_000.0,
) -> list[Packet]:
    """Packets of a TCP session carrying ``messages``.

    ``messages`` are ``(from_client, payload)`` pairs in the order they are
    sent; each starts a new segment (a message longer than ``mss`` is split
    over several). Every segment acknowledges all the peer has sent so far.
    """
    cli = _End(client[0], client[1], CLIENT_MAC, 0x1000_0000)
    srv = _End(server[0], server[1], SERVER_MAC, 0x7000_0000)
    packets: list[Packet] = []
    clock = start_time

    def emit(src: _End, dst: _End, flags: str, payload: bytes = b"") -> None:
        nonlocal clock
        pkt = (Ether(src=src.mac, dst=dst.mac)
               / IP(src=src.ip, dst=dst.ip)
               / TCP(sport=src.port, dport=dst.port, flags=flags, seq=src.seq,
                     ack=dst.seq if "A" in flags else 0, window=65535))
        if payload:
            pkt = pkt / payload
        pkt.time = clock
        clock += 0.0001
        packets.append(pkt)
        src.seq = (src.seq + len(payload) + (1 if ("S" in flags or "F" in flags) else 0)) \
            & 0xFFFFFFFF

    emit(cli, srv, "S")
    emit(srv, cli, "SA")
    emit(cli, srv, "A")
    for from_client, payload in messages:
        src, dst = (cli, srv) if from_client else (srv, cli)
        for off in range(0, len(payload), mss):
            emit(src, dst, "PA", payload[off : off + mss])
    emit(cli, srv, "FA")
    emit(srv, cli, "FA")
    emit(cli, srv, "A")
    return packets


def write_session_pcap(path: str, messages: Iterable[tuple[bool, bytes]], **kw: object) -> int:
    """Write :func:`tcp_session_packets` to ``path``; returns the packet count."""
    packets = tcp_session_packets(messages, **kw)  # type: ignore[arg-type]
    wrpcap(path, packets)
    return len(packets)
