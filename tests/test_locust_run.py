"""The locust load test with its books check: a short run on a real local stack (redis-server,
the gateway's processes, a worker, the mock upstream, the fake Razorpay) must balance, and the
check must see books that do not."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from gateway.worker.runner import Worker
from tests.support.worker_helpers import REPO

sys.path.insert(0, str(REPO / "loadtest"))
import locust_run


@pytest.mark.redis
def test_a_short_locust_run_balances_its_books(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(REPO / "loadtest" / "locust_run.py"), "--time", "30s", "--clients", "10",
         "--users", "200", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "the books balance" in run.stdout
    books = next(line for line in run.stdout.splitlines() if line.startswith("books:"))
    assert "0 without a figure" in books and "200:" in books and "402:" in books  # paid and refused calls
    assert (out / "report.html").exists() and (out / "locust_stats.csv").exists()
    rows = (out / "locust_stats.csv").read_text().splitlines()
    assert any(r.startswith("POST,chat stream,") for r in rows), rows[:3]


async def test_the_books_check_finds_a_charge_the_answers_did_not_report(engine, store, tmp_path):
    await engine.grant("u1", "10", op_id="g1")
    await engine.reserve("u1", "3", hold_id="h1", ttl_seconds=60)
    await engine.settle("u1", "h1", "1.25")
    await engine.grant("u2", "10", op_id="g2")
    await engine.reserve("u2", "3", hold_id="h2", ttl_seconds=60)  # left open
    await Worker(engine, store).run(burst=True)
    out = tmp_path / "out"
    out.mkdir()
    stack = SimpleNamespace(db=store.path)

    async def problems(lines):
        (out / "charges.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return await locust_run.check_books(stack, out, users=3)

    right = {"user": "u1", "route": "chat", "status": 200, "charged": "1.25"}
    found = await problems([right])
    assert found == ["u2: 3.000000 still held in 1 open holds"]
    await engine.release("u2", "h2")
    await Worker(engine, store).run(burst=True)
    assert await problems([right]) == []
    assert await problems([{**right, "charged": "1.00"}]) == [
        "u1: the ledger charged 1.250000, the answers reported 1.00"
    ]
    assert await problems([right, {**right, "charged": None}]) == [
        "u1: an answer (chat, 200) showed no charge"
    ]
