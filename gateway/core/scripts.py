"""The one registry of Lua scripts: read from package data once, called by name.

Each script is `lua/<name>.lua`; a line `--@include <lib>` inlines `lua/includes/<lib>.lua`.
Calls go out as EVALSHA; a server that does not know the script yet (NOSCRIPT: a restart, a
new cluster node) gets one EVAL, which also caches it there.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from redis.exceptions import NoScriptError

_INCLUDE = re.compile(r"^--@include (\w+)\s*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str


def _load_sources() -> dict[str, Script]:
    root = resources.files("gateway.lua")
    includes = {
        f.name[:-4]: f.read_text() for f in root.joinpath("includes").iterdir() if f.name.endswith(".lua")
    }
    scripts = {}
    for f in root.iterdir():
        if not f.name.endswith(".lua"):
            continue
        body = _INCLUDE.sub(lambda m: includes[m.group(1)], f.read_text())
        name = f.name[:-4]
        scripts[name] = Script(name, body, hashlib.sha1(body.encode()).hexdigest())
    return scripts


class ScriptRegistry:
    """Holds every script; `call` runs one on any redis-py async client (plain or cluster)."""

    def __init__(self) -> None:
        self.scripts = _load_sources()

    def __getitem__(self, name: str) -> Script:
        return self.scripts[name]

    async def call(self, redis: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        s = self.scripts[name]
        try:
            return await redis.evalsha(s.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await redis.eval(s.source, len(keys), *keys, *args)

    async def call_json(self, redis: Any, name: str, keys: list[str], args: list[Any]) -> tuple[str, dict]:
        """Runs a script that answers {code, JSON} and decodes it."""
        code, payload = await self.call(redis, name, keys, args)
        return decode_reply(code, payload)


def decode_reply(code: Any, payload: Any) -> tuple[str, dict]:
    if isinstance(code, bytes):
        code = code.decode()
    data = orjson.loads(payload) if payload else {}
    # Lua's cjson writes an empty table as [] (fakeredis) or {} (Redis): treat both as {}.
    return code, (data if isinstance(data, dict) else {})
