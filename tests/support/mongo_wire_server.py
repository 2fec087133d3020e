"""Local MongoDB wire-protocol server for tests (mongoeco, SQLite engine).

Run with the interpreter from tests/support/mongo_venv.sh (Python 3.13):

    python mongo_wire_server.py --port N --dir DIR

Prints ``READY <port>`` (flushed) once accepting connections; exits 0 on
SIGTERM/SIGINT. Port 0 picks a free port. Clients connect with
``mongodb://127.0.0.1:<port>/?directConnection=true``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from mongoeco.engines.sqlite import SQLiteEngine
from mongoeco.wire.proxy import AsyncMongoEcoProxyServer


async def serve(host: str, port: int, data_dir: str) -> None:
    os.makedirs(data_dir, exist_ok=True)
    engine = SQLiteEngine(os.path.join(data_dir, "mongoeco.sqlite3"))
    server = AsyncMongoEcoProxyServer(engine=engine, host=host, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    address = await server.start()
    try:
        print(f"READY {address.port}", flush=True)
        await stop.wait()
    finally:
        await server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", required=True, help="directory for the SQLite data file")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
