"""The multiplexed script client (gateway/core/multiplex.py) against a real redis-server:
replies paired with their calls under concurrency, errors as redis-py raises them, a lost
connection failing what was in flight and the next call reconnecting, timeouts."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.core.connections import make_script_client
from gateway.core.engine import CreditEngine
from gateway.core.keys import KeySpace
from gateway.core.multiplex import MultiplexedRedis
from gateway.core.settings import Settings

pytestmark = pytest.mark.redis

ECHO = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) * 2}"


@pytest.fixture
async def mux(redis_url, redis):
    m = MultiplexedRedis(redis_url, connections=2, timeout=2)
    yield m
    await m.aclose()


async def test_concurrent_calls_get_their_own_replies(mux, redis):
    sha = await redis.script_load(ECHO)
    sha = sha.decode() if isinstance(sha, bytes) else sha

    async def one(i: int):
        return i, await mux.evalsha(sha, 1, f"k{i}", f"v{i}", i)

    results = await asyncio.gather(*[one(i) for i in range(2000)])
    for i, reply in results:
        assert reply == [f"k{i}".encode(), f"v{i}".encode(), 2 * i]


async def test_error_replies_raise_like_redis_py(mux):
    with pytest.raises(NoScriptError):
        await mux.evalsha("0" * 40, 0)
    with pytest.raises(ResponseError):
        await mux.eval("return redis.call('INCR', KEYS[1], 'x')", 1, "k")  # wrong arity
    assert await mux.eval("return 7", 0) == 7  # the connection still serves


async def test_the_registry_falls_back_to_eval_on_noscript(mux, redis):
    engine = CreditEngine(redis, keys=KeySpace(partitions=4), script_redis=mux)
    await redis.script_flush()
    for p in range(4):
        await engine.mark_ready(p)
    await engine.grant("u", "3", op_id="g")
    assert (await engine.balance("u")).available == 3


async def test_a_lost_connection_fails_calls_in_flight_and_the_next_call_reconnects(mux, redis):
    assert await mux.eval("return 1", 0) == 1
    slow = asyncio.ensure_future(mux.execute("BLPOP", "never-filled", 5))
    other = asyncio.ensure_future(mux.execute("BLPOP", "never-filled-2", 5))
    await asyncio.sleep(0.2)
    await redis.client_kill_filter(_type="normal", skipme=True)
    for fut in (slow, other):
        with pytest.raises(RedisConnectionError):
            await fut
    assert await mux.eval("return 2", 0) == 2


async def test_a_call_without_an_answer_times_out_and_later_replies_stay_paired(redis_url):
    m = MultiplexedRedis(redis_url, connections=1, timeout=0.2)
    try:
        with pytest.raises(RedisTimeoutError):
            await m.execute("BLPOP", "nothing-here", 0.5)
        # The timed-out call's connection is closed; the next call gets a new one and its
        # own reply.
        m.timeout = 5
        assert await m.eval("return 'mine'", 0) == b"mine"
    finally:
        await m.aclose()


async def test_database_and_refused_connections(redis_url, redis):
    m = MultiplexedRedis(redis_url.rsplit("/", 1)[0] + "/3", connections=1)
    try:
        await m.execute("SET", "where", "db3")
        assert await redis.get("where") is None
        await redis.execute_command("SELECT", 3)
        assert await redis.get("where") == b"db3"
        await redis.execute_command("SELECT", 0)
    finally:
        await m.aclose()
    dead = MultiplexedRedis("redis://127.0.0.1:1", connections=1, timeout=1)
    with pytest.raises(RedisConnectionError):
        await dead.eval("return 1", 0)


def test_only_a_single_plain_server_gets_the_multiplexed_client(redis_url):
    assert isinstance(make_script_client(Settings(redis_url=redis_url)), MultiplexedRedis)
    assert make_script_client(Settings(redis_url=redis_url, redis_multiplex=False)) is None
    assert make_script_client(Settings(redis_url=redis_url, redis_cluster=True)) is None
    assert make_script_client(Settings(redis_url="rediss://example:6380/0")) is None
    assert make_script_client(Settings()) is None  # embedded


async def test_a_silent_server_gets_its_connection_replaced_not_queued_behind():
    accepted = []

    async def silent(reader, writer):  # reads everything, answers nothing
        accepted.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    m = MultiplexedRedis(f"redis://127.0.0.1:{port}/0", connections=1, timeout=0.2)
    try:
        for _ in range(3):
            with pytest.raises(RedisTimeoutError):
                await m.eval("return 1", 0)
        assert len(accepted) == 3  # a new connection after each timeout
        assert all(c is None or c.lost for c in m._slots)
    finally:
        await m.aclose()
        for w in accepted:
            w.close()
        server.close()


async def test_failed_connection_setup_leaks_no_socket(redis_url):
    import os

    base = redis_url.rsplit("/", 1)[0].replace("redis://", "redis://:wrong-password@")
    m = MultiplexedRedis(base + "/0", connections=1)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(RedisConnectionError):  # AUTH refused: no password is set
            await m.eval("return 1", 0)
    await asyncio.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) <= fds + 1
    await m.aclose()


async def test_a_closed_client_refuses_calls(mux):
    assert await mux.eval("return 1", 0) == 1
    await mux.aclose()
    with pytest.raises(RedisConnectionError):
        await mux.eval("return 1", 0)
