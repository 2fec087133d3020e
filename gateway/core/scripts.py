"""The one registry of Lua scripts: read from package data once, called by name.

Each script is `lua/<name>.lua`; a line `--@include <lib>` inlines `lua/includes/<lib>.lua`,
and a line `--@keys <count>` declares how many KEYS the script takes: `N` exactly, `N-M`
from N to M, `N+` at least N. A call with another number of keys is refused before it
reaches Redis: a missing key would read as nil inside the script and fail far from the
cause, or touch the wrong key. Calls go out as EVALSHA; a server that does not know the
script yet (NOSCRIPT: a restart, a new cluster node) gets one EVAL, which also caches it there.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from typing import Any, Protocol

import orjson
from redis.exceptions import NoScriptError

_INCLUDE = re.compile(r"^--@include (\w+)\s*$", re.MULTILINE)
_KEYS = re.compile(r"^--@keys (\d+)(?:(\+)|-(\d+))?\s*$", re.MULTILINE)


class ScriptError(Exception):
    """A script that cannot be loaded (a bad header) or a call that does not fit it."""


class ScriptClient(Protocol):
    """What running a script needs of a client: redis-py's async Redis and RedisCluster,
    and the multiplexed client (gateway/core/multiplex.py)."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Awaitable[Any]: ...

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Awaitable[Any]: ...


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str
    min_keys: int
    max_keys: int | None  # None: no upper bound

    def check_keys(self, keys: list[str]) -> None:
        """Raises ScriptError unless the script takes `len(keys)` keys."""
        n = len(keys)
        if n < self.min_keys or (self.max_keys is not None and n > self.max_keys):
            raise ScriptError(f"script {self.name!r} takes {self.keys_declared()} keys, got {n}")

    def keys_declared(self) -> str:
        if self.max_keys is None:
            return f"at least {self.min_keys}"
        if self.max_keys == self.min_keys:
            return str(self.min_keys)
        return f"{self.min_keys} to {self.max_keys}"


def _key_count(name: str, text: str) -> tuple[int, int | None]:
    found = _KEYS.findall(text)
    if len(found) != 1:
        raise ScriptError(f"script {name!r} must declare its keys in one '--@keys N' line (N, N-M or N+)")
    low, plus, high = found[0]
    if plus:
        return int(low), None
    if high and int(high) < int(low):
        raise ScriptError(f"script {name!r}: '--@keys {low}-{high}' is an empty range")
    return int(low), int(high or low)


def _load_sources(root: Traversable) -> dict[str, Script]:
    includes = {
        f.name[:-4]: f.read_text() for f in root.joinpath("includes").iterdir() if f.name.endswith(".lua")
    }
    scripts = {}
    for f in root.iterdir():
        if not f.name.endswith(".lua"):
            continue
        name = f.name[:-4]
        text = f.read_text()

        def inline(m: re.Match[str], name: str = name) -> str:
            lib = m.group(1)
            if lib not in includes:
                raise ScriptError(f"script {name!r} includes {lib!r}: there is no includes/{lib}.lua")
            return includes[lib]

        low, high = _key_count(name, text)
        body = _INCLUDE.sub(inline, text)
        scripts[name] = Script(name, body, hashlib.sha1(body.encode()).hexdigest(), low, high)
    return scripts


class ScriptRegistry:
    """Holds every script; `call` runs one on any redis-py async client (plain or cluster).
    `root`: the folder of the scripts (default: the package's gateway.lua)."""

    def __init__(self, root: Traversable | None = None) -> None:
        self.scripts = _load_sources(root if root is not None else resources.files("gateway.lua"))

    def __getitem__(self, name: str) -> Script:
        try:
            return self.scripts[name]
        except KeyError:
            raise ScriptError(f"no script {name!r}") from None

    async def call(self, redis: ScriptClient, name: str, keys: list[str], args: list[Any]) -> Any:
        s = self[name]
        s.check_keys(keys)
        try:
            return await redis.evalsha(s.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await redis.eval(s.source, len(keys), *keys, *args)

    async def call_json(
        self, redis: ScriptClient, name: str, keys: list[str], args: list[Any]
    ) -> tuple[str, dict]:
        """Runs a script that answers {code, JSON} and decodes it."""
        code, payload = await self.call(redis, name, keys, args)
        return decode_reply(code, payload)


def decode_reply(code: Any, payload: Any) -> tuple[str, dict]:
    """A script's {code, JSON} answer as (code, dict)."""
    if isinstance(code, bytes):
        code = code.decode()
    data = orjson.loads(payload) if payload else {}
    # Lua's cjson writes an empty table as [] (fakeredis) or {} (Redis): treat both as {}.
    return code, (data if isinstance(data, dict) else {})
