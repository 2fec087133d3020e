"""A bare, unmetered passthrough proxy on the gateway's HTTP stack (Starlette + uvicorn +
one pooled aiohttp client): the baseline the metered gateway is measured against.

    python loadtest/passthrough.py UPSTREAM_URL PORT
"""

from __future__ import annotations

import contextlib
import sys

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


def build(upstream: str) -> Starlette:
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        yield
        await state["s"].close()

    async def forward(request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        resp = await state["s"].post(
            upstream + request.url.path, data=body, headers=headers, allow_redirects=False
        )
        out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
        if resp.content_type == "text/event-stream":

            async def gen():
                try:
                    async for chunk in resp.content.iter_any():
                        yield chunk
                finally:
                    resp.release()

            return StreamingResponse(gen(), status_code=resp.status, headers=out)
        raw = await resp.read()
        resp.release()
        return Response(raw, status_code=resp.status, headers=out)

    return Starlette(routes=[Route("/v1/{rest:path}", forward, methods=["POST"])], lifespan=lifespan)


if __name__ == "__main__":
    uvicorn.run(
        build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False
    )
