"""From credit-management's documents to what the gateway is to hold, without writing:
the grants of each account, the payments, plans, subscriptions and promo codes with their
claims. Every id here is derived from a source document's, so that a second run plans the
same writes and finds them made. What is wrong in the data goes to the report."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from gateway.core.engine import MAX_EXPIRY_MS
from gateway.core.keys import ID_PATTERN
from gateway.core.money import MAX_UNITS, credits_text, from_units
from gateway.core.store.payments import PaymentRecord
from gateway.core.store.plans import PERIODS
from gateway.payments.catalog import MINOR_DIGITS, CatalogError, currency_code
from gateway.payments.service import HELD
from gateway.plans.subscriptions import PLAN_PRIORITY
from gateway.promos import PromoError, normalize_code

from .report import Report
from .source import BadValue, Doc, decimal_of, flag, jsonable, minor_of, ms_of, safe_id, units_of, user_of

ORIGIN = "credit-management"
BALANCE_OP = "cm:balance"
PURCHASE_PRIORITY = 100
# The lengths of a billing period the old package's validity_days may have for the
# gateway's calendar periods to be the same thing.
PERIOD_DAYS = {"daily": {1}, "weekly": {7}, "monthly": {28, 29, 30, 31}, "yearly": {365, 366}}
# The old package's statuses -> the gateway's. An attempt that never completed is closed
# (expired): reconciliation then leaves it alone rather than asking the provider about
# every old attempt on every run, and a capture its provider still reports moves it to paid.
# The old package's PaymentStatus (its Razorpay event names) and the raw event names its
# refund handler stored instead; a status not here is reported and imported by what was
# credited (paid when credits_added > 0, else expired).
STATUSES = {
    # money received
    "captured": "paid",
    "paid": "paid",
    "partially_paid": "paid",
    "order_paid": "paid",
    "invoice_paid": "paid",
    "invoice_partially_paid": "paid",
    "refund_failed": "paid",
    "dispute_closed": "paid",
    # given back
    "refunded": "refunded",
    "refund_created": "refunded",
    "refund_processed": "refunded",
    "refund.created": "refunded",
    "refund.processed": "refunded",
    # closed without money
    "cancelled": "cancelled",
    "expired": "expired",
    "invoice_expired": "expired",
    "failed": "expired",
    "pending": "expired",
    "created": "expired",
    "authorized": "expired",
}


@dataclass(frozen=True)
class Options:
    now_ms: int
    balance: str = "current"  # current: the newest current_credits; replay: the transactions' sum
    credit_uncredited: bool = False
    currency: str = "INR"  # of plan prices and of payments that name none
    subscription_provider: str | None = "razorpay"  # priced plans' renewals; None: granted unpaid


@dataclass
class GrantStep:
    op_id: str
    units: int
    expires_ms: int | None
    source: str
    priority: int
    metadata: dict[str, Any]


@dataclass
class Account:
    user: str
    grants: list[GrantStep] = field(default_factory=list)


@dataclass
class PaymentStep:
    record: PaymentRecord
    document: str  # the source document as JSON: kept as the payment's import event
    uncredited: bool  # captured, never credited by the old package


@dataclass
class PlanStep:
    plan_id: str
    source_id: str
    body: dict[str, Any]
    created_ms: int


@dataclass
class SubscriptionStep:
    sub_id: str
    source_id: str
    user: str
    plan_id: str
    source_plan: str
    period_start_ms: int
    valid_until_ms: int
    renews: bool
    note: dict[str, Any]


@dataclass
class PromoStep:
    code: str
    body: dict[str, Any]
    created_ms: int
    claims: list[tuple[str, int]]  # (user, n): the user's n-th claim


@dataclass
class ImportPlan:
    plans: list[PlanStep]
    subscriptions: list[SubscriptionStep]
    accounts: list[Account]
    payments: list[PaymentStep]
    promos: list[PromoStep]


def make_plan(docs: dict[str, list[Doc]], opts: Options, report: Report) -> ImportPlan:
    report.source_counts = {name: len(items) for name, items in docs.items()}
    plans = plan_plans(docs["credit_subscription_plans"], opts, report)
    subs = plan_subscriptions(docs["credit_user_subscriptions"], plans, opts, report)
    accounts = plan_accounts(docs, subs, plans, opts, report)
    report_reservations(docs["credit_reserved"], report)
    return ImportPlan(
        plans=list(plans.values()),
        subscriptions=list(subs.values()),
        accounts=accounts,
        payments=plan_payments(docs["payment_records"], opts, report),
        promos=plan_promos(docs["promos"], docs["user_promo_claims"], report),
    )


def _malformed(report: Report, doc: Doc, why: str) -> None:
    user = doc.get("user_id")
    report.defect(
        "malformed",
        why,
        doc=doc,
        user=user if isinstance(user, str) else None,
    )


def _units(report: Report, doc: Doc, name: str, *, default: Any = None) -> int:
    """A credits field in micro-credits; a rounded one reported."""
    value = doc.get(name, default)
    units, exact = units_of(value)
    if not exact:
        report.defect(
            "rounded",
            f"{name} {value!r} rounded to {credits_text(units)}",
            doc=doc,
        )
    return units


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _iso_any(ms: int) -> str:
    """A time for a report, also past what datetime holds."""
    try:
        return _iso(ms)
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms after 1970"


# -- accounts -----------------------------------------------------------------------------


@dataclass
class _Expiring:
    doc: Doc
    units: int
    expires_ms: int


def _replay(txns: list[Doc], report: Report) -> tuple[int | None, int | None, Doc | None]:
    """(replayed balance, newest current_credits, newest transaction); None where unreadable."""
    dated: list[tuple[int, Doc]] = []
    replay: int | None = 0
    for t in txns:
        try:
            ts = ms_of(t.get("timestamp"))
        except BadValue as exc:
            _malformed(report, t, f"timestamp: {exc}")
            continue
        dated.append((ts, t))
        try:
            delta = _units(report, t, "credits_added", default=0) if t.get("credits_added") is not None else 0
            if t.get("credits_deducted") is not None:
                delta -= _units(report, t, "credits_deducted")
        except BadValue as exc:
            _malformed(report, t, f"amounts: {exc}: the replay of this user is incomplete")
            replay = None
            continue
        if replay is not None:
            replay += delta
    if not dated:
        return replay, 0 if not txns else None, None
    dated.sort(key=lambda x: x[0])
    last = [t for ts, t in dated if ts == dated[-1][0]]
    readable: list[tuple[int, Doc]] = []
    for t in last:
        try:
            readable.append((_units(report, t, "current_credits"), t))
        except BadValue:
            continue
    if not readable:
        return replay, None, last[-1]
    # Transactions at the same newest time leave their order unknown (the database keeps
    # none): the lowest balance among them, and the others reported.
    readable.sort(key=lambda x: x[0])
    if readable[0][0] != readable[-1][0]:
        report.defect(
            "newest_tied",
            f"current_credits {', '.join(credits_text(u) for u, _ in readable)} at the same time: "
            f"{credits_text(readable[0][0])} taken",
            collection="credit_transactions",
            doc_id=readable[0][1].id,
            user=readable[0][1].get("user_id"),
        )
    return replay, readable[0][0], readable[0][1]


def _text(units: int | None) -> str:
    return "unreadable" if units is None else credits_text(units)


def plan_accounts(
    docs: dict[str, list[Doc]],
    subs: dict[str, SubscriptionStep],
    plans: dict[str, PlanStep],
    opts: Options,
    report: Report,
) -> list[Account]:
    txns: dict[str, list[Doc]] = defaultdict(list)
    expiry: dict[str, list[Doc]] = defaultdict(list)
    for name, into in (("credit_transactions", txns), ("credit_expiry_records", expiry)):
        for d in docs[name]:
            try:
                into[user_of(d)].append(d)
            except BadValue as exc:
                _malformed(report, d, str(exc))
    accounts = []
    for user in sorted(set(txns) | set(expiry)):
        replay, shown, newest = _replay(txns.get(user, []), report)
        if replay is not None and shown is not None and replay != shown:
            report.defect(
                "balance_mismatch",
                f"current_credits {credits_text(shown)}, replay {credits_text(replay)} "
                f"(difference {credits_text(shown - replay)})",
                user=user,
            )
        chosen = shown if opts.balance == "current" else replay
        if chosen is None or not 0 <= chosen <= MAX_UNITS:
            which = "current_credits" if opts.balance == "current" else "the replay"
            report.defect(
                "bad_balance",
                f"{which} is {_text(chosen)} (current_credits {_text(shown)}, replay {_text(replay)})",
                user=user,
            )
            report.count("balances", "skipped")
            continue
        acct = Account(user)
        left = chosen - _plan_expiring(
            acct, expiry.get(user, []), chosen, subs.get(user), plans, opts, report
        )
        if left > 0:
            meta = {
                "import": ORIGIN,
                "balance": "current_credits" if opts.balance == "current" else "replay",
                "current_credits": _text(shown),
                "replay": _text(replay),
                "transaction": newest.id if newest else None,
            }
            acct.grants.append(GrantStep(BALANCE_OP, left, None, "admin", PURCHASE_PRIORITY, meta))
        accounts.append(acct)
    return accounts


def _plan_expiring(
    acct: Account,
    records: list[Doc],
    balance: int,
    sub: SubscriptionStep | None,
    plans: dict[str, PlanStep],
    opts: Options,
    report: Report,
) -> int:
    """The user's unexpired expiry records as grants, within `balance`; their total."""
    live: list[_Expiring] = []
    for d in records:
        try:
            remaining = _units(report, d, "remaining_credits")
            expires = ms_of(d.get("expires_at"))
        except BadValue as exc:
            _malformed(report, d, str(exc))
            continue
        if flag(d.get("expired")) or remaining <= 0:
            continue
        if expires > MAX_EXPIRY_MS:
            report.defect(
                "expiry_beyond_limit",
                f"{credits_text(remaining)} credits expiring at {_iso_any(expires)}, after the latest "
                "expiry the gateway keeps: imported without expiry",
                doc=d,
                user=acct.user,
            )
            continue  # left in the balance, which becomes a grant without expiry
        if expires <= opts.now_ms:
            report.defect(
                "expiry_overdue",
                f"{credits_text(remaining)} credits due to expire at {_iso(expires)}",
                doc=d,
                user=acct.user,
            )
            continue
        live.append(_Expiring(d, remaining, expires))
    total = sum(e.units for e in live)
    if total > balance:
        report.defect(
            "expiring_exceeds_balance",
            f"unexpired records hold {credits_text(total)}, the balance is {credits_text(balance)}",
            user=acct.user,
        )
        # Spending draws on the soonest-expiring credit first: that is what was spent.
        excess = total - balance
        for e in sorted(live, key=lambda e: e.expires_ms):
            cut = min(excess, e.units)
            e.units, excess = e.units - cut, excess - cut
        live = [e for e in live if e.units > 0]
    for e in live:
        source_plan = e.doc.get("subscription_plan_id")
        meta: dict[str, Any] = {
            **e.doc.extra(),
            "import": ORIGIN,
            "expiry_record": e.doc.id,
            "credits": jsonable(e.doc.get("credits")),
            "remaining_credits": jsonable(e.doc.get("remaining_credits")),
        }
        if source_plan is not None:
            meta["subscription_plan_id"] = str(source_plan)
        if sub is not None and source_plan is not None and str(source_plan) == sub.source_plan:
            # The imported subscription's current period: its plan credit, which ends with it.
            meta |= {"subscription": sub.sub_id, "period": -1, "plan": sub.plan_id}
        is_plan = source_plan is not None
        acct.grants.append(
            GrantStep(
                f"cm:expiry:{safe_id(e.doc.id)}",
                e.units,
                e.expires_ms,
                "plan" if is_plan else "admin",
                PLAN_PRIORITY if is_plan else PURCHASE_PRIORITY,
                meta,
            )
        )
    return sum(e.units for e in live)


def report_reservations(docs: list[Doc], report: Report) -> None:
    for d in docs:
        if flag(d.get("committed")) or flag(d.get("released")):
            continue
        try:
            units, _ = units_of(d.get("credits"))
            amount = credits_text(units)
        except BadValue:
            amount = repr(d.get("credits"))
        created = d.get("created_at")
        report.defect(
            "open_reservation",
            f"{amount} credits reserved at {jsonable(created)} ({d.get('reason') or 'no reason given'})",
            doc=d,
            user=d.get("user_id") if isinstance(d.get("user_id"), str) else None,
        )


# -- payments -----------------------------------------------------------------------------


def _opt_ms(doc: Doc, name: str) -> int | None:
    return None if doc.get(name) is None else ms_of(doc.get(name))


def _str(doc: Doc, name: str, most: int = 200) -> str | None:
    v = doc.get(name)
    return None if v is None else str(v)[:most]


def plan_payments(docs: list[Doc], opts: Options, report: Report) -> list[PaymentStep]:
    out = []
    for d in docs:
        try:
            out.append(_payment(d, opts, report))
        except (BadValue, CatalogError) as exc:
            _malformed(report, d, str(exc))
    return out


def _payment(d: Doc, opts: Options, report: Report) -> PaymentStep:
    user = user_of(d)
    provider = d.get("provider")
    if provider not in ("razorpay", "stripe"):
        raise BadValue(f"provider {str(provider)[:20]!r} is neither razorpay nor stripe")
    old_status = str(d.get("status") or "").strip().lower()
    known = STATUSES.get(old_status)
    currency = currency_code(d.get("currency") or opts.currency)
    minor, exact = minor_of(d.get("amount"))
    if minor <= 0:
        raise BadValue(f"amount {d.get('amount')!r} is not positive")
    if not exact:
        report.defect(
            "non_integral_amount",
            f"amount {d.get('amount')!r} {currency} minor units, rounded to {minor}",
            doc=d,
            user=user,
        )
    if currency == "INR" and d.get("amount_inr") is not None:
        inr = decimal_of(d.get("amount_inr"))
        if inr.scaleb(MINOR_DIGITS["INR"]) != minor:
            report.defect(
                "amount_inr_mismatch",
                f"amount_inr {inr} but amount {minor} paise",
                doc=d,
                user=user,
            )
    credits = _units(report, d, "credits_to_add", default=0) if d.get("credits_to_add") is not None else 0
    added = _units(report, d, "credits_added") if d.get("credits_added") is not None else 0
    for name, units in (("credits_to_add", credits), ("credits_added", added)):
        if not 0 <= units <= MAX_UNITS:
            raise BadValue(f"{name} {d.get(name)!r} is not between 0 and {credits_text(MAX_UNITS)} credits")
    status = known or ("paid" if added > 0 else "expired")
    if known is None:
        report.defect(
            "unknown_status",
            f"status {str(d.get('status'))[:40]!r} imported as {status} "
            f"(credits_added {credits_text(added)})",
            doc=d,
            user=user,
        )
    created = ms_of(d.get("created_at"))
    completed, failed = _opt_ms(d, "completed_at"), _opt_ms(d, "failed_at")
    where: dict[str, Any] = {"doc": d, "user": user}
    uncredited = status == "paid" and added <= 0
    if uncredited:
        report.defect(
            "captured_uncredited",
            f"{credits_text(credits)} credits for {minor} {currency} minor units"
            + (" (to be credited: --credit-uncredited)" if opts.credit_uncredited else " (held)"),
            **where,
        )
    elif added > 0 and status not in ("paid", "refunded"):
        report.defect(
            "credited_not_captured", f"status {old_status}, {credits_text(added)} credited", **where
        )
    if added > 0 and added != credits:
        report.defect(
            "credits_added_differs",
            f"bought {credits_text(credits)}, credited {credits_text(added)}",
            **where,
        )
    error = _str(d, "error_message", 500)
    if status == "expired":
        error = f"{ORIGIN}: {old_status}" + (f": {error}" if error else "")
    paid = completed or created
    record = PaymentRecord(
        payment_id=safe_id(d.id),
        user=user,
        provider=provider,
        amount_minor=minor,
        currency=currency,
        credits=credits,
        status=status,
        created_ms=created,
        updated_ms=max(x for x in (created, completed, failed) if x is not None),
        description=_str(d, "description"),
        link_id=_str(d, "provider_payment_link_id"),
        provider_payment_id=_str(d, "provider_payment_id"),
        order_id=_str(d, "provider_order_id"),
        paid_ms=paid if status in ("paid", "refunded") else None,
        # What the old package credited is in its balance, imported as such: never again.
        credited_ms=paid if added > 0 else None,
        refunded_minor=minor if status == "refunded" else 0,
        error=error,
        purpose=HELD if uncredited and not opts.credit_uncredited else None,
    )
    document = json.dumps({"_id": d.id, **jsonable(d.fields)}, default=str, sort_keys=True)
    return PaymentStep(record, document, uncredited)


# -- plans and subscriptions --------------------------------------------------------------


def plan_plans(docs: list[Doc], opts: Options, report: Report) -> dict[str, PlanStep]:
    """The plans by their source id."""
    out = {}
    for d in docs:
        try:
            period = str(d.get("billing_period") or "").strip().lower()
            if period not in PERIODS:
                raise BadValue(
                    f"billing_period {d.get('billing_period')!r} is not one of {', '.join(PERIODS)}"
                )
            credits = _units(report, d, "credit_limit")
            currency = currency_code(d.get("currency") or opts.currency)
            price = decimal_of(d.get("price") if d.get("price") is not None else 0)
            whole = price.quantize(Decimal(1).scaleb(-MINOR_DIGITS[currency]), rounding=ROUND_HALF_EVEN)
            if whole != price:
                report.defect(
                    "rounded",
                    f"price {d.get('price')!r} rounded to {whole}",
                    doc=d,
                )
            created = ms_of(d.get("created_at")) if d.get("created_at") is not None else opts.now_ms
        except (BadValue, CatalogError) as exc:
            _malformed(report, d, str(exc))
            continue
        days = d.get("validity_days")
        if days is not None and days not in PERIOD_DAYS[period]:
            report.defect(
                "plan_validity",
                f"validity_days {days!r} on a {period} plan",
                doc=d,
            )
        body: dict[str, Any] = {
            "name": d.get("name"),
            "description": d.get("description") or None,
            "credits": from_units(credits),
            "period": period,
            "price": whole,
            "currency": currency,
            "active": flag(d.get("is_active", True)),
        }
        out[d.id] = PlanStep(f"cm_{safe_id(d.id)}", d.id, body, created)
    return out


def plan_subscriptions(
    docs: list[Doc], plans: dict[str, PlanStep], opts: Options, report: Report
) -> dict[str, SubscriptionStep]:
    """The live subscription of each user (one at most), by user."""
    found: dict[str, list[SubscriptionStep]] = defaultdict(list)
    for d in docs:
        if not flag(d.get("is_active")):
            report.count("subscriptions", "skipped")  # ended there: history, not carried
            continue
        try:
            user = user_of(d)
            until = ms_of(d.get("valid_until"))
            start = ms_of(d.get("started_at")) if d.get("started_at") is not None else min(opts.now_ms, until)
        except BadValue as exc:
            _malformed(report, d, str(exc))
            continue
        where: dict[str, Any] = {"doc": d, "user": user}
        plan = plans.get(str(d.get("subscription_plan_id")))
        if plan is None:
            report.defect("plan_not_imported", f"plan {d.get('subscription_plan_id')!r}", **where)
            continue
        if until <= opts.now_ms:
            report.defect("subscription_lapsed", f"valid until {_iso(until)}", **where)
            continue
        note = {"source": ORIGIN, "source_id": d.id, **d.extra()}
        found[user].append(
            SubscriptionStep(
                sub_id=f"sub_cm_{safe_id(d.id)}",
                source_id=d.id,
                user=user,
                plan_id=plan.plan_id,
                source_plan=plan.source_id,
                period_start_ms=min(start, until - 1),
                valid_until_ms=until,
                renews=flag(d.get("auto_renew", True)),
                note=note,
            )
        )
    out = {}
    for user, subs in found.items():
        subs.sort(key=lambda s: (s.valid_until_ms, s.source_id))
        for other in subs[:-1]:
            report.defect(
                "subscription_duplicate",
                f"not imported: {subs[-1].source_id} is valid longer",
                collection="credit_user_subscriptions",
                doc_id=other.source_id,
                user=user,
            )
            report.count("subscriptions", "skipped")
        out[user] = subs[-1]
    return out


# -- promo codes --------------------------------------------------------------------------


def _promo_body(d: Doc, code: str, report: Report) -> dict[str, Any]:
    target = str(d.get("target_type") or "all_users").lower()
    users = None
    if target == "specific_users":
        raw = d.get("target_user_ids") or []
        users = [u for u in raw if isinstance(u, str) and ID_PATTERN.fullmatch(u)]
        if len(users) != len(raw):
            report.defect(
                "malformed",
                f"{len(raw) - len(users)} target_user_ids that are not valid user ids left out",
                doc=d,
            )
    elif target not in ("all_users", "all"):
        raise BadValue(f"target_type {target[:30]!r} is neither all_users nor specific_users")
    body: dict[str, Any] = {
        "code": code,
        "credits": from_units(_units(report, d, "credits")),
        "description": _str(d, "description", 500),
        "max_uses": d.get("max_uses"),
        "max_uses_per_user": d.get("max_uses_per_user") if d.get("max_uses_per_user") is not None else 1,
        "target_users": users,
        "active": flag(d.get("is_active", True)),
    }
    for name in ("valid_from", "valid_until"):
        if d.get(name) is not None:
            body[name] = _iso(ms_of(d.get(name)))
    return body


def plan_promos(promos: list[Doc], claims: list[Doc], report: Report) -> list[PromoStep]:
    by_code: dict[str, list[Doc]] = defaultdict(list)
    for d in promos:
        try:
            by_code[normalize_code(d.get("code"))].append(d)
        except PromoError as exc:
            _malformed(report, d, f"code {str(d.get('code'))[:40]!r}: {exc.message}")
    claim_count: dict[str, int] = defaultdict(int)
    for c in claims:
        claim_count[str(c.get("promo_id"))] += 1
    code_of: dict[str, str] = {}  # source promo id -> code
    out = []
    for norm, group in by_code.items():
        # Of codes equal but for case: the active one, then the most claimed, then the newest.
        def rank(d: Doc) -> tuple[bool, int, str]:
            return (flag(d.get("is_active", True)), claim_count[d.id], str(jsonable(d.get("created_at"))))

        group.sort(key=rank)
        kept = group[-1]
        if len(group) > 1:
            report.defect(
                "code_collision",
                f"{', '.join(repr(d.get('code')) for d in group)} are all {norm}: "
                f"{kept.get('code')!r} ({kept.id}) is imported, the claims of all count for it",
                doc=kept,
            )
        try:
            body = _promo_body(kept, norm, report)
            created = ms_of(kept.get("created_at")) if kept.get("created_at") is not None else 0
        except BadValue as exc:
            _malformed(report, kept, str(exc))
            continue
        for d in group:
            code_of[d.id] = norm
        out.append(PromoStep(norm, body, created, []))
    steps = {p.code: p for p in out}
    per_user: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for c in claims:
        code: str | None = code_of.get(str(c.get("promo_id")))
        if code is None:
            try:
                code = normalize_code(c.get("promo_code"))
            except PromoError:
                code = None
        try:
            user = user_of(c)
        except BadValue as exc:
            _malformed(report, c, str(exc))
            continue
        if code is None or code not in steps:
            report.defect(
                "claim_without_code",
                f"promo {c.get('promo_id')!r} / {c.get('promo_code')!r}",
                doc=c,
                user=user,
            )
            continue
        try:
            at = ms_of(c.get("claimed_at"))
        except BadValue:
            at = 0
        per_user[(code, user)].append((at, c.id))
    for (code, user), made in sorted(per_user.items()):
        made.sort()
        steps[code].claims += [(user, n) for n in range(1, len(made) + 1)]
    return out
