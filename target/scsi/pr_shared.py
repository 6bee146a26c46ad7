"""Persistent reservations shared by several target processes serving the
same logical unit (gateways in front of one Ceph RBD image).

The state (registrations, reservation, PRgeneration) lives in the cluster
in a :class:`SharedPRStore`; each gateway keeps a copy for the hot path
(every command's conflict check, SPC-4 §5.9.1) and for PERSISTENT RESERVE
IN. A PERSISTENT RESERVE OUT is read-modify-write with compare-and-swap:
read the stored state and its version, run the command on it, store the
result only if the version is unchanged (else run it again on the newer
state), then notify the other gateways, which adopt the new state before
acknowledging -- so once the initiator has GOOD, every gateway enforces it.
A notification is adopted on the event loop, between commands, never in
the middle of one.

SPC-2 RESERVE/RELEASE stay per gateway. APTPL is not offered (PTPL_C=0):
the shared state already outlives any one gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Protocol

from iscsi.scsi.constants import SenseKey
from iscsi.scsi.sense import INTERNAL_TARGET_FAILURE, CheckCondition

from .pr_model import _PRState
from .pr_store import decode_state, state_json
from .reservations import Reservations
from .types import Nexus

log = logging.getLogger("aioiscsi.target")

#: Compare-and-swap attempts before a PERSISTENT RESERVE OUT gives up.
_ATTEMPTS = 16


class SharedPRStore(Protocol):
    """Where the shared state lives. The calls block (a worker thread runs
    them); ``watch``'s callback runs on a thread of the store's library."""

    def read(self) -> tuple[bytes | None, int]:
        """The stored document (None: none yet) and its version."""

    def write_if(self, blob: bytes, version: int) -> bool:
        """Store ``blob`` if the version is still ``version``; False when
        another writer came first."""

    def notify(self, blob: bytes) -> None:
        """Tell every watcher (other gateways) the new document; returns
        once they have acknowledged it or a timeout passed."""

    def watch(self, callback: Callable[[bytes], None]) -> None:
        """Call ``callback(document)`` for each notification."""

    def close(self) -> None:
        """Stop watching."""


def encode(s: _PRState) -> bytes:
    """The stored document: the APTPL file format plus the generation."""
    doc = state_json(s)
    doc["aptpl"] = True  # the file format's marker of a state to trust
    doc["shared"] = {"aptpl": s.aptpl, "generation": s.generation}
    return json.dumps(doc, sort_keys=True).encode()


def decode(blob: bytes | None) -> _PRState:
    """The state a stored document holds (an empty state for None);
    ValueError when damaged."""
    if not blob:
        return _PRState()
    state = decode_state(blob)
    extra = json.loads(blob).get("shared", {})
    state.aptpl = bool(extra.get("aptpl", False))
    state.generation = int(extra.get("generation", 0))
    return state


class SharedReservations(Reservations):
    """:class:`Reservations` whose persistent state is kept in a store."""

    def __init__(self, store: SharedPRStore) -> None:
        super().__init__(None)
        self.store = store
        self._lock: asyncio.Lock | None = None
        blob, _ = store.read()
        self._s = decode(blob)
        self._loop: asyncio.AbstractEventLoop | None = None
        store.watch(self._notified)

    def note_nexus(self, nexus: Nexus) -> None:
        """As :meth:`Reservations.note_nexus`; also learns the target's
        loop, to which notifications are handed from then on."""
        super().note_nexus(nexus)
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                pass

    def _notified(self, blob: bytes) -> None:
        # A thread of the store's library: parse here, adopt on the loop.
        try:
            state = decode(blob)
        except ValueError as exc:
            log.error("shared reservation state notified by another gateway is damaged: %s", exc)
            return
        loop = self._loop
        if loop is None:
            self._s = state
            return
        try:
            loop.call_soon_threadsafe(self._adopt, state)
        except RuntimeError:
            pass  # loop closed: shutting down

    def _adopt(self, state: _PRState) -> None:
        self._s = state

    async def run_out(self, command: Callable[[], object]) -> object:
        """Run ``command`` (which calls :meth:`reserve_out`) against the
        stored state with compare-and-swap, then notify the other gateways."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        async with self._lock:
            for _ in range(_ATTEMPTS):
                blob, version = await asyncio.to_thread(self.store.read)
                try:
                    before = decode(blob)
                except ValueError as exc:
                    log.error("shared reservation state is damaged: %s", exc)
                    raise CheckCondition(SenseKey.HARDWARE_ERROR, *INTERNAL_TARGET_FAILURE) from None
                self._s = before.copy()
                result = command()  # raises (state unchanged) on conflict / bad request
                after = self._s
                if (after.regs, after.reservation, after.aptpl, after.generation) == (
                        before.regs, before.reservation, before.aptpl, before.generation):
                    return result
                new = encode(after)
                try:
                    stored = await asyncio.to_thread(self.store.write_if, new, version)
                except Exception as exc:  # noqa: BLE001 - the store's own errors
                    self._s = before
                    log.error("cannot store the shared reservation state: %s", exc)
                    raise CheckCondition(SenseKey.HARDWARE_ERROR,
                                         *INTERNAL_TARGET_FAILURE) from None
                if stored:
                    await asyncio.to_thread(self.store.notify, new)
                    return result
                self._s = before  # another gateway came first: again, on its state
        raise CheckCondition(SenseKey.HARDWARE_ERROR, *INTERNAL_TARGET_FAILURE)

    def close(self) -> None:
        """Stop following the other gateways."""
        self.store.close()
