"""A TCP relay for tests that must lose one connection on purpose: it
forwards every connection it accepts to a target and can cut any of them
(both directions, at once) when the test says so -- the way a cable pull
or a middlebox reset looks to both ends. It runs on the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pair:
    """One relayed connection: the client's side and the target's."""

    client_port: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: Drop what the target sends instead of forwarding it.
    mute: bool = False


class Relay:
    """Forwards ``127.0.0.1:<port>`` to ``host:port``.

    :meth:`cut` aborts the relayed connection whose client side uses a
    given local port (``transport.get_extra_info("sockname")[1]`` on the
    client), so a test can pick exactly which connection of a session dies.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.pairs: list[_Pair] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Relay:
        """Listen on an ephemeral port of 127.0.0.1."""
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        pair = _Pair(writer.get_extra_info("peername")[1], writer, up_writer)
        self.pairs.append(pair)
        pair.tasks = [asyncio.ensure_future(self._pump(reader, up_writer, pair)),
                      asyncio.ensure_future(self._pump(up_reader, writer, pair))]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    pair: _Pair) -> None:
        try:
            while data := await src.read(1 << 16):
                if pair.mute and dst is pair.client:
                    continue
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._close(pair)

    @staticmethod
    def _close(pair: _Pair) -> None:
        for w in (pair.client, pair.upstream):
            transport = w.transport
            if not transport.is_closing():
                transport.abort()

    def _pair(self, client_port: int) -> _Pair:
        for pair in self.pairs:
            if pair.client_port == client_port:
                return pair
        raise KeyError(f"no relayed connection from port {client_port}")

    def cut(self, client_port: int) -> None:
        """Abort the relayed connection from ``client_port``, both ways."""
        self._close(self._pair(client_port))

    def mute(self, client_port: int) -> None:
        """From now on drop what the target sends on the connection from
        ``client_port`` (the client's commands still get through): its
        answers are lost, as when a connection dies after the target has
        taken commands."""
        self._pair(client_port).mute = True

    async def close(self) -> None:
        """Stop listening and drop every relayed connection."""
        if self.server is not None:
            self.server.close()
        for pair in self.pairs:
            self._close(pair)
            for task in pair.tasks:
                task.cancel()
        for pair in self.pairs:
            for task in pair.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.server is not None:
            await self.server.wait_closed()
