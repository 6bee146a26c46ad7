"""Error recovery family (ErrorRecoveryLevel 1 and 2: SNACK, digest
recovery, connection and task reassignment, RFC 7143 §7).

The tests are declared so that the catalogue, the selection globs and the
reports are complete; each first negotiates the level it needs and reports
not-supported when the target declines it. Their bodies are not written
yet: a target that agrees gets not-supported with that said.
"""

from __future__ import annotations

from .context import Context
from .model import Level, NotSupported, conformance_test

MUST = Level.MUST


def require_erl(ctx: Context, level: int) -> None:
    """Log in offering ErrorRecoveryLevel=``level``; NotSupported when the
    target agrees to less (§13.20: result function Min)."""
    w = ctx.session({"ErrorRecoveryLevel": str(level)})
    assert w.params is not None
    got = w.params.error_recovery_level
    ctx.logout(w)
    if got < level:
        raise NotSupported(f"target declined ErrorRecoveryLevel={level} (agreed {got})")
    raise NotSupported(f"target agreed ErrorRecoveryLevel={got}; this check is not "
                       "implemented in the kit yet")


def _declare(test_id: str, section: str, level: int, description: str) -> None:
    @conformance_test(test_id, section, MUST, description + f" (needs ERL {level})")
    def test(ctx: Context) -> str:
        require_erl(ctx, level)
        return ""


_declare("erl.snack.data", "11.16.1", 1,
         "SNACK Type 0 for a Data-In PDU we pretend lost: the target resends it with the "
         "same DataSN")
_declare("erl.snack.status", "11.16.1", 1,
         "SNACK Type 1 (status) for a StatSN we pretend lost: the response is resent")
_declare("erl.snack.data_ack", "11.16.1", 1,
         "DataACK SNACK answering a Data-In with the A bit: accepted, no Reject")
_declare("erl.snack.r_data", "11.16.1", 1,
         "R-Data SNACK: Data-In resent with a fresh DataSN sequence and the status after it")
_declare("erl.digest.data_out_recovery", "7.8", 1,
         "a Data-Out with a wrong data digest: the target discards it and asks for the data "
         "again with a recovery R2T")
_declare("erl.connection.reinstatement", "6.3.4", 2,
         "a new connection with the same ISID, TSIH and CID: the old one is closed, its tasks "
         "can be reassigned")
_declare("erl.task.reassign", "11.5.1", 2,
         "TASK REASSIGN of a task from a dropped connection onto a new one: response 0 and the "
         "task completes")
_declare("erl.time2retain.expiry", "13.16", 2,
         "after a connection drop, tasks are kept DefaultTime2Retain seconds, then dropped")
