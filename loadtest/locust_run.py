"""A locust load test on a local stack, then a check of the books. Exit 0 only if they balance.

    .venv/bin/python loadtest/locust_run.py [--time 60s] [--clients 50] [--users 2000]
        [--gateway-processes 2] [--latency-ms 20] [--error-rate 0.02] [--out loadtest-out]

It starts redis-server (AOF, everysec), the mock LLM upstream (with that latency and share of
500s), the fake Razorpay (its pay page delivers signed webhooks to the gateway), the gateway
(`serve --workers N`) and one worker, each a process of its own, on a SQLite store. It seeds
the accounts (one in ten without credit, one in ten with 1 credit that runs out during the
load, the rest with 1000) and a promo code, runs `locust --headless` with
loadtest/locustfile.py for the given time (its CSV files and HTML report go to --out), stops
the gateway, lets the worker drain, and checks:

- every answer's reported charge (X-Credits-Charged, or a stream's closing line) is in the
  ledger: per account, the sum reported equals the account's `spent`;
- no account below zero (available >= 0; a debt is recorded as debt, never as a negative
  balance), and no hold left open (held = 0, no open hold in the store);
- `credit-gateway reconcile` finds Redis and the store equal;
- each paid payment is credited exactly once, and no account claimed the promo twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.core.money import from_units  # noqa: E402
from gateway.core.store.sqlite import SQLiteStore  # noqa: E402

ADMIN = "load-admin-" + "a" * 40
CLIENT = "load-client-" + "c" * 40
RZP_KEY, RZP_SECRET, RZP_WEBHOOK = "rzp_test_load", "load_secret", "load_webhook_secret"
PROMO = "LOADTEST"

CONFIG = """
[gateway]
hold_margin_seconds = 10

[[upstreams]]
name = "openai"
kind = "openai"
base_url = "{url}"
api_key = "sk-load"
timeout_seconds = 30
models = ["load-gpt", "load-embed"]

[[upstreams]]
name = "anthropic"
kind = "anthropic"
base_url = "{url}"
api_key = "ant-load"
timeout_seconds = 30
models = ["load-claude"]

# credits per million tokens: a call costs a few hundredths of a credit
[pricing.models."load-gpt"]
input = "1000"
output = "2000"
max_output_tokens = 256

[pricing.models."load-claude"]
input = "1000"
output = "3000"
max_output_tokens = 256

[pricing.models."load-embed"]
input = "100"
output = "0"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout} s")


def initial_credit(i: int) -> str | None:
    """The seeding: one in ten without credit, one in ten with 1 credit, the rest 1000."""
    return None if i % 10 == 0 else "1" if i % 10 == 5 else "1000"


class Stack:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CREDIT_", "RAZORPAY_"))}
        self.env["PYTHONPATH"] = str(REPO)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 (the process keeps it)
        self.procs[name] = subprocess.Popen(
            argv, cwd=self.work, env=env or self.env, stdout=log, stderr=subprocess.STDOUT
        )

    def start(self) -> None:
        a, work = self.args, self.work
        rport, uport, zport, self.gport = free_port(), free_port(), free_port(), free_port()
        self.spawn(
            "redis",
            [shutil.which("redis-server") or "redis-server", "--port", str(rport), "--dir", str(work),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
        )  # fmt: skip
        py = sys.executable
        self.spawn(
            "upstream",
            [py, "-m", "gateway.devtools.mock_upstream", "--port", str(uport), "--no-record",
             "--latency-ms", str(a.latency_ms), "--error-rate", str(a.error_rate)],
        )  # fmt: skip
        self.gateway_url = f"http://127.0.0.1:{self.gport}"
        self.spawn(
            "razorpay",
            [py, "-m", "gateway.devtools.fake_razorpay", "--port", str(zport), "--key-id", RZP_KEY,
             "--key-secret", RZP_SECRET, "--webhook-url", f"{self.gateway_url}/webhooks/razorpay",
             "--webhook-secret", RZP_WEBHOOK],
        )  # fmt: skip
        for p in (rport, uport, zport):
            wait_port(p)
        (work / "gateway.toml").write_text(CONFIG.format(url=f"http://127.0.0.1:{uport}"))
        self.db = work / "store.db"
        self.genv = {
            **self.env,
            "CREDIT_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
            "CREDIT_ADMIN_KEYS": ADMIN,
            "CREDIT_CLIENT_KEYS": CLIENT,
            "CREDIT_GATEWAY_CONFIG": str(work / "gateway.toml"),
            "CREDIT_SQLITE_PATH": str(self.db),
            "CREDIT_AUDIT_PATH": str(work / "audit.jsonl"),
            "CREDIT_PAYMENT_RATES": "INR=1",
            "CREDIT_RAZORPAY_BASE_URL": f"http://127.0.0.1:{zport}",
            "CREDIT_WORKER_METRICS_PORT": "0",
            "RAZORPAY_KEY_ID": RZP_KEY,
            "RAZORPAY_KEY_SECRET": RZP_SECRET,
            "RAZORPAY_WEBHOOK_SECRET": RZP_WEBHOOK,
        }
        self.spawn(
            "gateway",
            [py, "-m", "gateway.cli", "serve", "--port", str(self.gport), "--log-level", "warning",
             "--workers", str(a.gateway_processes)],
            self.genv,
        )  # fmt: skip
        self.spawn("worker", [py, "-m", "gateway.worker"], self.genv)
        wait_port(self.gport)
        deadline = time.time() + 60
        while httpx.get(self.gateway_url + "/readyz").status_code != 200:
            if time.time() > deadline:
                raise SystemExit("the gateway did not get ready")
            time.sleep(0.2)

    def stop(self, name: str, timeout: float = 60) -> None:
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def stop_all(self) -> None:
        for name in ("gateway", "worker", "razorpay", "upstream", "redis"):
            self.stop(name)


def seed(stack: Stack, users: int) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=stack.gateway_url, headers=admin, timeout=30) as c:
        for i in range(users):
            amount = initial_credit(i)
            if amount is not None:
                r = c.post(f"/admin/accounts/u{i}/grants", json={"amount": amount},
                           headers={"Idempotency-Key": f"seed-u{i}"})  # fmt: skip
                r.raise_for_status()
        r = c.post("/admin/promos", json={"code": PROMO, "credits": "5", "max_uses_per_user": 1})
        if r.status_code != 409:
            r.raise_for_status()


def run_locust(stack: Stack, out: Path) -> int:
    a = stack.args
    env = {
        **stack.env,
        "LOAD_GATEWAY_CLIENT_KEY": CLIENT,
        "LOAD_GATEWAY_ADMIN_KEY": ADMIN,
        "LOAD_USERS": str(a.users),
        "LOAD_BROKE_EVERY": "10",
        "LOAD_PROMO": PROMO,
        "LOAD_PAYMENTS": "1",
        "LOAD_CHARGES": str(out / "charges.jsonl"),
    }
    (out / "charges.jsonl").unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"), "--headless",
        "-u", str(a.clients), "-r", str(max(1, a.clients // 5)), "-t", a.time, "--host", stack.gateway_url,
        "--csv", str(out / "locust"), "--html", str(out / "report.html"), "--only-summary",
        "--stop-timeout", "30", "--exit-code-on-error", "0",
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=REPO).returncode


async def check_books(stack: Stack, out: Path, users: int) -> list[str]:
    problems: list[str] = []
    reported: dict[str, Decimal] = defaultdict(Decimal)
    answers = unknown = 0
    statuses: dict[int, int] = defaultdict(int)
    for line in (out / "charges.jsonl").read_text().splitlines():
        rec = json.loads(line)
        answers += 1
        statuses[rec["status"]] += 1
        if rec["charged"] is None:
            unknown += 1
            problems.append(f"{rec['user']}: an answer ({rec['route']}, {rec['status']}) showed no charge")
        else:
            reported[rec["user"]] += Decimal(rec["charged"])
    store = SQLiteStore(str(stack.db))
    await store.open()
    try:
        accounts = 0
        spent_total = Decimal(0)
        for i in range(users):
            user = f"u{i}"
            snap = await store.snapshot(user)
            if snap is None:
                if reported.get(user):
                    problems.append(f"{user}: charged {reported[user]} in answers, no account in the store")
                continue
            accounts += 1
            t = snap.totals
            spent = from_units(t["spent"])
            spent_total += spent
            said = reported.get(user, Decimal(0))
            if spent != said:
                problems.append(f"{user}: the ledger charged {spent}, the answers reported {said}")
            if t["available"] < 0:
                problems.append(f"{user}: available {from_units(t['available'])} below zero")
            if t["held"] != 0 or snap.holds:
                problems.append(f"{user}: {from_units(t['held'])} still held in {len(snap.holds)} open holds")
        payments = await store.list_payments(limit=100_000)
        paid = [p for p in payments if p.status == "paid"]
        for p in paid:
            if p.credited_ms is None:
                problems.append(f"payment {p.payment_id} paid and not credited")
            elif not await store.ledger_has(p.user, f"payment:{p.payment_id}"):
                problems.append(f"payment {p.payment_id} marked credited, no grant in the ledger")
        claims = await store.promo_claims(PROMO)
        per_user: dict[str, int] = defaultdict(int)
        for user, _n, _at in claims:
            per_user[user] += 1
        problems += [f"{u}: claimed {PROMO} {n} times" for u, n in per_user.items() if n > 1]
    finally:
        await store.close()
    print(
        f"books: {answers} metered answers ({dict(sorted(statuses.items()))} by status; {unknown} "
        f"without a figure), {accounts} accounts, {spent_total} credits charged, {len(paid)} "
        f"payments paid, {len(claims)} promo claims"
    )
    return problems


def reconcile(stack: Stack) -> int:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "reconcile"], env=stack.genv, cwd=stack.work
    ).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--time", default="60s", help="locust's run time (default 60s)")
    ap.add_argument("--clients", type=int, default=50, help="simulated clients (default 50)")
    ap.add_argument("--users", type=int, default=2000, help="accounts the load spreads over (default 2000)")
    ap.add_argument("--gateway-processes", type=int, default=2)
    ap.add_argument("--latency-ms", type=int, default=20, help="the mock upstream's latency")
    ap.add_argument("--error-rate", type=float, default=0.02, help="the mock upstream's share of 500s")
    ap.add_argument("--out", default="loadtest-out", help="locust's CSV and HTML report go here")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.users < 1 or args.gateway_processes < 1:
        ap.error("--clients, --users and --gateway-processes must be at least 1")
    if not 0 <= args.error_rate <= 1 or args.latency_ms < 0:
        ap.error("--error-rate is a share between 0 and 1, --latency-ms at least 0")
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        ap.error(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="locust-run-"))
    stack = Stack(args, work)
    try:
        stack.start()
        seed(stack, args.users)
        code = run_locust(stack, out)
        if code != 0:
            print(f"locust exited with {code}", file=sys.stderr)
            return code
        stack.stop("gateway")  # drains its settlements; the worker then stores the rest
        rc = reconcile(stack)
        problems = asyncio.run(check_books(stack, out, args.users))
        if rc != 0:
            problems.append(f"credit-gateway reconcile exited {rc}: Redis and the store differ")
    finally:
        stack.stop_all()
    for p in problems[:50]:
        print("BOOKS:", p, file=sys.stderr)
    if problems:
        print(f"the books do not balance: {len(problems)} problems (logs in {work})", file=sys.stderr)
        return 1
    print(f"the books balance; report: {out / 'report.html'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
