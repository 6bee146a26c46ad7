"""The initiator's session-recovery policy, sans-I/O (RFC 7143 §7.1.4.3,
ErrorRecoveryLevel 0): which commands a new connection reissues, and how
long to wait before each login -- time passed in, never read.

A target that breaks the protocol right after every login
must not get an endless storm of logins, nor hang its commands: a command
is sent at most ``1 + command_retries`` times (Linux's SCSI midlayer retries
5 times), and a connection that fails soon after its login makes the next
login wait, doubling from ``backoff_first`` up to ``backoff_max``.
"""

from __future__ import annotations

from .initiator_tasks import Command


class RecoveryPolicy:
    """Reissue and pacing decisions for one session."""

    def __init__(self, *, command_retries: int = 5, backoff_first: float = 0.05,
                 backoff_max: float = 5.0, healthy_after: float = 10.0) -> None:
        self.command_retries = command_retries
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        #: A connection that lived this long before failing was healthy.
        self.healthy_after = healthy_after
        #: Connection failures since the last healthy period.
        self.failures = 0
        self._logged_in_at: float | None = None

    def logged_in(self, now: float) -> None:
        """A login completed at ``now``."""
        self._logged_in_at = now

    def command_completed(self) -> None:
        """A command got its status: the target works; no more backoff."""
        self.failures = 0

    def connection_failed(self, now: float) -> float:
        """The connection failed at ``now``: seconds to wait before the
        next login (0 after a healthy period: recover at once)."""
        if self._logged_in_at is not None and now - self._logged_in_at >= self.healthy_after:
            self.failures = 0
        self.failures += 1
        if self.failures <= 1:
            return 0.0
        return float(min(self.backoff_first * 2 ** (self.failures - 2), self.backoff_max))

    def login_retry_delay(self, previous: float) -> float:
        """The wait after a failed login attempt that waited ``previous``."""
        return min(max(previous * 2, self.backoff_first), max(1.0, self.backoff_max))

    def give_up(self) -> bool:
        """True when so many connections in a row failed without any
        command completing that waiting commands should fail rather than
        wait (a target that logs in and then never answers: the commands
        behind the unit-attention check are never even sent)."""
        return self.failures > self.command_retries + 1

    def reissue(self, cmd: Command) -> bool:
        """Whether ``cmd`` may be sent again on a new connection."""
        return cmd.attempts <= self.command_retries


__all__ = ["RecoveryPolicy"]
