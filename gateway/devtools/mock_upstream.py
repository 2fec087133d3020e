"""A mock LLM upstream (OpenAI and Anthropic shapes, JSON and SSE): for trying the gateway
out without an LLM account (`credit-gateway mock-upstream --port 9100`), and for the tests
and benchmarks. It answers every model with a few "tok " tokens and reports usage.

Each request may steer it with headers (the gateway forwards them like any other):
  X-Fake-Status: 500           answer this HTTP status with an error body, before any output
  X-Fake-Latency-Ms: 50        wait before answering
  X-Fake-Input-Tokens: 12      usage reported (default: body size / 4)
  X-Fake-Output-Tokens: 7      tokens generated per choice (default 10), never above the
                               request's cap in the field its route obeys; `n` choices are
                               generated (and `best_of` on completions) and billed
  X-Fake-Cached-Tokens: 3      part of the input served from cache
  X-Fake-Chunk-Delay-Ms: 5     pause between streamed chunks
  X-Fake-Fail-After: 3         streams: drop the connection after this many chunks
  X-Fake-Garbage-After: 3      streams: after this many chunks, bytes that are no SSE and an
                               event that is no JSON, then the rest of the stream
  X-Fake-No-Usage: 1           never report usage
  X-Fake-Cap-Field: max_tokens  a loosely compatible server: reads only this cap field, and
                               `n` / `best_of` on any route
  X-Fake-Usage: %7B%7D          whole answers: this (URL-encoded JSON) as their usage object
  X-Fake-Ignore-Cap: 1         generate X-Fake-Output-Tokens whatever cap the request names
  X-Fake-Token-Text: %F0%9F%98%80  the text of each generated token (URL-encoded; default "tok ")
GET /_requests lists what it received (method, path, headers, body); DELETE /_requests clears.

    credit-gateway mock-upstream --port 9100        (or: python -m gateway.devtools.mock_upstream)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import urllib.parse
from typing import Any

from aiohttp import web

# The output cap each route obeys (chat: max_completion_tokens first, as OpenAI reads it).
CAP_FIELDS = {
    "/v1/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}


def _max_tokens(path: str, body: dict, field: str | None = None) -> int | None:
    for k in (field,) if field else CAP_FIELDS.get(path, ()):
        if isinstance(body.get(k), int):
            return body[k]
    return None


@web.middleware
async def _upstream_headers(request: web.Request, handler):
    """The headers a real upstream adds to every answer (OpenAI's request id and account)."""
    resp = await handler(request)
    resp.headers.setdefault("x-request-id", f"req_mock{time.monotonic_ns()}")
    resp.headers.setdefault("openai-organization", "mock-org")
    return resp


def _token_text(request: web.Request) -> str:
    return urllib.parse.unquote(request.headers.get("X-Fake-Token-Text", "tok "))


def _choices(path: str, body: dict, lenient: bool = False) -> tuple[int, int]:
    """(choices returned, completions generated and billed): n, and best_of on completions
    (`lenient`: on any route, as a loosely compatible server might)."""
    if not lenient and path not in ("/v1/chat/completions", "/v1/completions"):
        return 1, 1
    n_field, best_of_field = body.get("n"), body.get("best_of")
    n = n_field if isinstance(n_field, int) else 1
    best_of = (
        best_of_field if (lenient or path == "/v1/completions") and isinstance(best_of_field, int) else n
    )
    return n, max(n, best_of)


class MockUpstream:
    """`latency_ms`, `output_tokens` and `error_rate` (a share of answers that are 500s) apply
    to requests that do not say otherwise with the X-Fake-* headers (load tests, the demo)."""

    def __init__(
        self,
        record: bool = True,
        *,
        latency_ms: int = 0,
        output_tokens: int = 10,
        error_rate: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.requests: list[dict[str, Any]] = []
        self.record = record
        self.latency_ms, self.output_tokens, self.error_rate = latency_ms, output_tokens, error_rate
        self.rand = random.Random(seed)
        self.app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[_upstream_headers])
        r = self.app.router
        for path in (
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
            "/v1/messages",
        ):
            r.add_post(path, self.llm)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/redirect", self.redirect)
        r.add_post("/v1/redirect", self.redirect)
        r.add_get("/_requests", self.list_requests)
        r.add_delete("/_requests", self.clear_requests)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    # -- endpoints --------------------------------------------------------------------

    async def list_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def clear_requests(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.json_response({"cleared": True})

    async def models(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def redirect(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        raise web.HTTPFound("http://127.0.0.1:9/elsewhere")

    def _record(self, request: web.Request, raw: bytes) -> None:
        if self.record:
            self.requests.append(
                {
                    "method": request.method,
                    "path": request.path_qs,
                    "headers": dict(request.headers),
                    "body": raw.decode(errors="replace"),
                }
            )

    async def llm(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self._record(request, raw)
        h = request.headers
        latency = int(h.get("X-Fake-Latency-Ms", self.latency_ms))
        if latency:
            await asyncio.sleep(latency / 1000)
        anthropic = request.path == "/v1/messages"
        failing = self.error_rate and self.rand.random() < self.error_rate
        status = int(h.get("X-Fake-Status", "500" if failing else "200"))
        if status >= 400:
            if anthropic:
                err = {"type": "error", "error": {"type": "api_error", "message": "mock upstream failure"}}
            else:
                err = {"error": {"message": "mock upstream failure", "type": "server_error", "code": None}}
            return web.json_response(err, status=status)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return web.json_response({"error": {"message": "bad json"}}, status=400)
        n_in = int(h.get("X-Fake-Input-Tokens", max(1, len(raw) // 4)))
        cached = int(h.get("X-Fake-Cached-Tokens", 0))
        cap = _max_tokens(request.path, body, h.get("X-Fake-Cap-Field"))
        n_out = int(h.get("X-Fake-Output-Tokens", self.output_tokens))
        if cap is not None:
            n_out = n_out if h.get("X-Fake-Ignore-Cap") == "1" else min(n_out, cap)
        if request.path == "/v1/embeddings":
            n_out = 0
        usage_on = h.get("X-Fake-No-Usage") != "1"
        model = body.get("model", "fake-model")
        choices, billed = _choices(request.path, body, lenient="X-Fake-Cap-Field" in h)
        if body.get("stream"):
            return await self._stream(request, body, anthropic, model, n_in, n_out, cached, usage_on, choices)
        inputs = (
            len(body["input"])
            if isinstance(body.get("input"), list) and body["input"] and not isinstance(body["input"][0], int)
            else 1
        )
        out = self._whole(
            request.path, model, n_in, n_out, cached, usage_on, choices, billed, _token_text(request), inputs
        )
        if h.get("X-Fake-Usage"):
            out["usage"] = json.loads(urllib.parse.unquote(h["X-Fake-Usage"]))
        return web.json_response(out)

    def _whole(
        self,
        path: str,
        model: str,
        n_in: int,
        n_out: int,
        cached: int,
        usage_on: bool,
        choices: int = 1,
        billed: int = 1,
        tok: str = "tok ",
        inputs: int = 1,
    ) -> dict:
        text = tok * n_out
        out: dict[str, Any]
        if path == "/v1/messages":
            out = {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
            }
            if usage_on:
                out["usage"] = {
                    "input_tokens": n_in - cached,
                    "output_tokens": n_out * billed,
                    "cache_read_input_tokens": cached,
                    "cache_creation_input_tokens": 0,
                }
            return out
        if path == "/v1/responses":
            out = {
                "id": "resp_fake",
                "object": "response",
                "model": model,
                "status": "completed",
                "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}],
            }
            if usage_on:
                out["usage"] = {
                    "input_tokens": n_in,
                    "output_tokens": n_out * billed,
                    "total_tokens": n_in + n_out * billed,
                    "input_tokens_details": {"cached_tokens": cached},
                }
            return out
        if path == "/v1/embeddings":
            out = {
                "object": "list",
                "model": model,
                "data": [{"object": "embedding", "index": i, "embedding": [0.0, 0.1]} for i in range(inputs)],
            }
            if usage_on:
                out["usage"] = {"prompt_tokens": n_in, "total_tokens": n_in}
            return out
        out_choices = []
        for i in range(choices):
            choice: dict[str, Any] = {"index": i, "finish_reason": "stop"}
            if path == "/v1/completions":
                choice["text"] = text
            else:
                choice["message"] = {"role": "assistant", "content": text}
            out_choices.append(choice)
        out = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": out_choices,
        }
        if usage_on:
            total_out = n_out * billed
            out["usage"] = {
                "prompt_tokens": n_in,
                "completion_tokens": total_out,
                "total_tokens": n_in + total_out,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
        return out

    async def _stream(
        self, request, body, anthropic, model, n_in, n_out, cached, usage_on, choices: int = 1
    ) -> web.StreamResponse:
        h = request.headers
        delay = int(h.get("X-Fake-Chunk-Delay-Ms", 0)) / 1000
        tok = _token_text(request)
        fail_after = int(h["X-Fake-Fail-After"]) if h.get("X-Fake-Fail-After") else None
        garbage_after = int(h["X-Fake-Garbage-After"]) if h.get("X-Fake-Garbage-After") else None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        sent = 0

        async def send(event: str | None, data: Any) -> None:
            nonlocal sent
            if fail_after is not None and sent >= fail_after:
                raise _Drop()
            if garbage_after is not None and sent == garbage_after:
                # bytes no SSE parser can read, a broken JSON event, then the stream goes on
                await resp.write(
                    b"\xff\xfe\x00garbage\r\n\n" + b"data: {not json\n\n" + bytes(range(256)) + b"\n\n"
                )
            prefix = f"event: {event}\n" if event else ""
            payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            await resp.write(f"{prefix}data: {payload}\n\n".encode())
            sent += 1
            if delay:
                await asyncio.sleep(delay)

        try:
            if anthropic:
                start_usage = {
                    "input_tokens": n_in - cached,
                    "output_tokens": 1,
                    "cache_read_input_tokens": cached,
                    "cache_creation_input_tokens": 0,
                }
                await send(
                    "message_start",
                    {
                        "type": "message_start",
                        "message": {
                            "id": "msg_fake",
                            "type": "message",
                            "role": "assistant",
                            "model": model,
                            "content": [],
                            **({"usage": start_usage} if usage_on else {}),
                        },
                    },
                )
                await send(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
                for _ in range(n_out):
                    await send(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "text_delta", "text": tok},
                        },
                    )
                await send("content_block_stop", {"type": "content_block_stop", "index": 0})
                delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
                if usage_on:
                    delta["usage"] = {"output_tokens": n_out}
                await send("message_delta", delta)
                await send("message_stop", {"type": "message_stop"})
            elif request.path == "/v1/responses":
                for _ in range(n_out):
                    await send(
                        "response.output_text.delta", {"type": "response.output_text.delta", "delta": tok}
                    )
                done = {"id": "resp_fake", "object": "response", "model": model, "status": "completed"}
                if usage_on:
                    done["usage"] = {
                        "input_tokens": n_in,
                        "output_tokens": n_out,
                        "total_tokens": n_in + n_out,
                        "input_tokens_details": {"cached_tokens": cached},
                    }
                await send("response.completed", {"type": "response.completed", "response": done})
            else:
                base = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                }
                for _ in range(n_out):
                    for c in range(choices):
                        if request.path == "/v1/completions":
                            ch = {"index": c, "text": tok, "finish_reason": None}
                        else:
                            ch = {"index": c, "delta": {"content": tok}, "finish_reason": None}
                        await send(None, {**base, "choices": [ch]})
                for c in range(choices):
                    await send(
                        None, {**base, "choices": [{"index": c, "delta": {}, "finish_reason": "stop"}]}
                    )
                opts = body.get("stream_options") or {}
                if usage_on and opts.get("include_usage"):
                    total_out = n_out * choices
                    await send(
                        None,
                        {
                            **base,
                            "choices": [],
                            "usage": {
                                "prompt_tokens": n_in,
                                "completion_tokens": total_out,
                                "total_tokens": n_in + total_out,
                                "prompt_tokens_details": {"cached_tokens": cached},
                            },
                        },
                    )
                await send(None, "[DONE]")
            await resp.write_eof()
        except _Drop:
            # Mid-stream failure: cut the connection without finishing the chunked body.
            if request.transport is not None:
                request.transport.close()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return resp


class _Drop(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.error_rate <= 1:
        raise SystemExit("--error-rate is a share between 0 and 1")
    mock = MockUpstream(
        record=not args.no_record,
        latency_ms=args.latency_ms,
        output_tokens=args.output_tokens,
        error_rate=args.error_rate,
    )
    print(
        f"mock LLM upstream on http://{args.host}:{args.port} (OpenAI and Anthropic routes, any model)",
        flush=True,
    )
    web.run_app(mock.app, host=args.host, port=args.port, access_log=None, print=lambda *_: None)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mock LLM upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `credit-gateway mock-upstream` and of `python -m` this module."""
    parser.add_argument("--no-record", action="store_true", help="keep no request log (benchmarks)")
    parser.add_argument("--latency-ms", type=int, default=0, help="wait before each answer (default 0)")
    parser.add_argument(
        "--output-tokens", type=int, default=10, help="tokens generated per answer (default 10)"
    )
    parser.add_argument(
        "--error-rate", type=float, default=0.0, help="share of answers that are 500s, 0 to 1 (default 0)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
