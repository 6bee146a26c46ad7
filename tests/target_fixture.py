"""Run our target in a background thread on an ephemeral loopback port, so
tests can point real initiators (libiscsi tools, qemu-img, our initiator) at
it and inspect server state afterwards."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from target.config import ChapConfig, Limits, LunSpec, PortalGroup, ServerConfig, TargetSpec
from target.server import TargetServer

TARGET_NAME = "iqn.2026-11.org.aioiscsi.test:disk"


def new_loop() -> asyncio.AbstractEventLoop:
    """The loop production uses: uvloop when installed (DESIGN.md)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class RunningTarget:
    """A target server running on its own event loop thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server = TargetServer(config)
        self.loop = new_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> RunningTarget:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("target did not start within 30 s")
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        return self.server.bound[0][2]

    @property
    def host(self) -> str:
        return self.server.bound[0][1]

    def portal(self) -> str:
        h = self.host
        return f"[{h}]:{self.port}" if ":" in h else f"{h}:{self.port}"

    def url(self, lun: int = 0, target: str | None = None, user: str | None = None,
            secret: str | None = None) -> str:
        cred = f"{user}%{secret}@" if user else ""
        return f"iscsi://{cred}{self.portal()}/{target or self.config.targets[0].name}/{lun}"

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the server's loop and return its result."""
        async def wrapper() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(30)

    def stop(self) -> None:
        if self._thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self.server.stop(logout_wait=0.5), self.loop)
            try:
                fut.result(30)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(30)
        self.loop.close()


def make_config(luns: list[LunSpec], *, name: str = TARGET_NAME, chap: ChapConfig | None = None,
                limits: Limits | None = None, allow: tuple[str, ...] = (),
                discovery_chap: ChapConfig | None = None, host: str = "127.0.0.1",
                extra_targets: tuple[TargetSpec, ...] = (), nop_interval: float = 0.0,
                login_timeout: float = 15.0, state_dir: str | None = None) -> ServerConfig:
    """A one-target config listening on an ephemeral port of ``host``."""
    spec = TargetSpec(name=name, luns=tuple(luns), chap=chap, limits=limits or Limits(),
                      allow=allow)
    return ServerConfig(targets=(spec, *extra_targets),
                        portal_groups=(PortalGroup(1, ((host, 0),)),),
                        discovery_chap=discovery_chap, nop_interval=nop_interval,
                        login_timeout=login_timeout, state_dir=state_dir)


@contextmanager
def running_target(config: ServerConfig) -> Iterator[RunningTarget]:
    """Context manager: a started target, stopped on exit."""
    t = RunningTarget(config).start()
    try:
        yield t
    finally:
        t.stop()
