"""The Redis Cluster client of the gateway: a dead node costs only its own slots, fast.

redis-py's asyncio RedisCluster, left to its defaults, turns one dead primary into an
outage of the whole cluster client:
- a call on the dead node's slots is retried 10 times, each time re-reading the topology
  (CLUSTER SLOTS) under a lock that every other call, on every node, waits for first;
- each re-read marks every connection to every node for reconnection;
- a CLUSTERDOWN answer (a restarted primary gives it for its first seconds) closes every
  connection of every node, including those other calls are using at that moment; on
  Python 3.11 the write of such a call runs in its own task (asyncio.wait_for), which then
  finds the connection gone: AttributeError: 'NoneType' object has no attribute
  'writelines', an error no caller expects.

`GatewayRedisCluster` keeps redis-py's routing, connections, MOVED handling and commands,
and changes what a failure does:
- One retry, on a new connection, of a call whose connection broke (a node that died, or
  closed its idle clients); a timeout is not retried. Every connection to a node that
  failed a call is marked to reconnect before its next use (lazily, never under a call
  using it), so a dead socket fails no further call.
- Per node health. A call that failed on a new connection too, or a second timeout in a
  row, takes its node out: calls routed to it fail at once with NodeDown for
  PROBE_INTERVAL seconds; then a single call goes through as a probe (the others keep
  failing at once) and its outcome brings the node back or keeps it out. Calls on the
  other nodes never wait for a down node.
- No blocking topology re-read. A failure schedules one in the background (at most one
  per REFRESH_INTERVAL): it asks a live node for CLUSTER SLOTS and rebuilds redis-py's
  slot map only if a slot's primary changed (a replica promoted), so an unchanged
  topology costs no reconnection.
- Every way the cluster can fail a call reaches the caller as a redis-py ConnectionError
  (ClusterUnavailable; NodeDown is one): what the API answers as 503
  credit_store_unavailable. That includes CLUSTERDOWN, a slot no node serves, redirections
  that never settle, a topology that cannot be read, and redis-py's internal
  AttributeError / TypeError from a connection closed under a call.

The socket timeouts are the gateway's CREDIT_REDIS_TIMEOUT_SECONDS (make_redis): a node
that accepts connections but stops answering fails its calls after that long, and, its
node then down, the calls after them at once.

Relies on redis-py 8's asyncio cluster internals (ClusterNode.execute_command, the
NodesManager slot map, connections' mark_for_reconnect): pyproject pins redis < 9, and
tests/test_cluster_faults.py exercises every path against a real cluster.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable, Mapping
from typing import Any

from redis.asyncio.cluster import AbstractStrategy, ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.cluster import get_node_name
from redis.event import EventDispatcherInterface
from redis.exceptions import (
    AskError,
    ClusterError,
    ConnectionError,
    MaxConnectionsError,
    MovedError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)
from redis.typing import EncodableT
from redis.utils import str_if_bytes

log = logging.getLogger("credit.redis.cluster")

FAILURES_TO_OPEN = 2
"""Consecutive failures that take a node out: two timeouts, or one call that failed on a
broken connection and again on a new one."""
PROBE_INTERVAL = 0.5
"""Seconds a down node's calls fail at once before one call probes it again."""
REFRESH_INTERVAL = 1.0
"""Least seconds between two background topology re-reads."""


class ClusterUnavailable(ConnectionError):
    """The cluster could not run this call (a node down, CLUSTERDOWN, a slot not served,
    a redis-py internal failure). A redis ConnectionError, so callers treat it as one."""


class NodeDown(ClusterUnavailable):
    """The call's node failed recently; it is probed again shortly."""


class _NodeHealth:
    """Circuit state of one node: closed (calls go), open (calls fail at once), or
    half-open (one probe call in flight, the others fail at once)."""

    __slots__ = ("failures", "last_error", "open_until", "probing")

    def __init__(self) -> None:
        self.failures = 0
        self.open_until = 0.0  # 0: closed
        self.probing = False
        self.last_error = ""

    def admit(self, name: str, now: float) -> bool:
        """True when this call is the probe; raises NodeDown when the node is out."""
        if not self.open_until:
            return False
        if now < self.open_until or self.probing:
            raise NodeDown(f"Redis node {name} is down ({self.last_error}); probing it again shortly")
        self.probing = True
        return True

    def succeeded(self) -> None:
        self.failures = 0
        self.open_until = 0.0
        self.probing = False

    def failed(self, probe: bool, now: float, error: BaseException, weight: int) -> None:
        self.failures += weight
        self.last_error = f"{type(error).__name__}: {error}"
        if probe:
            self.probing = False
        if probe or self.open_until or self.failures >= FAILURES_TO_OPEN:
            self.open_until = now + PROBE_INTERVAL

    def abandoned(self, probe: bool) -> None:
        """The call ended without telling anything about the node (cancelled, client-side)."""
        if probe:
            self.probing = False


class GatewayRedisCluster(RedisCluster):
    """RedisCluster with fail-fast node health, background topology refresh, and every
    cluster failure raised as a ConnectionError (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No cluster-level retries (each re-reads the topology, and others wait for that):
        # _execute_command retries a broken connection once by itself.
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        # MOVED patches the slot map; never "close every connection and re-read" on it.
        kwargs.setdefault("reinitialize_steps", 0)
        # Slots no node serves fail their own calls (ClusterUnavailable), not the client.
        kwargs.setdefault("require_full_coverage", False)
        super().__init__(*args, **kwargs)
        self._health: dict[str, _NodeHealth] = {}
        self._refresh_task: asyncio.Task | None = None
        self._last_refresh = 0.0
        self._last_internal_log = 0.0

    # -- calls -------------------------------------------------------------------------

    async def initialize(self, *args: Any, **kwargs: Any) -> GatewayRedisCluster:
        try:
            await super().initialize(*args, **kwargs)  # returns self, annotated as the base
        except (ConnectionError, TimeoutError):
            raise
        except RedisClusterException as exc:  # no node reachable, or slots not covered
            raise ClusterUnavailable(f"the Redis Cluster topology could not be read: {exc}") from exc
        return self

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (ConnectionError, TimeoutError):
            raise
        except (ClusterError, SlotNotCoveredError) as exc:  # CLUSTERDOWN, TTL exhausted, slot not covered
            self._refresh_soon()
            raise ClusterUnavailable(f"Redis Cluster could not serve {_name(args)}: {exc}") from exc
        except (AttributeError, TypeError) as exc:
            raise self._internal_failure(args, exc) from exc

    def _health_of(self, node: ClusterNode) -> _NodeHealth:
        health = self._health.get(node.name)
        if health is None:
            health = self._health[node.name] = _NodeHealth()
        return health

    async def _execute_command(self, target_node: ClusterNode, *args: Any, **kwargs: Any) -> Any:
        health = self._health_of(target_node)
        probe = health.admit(target_node.name, time.monotonic())
        retried = False
        while True:
            try:
                try:
                    response = await target_node.execute_command(*args, **kwargs)
                except (MovedError, AskError, TryAgainError):
                    # Not executed: redis-py follows the redirection (and patches its slot map).
                    response = await super()._execute_command(target_node, *args, **kwargs)
            except MaxConnectionsError:  # this process's pool is full: says nothing about the node
                health.abandoned(probe)
                raise
            except TimeoutError as exc:  # not retried: it already took the whole timeout
                self._node_failed(target_node, health, probe, exc, weight=1)
                raise
            except ConnectionError as exc:
                if type(exc) is ConnectionError and not retried:
                    # A connection that broke (a dead node, or one closed while idle): once
                    # more on a new connection, which tells the two apart. (redis-py retries
                    # these too; the engine's scripts are idempotent by operation id.)
                    retried = True
                    self._reconnect_all(target_node)
                    continue
                # A new connection failed as well (or the node is loading, or refused us).
                self._node_failed(target_node, health, probe, exc, weight=FAILURES_TO_OPEN)
                raise
            except ResponseError as exc:  # the node answered
                health.succeeded()
                if isinstance(exc, ClusterError):  # CLUSTERDOWN: its view of the cluster may be news
                    self._refresh_soon()
                raise
            except (AttributeError, TypeError) as exc:
                health.abandoned(probe)
                self._reconnect_all(target_node)
                raise self._internal_failure(args, exc) from exc
            except BaseException:
                health.abandoned(probe)
                raise
            health.succeeded()
            return response

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> GatewayClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return GatewayClusterPipeline(self, transaction)

    # redis-py declares this method sync in ClusterMultiKeyCommands and async (a coroutine)
    # in AsyncClusterMultiKeyCommands, which RedisCluster uses: the base annotation is wrong.
    async def _execute_pipeline_by_slot(  # type: ignore[override]
        self, command: str, slots_to_args: Mapping[int, Iterable[EncodableT]]
    ) -> list[Any]:
        # Multi-key commands (EXISTS, DELETE, MGET, MSET...) go per slot through a pipeline.
        try:
            return await super()._execute_pipeline_by_slot(command, slots_to_args)
        except SlotNotCoveredError as exc:
            self._refresh_soon()
            raise ClusterUnavailable(f"Redis Cluster could not serve {command}: {exc}") from exc

    @staticmethod
    def _reconnect_all(node: ClusterNode) -> None:
        """Marks every connection to `node` to reconnect before its next use: after one
        broke, the others most likely did too (the node died, or closed its idle clients).
        Lazily, never under a call using one (closing those is what breaks redis-py)."""
        node.update_active_connections_for_reconnect()
        for conn in tuple(node._free):
            conn.mark_for_reconnect()

    def _node_failed(
        self, node: ClusterNode, health: _NodeHealth, probe: bool, exc: BaseException, *, weight: int
    ) -> None:
        health.failed(probe, time.monotonic(), exc, weight)
        self._reconnect_all(node)
        if health.open_until:
            self._default_node_up()
        # redis-py's own handling (of a redirection that failed) asks for a blocking re-read
        # that every call would wait for: the background one does instead. (Not after a
        # close: that one dropped the default node, and only a re-read restores it.)
        if self.nodes_manager.default_node is not None:
            self._initialize = False
        self._refresh_soon()

    def _internal_failure(self, args: tuple, exc: BaseException) -> ClusterUnavailable:
        now = time.monotonic()
        if now - self._last_internal_log > 10:
            self._last_internal_log = now
            log.warning(
                "redis-py failed inside a cluster call (%s: %s); answered as a connection error",
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
        self._refresh_soon()
        return ClusterUnavailable(f"Redis Cluster call {_name(args)} failed: {type(exc).__name__}: {exc}")

    def _is_up(self, node: ClusterNode, now: float) -> bool:
        health = self._health.get(node.name)
        return health is None or not health.open_until or health.open_until <= now

    def _default_node_up(self) -> None:
        """Keyless commands (PING: the readiness check) go to the default node: never a
        down one while a primary is up."""
        default = self.nodes_manager.default_node
        now = time.monotonic()
        if default is None or self._is_up(default, now):
            return
        up = [n for n in self.get_primaries() if n.name != default.name and self._is_up(n, now)]
        if up:
            self.nodes_manager.default_node = random.choice(up)

    # -- topology ----------------------------------------------------------------------

    def _refresh_soon(self) -> None:
        if self._refresh_task is not None and not self._refresh_task.done():
            return
        delay = max(0.0, self._last_refresh + REFRESH_INTERVAL - time.monotonic())
        self._refresh_task = asyncio.get_running_loop().create_task(
            self._refresh(delay), name="redis-cluster-refresh"
        )

    async def _refresh(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        self._last_refresh = time.monotonic()
        try:
            if await self._topology_changed():
                log.info("Redis Cluster topology changed; re-reading it")
                await self.nodes_manager.initialize()
                self._default_node_up()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next failure schedules another attempt
            log.info("Redis Cluster topology re-read failed: %s: %s", type(exc).__name__, exc)

    async def _topology_changed(self) -> bool:
        """Asks a node that is up for CLUSTER SLOTS; True when a slot's primary differs
        from redis-py's slot map (or coverage changed)."""
        now = time.monotonic()
        nodes = [n for n in self.nodes_manager.nodes_cache.values() if self._is_up(n, now)]
        random.shuffle(nodes)
        last: BaseException | None = None
        for node in nodes:
            try:
                slots = await node.execute_command("CLUSTER SLOTS")
            except (ConnectionError, TimeoutError, ResponseError) as exc:
                last = exc
                continue
            cache = self.nodes_manager.slots_cache
            covered = 0
            for entry in slots:
                start, end, primary = int(entry[0]), int(entry[1]), entry[2]
                host = str_if_bytes(primary[0]) or node.host
                host, port = self.nodes_manager.remap_host_port(host, int(primary[1]))
                name = get_node_name(host, port)
                for slot in range(start, end + 1):  # every slot: MOVED patches single ones
                    owners = cache.get(slot)
                    if not owners or owners[0].name != name:
                        return True
                covered += end - start + 1
            return covered != len(cache)
        raise ClusterUnavailable(f"no Redis Cluster node answered CLUSTER SLOTS: {last}")

    async def aclose(self) -> None:
        task, self._refresh_task = self._refresh_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await super().aclose()


class GatewayClusterPipeline(ClusterPipeline):
    """redis-py's cluster pipeline, its cluster failures raised as ClusterUnavailable.

    With the client's zero retries it never closes every connection on a failure. A
    pipeline whose commands all name one node (what a single-key EXISTS, DELETE or MGET
    becomes) goes by that node's health like a call: refused at once while the node is
    down. Other pipelines span nodes and fail as their connection attempts do."""

    cluster_client: GatewayRedisCluster
    # Declared (not set) by redis-py's CommandsProtocol; its ClusterPipeline never sets it.
    _event_dispatcher: EventDispatcherInterface

    def __init__(self, client: GatewayRedisCluster, transaction: bool | None = None) -> None:
        super().__init__(client, transaction)
        self._event_dispatcher = client._event_dispatcher

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        node = self._single_node()
        health: _NodeHealth | None = None
        probe = False  # a pipeline of several nodes is never a probe
        if node is not None:
            health = client._health_of(node)
            probe = health.admit(node.name, time.monotonic())
        try:
            result = await super().execute(raise_on_error, allow_redirections)
        except (ConnectionError, TimeoutError) as exc:
            if node is not None and health is not None and not isinstance(exc, MaxConnectionsError):
                client._node_failed(node, health, probe, exc, weight=1)
            else:
                client._refresh_soon()
            raise
        except ResponseError as exc:
            if health is not None:
                health.succeeded()
            if not isinstance(exc, ClusterError):
                raise
            client._refresh_soon()
            raise ClusterUnavailable(f"Redis Cluster could not run a pipeline: {exc}") from exc
        except (ClusterError, SlotNotCoveredError) as exc:  # TTL exhausted, slot not covered
            if health is not None:
                health.abandoned(probe)
            client._refresh_soon()
            raise ClusterUnavailable(f"Redis Cluster could not run a pipeline: {exc}") from exc
        except (AttributeError, TypeError) as exc:
            if health is not None:
                health.abandoned(probe)
            raise client._internal_failure(("pipeline",), exc) from exc
        except BaseException:
            if health is not None:
                health.abandoned(probe)
            raise
        if health is not None:
            health.succeeded()
        return result

    def _single_node(self) -> ClusterNode | None:
        """The node every queued command names (target_nodes), if there is one."""
        strategy = self._execution_strategy
        if not isinstance(strategy, AbstractStrategy):  # a strategy whose queue we cannot read
            return None
        names: dict[str, ClusterNode] = {}
        for cmd in strategy._command_queue:
            targets = cmd.kwargs.get("target_nodes")
            if not isinstance(targets, list) or len(targets) != 1 or not isinstance(targets[0], ClusterNode):
                return None
            names[targets[0].name] = targets[0]
        return next(iter(names.values())) if len(names) == 1 else None


def _name(args: tuple) -> str:
    return str(args[0]) if args else "command"
