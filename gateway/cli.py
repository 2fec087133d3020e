"""`credit-gateway serve | worker | reconcile | rehydrate`: a thin shell over the runners."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import secrets
import sys


from .core.settings import load_settings


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app

    settings = load_settings()
    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    if not settings.admin_keys:
        if settings.embedded:
            # Never open admin routes: make a key for this run and show it once.
            key = secrets.token_urlsafe(32)
            settings.admin_keys = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
            print(f"No CREDIT_ADMIN_KEYS set: generated an admin key for this run (shown once):\n  {key}", flush=True)
        else:
            print("No CREDIT_ADMIN_KEYS set: the admin API refuses every request.", file=sys.stderr, flush=True)
    if settings.embedded:
        print(
            "Embedded mode (no CREDIT_REDIS_URL): in-process Redis and the worker run in this process; "
            f"the durable record is SQLite at {settings.sqlite_path}.",
            flush=True,
        )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.service import run_worker

    asyncio.run(run_worker(load_settings(), burst=args.burst))
    return 0


async def _with_engine(fn):
    from .core.connections import make_engine, make_redis, make_store

    settings = load_settings()
    if settings.embedded:
        raise SystemExit("this command needs CREDIT_REDIS_URL (embedded mode keeps Redis inside the serve process)")
    redis, store = make_redis(settings), make_store(settings)
    await store.open()
    try:
        return await fn(settings, make_engine(settings, redis), store)
    finally:
        await store.close()
        await redis.aclose()


def cmd_rehydrate(args: argparse.Namespace) -> int:
    from .core.recovery import rehydrate

    async def run(settings, engine, store):
        parts = None if args.all else await engine.missing_partitions()
        if parts == []:
            print("every partition is ready; nothing to rebuild (use --all to rebuild anyway)")
            return 0
        report = await rehydrate(engine, store, parts)
        print(f"rebuilt {report.accounts} accounts ({report.skipped} already current), "
              f"{report.operations} operation ids, {report.partitions} partitions")
        return 0

    return asyncio.run(_with_engine(run))


def cmd_reconcile(args: argparse.Namespace) -> int:
    from worker.service import build_worker

    from .core.recovery import reconcile

    async def run(settings, engine, store):
        if not args.no_drain:
            worker = build_worker(settings, engine, store)
            await worker.run(burst=True)
            if worker.audit:
                worker.audit.close()
        drift = await reconcile(engine, store)
        for d in drift:
            print(f"DRIFT {d}")
        print(f"reconcile: {len(drift)} drift(s)")
        return 1 if drift else 0

    return asyncio.run(_with_engine(run))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="credit-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the HTTP gateway (embedded mode without CREDIT_REDIS_URL)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--log-level", default="info")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("worker", help="persist events from Redis to the store")
    p.add_argument("--burst", action="store_true", help="drain every stream, then exit")
    p.set_defaults(fn=cmd_worker)
    p = sub.add_parser("reconcile", help="drain, then compare every account in Redis with the store")
    p.add_argument("--no-drain", action="store_true", help="compare without draining first")
    p.set_defaults(fn=cmd_reconcile)
    p = sub.add_parser("rehydrate", help="rebuild Redis accounts, grants and open holds from the store")
    p.add_argument("--all", action="store_true", help="every partition, not only those Redis lost")
    p.set_defaults(fn=cmd_rehydrate)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
