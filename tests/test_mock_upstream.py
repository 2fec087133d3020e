"""The mock LLM upstream's defaults for load tests and the demo: latency, output tokens and a
share of failures, each overridden by a request's X-Fake-* headers."""

from __future__ import annotations

import time

import aiohttp
import pytest

from gateway.devtools.mock_upstream import MockUpstream, main

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}


async def test_defaults_apply_unless_a_header_says_otherwise():
    mock = MockUpstream(latency_ms=200, output_tokens=7, error_rate=0.5, seed=1)
    url = await mock.start()
    try:
        async with aiohttp.ClientSession() as s:
            statuses = []
            started = time.monotonic()
            for _ in range(20):
                async with s.post(url + "/v1/chat/completions", json=CHAT) as r:
                    statuses.append(r.status)
                    if r.status == 200:
                        assert (await r.json())["usage"]["completion_tokens"] == 7
            assert time.monotonic() - started >= 20 * 0.2
            assert 3 <= statuses.count(500) <= 17 and statuses.count(200) + statuses.count(500) == 20
            headers = {"X-Fake-Status": "200", "X-Fake-Latency-Ms": "0", "X-Fake-Output-Tokens": "3"}
            for _ in range(5):
                async with s.post(url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
                    assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 3
    finally:
        await mock.stop()


def test_an_error_rate_outside_zero_to_one_is_refused():
    with pytest.raises(SystemExit, match="between 0 and 1"):
        main(["--error-rate", "1.5"])
