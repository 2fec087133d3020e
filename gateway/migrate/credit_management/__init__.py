"""Importing credit-management's MongoDB data (`credit-gateway import credit-management`):
read its collections (source.py), plan what the gateway is to hold (plan.py), write it
through the gateway's services, each write once (write.py), and report what was imported
and what was found wrong (report.py). docs/migrating-from-credit-management.md describes
the mapping and the decisions."""

from __future__ import annotations

from .plan import Options, make_plan
from .report import Report
from .source import SourceError, read
from .write import Target, Writer

__all__ = ["Options", "Report", "SourceError", "Target", "read", "run_import"]


async def run_import(
    docs: dict, target: Target, opts: Options, *, source: str, dry_run: bool = False, strict: bool = False
) -> Report:
    """Imports the documents `read` returned into `target`. `strict`: a dry run first, and
    nothing written when it finds a defect (the dry run's report is returned)."""
    if strict and not dry_run:
        first = await run_import(docs, target, opts, source=source, dry_run=True)
        if first.defects:
            return first
    report = Report(source=source, dry_run=dry_run)
    plan = make_plan(docs, opts, report)
    writer = Writer(
        target,
        report,
        dry_run=dry_run,
        credit_uncredited=opts.credit_uncredited,
        subscription_provider=opts.subscription_provider,
    )
    await writer.write(plan)
    return report
