#!/usr/bin/env bash
# Brings a local Redis Cluster of N primaries up or down on 127.0.0.1 in a few seconds, and
# kills / restarts one node of it (fault tests).
# usage: redis-cluster.sh up|down [DIR] [FIRST_PORT] [N]   (defaults: $TMPDIR/rc 7001 3)
#        redis-cluster.sh kill|start|pause|resume DIR PORT
#   kill:   SIGKILL of that node (no shutdown, no save: a crash).
#   start:  starts it again on the same port with its nodes.conf, so it rejoins the cluster
#           with its slots; without persistence it comes back empty.
#   pause:  SIGSTOP: the node hangs (connections open, no answer); resume: SIGCONT.
# Every node runs with cluster-require-full-coverage no (REDIS_CLUSTER_FULL_COVERAGE=yes
# changes it): a dead primary without a replica then takes down only its own slots.
# Used by tests/conftest.py (the cluster suite) with free ports chosen by the fixture.
set -euo pipefail
CMD=${1:?up|down|kill|start|pause|resume}; BASE=${2:-${TMPDIR:-/tmp}/rc}; P0=${3:-7001}; N=${4:-3}
COVERAGE=${REDIS_CLUSTER_FULL_COVERAGE:-no}
ports() { for ((i=0;i<N;i++)); do echo $((P0+i)); done; }
start_node() {
  local p=$1 d="$BASE/$1"
  redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
    --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --cluster-require-full-coverage "$COVERAGE" \
    --dir "$d" --save '' --appendonly no --daemonize yes \
    --pidfile "$d/redis.pid" --logfile "$d/redis.log"
  until redis-cli -p "$p" ping >/dev/null 2>&1; do sleep 0.05; done
}
case "$CMD" in
up)
  for p in $(ports); do
    d="$BASE/$p"; rm -rf "$d"; mkdir -p "$d"
    start_node "$p"
  done
  redis-cli --cluster create $(for p in $(ports); do printf '127.0.0.1:%s ' "$p"; done) \
    --cluster-replicas 0 --cluster-yes >"$BASE/create.log"
  for p in $(ports); do
    until redis-cli -p "$p" cluster info | grep -q 'cluster_state:ok'; do sleep 0.05; done
  done
  echo "cluster up: $(redis-cli -p "$P0" cluster info | grep -E 'cluster_(state|slots_assigned|known_nodes)' | tr -d '\r' | tr '\n' ' ')"
  ;;
kill)
  f="$BASE/$P0/redis.pid"; pid=$(cat "$f")
  kill -KILL "$pid"
  # Gone, or a zombie (a daemonized node is not our child; its reaper may be slow).
  while kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" | cut -c1)" != Z ]; do sleep 0.02; done
  rm -f "$f"
  echo "killed $P0 (pid $pid)"
  ;;
start)
  start_node "$P0"
  echo "started $P0"
  ;;
pause) kill -STOP "$(cat "$BASE/$P0/redis.pid")"; echo "paused $P0" ;;
resume) kill -CONT "$(cat "$BASE/$P0/redis.pid")"; echo "resumed $P0" ;;
down)
  pids=()
  for p in $(ports); do
    f="$BASE/$p/redis.pid"; [ -f "$f" ] || continue
    pids+=("$(cat "$f")")
    redis-cli -p "$p" shutdown nosave now >/dev/null 2>&1 || kill "$(cat "$f")" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done; done
  echo "cluster down"
  ;;
*) echo "unknown command $CMD" >&2; exit 2 ;;
esac
