"""Locust load on a running gateway: the traffic of an LLM product (loadtest/locust_run.py starts
a stack for it and checks the books after; `locust -f loadtest/locustfile.py` also runs it
against a gateway of your own).

The mix, per simulated client: chat completions (JSON and streamed), embeddings, Anthropic
messages (JSON and streamed), a share of the accounts without credit (402 is their expected
answer), promo claims, credit bought through the (fake) Razorpay pay page whose webhook
reaches the gateway during the load, and admin reads. Each answer's charge (the
X-Credits-Charged header, or a stream's closing `: credits charged=` line) is written to
LOAD_CHARGES (a JSON line per answer) for the books check.

Environment: LOAD_GATEWAY_CLIENT_KEY, LOAD_GATEWAY_ADMIN_KEY, LOAD_USERS (accounts u0..u<n-1>),
LOAD_BROKE_EVERY (every n-th account has no credit), LOAD_PROMO (a code to claim),
LOAD_CHARGES (the file), LOAD_PAYMENTS (1: buy credit during the load).
"""

from __future__ import annotations

import json
import os
import random
import re
import threading

from locust import FastHttpUser, between, events, task

CLIENT_KEY = os.environ.get("LOAD_GATEWAY_CLIENT_KEY", "")
ADMIN_KEY = os.environ.get("LOAD_GATEWAY_ADMIN_KEY", "")
USERS = int(os.environ.get("LOAD_USERS", "1000"))
BROKE_EVERY = int(os.environ.get("LOAD_BROKE_EVERY", "10"))
PROMO = os.environ.get("LOAD_PROMO", "")
PAYMENTS = os.environ.get("LOAD_PAYMENTS", "0") == "1"
CHARGES_PATH = os.environ.get("LOAD_CHARGES", "charges.jsonl")

STREAM_CHARGE = re.compile(rb"credits charged=([0-9.]+|unconfirmed)")

_lock = threading.Lock()
_out = None


def record(user: str, route: str, status: int, charged: str | None) -> None:
    """One answer's charge: a decimal string, "0", or None when the gateway showed no figure."""
    global _out
    with _lock:
        if _out is None:
            _out = open(CHARGES_PATH, "a", encoding="utf-8")  # noqa: SIM115 (closed at quit)
        _out.write(json.dumps({"user": user, "route": route, "status": status, "charged": charged}) + "\n")


@events.quitting.add_listener
def _close(**_kw: object) -> None:
    if _out is not None:
        _out.close()


def is_broke(user: str) -> bool:
    return int(user[1:]) % BROKE_EVERY == 0


class LlmApp(FastHttpUser):
    """An app calling LLMs through the gateway for its users."""

    wait_time = between(0.0, 0.05)

    def _user(self) -> str:
        return f"u{random.randrange(USERS)}"

    def _headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {CLIENT_KEY}", "X-User-Id": user}

    def _call(self, path: str, body: dict, name: str) -> None:
        user = self._user()
        stream = bool(body.get("stream"))
        with self.client.post(
            path, json=body, headers=self._headers(user), name=name, catch_response=True
        ) as r:
            if r.status_code == 402 or (r.status_code >= 500 and r.headers.get("X-Credits-Charged") == "0"):
                r.success()  # an account without credit; an upstream failure given back
                record(user, name, r.status_code, "0")
                return
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
            if stream:
                m = STREAM_CHARGE.search(r.content or b"")
                charged = m.group(1).decode() if m else None
                if charged == "unconfirmed":
                    charged = None
            else:
                charged = r.headers.get("X-Credits-Charged")
            record(user, name, r.status_code, charged)

    @task(6)
    def chat(self) -> None:
        self._call(
            "/v1/chat/completions",
            {"model": "load-gpt", "messages": [{"role": "user", "content": "hello " * 20}], "max_tokens": 64},
            "chat",
        )

    @task(4)
    def chat_stream(self) -> None:
        self._call(
            "/v1/chat/completions",
            {
                "model": "load-gpt",
                "stream": True,
                "messages": [{"role": "user", "content": "stream " * 20}],
                "max_tokens": 64,
            },
            "chat stream",
        )

    @task(2)
    def embeddings(self) -> None:
        self._call("/v1/embeddings", {"model": "load-embed", "input": "some text " * 30}, "embeddings")

    @task(2)
    def anthropic(self) -> None:
        self._call(
            "/v1/messages",
            {"model": "load-claude", "max_tokens": 64, "messages": [{"role": "user", "content": "hi " * 20}]},
            "anthropic",
        )

    @task(2)
    def anthropic_stream(self) -> None:
        self._call(
            "/v1/messages",
            {
                "model": "load-claude",
                "stream": True,
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "hi " * 20}],
            },
            "anthropic stream",
        )

    @task(1)
    def claim_promo(self) -> None:
        if not PROMO:
            return
        user = self._user()
        with self.client.post(
            "/credits/promo/claim",
            json={"code": PROMO},
            headers=self._headers(user),
            name="promo claim",
            catch_response=True,
        ) as r:
            if r.status_code in (200, 201, 409):  # 409: this user's claim was already made
                r.success()
            else:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(1)
    def buy_credit(self) -> None:
        if not PAYMENTS:
            return
        user = self._user()
        with self.client.post(
            "/credits/payments",
            json={"amount": "100", "currency": "INR", "provider": "razorpay"},
            headers=self._headers(user),
            name="payment create",
            catch_response=True,
        ) as r:
            if r.status_code != 201:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
            url = r.json()["url"]
        # The buyer pays on the provider's page; its webhook reaches the gateway.
        with self.client.post(
            url, data={"action": "pay"}, name="fake razorpay pay", catch_response=True
        ) as r:
            if r.status_code >= 400:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(1)
    def admin_read(self) -> None:
        self.client.get(
            f"/admin/accounts/{self._user()}",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            name="admin account",
        )
