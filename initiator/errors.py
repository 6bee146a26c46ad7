"""Exceptions the initiator raises to its callers.

Every failure a caller can see is an :class:`InitiatorError` whose ``str()``
is one line saying what happened; :attr:`InitiatorError.hint` says what to
try, so the command line can print both without a traceback.
"""

from __future__ import annotations

from iscsi.constants import LoginStatus


class InitiatorError(Exception):
    """Base class of initiator failures; ``hint`` suggests what to try."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class PortalUnreachable(InitiatorError):
    """TCP connection to the portal failed (refused, timed out, no route)."""

    hint = "check the address and port, and that the target is running"


class LoginRefused(InitiatorError):
    """The target answered the login with a non-success status (§11.13.5)."""

    def __init__(self, status: int, message: str | None = None, *,
                 hint: str | None = None) -> None:
        try:
            words = LoginStatus(status).words
        except ValueError:
            words = f"status class {status >> 8} detail {status & 0xFF}"
        self.status = status
        self.words = words
        hint = hint or _LOGIN_HINTS.get(status, "check the target's configuration")
        super().__init__(message or f"login refused: {words} (status 0x{status:04x})", hint=hint)


_LOGIN_HINTS: dict[int, str] = {
    LoginStatus.AUTHENTICATION_FAILURE:
        "check the CHAP user and secret (iscsi://user%secret@host/...)",
    LoginStatus.AUTHORIZATION_FAILURE:
        "the target's ACL does not allow this initiator name",
    LoginStatus.NOT_FOUND: "run 'iscsi-initiator discover HOST' to list the targets",
    LoginStatus.TARGET_REMOVED: "run 'iscsi-initiator discover HOST' to list the targets",
    LoginStatus.TOO_MANY_CONNECTIONS: "log out other sessions to this target",
    LoginStatus.SERVICE_UNAVAILABLE: "try again later",
    LoginStatus.OUT_OF_RESOURCES: "try again later",
}


class LoginFailed(InitiatorError):
    """The login exchange broke off (negotiation or authentication error on
    our side, or the target closed the connection mid-login)."""

    hint = "check the credentials and the negotiable keys you set"


class SessionFailed(InitiatorError):
    """The session is gone for good: the replacement timeout expired, the
    session was closed, or the target asked it to end."""

    hint = "check that the target is reachable, then reconnect"


class ConnectionLost(InitiatorError):
    """The connection dropped while a non-SCSI exchange (ping, text, task
    management) was outstanding; SCSI commands are reissued instead."""


class TargetProtocolError(InitiatorError):
    """The target broke RFC 7143 (or rejected one of our PDUs)."""

    hint = "this is a target bug or an interoperability problem; a packet capture helps"


class CommandTimedOut(InitiatorError):
    """A SCSI command got no status within ``SessionOptions.command_timeout``;
    the task was aborted (ABORT TASK, then LOGICAL UNIT RESET, then session
    recovery, the escalation Linux's SCSI error handler uses)."""

    hint = "the target is overloaded or stuck; check its logs, or raise command_timeout"


class LUNNotFound(InitiatorError):
    """The LUN does not exist on the target."""

    hint = "run 'iscsi-initiator ls URL' to list the LUNs"
