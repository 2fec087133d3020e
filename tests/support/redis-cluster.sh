#!/usr/bin/env bash
# Brings a local Redis Cluster of N primaries up or down on 127.0.0.1 in a few seconds.
# usage: redis-cluster.sh up|down [DIR] [FIRST_PORT] [N]   (defaults: $TMPDIR/rc 7001 3)
# Used by tests/conftest.py (the cluster suite) with free ports chosen by the fixture.
set -euo pipefail
CMD=${1:?up|down}; BASE=${2:-${TMPDIR:-/tmp}/rc}; P0=${3:-7001}; N=${4:-3}
ports() { for ((i=0;i<N;i++)); do echo $((P0+i)); done; }
if [ "$CMD" = up ]; then
  for p in $(ports); do
    d="$BASE/$p"; rm -rf "$d"; mkdir -p "$d"
    redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
      --dir "$d" --save '' --appendonly no --daemonize yes \
      --pidfile "$d/redis.pid" --logfile "$d/redis.log"
  done
  for p in $(ports); do until redis-cli -p "$p" ping >/dev/null 2>&1; do sleep 0.05; done; done
  redis-cli --cluster create $(for p in $(ports); do printf '127.0.0.1:%s ' "$p"; done) \
    --cluster-replicas 0 --cluster-yes >"$BASE/create.log"
  for p in $(ports); do
    until redis-cli -p "$p" cluster info | grep -q 'cluster_state:ok'; do sleep 0.05; done
  done
  echo "cluster up: $(redis-cli -p "$P0" cluster info | grep -E 'cluster_(state|slots_assigned|known_nodes)' | tr -d '\r' | tr '\n' ' ')"
else
  pids=()
  for p in $(ports); do
    f="$BASE/$p/redis.pid"; [ -f "$f" ] || continue
    pids+=("$(cat "$f")")
    redis-cli -p "$p" shutdown nosave now >/dev/null 2>&1 || kill "$(cat "$f")" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done; done
  echo "cluster down"
fi
