"""What a test body works with: the kit's settings, fresh connections and
sessions, and a handful of SCSI helpers built on :class:`Wire`."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from iscsi.constants import RESERVED_TAG
from iscsi.errors import ProtocolError
from iscsi.login import ChapAuth, LoginRejected
from iscsi.names import ISCSIURL
from iscsi.pdu import (
    R2T,
    DataIn,
    DataOut,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    PDU,
    Reject,
    ScsiCommand,
    ScsiResponse,
    encode_lun,
)
from iscsi.scsi.sense import SenseData, SenseDecodeError

from .describe import describe
from .model import Failed, TestError, TestSpec
from .wire import PeerClosed, Transcript, Wire

GOOD = 0x00
CHECK_CONDITION = 0x02


@dataclass(frozen=True)
class KitConfig:
    """The command line, parsed."""

    url: ISCSIURL
    url2: ISCSIURL | None = None
    initiator_name: str = "iqn.2026-11.org.aioiscsi:conformance"
    timeout: float = 10.0
    allow_dataloss: bool = False
    #: How long "the target must not answer" is watched for.
    quiet: float = 1.0
    verbose: bool = False


@dataclass
class CmdResult:
    """What came back for one SCSI command."""

    itt: int
    status: int | None = None
    response: ScsiResponse | None = None
    data_ins: list[DataIn] = field(default_factory=list)
    r2ts: list[R2T] = field(default_factory=list)
    final: PDU | None = None
    reject: Reject | None = None

    @property
    def data(self) -> bytes:
        """The Data-In payloads joined in arrival order."""
        return b"".join(bytes(d.data) for d in self.data_ins)

    @property
    def sense(self) -> SenseData | None:
        """The sense data of a CHECK CONDITION, if any decodes."""
        if self.response is None or not self.response.sense:
            return None
        try:
            return SenseData.decode(self.response.sense)
        except SenseDecodeError:
            return None

    @property
    def residual(self) -> tuple[bool, bool, int]:
        """(overflow, underflow, count) from whichever PDU carried status."""
        p = self.final
        if isinstance(p, (ScsiResponse, DataIn)):
            return p.residual_overflow, p.residual_underflow, p.residual_count
        return False, False, 0


class Context:
    """One test's view of the target."""

    def __init__(self, config: KitConfig, spec: TestSpec, transcript: Transcript,
                 deadline: float) -> None:
        self.config = config
        self.spec = spec
        self.transcript = transcript
        self.deadline = deadline
        self.wires: list[Wire] = []
        #: The R2T :meth:`pending_write` got.
        self.last_r2t: R2T | None = None
        url = config.url
        if url.target is None:
            raise TestError("the URL names no target")
        self.target: str = url.target
        self.lun = encode_lun(url.lun or 0)

    # -- connections ----------------------------------------------------------
    def connect(self, url: ISCSIURL | None = None) -> Wire:
        """A new TCP connection (closed when the test ends)."""
        u = url or self.config.url
        w = Wire(u.host, u.port, self.transcript, self.deadline)
        self.wires.append(w)
        return w

    def close_all(self) -> None:
        """Close every connection the test opened (logging out is the
        test's own business; closing also ends a session at ERL 0)."""
        for w in self.wires:
            w.close()

    @staticmethod
    def new_isid() -> int:
        """A random ISID of type 10b ("random", RFC 7143 §11.12.5)."""
        return (0x80 << 40) | (secrets.randbits(24) << 16) | secrets.randbits(16)

    def chap(self, url: ISCSIURL | None = None) -> ChapAuth | None:
        """CHAP settings from the URL's credentials, or None."""
        u = url or self.config.url
        if u.user is None or u.password is None:
            return None
        # MD5 only, as the initiator does by default: it is the one
        # algorithm every target implements (§12.1.3); the chap family
        # tries the others one by one.
        if u.target_user and u.target_password:
            return ChapAuth(u.user, u.password, u.target_user, u.target_password,
                            algorithms=(5,), refuse_short_secrets=False)
        return ChapAuth(u.user, u.password, algorithms=(5,), refuse_short_secrets=False)

    def log(self, text: str) -> None:
        """A note in the transcript."""
        self.transcript.add(0, "##", text)

    def session(self, offers: Mapping[str, str | None] | None = None, *,
                url: ISCSIURL | None = None, isid: int | None = None, tsih: int = 0,
                discovery: bool = False, chap: ChapAuth | None | bool = True) -> Wire:
        """Connect and log in; a refused login is a TestError (the test
        could not run), since each test checks its own rule, not login."""
        w = self.connect(url)
        auth = self.chap(url) if chap is True else (chap or None)
        try:
            w.login(self.config.initiator_name, None if discovery else self.target,
                    isid=isid if isid is not None else self.new_isid(), tsih=tsih,
                    chap=auth, offers=offers)
        except LoginRejected as exc:
            raise TestError(f"login refused: {exc}") from exc
        except ProtocolError as exc:
            raise TestError(f"login failed: {exc}") from exc
        except PeerClosed as exc:
            raise TestError(f"target closed the connection during login: {exc}") from exc
        return w

    # -- SCSI -----------------------------------------------------------------
    def command(self, w: Wire, cdb: bytes, *, read_len: int = 0, write_len: int = 0,
                immediate_data: bytes = b"", immediate: bool = False, itt: int | None = None,
                cmdsn: int | None = None, final: bool = True, lun: int | None = None,
                note: str = "") -> int:
        """Send a SCSI Command; returns its ITT. ``cmdsn`` None takes the
        next CmdSN (or the current one, unadvanced, for an immediate command)."""
        tag = w.next_itt() if itt is None else itt
        if cmdsn is None:
            cmdsn = w.cmdsn if immediate else w.next_cmdsn()
        w.send(ScsiCommand(itt=tag, lun=self.lun if lun is None else lun, cdb=cdb,
                           expected_data_transfer_length=read_len or write_len, cmdsn=cmdsn,
                           expstatsn=w.expstatsn, read=read_len > 0, write=write_len > 0,
                           final=final, immediate=immediate, data=immediate_data), note=note)
        return tag

    def collect(self, w: Wire, itt: int, *, write_data: bytes | None = None,
                stop_at_r2t: bool = False) -> CmdResult:
        """Gather the answer to command ``itt``: Data-In, R2Ts (answered with
        ``write_data`` unless ``stop_at_r2t``) and the status."""
        res = CmdResult(itt)
        while True:
            pdu = w.expect((DataIn, R2T, ScsiResponse, Reject, NopIn), "the command's answer")
            if isinstance(pdu, Reject):
                res.reject = pdu
                return res
            if isinstance(pdu, NopIn):
                continue  # an answer to an earlier ping of ours
            if pdu.itt != itt:
                raise Failed(f"answer for ITT 0x{pdu.itt:x}, expected 0x{itt:x} "
                             "(RFC 7143 §11.4.7)", describe(pdu))
            if isinstance(pdu, DataIn):
                res.data_ins.append(pdu)
                if pdu.status_present:
                    res.status, res.final = pdu.status, pdu
                    return res
            elif isinstance(pdu, R2T):
                res.r2ts.append(pdu)
                if stop_at_r2t:
                    return res
                if write_data is None:
                    raise Failed("R2T for a command that sends no data (RFC 7143 §11.8)",
                                 describe(pdu))
                self.answer_r2t(w, pdu, write_data)
            elif isinstance(pdu, ScsiResponse):
                res.response, res.status, res.final = pdu, pdu.status, pdu
                return res

    def answer_r2t(self, w: Wire, r2t: R2T, data: bytes) -> None:
        """Send the Data-Out PDUs an R2T asks for (§11.8, §11.7)."""
        assert w.params is not None
        seg = w.params.max_xmit_data_segment_length
        off, end = r2t.buffer_offset, r2t.buffer_offset + r2t.desired_data_transfer_length
        sn = 0
        while off < end:
            n = min(seg, end - off)
            w.send(DataOut(itt=r2t.itt, lun=r2t.lun, ttt=r2t.ttt, expstatsn=w.expstatsn,
                           datasn=sn, buffer_offset=off, final=off + n == end,
                           data=data[off:off + n]))
            off += n
            sn += 1

    def run(self, w: Wire, cdb: bytes, *, read_len: int = 0,
            write_data: bytes | None = None) -> CmdResult:
        """Send a command and wait for its status (no immediate data)."""
        itt = self.command(w, cdb, read_len=read_len,
                           write_len=len(write_data) if write_data else 0)
        return self.collect(w, itt, write_data=write_data)

    def ready(self, w: Wire) -> None:
        """TEST UNIT READY until GOOD, so pending unit attentions (power on,
        a reset by an earlier test) do not disturb the test proper."""
        for _ in range(8):
            res = self.run(w, bytes(6))
            if res.status == GOOD:
                return
        raise TestError("the LUN does not become ready (TEST UNIT READY never GOOD)")

    def capacity(self, w: Wire) -> tuple[int, int]:
        """(blocks, block size) from READ CAPACITY(10)."""
        res = self.run(w, bytes([0x25]) + bytes(9), read_len=8)
        if res.status != GOOD or len(res.data) < 8:
            raise TestError(f"READ CAPACITY(10) failed (status {res.status})")
        last, size = int.from_bytes(res.data[:4], "big"), int.from_bytes(res.data[4:8], "big")
        if size == 0:
            raise TestError("READ CAPACITY(10) reports a zero block size")
        return last + 1, size

    #: Offers that make a WRITE wait for an R2T (see :meth:`pending_write`).
    R2T_FIRST: Mapping[str, str | None] = {"InitialR2T": "Yes", "ImmediateData": "No"}

    def pending_write(self, w: Wire) -> tuple[int, int]:
        """A WRITE(10) of the last block left waiting for its data: the
        session must have been opened with :attr:`R2T_FIRST`. Returns (ITT,
        CmdSN) once the target's R2T has arrived; the data is never sent."""
        assert w.params is not None
        if not w.params.initial_r2t or w.params.immediate_data:
            raise TestError("target did not agree to InitialR2T=Yes, ImmediateData=No")
        self.ready(w)
        blocks, size = self.capacity(w)
        sn = w.cmdsn
        cdb = bytes([0x2A, 0]) + (blocks - 1).to_bytes(4, "big") + bytes([0, 0, 1, 0])
        itt = self.command(w, cdb, write_len=size, note="left waiting for its data")
        res = self.collect(w, itt, stop_at_r2t=True)
        if not res.r2ts:
            raise TestError("the WRITE completed without asking for its data")
        self.last_r2t = res.r2ts[0]
        return itt, sn

    def ping(self, w: Wire, data: bytes = b"") -> NopIn:
        """A NOP-Out ping (ITT set, immediate) and its NOP-In."""
        itt = w.next_itt()
        w.send(NopOut(itt=itt, ttt=RESERVED_TAG, lun=0, cmdsn=w.cmdsn, expstatsn=w.expstatsn,
                      immediate=True, data=data))
        while True:
            pdu = w.expect(NopIn, "the NOP-In answering our ping")
            assert isinstance(pdu, NopIn)
            if pdu.itt == itt:
                return pdu

    def alive(self, w: Wire) -> bool:
        """True when the connection still answers a ping."""
        try:
            self.ping(w)
        except (Failed, PeerClosed):
            return False
        return True

    def logout(self, w: Wire) -> LogoutResponse | None:
        """Close the session politely (best effort; used for clean-up)."""
        if w.closed:
            return None
        try:
            w.send(LogoutRequest(itt=w.next_itt(), reason=0, cmdsn=w.cmdsn,
                                 expstatsn=w.expstatsn, immediate=True))
            while True:
                pdu = w.next_pdu(min(2.0, max(0.1, w.remaining())))
                if pdu is None or isinstance(pdu, LogoutResponse):
                    return pdu
        except (PeerClosed, Failed, OSError):
            return None
        finally:
            w.close()


def describe_opt(pdu: PDU | None) -> str | None:
    """describe(), tolerating None."""
    return describe(pdu) if pdu is not None else None
