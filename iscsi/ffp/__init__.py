"""The full-feature phase of RFC 7143, sans-I/O, for both roles.

Shape (as h11/aioquic): an engine object is fed decoded PDUs together with
``now`` (seconds, any monotonic origin chosen by the caller); it returns
events for its owner and queues PDUs, which the owner takes as wire buffers
with :meth:`~iscsi.ffp.common.Outbox.take` and writes with one
``writelines``. Time only enters through ``now`` arguments:
``get_timer()`` says when the engine next wants ``handle_timer(now)``.

Modules: :mod:`.common` (shared pieces: outbox, deadlines, burst
splitting); the target's :mod:`.target` (one connection's engine),
:mod:`.target_control` (NOP, Text, Logout, TMF answers), :mod:`.target_tasks`
(its tasks, events and parameters), :mod:`.target_recovery`
(ErrorRecoveryLevel 1: recovery R2Ts, status and Data-In kept for SNACK)
and :mod:`.window` (a session's CmdSN window); the initiator's
:mod:`.initiator` (the engine), :mod:`.initiator_tasks` (commands and
events), :mod:`.initiator_control` (NOP, TMF, Text, Logout, Async Message,
Reject), :mod:`.initiator_erl` (ErrorRecoveryLevel 1: SNACK, held status,
command retry) and :mod:`.initiator_recovery` (reissue bounds and login
pacing).
"""
