"""What a user configures about an initiator session (:class:`SessionOptions`,
defaults after open-iscsi's) and how a SCSI command ended (:class:`ScsiResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SessionOptions:
    """Everything configurable about a session (defaults follow open-iscsi).

    ``keys`` holds any further negotiable key in wire syntax and wins over
    the typed fields; ``header_digest``/``data_digest`` are offered lists
    such as ``"None,CRC32C"`` (we prefer no digest but accept one) or
    ``"CRC32C"`` (insist).
    """

    initiator_name: str | None = None
    initiator_alias: str | None = None
    #: One-way CHAP: the name and secret we prove ourselves with.
    chap_user: str | None = None
    chap_secret: str | None = None
    #: Mutual CHAP: the name and secret the target must prove.
    target_chap_user: str | None = None
    target_chap_secret: str | None = None
    #: CHAP_A values offered, in preference order (IANA: 5 MD5, 6 SHA-1,
    #: 7 SHA-256, 8 SHA3-256). MD5 only by default, like open-iscsi's
    #: ``chap_algs``: tgt 1.0.x accepts 7 but computes SHA-1 for it, so
    #: offering 7 first breaks CHAP against tgt.
    chap_algorithms: tuple[int, ...] = (5,)
    header_digest: str = "None,CRC32C"
    data_digest: str = "None,CRC32C"
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 16776192
    first_burst_length: int = 262144
    initial_r2t: bool = False
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    keys: dict[str, str] = field(default_factory=dict)
    #: Seconds of receive silence before a NOP-Out ping; None disables pings.
    nop_interval: float | None = 5.0
    #: Seconds to wait for the ping's answer before declaring the connection dead.
    nop_timeout: float = 5.0
    #: Seconds a broken session may take to come back before commands fail.
    replacement_timeout: float = 120.0
    #: Seconds allowed for TCP connect (first connect: reported this fast).
    connect_timeout: float = 5.0
    #: Seconds allowed for a whole login exchange.
    login_timeout: float = 15.0
    #: The 48-bit ISID; a random one of type "random" (§11.12.5) if None.
    isid: int | None = None
    #: Upper bound on commands in flight besides the target's window.
    queue_depth: int = 128
    #: Seconds from submission to status before a command is aborted and
    #: fails with CommandTimedOut (open-iscsi/Linux: 30 s); None: no limit.
    command_timeout: float | None = 30.0
    #: Seconds for each task management step of that abort.
    tmf_timeout: float = 10.0
    #: Times a command is reissued after connection failures before it
    #: fails (the SCSI midlayer's retries, 5 in Linux).
    command_retries: int = 5
    #: Upper bound of the pause between logins after repeated failures.
    reconnect_backoff_max: float = 5.0
    #: TCP connections in the session (MC/S, RFC 7143 §4.2): more than 1
    #: offers MaxConnections=N and adds connections up to what the target
    #: accepts; commands go to the least loaded one, and the session
    #: carries on over the others when one is lost.
    connections: int = 1
    #: ErrorRecoveryLevel offered (RFC 7143 §13.20; the session runs at the
    #: lower of both sides'): 1 recovers digest errors and lost PDUs with
    #: SNACK and recovery R2Ts instead of dropping the connection (§7.1.5);
    #: 2 also moves a lost connection's tasks to another one with TASK
    #: REASSIGN instead of reissuing or failing them (§7.2.2).
    error_recovery_level: int = 0
    #: Portals (``host[:port]``) of the target's portal group for the
    #: extra connections, in turn (connection CID n uses portals[n - 1 mod
    #: len]); empty: the portal the session logged in at.
    portals: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ScsiResult:
    """How a SCSI command ended (status GOOD or not; checks are the caller's).

    ``data`` is the Data-In actually transferred (a view of the caller's
    buffer when one was given); ``residual`` is the residual count with
    ``underflow``/``overflow`` saying which (RFC 7143 §11.4.5).
    """

    status: int
    sense: bytes = b""
    data: memoryview | None = None
    residual: int = 0
    underflow: bool = False
    overflow: bool = False

    @property
    def good(self) -> bool:
        """True for status GOOD (or CONDITION MET)."""
        return self.status in (0x00, 0x04)
