"""A TCP proxy in front of a real redis-server that a test can break.

- `down()`: every open connection is cut and new ones are closed at once (Redis gone);
  `up()`: connections go through again.
- `lose_reply_to(marker)`: the next request whose bytes contain `marker` reaches Redis (and
  is applied there), but its reply is dropped and the connection cut: a write whose answer
  never came back.
"""

from __future__ import annotations

import asyncio
import contextlib


class FlakyRedisProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.is_up = True
        self.lost_replies = 0
        self._marker: bytes | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> FlakyRedisProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def down(self) -> None:
        self.is_up = False
        for c, s in list(self._conns):
            c.close()
            s.close()

    def up(self) -> None:
        self.is_up = True

    def lose_reply_to(self, marker: bytes) -> None:
        self._marker = marker

    async def close(self) -> None:
        self.down()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            if not self.is_up:
                cwriter.close()
                return
            try:
                sreader, swriter = await asyncio.open_connection(*self.target)
            except OSError:
                cwriter.close()
                return
            pair = (cwriter, swriter)
            self._conns.add(pair)
            lose = asyncio.Event()

            async def client_to_server() -> None:
                while data := await creader.read(65536):
                    if self._marker is not None and self._marker in data:
                        self._marker = None
                        lose.set()
                    swriter.write(data)
                    await swriter.drain()

            async def server_to_client() -> None:
                while data := await sreader.read(65536):
                    if lose.is_set():
                        self.lost_replies += 1
                        return  # the reply is dropped; both sides are cut below
                    cwriter.write(data)
                    await cwriter.drain()

            pumps = [asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                self._conns.discard(pair)
                cwriter.close()
                swriter.close()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                cwriter.close()
            self._tasks.discard(task)
