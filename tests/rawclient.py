"""A blocking, PDU-level iSCSI client for protocol tests: it logs in with
the sans-I/O :class:`iscsi.login.InitiatorLogin` and then lets a test send
any PDU -- well-formed or hostile -- and read what the target answers."""

from __future__ import annotations

import socket
from collections.abc import Mapping

from iscsi.errors import ProtocolError
from iscsi.framing import PDUReader
from iscsi.keys import NegotiatedParams
from iscsi.login import ChapAuth, InitiatorLogin
from iscsi.pdu import PDU, LoginRequest, LoginResponse

INITIATOR = "iqn.2026-11.org.aioiscsi.test:raw"


class RawClient:
    """One TCP connection to a target."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = PDUReader()
        self.pending: list[PDU] = []
        self.params: NegotiatedParams | None = None
        self.cmdsn = 0
        self.statsn = 0
        self.hd = self.dd = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, pdu: PDU) -> None:
        self.sock.sendall(pdu.to_bytes(self.hd, self.dd))

    def recv(self) -> PDU:
        """The next PDU; raises ConnectionError when the target closed."""
        while not self.pending:
            more = self.reader.parse()
            if more:
                self.pending.extend(more)
                break
            buf = self.reader.get_buffer()
            n = self.sock.recv_into(buf)
            if n == 0:
                raise ConnectionError("target closed the connection")
            self.pending.extend(self.reader.buffer_updated(n))
        return self.pending.pop(0)

    def closed_by_peer(self) -> bool:
        """True when the target closes the connection (reads until EOF,
        bounded by the socket timeout)."""
        try:
            while True:
                self.recv()
        except (ConnectionError, OSError, ProtocolError):
            return True

    def login(self, target: str | None, *, initiator: str = INITIATOR,
              chap: ChapAuth | None = None, isid: int = 0x400000000001, tsih: int = 0, cid: int = 0, cmdsn: int = 0,
              offers: Mapping[str, str | None] | None = None) -> LoginResponse:
        """Log in; returns the final response (raises LoginError on refusal)."""
        login = InitiatorLogin(initiator, target, isid, tsih=tsih, cid=cid, cmdsn=cmdsn, auth=chap,
                               offers=offers or {})
        req: LoginRequest | None = login.start()
        resp: LoginResponse | None = None
        while req is not None:
            self.send(req)
            pdu = self.recv()
            assert isinstance(pdu, LoginResponse), pdu
            resp = pdu
            req = login.receive(pdu)
        assert resp is not None
        self.params = login.params
        self.hd, self.dd = self.params.header_digest, self.params.data_digest
        self.reader.header_digest, self.reader.data_digest = self.hd, self.dd
        self.reader.max_data_segment_length = self.params.max_recv_data_segment_length
        self.cmdsn = login.expcmdsn
        self.statsn = login.exp_statsn
        return resp

    def next_cmdsn(self) -> int:
        sn = self.cmdsn
        self.cmdsn = (sn + 1) & 0xFFFFFFFF
        return sn
