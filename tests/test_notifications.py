"""Notifications on SQLite and MongoDB, against a real redis-server: what the worker detects
in stored batches (once per threshold crossing, once per redelivered batch), the expiring
credit scan, delivery to a real local HTTP receiver (down, then up; signatures checked with
the README's code), a worker killed mid-delivery, retries ending as failed, and the admin
routes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import pytest_asyncio

from gateway.api.app import create_app
from gateway.core.settings import Settings, SettingsError, settings_from_env
from gateway.core.store.notifications import NotificationRecord
from gateway.notifications import Notifier
from gateway.notifications.delivery import Deliverer, DeliveryError, build_sink
from gateway.notifications.detect import Detector
from gateway.notifications.expiring import ExpiringScan
from gateway.notifications.notifier import make_note
from gateway.notifications.webhook import WebhookSink
from gateway.worker.runner import Worker
from tests.conftest import free_port
from tests.support.api_fixtures import ADMIN, CLIENT, H_ADMIN
from tests.support.engine_helpers import events_of
from tests.support.notify_receiver import Receiver
from tests.support.worker_helpers import until

SECRET = "whsec-notify-test-secret"
T5 = 5_000_000  # a threshold of 5 credits


@pytest_asyncio.fixture
async def store(new_store):
    return await new_store()


@pytest_asyncio.fixture
async def receiver():
    r = Receiver(SECRET)
    yield r
    await r.stop()


def ms(clock) -> int:
    return int(clock() * 1000)


def detector(store, clock, threshold=T5) -> Detector:
    return Detector(store, default_threshold_units=threshold, now_ms=lambda: ms(clock))


async def drain(engine, store, det, **kw) -> None:
    await Worker(engine, store, on_stored=det.batch, **kw).run(burst=True)
    clock = engine.clock
    clock.advance(1)  # the notifications of each drain come after the last one's


async def notes(store, **q) -> list[NotificationRecord]:
    return list(reversed(await store.list_notifications(limit=200, **q)))


async def kinds(store, user) -> list[str]:
    return [n.kind for n in await notes(store, user=user)]


def deliverer(store, sink, clock, **kw) -> Deliverer:
    values = {
        "lease_ms": 60_000,
        "retry_ms": 3_600_000,
        "base_ms": 1_000,
        "cap_ms": 60_000,
        "rand": lambda: 1.0,
    }
    values.update(kw)
    return Deliverer(store, sink, now_ms=lambda: ms(clock), **values)


# -- detection ------------------------------------------------------------------------------


async def test_low_balance_once_per_crossing_rearmed_by_a_grant_above_the_threshold(engine, store, clock):
    det = detector(store, clock)
    await engine.grant("ann", "10", op_id="g1")
    await drain(engine, store, det)
    assert await kinds(store, "ann") == []
    await engine.debit("ann", "6", op_id="d1")  # 4 left: below 5
    await drain(engine, store, det)
    await engine.debit("ann", "1", op_id="d2")  # 3: still below, no second one
    await drain(engine, store, det)
    [first] = await notes(store, user="ann")
    assert (first.kind, first.data["available"], first.data["threshold"]) == ("low_balance", "4", "5")
    await engine.grant("ann", "10", op_id="g2")  # 13: back above, re-armed
    await drain(engine, store, det)
    assert await kinds(store, "ann") == ["low_balance"]
    await engine.debit("ann", "10", op_id="d3")  # 3: a second crossing
    await drain(engine, store, det)
    got = await notes(store, user="ann")
    assert [n.kind for n in got] == ["low_balance", "low_balance"]
    assert got[0].id != got[1].id and got[1].data["available"] == "3"
    assert [n.dedup_key for n in got] == ["low_balance:ann:0", "low_balance:ann:1"]


async def test_users_far_from_their_threshold_cost_no_flag_read(engine, store, clock):
    det = detector(store, clock)
    for u in ("p1", "p2", "p3"):
        await engine.grant(u, "100", op_id=f"g-{u}")
    await drain(engine, store, det)  # new accounts: armed by default, nothing to read
    for u in ("p1", "p2", "p3"):
        await engine.reserve(u, "1", hold_id=f"h-{u}", ttl_seconds=60)
        await engine.settle(u, f"h-{u}", "0.5")
    await drain(engine, store, det)
    assert det.flag_reads == 0
    await engine.debit("p1", "98", op_id="big")
    await drain(engine, store, det)
    assert det.flag_reads == 1 and await kinds(store, "p1") == ["low_balance"]


async def test_a_hold_released_back_above_the_threshold_rearms(engine, store, clock):
    det = detector(store, clock)
    await engine.grant("hal", "8", op_id="g1")
    await engine.reserve("hal", "6", hold_id="h1", ttl_seconds=60)  # 2 available
    await drain(engine, store, det)
    await engine.release("hal", "h1")  # 8: back above, in a batch of its own
    await drain(engine, store, det)
    await engine.debit("hal", "4", op_id="d1")  # 4: a second crossing
    await drain(engine, store, det)
    assert await kinds(store, "hal") == ["low_balance", "low_balance"]


async def test_a_redelivered_batch_does_not_notify_twice(engine, store, clock):
    det = detector(store, clock)
    await engine.grant("red", "10", op_id="g1")
    await engine.debit("red", "9", op_id="d1")
    await engine.grant(
        "red", "3", op_id="payment:cgpay_1", source="payment", metadata={"payment_id": "cgpay_1"}
    )
    kills = 0

    async def dies_before_the_ack(events):
        nonlocal kills
        if await det.batch(events) and kills < 2:
            kills += 1
            raise RuntimeError("killed after the notifications, before the ack")

    # The first pass fails after its notifications: its entries stay pending, are taken
    # over (claim_idle_ms=0: at once) and processed again, one by one.
    await Worker(engine, store, on_stored=dies_before_the_ack, claim_idle_ms=0).run(burst=True)
    assert kills == 2
    assert sorted(await kinds(store, "red")) == ["low_balance", "payment_succeeded"]
    # The same events again, cut in other batches: nothing new either.
    evs = await events_of(engine, "red")
    for e in evs:
        await det.batch([e])
    await det.batch(evs)
    assert sorted(await kinds(store, "red")) == ["low_balance", "payment_succeeded"]


async def test_in_debt_once_and_rearmed_when_the_debt_is_repaid(engine, store, clock):
    det = detector(store, clock, threshold=0)  # low_balance off: only the debt speaks
    await engine.grant("deb", "1", op_id="g1")
    await engine.debit("deb", "3", op_id="d1", allow_debt=True)
    await drain(engine, store, det)
    await engine.debit("deb", "1", op_id="d2", allow_debt=True)  # deeper: no second one
    await drain(engine, store, det)
    [n] = await notes(store, user="deb")
    assert (n.kind, n.data["debt"]) == ("in_debt", "2")
    await engine.grant("deb", "5", op_id="g2")  # repays 3: out of debt, re-armed
    await drain(engine, store, det)
    await engine.debit("deb", "4", op_id="d3", allow_debt=True)
    await drain(engine, store, det)
    assert await kinds(store, "deb") == ["in_debt", "in_debt"]


async def test_payment_promo_plan_and_refund_kinds_from_the_stream(engine, store, clock):
    det = detector(store, clock, threshold=0)
    await engine.grant(
        "kim", "50", op_id="payment:cgpay_9", source="payment",
        metadata={"payment_id": "cgpay_9", "provider": "stripe"},
    )  # fmt: skip
    await engine.grant(
        "kim", "25", op_id="promo:WELCOME:kim:1", source="promo", metadata={"promo": "WELCOME", "claim": 1}
    )
    await engine.grant(
        "kim", "100", op_id="plan:pro:2027-01", source="plan", metadata={"plan": "pro", "ratio": 1.5}
    )
    await engine.grant("kim", "7", op_id="adm-1")  # an admin grant notifies nothing
    await engine.debit(
        "kim", "20", op_id="refund:stripe:re_1", allow_debt=True,
        metadata={"payment_id": "cgpay_9", "refund_id": "re_1"},
    )  # fmt: skip
    await drain(engine, store, det)
    await drain(engine, store, det)  # nothing left: nothing more
    got = {n.kind: n for n in await notes(store, user="kim")}
    assert sorted(got) == ["payment_refunded", "payment_succeeded", "promo_claimed", "subscription_renewed"]
    assert got["payment_succeeded"].data == {
        "op_id": "payment:cgpay_9", "credits": "50", "available": "50",
        "payment_id": "cgpay_9", "provider": "stripe",
    }  # fmt: skip
    assert (got["promo_claimed"].data["code"], got["promo_claimed"].data["credits"]) == ("WELCOME", "25")
    assert got["subscription_renewed"].data["metadata"] == {"plan": "pro", "ratio": "1.5"}  # no float
    assert (
        got["payment_refunded"].data["credits"] == "20"
        and got["payment_refunded"].data["refund_id"] == "re_1"
    )
    assert got["payment_refunded"].dedup_key == "payment_refunded:kim:refund:stripe:re_1"


async def test_credit_expiring_scan_notifies_once_per_grant(engine, store, clock):
    now = datetime.fromtimestamp(clock(), UTC)
    await engine.grant("exp", "5", op_id="soon", expires_at=now + timedelta(days=2))
    await engine.grant("exp", "5", op_id="later", expires_at=now + timedelta(days=10))
    await engine.grant("exp", "5", op_id="never")
    await engine.grant("oth", "2.5", op_id="soon2", expires_at=now + timedelta(hours=1), source="promo")
    await drain(engine, store, detector(store, clock, threshold=0))
    scan = ExpiringScan(store, days=3, now_ms=lambda: ms(clock), page=2)  # several pages
    assert await scan.run() == ["2 grants expiring within 3 days notified"]
    assert await scan.run() == []
    exp = await notes(store, kind="credit_expiring")
    assert sorted((n.user, n.data["credits"], n.data["op_id"]) for n in exp) == [
        ("exp", "5", "soon"),
        ("oth", "2.5", "soon2"),
    ]
    clock.advance(8 * 86400)  # "later" is now within 3 days
    assert await scan.run() == ["1 grants expiring within 3 days notified"]


async def test_record_dedups_on_its_key_and_refuses_floats_and_unknown_kinds(store, clock):
    notifier = Notifier(store, now_ms=lambda: ms(clock))
    assert await notifier.record(user="sub", kind="subscription_ended", dedup_key="subscription_ended:s1")
    assert not await notifier.record(user="sub", kind="subscription_ended", dedup_key="subscription_ended:s1")
    assert [n.kind for n in await notes(store, user="sub")] == ["subscription_ended"]
    with pytest.raises(ValueError, match="float"):
        await notifier.record(
            user="sub", kind="subscription_renewal_failed", dedup_key="x", data={"amount": 1.5}
        )
    with pytest.raises(ValueError, match="unknown notification kind"):
        await notifier.record(user="sub", kind="nope", dedup_key="y")


# -- delivery -------------------------------------------------------------------------------


async def add(store, clock, user="dan", kind="payment_failed", key=None, data=None) -> NotificationRecord:
    n = make_note(user, kind, key or f"{kind}:{user}:{clock()}", data or {"credits": "1.5"}, ms(clock))
    assert await store.add_notifications([n]) == 1
    return n


async def test_a_receiver_down_then_up_gets_each_event_once_signed(store, clock, receiver):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    sink = WebhookSink(url, SECRET, timeout=5)
    seen: list[tuple[str, str]] = []  # what the worker's metrics are told
    d = deliverer(store, sink, clock, observe=lambda kind, result: seen.append((kind, result)))
    made = [await add(store, clock, user=f"u{i}", key=f"k{i}") for i in range(3)]
    try:
        assert await d.run_once() == 3  # nothing listens: refused, tried again later
        after = {n.id: n for n in await notes(store)}
        assert all(n.status == "pending" and n.attempts == 1 and n.last_error for n in after.values())
        assert await d.run_once() == 0  # not due yet
        await receiver.start(port)
        receiver.status = 500  # listening, but failing
        clock.advance(1)
        assert await d.run_once() == 3
        assert receiver.requests == 3 and not receiver.events
        failed = await store.notification(made[0].id)
        assert failed.attempts == 2 and "500" in failed.last_error
        receiver.status = 200
        clock.advance(1)
        assert await d.run_once() == 0  # the second wait is twice the first
        clock.advance(1)
        assert await d.run_once() == 3
    finally:
        await sink.close()
    assert receiver.bad_signatures == 0
    assert sorted(seen) == [("payment_failed", "delivered")] * 3 + [("payment_failed", "retry")] * 6
    assert set(receiver.events) == {n.id for n in made}
    assert all(c == 1 for c in receiver.accepted.values())
    ev = receiver.events[made[0].id]
    assert ev == {"id": made[0].id, "type": "payment_failed", "created": made[0].created_ms // 1000,
                  "user": "u0", "data": {"credits": "1.5"}}  # fmt: skip
    done = await store.notification(made[0].id)
    assert (done.status, done.attempts, done.last_error, done.delivered_ms) == (
        "delivered",
        3,
        None,
        ms(clock),
    )


async def test_a_wrong_secret_is_refused_by_the_readme_check(store, clock, receiver):
    url = await receiver.start()
    sink = WebhookSink(url, "another-secret-entirely")
    await add(store, clock)
    try:
        await deliverer(store, sink, clock).run_once()
    finally:
        await sink.close()
    assert receiver.bad_signatures == 1 and not receiver.events
    [n] = await notes(store)
    assert n.status == "pending" and "400" in n.last_error


class Hangs:
    """A sink that takes the notification and never answers (its worker is killed then)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def deliver(self, notification):
        self.entered.set()
        await asyncio.Event().wait()

    async def close(self):
        pass


async def test_a_worker_killed_mid_delivery_leaves_it_to_be_delivered_after_the_lease(store, clock, receiver):
    n = await add(store, clock)
    hangs = Hangs()
    dying = asyncio.create_task(deliverer(store, hangs, clock).run_once())
    await asyncio.wait_for(hangs.entered.wait(), 10)
    dying.cancel()  # the worker dies holding the claim
    with pytest.raises(asyncio.CancelledError):
        await dying
    sink = WebhookSink(await receiver.start(), SECRET)
    other = deliverer(store, sink, clock)
    try:
        assert await other.run_once() == 0  # claimed by the dead one until its lease ends
        clock.advance(61)
        assert await other.run_once() == 1
    finally:
        await sink.close()
    assert list(receiver.events) == [n.id]
    assert (await store.notification(n.id)).status == "delivered"


async def test_two_deliverers_at_once_never_take_the_same_notification(store, clock):
    for i in range(20):
        await add(store, clock, key=f"c{i}")
    seen: list[str] = []

    class Records:
        async def deliver(self, notification):
            seen.append(notification.id)
            await asyncio.sleep(0)

        async def close(self):
            pass

    a, b = deliverer(store, Records(), clock, batch=3), deliverer(store, Records(), clock, batch=3)
    while await asyncio.gather(a.run_once(), b.run_once()) != [0, 0]:
        pass
    assert len(seen) == 20 and len(set(seen)) == 20


async def test_retries_end_as_failed_after_the_retry_time(store, clock):
    class Refuses:
        async def deliver(self, notification):
            raise DeliveryError("the receiver answered 503")

        async def close(self):
            pass

    n = await add(store, clock)
    seen: list[str] = []
    d = deliverer(
        store, Refuses(), clock, retry_ms=600_000, base_ms=60_000, cap_ms=120_000,
        observe=lambda kind, result: seen.append(result),
    )  # fmt: skip
    attempts = 0
    while (await store.notification(n.id)).status == "pending":
        attempts += await d.run_once()
        clock.advance(30)
        assert attempts < 50
    gone = await store.notification(n.id)
    assert gone.status == "failed" and gone.attempts == attempts and "503" in gone.last_error
    assert ms(clock) - n.created_ms >= 600_000
    assert 5 <= attempts <= 11  # 60 s, then 120 s (the cap) apart, over ten minutes
    assert seen == ["retry"] * (attempts - 1) + ["failed"]


# -- settings -------------------------------------------------------------------------------


def test_a_url_without_its_secret_refuses_to_start(monkeypatch):
    monkeypatch.setenv("CREDIT_NOTIFY_URL", "https://hooks.example/credits")
    with pytest.raises(SettingsError, match="CREDIT_NOTIFY_SECRET must be set"):
        settings_from_env()
    monkeypatch.setenv("CREDIT_NOTIFY_SECRET", "short")
    with pytest.raises(SettingsError, match="at least 16"):
        settings_from_env()
    monkeypatch.setenv("CREDIT_NOTIFY_SECRET", SECRET)
    assert isinstance(build_sink(settings_from_env()), WebhookSink)
    monkeypatch.setenv("CREDIT_LOW_BALANCE_THRESHOLD", "2.5.0")
    with pytest.raises(SettingsError, match="CREDIT_LOW_BALANCE_THRESHOLD"):
        settings_from_env()


class ListSink:
    def __init__(self, settings):
        self.got: list[str] = []

    async def deliver(self, notification):
        self.got.append(notification.id)

    async def close(self):
        pass


def test_another_sink_is_named_by_module_and_attribute():
    assert build_sink(Settings()) is None  # nothing configured: nothing delivered
    sink = build_sink(Settings(notify_sink="tests.test_notifications:ListSink"))
    assert isinstance(sink, ListSink)
    with pytest.raises(SystemExit, match="cannot load"):
        build_sink(Settings(notify_sink="tests.test_notifications:Missing"))


# -- the admin routes -------------------------------------------------------------------------


@pytest_asyncio.fixture
async def gw(redis, redis_url, store, clock):
    settings = Settings(
        redis_url=redis_url, admin_keys=ADMIN, client_keys=CLIENT, partitions=16, audit_path=None,
        low_balance_threshold="2",
    )  # fmt: skip
    app = create_app(settings, redis=redis, store=store, clock=clock, run_worker=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c,
    ):
        yield c


async def test_admin_lists_pages_shows_and_resends(gw, store, clock):
    made = []
    for i in range(5):
        made.append(await add(store, clock, user="ada" if i % 2 == 0 else "bob", key=f"a{i}"))
        clock.advance(1)
    r = await gw.get("/admin/notifications", params={"limit": 2}, headers=H_ADMIN)
    page = r.json()
    assert [n["id"] for n in page["notifications"]] == [made[4].id, made[3].id]
    seen = [n["id"] for n in page["notifications"]]
    while page["next_cursor"]:
        page = (
            await gw.get(
                "/admin/notifications", params={"limit": 2, "before": page["next_cursor"]}, headers=H_ADMIN
            )
        ).json()
        seen += [n["id"] for n in page["notifications"]]
    assert seen == [n.id for n in reversed(made)]
    r = await gw.get(
        "/admin/notifications",
        params={"user": "ada", "kind": "payment_failed", "status": "pending"},
        headers=H_ADMIN,
    )
    assert [n["id"] for n in r.json()["notifications"]] == [made[4].id, made[2].id, made[0].id]
    one = (await gw.get(f"/admin/notifications/{made[1].id}", headers=H_ADMIN)).json()
    assert (one["user"], one["kind"], one["status"], one["data"]) == (
        "bob",
        "payment_failed",
        "pending",
        {"credits": "1.5"},
    )
    # Delivered, then resent: pending again, delivered again with the same id.
    sink = ListSink(None)
    d = deliverer(store, sink, clock)
    await d.run_once()
    assert (await gw.get(f"/admin/notifications/{made[1].id}", headers=H_ADMIN)).json()[
        "status"
    ] == "delivered"
    again = await gw.post(f"/admin/notifications/{made[1].id}/resend", headers=H_ADMIN)
    assert again.status_code == 200 and again.json()["status"] == "pending" and again.json()["attempts"] == 0
    await d.run_once()
    assert sink.got.count(made[1].id) == 2 and len(sink.got) == 6


@pytest.mark.parametrize(
    ("method", "path", "kw", "status", "code"),
    [
        ("get", "/admin/notifications", {"params": {"kind": "nope"}}, 400, "invalid_kind"),
        ("get", "/admin/notifications", {"params": {"status": "sent"}}, 400, "invalid_status"),
        ("get", "/admin/notifications", {"params": {"limit": "0"}}, 400, "invalid_request"),
        ("get", "/admin/notifications", {"params": {"limit": "ten"}}, 400, "invalid_request"),
        ("get", "/admin/notifications", {"params": {"before": "yesterday"}}, 400, "invalid_cursor"),
        ("get", "/admin/notifications", {"params": {"user": "no/slash"}}, 400, "invalid_request"),
        ("get", "/admin/notifications/ntf_unknown", {}, 404, "not_found"),
        ("post", "/admin/notifications/ntf_unknown/resend", {}, 404, "not_found"),
        (
            "put",
            "/admin/accounts/ann/notifications",
            {"json": {"low_balance_threshold": "-1"}},
            422,
            "invalid_amount",
        ),
        (
            "put",
            "/admin/accounts/ann/notifications",
            {"json": {"low_balance_threshold": "1.0000001"}},
            422,
            "invalid_amount",
        ),
        ("put", "/admin/accounts/ann/notifications", {"json": {"threshold": "5"}}, 400, "invalid_request"),
        ("put", "/admin/accounts/ann/notifications", {"json": ["5"]}, 400, "invalid_request"),
    ],
)
async def test_admin_routes_refuse_bad_input_clearly(gw, method, path, kw, status, code):
    r = await getattr(gw, method)(path, headers=H_ADMIN, **kw)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


async def test_an_accounts_threshold_is_set_cleared_and_used_by_the_worker(gw, engine, store, clock):
    r = await gw.put(
        "/admin/accounts/tom/notifications", json={"low_balance_threshold": "50"}, headers=H_ADMIN
    )
    assert r.status_code == 200
    assert r.json() == {
        "user": "tom", "low_balance_threshold": "50", "default_low_balance_threshold": "2",
        "effective_low_balance_threshold": "50",
    }  # fmt: skip
    det = detector(store, clock, threshold=2_000_000)
    await engine.grant("tom", "40", op_id="g1")  # above the default, below the account's 50
    await drain(engine, store, det)
    assert await kinds(store, "tom") == ["low_balance"]
    r = await gw.put(
        "/admin/accounts/tom/notifications", json={"low_balance_threshold": None}, headers=H_ADMIN
    )
    assert r.json()["effective_low_balance_threshold"] == "2"
    assert (await gw.get("/admin/accounts/tom/notifications", headers=H_ADMIN)).json()[
        "low_balance_threshold"
    ] is None
    det.forget_thresholds()
    await engine.debit("tom", "39", op_id="d1")  # 1: below the default now, re-armed by the change
    await drain(engine, store, det)
    assert await kinds(store, "tom") == ["low_balance", "low_balance"]


# -- embedded mode ------------------------------------------------------------------------------


async def test_embedded_mode_detects_and_delivers_in_process(tmp_path, receiver):
    url = await receiver.start()
    settings = Settings(
        admin_keys=ADMIN, client_keys=CLIENT, sqlite_path=str(tmp_path / "e.db"), audit_path=None,
        notify_url=url, notify_secret=SECRET, notify_poll_seconds=0.05, low_balance_threshold="3",
    )  # fmt: skip
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c,
    ):
        r = await c.post("/admin/accounts/emb/grants", json={"amount": "5"}, headers=H_ADMIN)
        assert r.status_code == 201
        r = await c.post("/admin/accounts/emb/debits", json={"amount": "4"}, headers=H_ADMIN)
        assert r.status_code in (200, 201), r.text

        async def delivered() -> bool:
            return any(e["type"] == "low_balance" for e in receiver.events.values())

        await until(delivered, "the low_balance webhook arrives")
        listed = (await c.get("/admin/notifications", params={"user": "emb"}, headers=H_ADMIN)).json()
        assert [(n["kind"], n["status"]) for n in listed["notifications"]] == [("low_balance", "delivered")]


@pytest.mark.faults
async def test_a_worker_process_killed_mid_delivery_is_followed_by_one_delivery_per_id(redis_url, tmp_path):
    """A real worker process, SIGKILLed while its webhook request hangs at the receiver;
    the next worker delivers it after the lease; after its dedup the receiver has it once."""
    import signal
    import subprocess
    import sys

    from gateway.core.store.sqlite import SQLiteStore
    from tests.support.worker_helpers import REPO, worker_env

    receiver = Receiver(SECRET)
    url = await receiver.start()
    receiver.gate = asyncio.Event()
    db = tmp_path / "kill-notify.db"
    store = SQLiteStore(str(db))
    await store.open()
    env = worker_env(
        redis_url,
        db,
        CREDIT_NOTIFY_URL=url,
        CREDIT_NOTIFY_SECRET=SECRET,
        CREDIT_NOTIFY_LEASE_SECONDS=3,
        CREDIT_NOTIFY_TIMEOUT_SECONDS=2,
        CREDIT_NOTIFY_POLL_SECONDS=0.1,
    )
    procs = []
    try:
        await Notifier(store).record(user="kay", kind="promo_claimed", dedup_key="k-1", data={"code": "X"})
        [note] = (await Notifier(store).list(user="kay"))["notifications"]

        def start() -> subprocess.Popen:
            p = subprocess.Popen(
                [sys.executable, "-m", "gateway.worker"], env=env, cwd=REPO, stderr=subprocess.DEVNULL
            )
            procs.append(p)
            return p

        first = start()
        await asyncio.wait_for(receiver.entered.wait(), 60)  # its request is in flight
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
        receiver.gate.set()  # the receiver answers the dead worker's request: nobody reads it
        assert (await store.notification(note["id"])).status == "pending"
        start()

        async def delivered() -> bool:
            return (await store.notification(note["id"])).status == "delivered"

        await until(delivered, "the next worker delivers it", 60)
        assert list(receiver.events) == [note["id"]]  # after the receiver's dedup: once
        assert receiver.accepted[note["id"]] >= 1 and receiver.bad_signatures == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                await asyncio.to_thread(p.wait, 20)
        await store.close()
        await receiver.stop()


async def test_a_resend_while_its_delivery_is_under_way_is_refused(store, clock):
    from gateway.notifications.notifier import NotifyError

    n = await add(store, clock)
    hangs = Hangs()
    busy = asyncio.create_task(deliverer(store, hangs, clock).run_once())
    await asyncio.wait_for(hangs.entered.wait(), 10)
    notifier = Notifier(store, now_ms=lambda: ms(clock))
    with pytest.raises(NotifyError, match="being delivered now") as refused:
        await notifier.resend(n.id)
    assert refused.value.status == 409
    busy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await busy
    clock.advance(61)  # its lease over: a resend goes through
    assert (await notifier.resend(n.id)).lease is None


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"CREDIT_NOTIFY_LEASE_SECONDS": "1e300"}, "CREDIT_NOTIFY_LEASE_SECONDS"),
        ({"CREDIT_NOTIFY_POLL_SECONDS": "inf"}, "CREDIT_NOTIFY_POLL_SECONDS"),
        ({"CREDIT_NOTIFY_RETRY_CAP_SECONDS": "nan"}, "CREDIT_NOTIFY_RETRY_CAP_SECONDS"),
        ({"CREDIT_NOTIFY_RETRY_BASE_SECONDS": "100", "CREDIT_NOTIFY_RETRY_CAP_SECONDS": "10"}, "RETRY_BASE"),
        ({"CREDIT_NOTIFY_URL": "http://", "CREDIT_NOTIFY_SECRET": "s" * 20}, "CREDIT_NOTIFY_URL"),
        (
            {"CREDIT_NOTIFY_URL": "http://exa mple.com/", "CREDIT_NOTIFY_SECRET": "s" * 20},
            "CREDIT_NOTIFY_URL",
        ),
        (
            {"CREDIT_NOTIFY_URL": "http://127.0.0.1:99999/", "CREDIT_NOTIFY_SECRET": "s" * 20},
            "CREDIT_NOTIFY_URL",
        ),
        (
            {"CREDIT_NOTIFY_URL": "https://a.example/h", "CREDIT_NOTIFY_SECRET": " " * 20},
            "CREDIT_NOTIFY_SECRET",
        ),
    ],
)
def test_settings_that_would_stop_delivery_refuse_to_start(monkeypatch, env, names):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError, match=names):
        settings_from_env()


async def test_delivered_and_failed_notifications_are_pruned_after_the_keep_days(store, clock):
    from gateway.notifications.notifier import prune_outbox

    async def finished(user: str, key: str, status: str) -> NotificationRecord:
        n = await add(store, clock, user=user, key=key)
        assert n.id in [c.id for c in await store.claim_notifications(ms(clock), 60_000, f"t-{key}", 10)]
        assert await store.finish_notification(n.id, f"t-{key}", {"status": status})
        return n

    delivered = await finished("old", "old-1", "delivered")
    failed = await finished("old", "old-2", "failed")
    pending = await add(store, clock, user="old", key="old-3")  # never delivered: kept
    clock.advance(40 * 86400)
    recent = await finished("new", "new-1", "delivered")
    clock.advance(5 * 86400)
    lines = await prune_outbox(store, lambda: ms(clock), 30)
    assert lines == ["2 delivered or failed notifications older than 30 days removed"]
    assert {n.id for n in await notes(store)} == {pending.id, recent.id}
    assert await store.notification(delivered.id) is None and await store.notification(failed.id) is None
    assert await prune_outbox(store, lambda: ms(clock), 30) == []


def test_keeping_notifications_shorter_than_the_expiring_window_refuses_to_start(monkeypatch):
    monkeypatch.setenv("CREDIT_NOTIFY_KEEP_DAYS", "3")
    monkeypatch.setenv("CREDIT_NOTIFY_EXPIRING_DAYS", "7")
    with pytest.raises(SettingsError, match="CREDIT_NOTIFY_KEEP_DAYS"):
        settings_from_env()
