"""One logging configuration: text or JSON lines (CREDIT_LOG_FORMAT), and every line
logged while a request is served carries that request's id."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import httpx
import pytest

from gateway.api.app import create_app
from gateway.cli import _log_format
from gateway.core.settings import Settings
from gateway.core.store.sqlite import SQLiteStore
from gateway.logs import configure_logging
from tests.conftest import free_port
from tests.support.serve_process import clean_env

log = logging.getLogger("credit.test")


@pytest.fixture
def lines():
    """The root logger's output (our handler only) as a list of lines; undone afterwards."""
    out = io.StringIO()
    root = logging.getLogger()
    level = root.level
    yield out
    for h in [h for h in root.handlers if h.get_name() == "credit-gateway"]:
        root.removeHandler(h)
    root.setLevel(level)


async def _serve_and_log(redis, redis_url, tmp_path, *headers: dict[str, str]) -> list[httpx.Response]:
    """GET /_log (a route that logs one line) once per headers given; the answers."""
    settings = Settings(
        redis_url=redis_url, partitions=16, sqlite_path=str(tmp_path / "s.db"), audit_path=None
    )
    app = create_app(settings, redis=redis, store=SQLiteStore(str(tmp_path / "s.db")), run_worker=False)

    async def logs_a_line() -> dict:
        log.info("inside the request")
        return {}

    app.add_api_route("/_log", logs_a_line)
    # No lifespan: the route needs no services, only the app's middleware.
    answers = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        for h in headers:
            r = await c.get("/_log", headers=h)
            assert r.status_code == 200
            answers.append(r)
    return answers


async def test_json_lines_carry_the_request_id(redis, redis_url, tmp_path, lines):
    configure_logging("json", stream=lines)
    log.info("outside any request")
    await _serve_and_log(
        redis, redis_url, tmp_path, {"X-Request-Id": "req-abc.1"}, {"X-Request-Id": "bad id {"}, {}
    )
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    ours = [r for r in records if r["logger"] == "credit.test"]
    assert [r["message"] for r in ours] == ["outside any request"] + ["inside the request"] * 3
    assert "request_id" not in ours[0]
    assert ours[1]["request_id"] == "req-abc.1"  # the caller's, a plain token
    made = [ours[2]["request_id"], ours[3]["request_id"]]  # made here: the header was not one
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in made) and made[0] != made[1]
    assert {r["level"] for r in ours} == {"INFO"} and all(r["ts"] for r in ours)


async def test_text_lines_name_the_request_in_brackets(redis, redis_url, tmp_path, lines):
    configure_logging("text", stream=lines)
    await _serve_and_log(redis, redis_url, tmp_path, {"X-Request-Id": "r-42"})
    ours = [line for line in lines.getvalue().splitlines() if "credit.test" in line]
    assert len(ours) == 1 and ours[0].endswith("INFO credit.test: [r-42] inside the request")


def test_configured_twice_it_keeps_one_handler(lines):
    configure_logging("text", stream=io.StringIO())
    configure_logging("json", stream=lines)
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "credit-gateway"]
    assert len(ours) == 1
    log.warning("once")
    assert [json.loads(line)["message"] for line in lines.getvalue().splitlines()] == ["once"]


@pytest.mark.parametrize(("value", "expected"), [(None, "text"), ("json", "json"), ("yaml", "text")])
def test_the_command_line_reads_credit_log_format(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("CREDIT_LOG_FORMAT", raising=False)
    else:
        monkeypatch.setenv("CREDIT_LOG_FORMAT", value)
    assert _log_format() == expected


@pytest.mark.parametrize(
    "command", [["-m", "gateway.worker"], ["-m", "gateway.cli", "worker"]], ids=["module", "cli"]
)
def test_a_worker_that_cannot_reach_redis_stops_with_json_lines_only(tmp_path, command):
    env = clean_env(
        CREDIT_LOG_FORMAT="json",
        CREDIT_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        CREDIT_SQLITE_PATH=str(tmp_path / "w.db"),
        CREDIT_AUDIT_PATH="",
    )
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    assert lines[-1]["level"] == "CRITICAL" and "Connection" in lines[-1]["exc_info"]


async def test_answers_carry_the_request_id_their_log_lines_carry(redis, redis_url, tmp_path, lines):
    configure_logging("json", stream=lines)
    given, made = await _serve_and_log(redis, redis_url, tmp_path, {"X-Request-Id": "trace-7"}, {})
    assert given.headers.get_list("x-request-id") == ["trace-7"]
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    ours = [r for r in records if r["logger"] == "credit.test"]
    assert [r["request_id"] for r in ours] == ["trace-7", made.headers["x-request-id"]]
