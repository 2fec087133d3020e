"""Every Redis key name is built here and nowhere else.

All keys one script touches share one hash tag, the account's partition
(`crc32(user) % partitions`), so the same scripts run on a single Redis and on a Cluster.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

# The one rule for every id (user, hold, operation), wherever it appears: a JSON field, a
# header, a URL path segment. Ids become parts of key names and event ids: no separators
# ('|'), no hash-tag braces, no whitespace; no '/', which could not be one path segment
# (a hold "a/b" could never be settled by URL); '!' is kept for the system's own operation
# ids (expiry). `ID_PATTERN.pattern` is what the API's schemas and path parameters use.
# Not starting with a dot: "." and ".." are path segments that clients normalise away.
ID_CHARS = "letters, digits and _.:@+=~-, not starting with a dot"
MAX_ID_LENGTH = 128
ID_PATTERN = re.compile(r"^[A-Za-z0-9_:@+=~-][A-Za-z0-9_.:@+=~-]{0,127}$")

# Holds the gateway places itself while it meters a call: the proxy's (its request ids,
# `req_<hex>`) and library mode's (`lib-<hex>`). Only the metering that placed such a hold
# resolves it: the holds API neither creates nor settles nor releases ids beginning so, or
# a caller (a user with its own key) could release a call's hold and stream for free.
PROXY_HOLD_PREFIX = "req_"
LIBRARY_HOLD_PREFIX = "lib-"
METERED_HOLD_PREFIXES = (PROXY_HOLD_PREFIX, LIBRARY_HOLD_PREFIX)


def is_metered_hold(hold_id: str) -> bool:
    return hold_id.startswith(METERED_HOLD_PREFIXES)


class InvalidId(ValueError):
    """A user, hold or operation id that cannot be used in a key."""


def check_id(kind: str, value: str) -> str:
    # fullmatch: re's '$' would also match before a trailing newline.
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidId(f"{kind} must be 1-128 characters of {ID_CHARS} (got {value!r:.60})")
    return value


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    """The keys shared by all accounts of one partition."""

    tag: str
    events: str
    ready: str
    hold_expiry: str
    grant_expiry: str
    users: str
    dead: str
    rebuild: str  # the lease of the process rebuilding the partition (recovery.py)


class KeySpace:
    """Key names for one deployment (prefix + fixed partition count)."""

    def __init__(self, prefix: str = "cg", partitions: int = 64) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.prefix = prefix
        self.partitions = partitions
        self._parts = [self._make_partition(p) for p in range(partitions)]

    def _make_partition(self, p: int) -> PartitionKeys:
        t = f"{self.prefix}:{{p{p}}}"
        return PartitionKeys(
            tag=t,
            events=f"{t}:events",
            ready=f"{t}:ready",
            hold_expiry=f"{t}:hexp",
            grant_expiry=f"{t}:gexp",
            users=f"{t}:users",
            dead=f"{t}:dead",
            rebuild=f"{t}:rebuild",
        )

    def partition_of(self, user: str) -> int:
        return zlib.crc32(user.encode()) % self.partitions

    def partition(self, p: int) -> PartitionKeys:
        return self._parts[p]

    def all_partitions(self) -> list[PartitionKeys]:
        return list(self._parts)

    def account_keys(self, user: str, op_id: str = "", hold_id: str = "") -> list[str]:
        """KEYS[1..9] of every account script (see the header of lua/reserve.lua)."""
        pk = self._parts[self.partition_of(user)]
        t = pk.tag
        return [
            f"{t}:acct:{user}",
            f"{t}:gord:{user}",
            pk.events,
            pk.ready,
            f"{t}:op:{user}|{op_id}",
            f"{t}:hold:{user}|{hold_id}",
            pk.hold_expiry,
            pk.grant_expiry,
            pk.users,
        ]

    def hold_keys(self, user: str, op_id: str, hold_id: str) -> list[str]:
        """KEYS[1..11] of reserve / settle / release: account_keys + rate_keys, built at once."""
        pk = self._parts[self.partition_of(user)]
        t = pk.tag
        return [
            f"{t}:acct:{user}",
            f"{t}:gord:{user}",
            pk.events,
            pk.ready,
            f"{t}:op:{user}|{op_id}",
            f"{t}:hold:{user}|{hold_id}",
            pk.hold_expiry,
            pk.grant_expiry,
            pk.users,
            f"{t}:lim:{user}",
            f"{t}:rl:{user}",
        ]

    def rate_keys(self, user: str) -> list[str]:
        """KEYS[10..11] of reserve / settle / release: the account's rate-limit overrides
        (durable: the store keeps them too) and its rate state (ephemeral, expires)."""
        t = self._parts[self.partition_of(user)].tag
        return [f"{t}:lim:{user}", f"{t}:rl:{user}"]

    def api_key_partition(self, digest: str) -> int:
        """API keys are spread over the partitions by their digest (found without a user)."""
        return zlib.crc32(digest.encode()) % self.partitions

    def api_key(self, digest: str) -> str:
        return f"{self._parts[self.api_key_partition(digest)].tag}:apikey:{digest}"

    def hold_key(self, user: str, hold_id: str) -> str:
        return f"{self._parts[self.partition_of(user)].tag}:hold:{user}|{hold_id}"

    def op_key(self, user: str, op_id: str) -> str:
        return f"{self._parts[self.partition_of(user)].tag}:op:{user}|{op_id}"
