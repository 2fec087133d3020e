"""The `credit-gateway` command line: a thin shell over the runners.

Commands: serve, keys, worker, reconcile, payments reconcile, rehydrate, import
credit-management, mock-upstream, schema."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .core.settings import Settings, load_settings
from .logs import LogFormat, configure_logging


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import run

    settings = load_settings()
    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    if settings.embedded:
        if args.workers > 1:
            raise SystemExit(
                "embedded mode keeps Redis inside the serve process: one process only "
                "(set CREDIT_REDIS_URL to run several workers)"
            )
        _embedded_keys(settings)
        print(
            "Embedded mode (no CREDIT_REDIS_URL): in-process Redis and the worker run in this process; "
            f"the durable record is SQLite at {settings.sqlite_path}.",
            flush=True,
        )
    elif not settings.admin_keys:
        print("No CREDIT_ADMIN_KEYS set: the admin API refuses every request.", file=sys.stderr, flush=True)
    run(settings, workers=args.workers, log_level=args.log_level)
    return 0


def _embedded_keys(settings: Settings) -> None:
    """Keys for embedded mode: from the environment, else from the keys file (made and
    shown once on the first start). Never opens admin routes without a key."""
    from .embedded_keys import KeysFileError, ensure_keys

    try:
        keys = ensure_keys(settings)
    except (KeysFileError, OSError) as exc:
        raise SystemExit(str(exc)) from exc
    if keys.generated:
        lines = [f"  {kind} key: {'':<{7 - len(kind)}}{key}" for kind, key in keys.generated.items()]
        print(
            "Generated keys (shown this once; only their SHA-256 digests are kept, in "
            f"{keys.path.resolve()}):\n" + "\n".join(lines),
            flush=True,
        )
    if keys.from_file:
        print(
            f"Using the {' and '.join(keys.from_file)} key digests kept in {keys.path.resolve()} "
            "(the keys were shown at the first start; `credit-gateway keys --new`, or deleting that "
            "file, makes new ones).",
            flush=True,
        )


def cmd_keys(args: argparse.Namespace) -> int:
    from .embedded_keys import KINDS, KeysFileError, keys_file, read_keys_file, replace_keys

    settings = load_settings()
    if not settings.embedded:
        raise SystemExit(
            "keys are CREDIT_ADMIN_KEYS / CREDIT_CLIENT_KEYS outside embedded mode; "
            "this command manages embedded mode's keys file"
        )
    try:
        if args.new:
            kinds = list(KINDS) if args.new == "all" else [args.new]
            made = replace_keys(settings, kinds)
            print(f"New keys (shown this once; their digests replace the old ones in {keys_file(settings)}):")
            for kind, key in made.items():
                print(f"  {kind} key: {'':<{7 - len(kind)}}{key}")
            print("Restart `credit-gateway serve` to use them; the old ones stop working then.")
            return 0
        stored = read_keys_file(keys_file(settings))
    except (KeysFileError, OSError) as exc:
        raise SystemExit(str(exc)) from exc
    print(f"keys file: {keys_file(settings)}" + ("" if stored else " (none yet: `serve` makes it)"))
    for kind in KINDS:
        env = getattr(settings, f"{kind}_keys")
        source = (
            "CREDIT_" + kind.upper() + "_KEYS (wins over the file)"
            if env
            else (f"{len(stored[kind])} digest(s) in the file" if kind in stored else "none")
        )
        print(f"  {kind}: {source}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    # mypy does not follow pyproject's package-dir (worker/ installs as gateway.worker).
    from gateway.worker.service import run_worker  # type: ignore[import-not-found]

    asyncio.run(run_worker(load_settings(), burst=args.burst))
    return 0


async def _with_engine(fn):
    from .core.connections import make_engine, make_redis, make_store

    settings = load_settings()
    if settings.embedded:
        raise SystemExit(
            "this command needs CREDIT_REDIS_URL (embedded mode keeps Redis inside the serve process)"
        )
    redis, store = make_redis(settings), make_store(settings)
    await store.open()
    try:
        return await fn(settings, make_engine(settings, redis), store)
    finally:
        await store.close()
        await redis.aclose()


def _at_least_zero(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return n


def duration_seconds(text: str) -> float:
    """ "15m", "900s", "2h", "1d" or a number of seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (write 15m, 900s, 2h)") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError("a duration is zero or more")
    return value


def cmd_payments_reconcile(args: argparse.Namespace) -> int:
    from contextlib import AsyncExitStack

    from .selling import build_selling

    async def run(settings, engine, store):
        async with AsyncExitStack() as stack:
            # With the subscriptions: a subscription's payment is credited as its period.
            payments = (await build_selling(stack, settings, None, store, engine)).payments
            if not payments.providers:
                print("no payment provider is configured (RAZORPAY_KEY_ID/_SECRET, STRIPE_API_KEY)")
            changed = await payments.reconcile(int(args.older_than * 1000))
        failed = [line for line in changed if line.startswith("FAILED")]
        for line in changed:
            print(line)
        print(f"payments reconcile: {len(changed) - len(failed)} change(s), {len(failed)} failed")
        return 1 if failed else 0

    return asyncio.run(_with_engine(run))


def cmd_rehydrate(args: argparse.Namespace) -> int:
    from .core.recovery import rehydrate

    async def run(settings, engine, store):
        parts = None if args.all else await engine.missing_partitions()
        if parts == []:
            print("every partition is ready; nothing to rebuild (use --all to rebuild anyway)")
            return 0
        report = await rehydrate(engine, store, parts, only_missing=not args.all)
        print(
            f"rebuilt {report.accounts} accounts ({report.skipped} already current), "
            f"{report.operations} operation ids, {report.resolved_holds} resolved holds, "
            f"{report.partitions} partitions"
        )
        if report.busy:
            print(f"partitions {report.busy} were being rebuilt by another process: left to it")
        if report.unfinished:
            print(f"partitions {report.unfinished} were lost again midway: left not ready")
            return 1
        return 0

    return asyncio.run(_with_engine(run))


def cmd_reconcile(args: argparse.Namespace) -> int:
    from gateway.worker.service import build_worker

    from .core.reconcile import reconcile

    async def run(settings, engine, store):
        if not args.no_drain:
            worker = build_worker(settings, engine, store)
            await worker.run(burst=True)
            worker.close()
        drift = await reconcile(engine, store)
        for d in drift:
            print(f"DRIFT {d}")
        print(f"reconcile: {len(drift)} drift(s)")
        return 1 if drift else 0

    return asyncio.run(_with_engine(run))


def cmd_schema(args: argparse.Namespace) -> int:
    from .core.store.schema import ddl_script, mongo_script

    if args.backend == "mongo":
        if args.dialect:
            print("--dialect is for --backend sql", file=sys.stderr)
            return 2
        sys.stdout.write(mongo_script())
        return 0
    if not args.dialect:
        print("--backend sql needs --dialect postgres or --dialect sqlite", file=sys.stderr)
        return 2
    sys.stdout.write(ddl_script(args.dialect))
    return 0


def cmd_import_credit_management(args: argparse.Namespace) -> int:
    import json
    from contextlib import AsyncExitStack

    from .core.redact import public_url
    from .library.runtime import CreditRuntime
    from .migrate.credit_management import Options, SourceError, Target, read, run_import
    from .payments.catalog import CatalogError, currency_code
    from .selling import build_selling

    try:
        currency_code(args.currency)
    except CatalogError as exc:
        print(f"import: --currency: {exc}", file=sys.stderr)
        return 2
    settings = load_settings()
    source = f"{public_url(args.mongo_uri)} database {args.db}"

    async def run() -> int:
        try:
            docs = await read(args.mongo_uri, args.db)
        except SourceError as exc:
            print(f"import: {exc}", file=sys.stderr)
            return 2
        if settings.embedded:
            print(
                f"Embedded mode (no CREDIT_REDIS_URL): importing into {settings.sqlite_path}. Stop "
                "`credit-gateway serve` first: it sees the import when it starts again.",
                file=sys.stderr,
            )
        runtime = CreditRuntime(settings)  # in embedded mode its worker stores each write at once
        async with runtime as engine, AsyncExitStack() as stack:
            selling = await build_selling(stack, settings, None, runtime.store, engine)
            target = Target(engine, runtime.store, selling.payments, selling.promos, selling.subscriptions)
            opts = Options(
                now_ms=engine.now_ms(),
                balance=args.balance,
                credit_uncredited=args.credit_uncredited,
                currency=args.currency.upper(),
                subscription_provider=None
                if args.subscription_provider == "none"
                else args.subscription_provider,
            )
            report = await run_import(
                docs, target, opts, source=source, dry_run=args.dry_run, strict=args.strict
            )
        if args.json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            print(report.to_text(limit=args.show))
        if args.strict and report.defects:
            if not args.json:
                print("--strict: defects found; nothing was written", file=sys.stderr)
            return 3
        return 0

    return asyncio.run(run())


def _mock_upstream(args: argparse.Namespace) -> int:
    from .devtools.mock_upstream import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="credit-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the HTTP gateway (embedded mode without CREDIT_REDIS_URL)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port (needs CREDIT_REDIS_URL; settings from the environment)",
    )
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("keys", help="embedded mode's keys file: where it is, or --new keys")
    p.add_argument(
        "--new",
        nargs="?",
        const="all",
        choices=["admin", "client", "all"],
        help="make new keys (default: both) and show them once",
    )
    p.set_defaults(fn=cmd_keys)
    p = sub.add_parser(
        "mock-upstream", help="a mock LLM upstream (OpenAI and Anthropic routes) for trying the gateway"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    from .devtools.mock_upstream import add_arguments as add_mock_arguments

    add_mock_arguments(p)
    p.set_defaults(fn=_mock_upstream)
    p = sub.add_parser("worker", help="persist events from Redis to the store")
    p.add_argument("--burst", action="store_true", help="drain every stream, then exit")
    p.set_defaults(fn=cmd_worker)
    p = sub.add_parser("reconcile", help="drain, then compare every account in Redis with the store")
    p.add_argument("--no-drain", action="store_true", help="compare without draining first")
    p.set_defaults(fn=cmd_reconcile)
    p = sub.add_parser("payments", help="selling credits: payments reconcile")
    psub = p.add_subparsers(dest="payments_command", required=True)
    pr = psub.add_parser(
        "reconcile",
        help="ask the providers about payments still open or paid but not credited, and apply "
        "what they say (the worker also runs this on a schedule)",
    )
    pr.add_argument(
        "--older-than",
        type=duration_seconds,
        default=900.0,
        help="leave younger payments to their webhooks (default 15m)",
    )
    pr.set_defaults(fn=cmd_payments_reconcile)
    p = sub.add_parser("import", help="import another system's data: credit-management")
    isub = p.add_subparsers(dest="import_command", required=True)
    pi = isub.add_parser(
        "credit-management",
        help="import credit-management's MongoDB data (balances, expiring credit, payments, plans, "
        "subscriptions, promo codes and claims) into the gateway as configured; safe to run again",
    )
    pi.add_argument("--mongo-uri", required=True, help="the old package's MongoDB (mongodb://...)")
    pi.add_argument("--db", default="credit_management", help="its database (default credit_management)")
    pi.add_argument("--dry-run", action="store_true", help="write nothing; report what would be imported")
    pi.add_argument(
        "--balance",
        choices=["current", "replay"],
        default="current",
        help="each user's balance: current = the newest transaction's current_credits, what users "
        "were shown (default); replay = the sum of the transactions. The other is reported where they differ",
    )
    pi.add_argument(
        "--credit-uncredited",
        action="store_true",
        help="credit captured payments the old package never credited (default: imported, held, reported)",
    )
    pi.add_argument(
        "--currency", default="INR", help="plan prices' currency, and payments' without one (INR)"
    )
    pi.add_argument(
        "--subscription-provider",
        choices=["razorpay", "stripe", "none"],
        default="razorpay",
        help="the provider a priced plan's renewals are paid through (none: renewed without payment)",
    )
    pi.add_argument("--strict", action="store_true", help="write nothing and exit 3 when a defect is found")
    pi.add_argument("--json", action="store_true", help="the report as JSON (every defect listed)")
    pi.add_argument(
        "--show", type=_at_least_zero, default=20, help="defects shown per kind in the text report (20)"
    )
    pi.set_defaults(fn=cmd_import_credit_management)
    p = sub.add_parser("rehydrate", help="rebuild Redis accounts, grants and open holds from the store")
    p.add_argument("--all", action="store_true", help="every partition, not only those Redis lost")
    p.set_defaults(fn=cmd_rehydrate)
    p = sub.add_parser(
        "schema",
        help="print the durable schema the stores create: SQL DDL (tables, keys, indexes) or "
        "MongoDB's collections with their indexes and $jsonSchema validators (JSON)",
    )
    p.add_argument("--backend", choices=["sql", "mongo"], required=True)
    p.add_argument("--dialect", choices=["postgres", "sqlite"], help="with --backend sql")
    p.set_defaults(fn=cmd_schema)
    args = parser.parse_args(argv)
    configure_logging(_log_format())
    try:
        return args.fn(args)
    except Exception as exc:
        # Through the configured handler: one JSON line (traceback inside) when asked for JSON.
        logging.getLogger("credit.cli").critical("%s stopped: %s", args.command, exc, exc_info=True)
        return 1


def _log_format() -> LogFormat:
    """CREDIT_LOG_FORMAT, read before the other settings (whose errors are then logged in
    the chosen format); a bad value is reported by the command's own load_settings."""
    try:
        return Settings().log_format
    except Exception:
        return "text"


if __name__ == "__main__":
    raise SystemExit(main())
