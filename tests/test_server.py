"""`serve`'s connection limits, against the real server in a subprocess: a request head that
arrives slowly is cut off, an idle keep-alive connection is closed, connections beyond the
limit are answered 503 (JSON, Retry-After); and `--workers N` runs N processes."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest

from tests.support.serve_process import clean_env, serve

ADMIN = "admin-" + "s" * 40
CLIENT = "client-" + "s" * 40


def _env(tmp_path, **extra):
    return clean_env(
        CREDIT_SQLITE_PATH=str(tmp_path / "s.db"),
        CREDIT_AUDIT_PATH="",
        CREDIT_ADMIN_KEYS=ADMIN,
        CREDIT_CLIENT_KEYS=CLIENT,
        **extra,
    )


def _closed_by_server(sock: socket.socket, within: float, trickle: bytes | None = None) -> bool:
    """True once the server closes `sock` (EOF or reset); `trickle` is sent every 0.25 s meanwhile."""
    sock.settimeout(0.25)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if trickle is not None:
                sock.sendall(trickle)
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def test_slow_request_heads_and_idle_connections_are_closed_by_the_server(tmp_path):
    proc, port = serve(
        _env(tmp_path, CREDIT_HTTP_HEADER_TIMEOUT_SECONDS="1", CREDIT_HTTP_KEEPALIVE_SECONDS="1"), tmp_path
    )
    try:
        slow = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        silent = socket.create_connection(("127.0.0.1", port))  # opens, never sends a byte
        # A keep-alive connection whose second request head stalls is cut off too.
        kept = socket.create_connection(("127.0.0.1", port))
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        kept.settimeout(5)
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /healthz HTTP/1.1\r\n")
        # An idle keep-alive connection (a complete request answered) is closed too.
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        idle.settimeout(5)
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")

        # The slowloris connections keep sending a header line every 0.25 s; the server
        # still closes them (the limit runs from the connection's opening, not the last byte).
        for s in slow:
            assert _closed_by_server(s, 20, trickle=b"X-a: b\r\n"), "a slow request head was never cut off"
        assert _closed_by_server(silent, 20)
        assert _closed_by_server(kept, 20, trickle=b"X-a: b\r\n")
        assert _closed_by_server(idle, 20)
        for s in (*slow, silent, kept, idle):
            s.close()
        # Requests at normal speed are still served.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/healthz").status_code == 200
    finally:
        proc.stop()


def test_connections_beyond_the_limit_are_answered_503_with_retry_after(tmp_path):
    proc, port = serve(
        _env(tmp_path, CREDIT_HTTP_MAX_CONNECTIONS="3", CREDIT_HTTP_HEADER_TIMEOUT_SECONDS="60"), tmp_path
    )
    try:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # within the limit: served
        held[0].settimeout(5)
        assert held[0].recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)  # the server has accepted the three
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            r = c.get("/healthz")
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
            assert r.json()["error"]["code"] == "too_many_connections"
        for s in held:
            s.close()
        time.sleep(0.2)  # the server has seen them close
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/healthz").status_code == 200
    finally:
        output = proc.stop()
    assert "open connections" in output  # logged once, not per connection


@pytest.mark.redis
def test_serve_with_workers_runs_that_many_processes_on_one_port(tmp_path, redis_url):
    proc, port = serve(
        _env(tmp_path, CREDIT_REDIS_URL=redis_url, CREDIT_KEY_PREFIX="wk"), tmp_path, "--workers", "2"
    )
    try:
        deadline = time.time() + 60
        while proc.output.count("Application startup complete") < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert proc.output.count("Application startup complete") == 2, proc.output
        pids = set(re.findall(r"Started server process \[(\d+)\]", proc.output))
        assert len(pids) == 2 and str(proc.proc.pid) not in pids, proc.output
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            assert c.post("/admin/accounts/wk/grants", json={"amount": "2"}, headers=admin).status_code == 201
            for _ in range(4):  # whichever worker answers sees the same account
                r = c.get(
                    "/credits/balance", headers={"Authorization": f"Bearer {CLIENT}", "X-User-Id": "wk"}
                )
                assert json.loads(r.text)["available"] == "2.000000"
            # /metrics sums every process's counts, whichever process answers the scrape
            for _ in range(20):
                with httpx.Client(base_url=f"http://127.0.0.1:{port}") as fresh:  # a new connection each
                    assert fresh.get("/healthz").status_code == 200
            time.sleep(1.5)  # each process adds what it counted to the shared files every second
            for _ in range(4):
                with httpx.Client(base_url=f"http://127.0.0.1:{port}") as fresh:
                    text = fresh.get("/metrics", headers=admin).text
                assert 'credit_http_requests_total{method="GET",route="/healthz",status="200"} 20.0' in text
    finally:
        proc.stop()


def test_a_request_the_server_cannot_parse_is_answered_in_json(tmp_path):
    proc, port = serve(_env(tmp_path), tmp_path)
    try:
        for raw in (
            b"POST /credits/holds HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            "GET /admin/accounts/a/ledger?limit=\u0661 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(raw)
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower(), reply
            assert json.loads(body)["error"]["code"] == "malformed_http"
    finally:
        proc.stop()
