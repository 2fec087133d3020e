"""What an import did and what it found wrong in the old data: counts per kind of record
and outcome, and the defects, each with the document it is about."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from gateway.core.money import credits_text

# Every defect the importer reports, and what it means for the import.
DEFECTS: dict[str, str] = {
    "malformed": "a document that cannot be read (skipped)",
    "balance_mismatch": "the newest current_credits differs from the replay of the user's transactions "
    "(the old package's lost updates)",
    "newest_tied": "several transactions at the newest time with different current_credits (their "
    "order is unknown): the lowest is taken",
    "bad_balance": "the balance chosen is missing, not a number, negative, or above a billion credits "
    "(one operation's limit): no credit imported for the user",
    "expiry_beyond_limit": "an expiry record expiring after the latest time the gateway keeps (year "
    "2248): its remainder is imported as credit without expiry",
    "unknown_status": "a payment status the old package's models do not name: imported as paid when "
    "credits were added, else as expired",
    "rounded": "a value with more decimals than the gateway keeps, rounded (half to even)",
    "expiring_exceeds_balance": "unexpired expiry records hold more than the balance (the old expiry would "
    "remove credit already spent): cut to the balance, soonest-expiring first",
    "expiry_overdue": "an expiry record past its expires_at but not marked expired: its remainder is "
    "imported as credit without expiry",
    "account_exists": "the account has credit in the gateway already (carried over by hand?): balance "
    "not imported",
    "expiry_passed": "an expiry record's time came during the import: not imported",
    "captured_uncredited": "a paid payment whose credits were never added: imported as paid and held, "
    "not credited (--credit-uncredited credits it)",
    "credited_not_captured": "a payment credited though not paid: imported as credited",
    "credits_added_differs": "a payment credited with another number of credits than it bought",
    "non_integral_amount": "a payment amount (minor units) with a fraction: rounded",
    "amount_inr_mismatch": "amount_inr does not match the amount in paise (the old float conversion)",
    "plan_validity": "validity_days is not the length of the billing period; the gateway renews on the "
    "calendar",
    "plan_not_imported": "a subscription names a plan that was not imported: not imported",
    "subscription_lapsed": "an active subscription past its valid_until (the old package never renewed): "
    "not imported",
    "subscription_duplicate": "a user with several active subscriptions: the one valid longest is imported",
    "subscription_conflict": "the user has a live subscription in the gateway already: not imported",
    "code_collision": "promo codes equal but for case: one code here (see the docs for which), the claims "
    "of all counted under it",
    "code_exists": "a promo code made in the gateway already: its old claims are not counted",
    "claim_without_code": "a promo claim of a code that was not imported: not counted",
    "open_reservation": "a reservation neither committed nor released: not carried over",
}


@dataclass(slots=True)
class Defect:
    kind: str
    message: str
    collection: str | None = None
    doc_id: str | None = None
    user: str | None = None


OUTCOMES = ("imported", "already imported", "skipped")


class SourceDoc(Protocol):
    @property
    def collection(self) -> str: ...

    @property
    def id(self) -> str: ...


@dataclass
class Report:
    source: str
    dry_run: bool
    # section (balances, grants, payments...) -> outcome -> count
    counts: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    # micro-credits written (or to be written, in a dry run) per section
    credits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    defects: list[Defect] = field(default_factory=list)
    source_counts: dict[str, int] = field(default_factory=dict)

    def defect(
        self,
        kind: str,
        message: str,
        *,
        doc: SourceDoc | None = None,
        collection: str | None = None,
        doc_id: str | None = None,
        user: str | None = None,
    ) -> None:
        """One defect, about `doc` (or the document `collection` and `doc_id` name)."""
        assert kind in DEFECTS, kind
        if doc is not None:
            collection, doc_id = doc.collection, doc.id
        self.defects.append(Defect(kind, message, collection, doc_id, user))

    def count(self, section: str, outcome: str, n: int = 1, *, units: int = 0) -> None:
        assert outcome in OUTCOMES, outcome
        if n == 0:
            return
        self.counts[section][outcome] += n
        if outcome == "imported":
            self.credits[section] += units

    def total(self, outcome: str) -> int:
        return sum(c.get(outcome, 0) for c in self.counts.values())

    @property
    def nothing_new(self) -> bool:
        return self.total("imported") == 0

    def by_kind(self) -> dict[str, list[Defect]]:
        out: dict[str, list[Defect]] = defaultdict(list)
        for d in self.defects:
            out[d.kind].append(d)
        return dict(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dry_run": self.dry_run,
            "source_documents": self.source_counts,
            "counts": {s: dict(c) for s, c in self.counts.items()},
            "credits": {s: credits_text(u) for s, u in self.credits.items()},
            "already_imported": self.nothing_new and self.total("already imported") > 0,
            "defects": {k: len(v) for k, v in self.by_kind().items()},
            "defect_list": [asdict(d) for d in self.defects],
        }

    def to_text(self, limit: int = 20) -> str:
        done = "to import" if self.dry_run else "imported"
        lines = [
            f"credit-management import from {self.source}"
            + (" (dry run: nothing was written)" if self.dry_run else ""),
            "source documents: "
            + ", ".join(f"{k} {v}" for k, v in self.source_counts.items() if v)
            + ("" if any(self.source_counts.values()) else "none"),
        ]
        for section, c in self.counts.items():
            parts = [f"{c.get('imported', 0)} {done}"]
            if c.get("already imported"):
                parts.append(f"{c['already imported']} already imported")
            if c.get("skipped"):
                parts.append(f"{c['skipped']} skipped")
            if self.credits.get(section):
                parts.append(f"{credits_text(self.credits[section])} credits {done}")
            lines.append(f"  {section}: " + ", ".join(parts))
        if self.nothing_new and self.total("already imported"):
            lines.append("everything was already imported: nothing new was written")
        kinds = self.by_kind()
        lines.append(f"defects: {len(self.defects)}" + (" (none)" if not self.defects else ""))
        for kind, items in kinds.items():
            lines.append(f"  {kind} ({len(items)}): {DEFECTS[kind]}")
            for d in items[:limit]:
                where = " ".join(
                    x
                    for x in (
                        f"user {d.user}" if d.user else "",
                        f"{d.collection} {d.doc_id}" if d.collection and d.doc_id else "",
                    )
                    if x
                )
                lines.append(f"    - {where + ': ' if where else ''}{d.message}")
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more (--json lists them all)")
        return "\n".join(lines)
