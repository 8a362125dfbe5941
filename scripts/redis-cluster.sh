#!/usr/bin/env bash
# A Redis Cluster on loopback — three primaries with a replica each — for
# trying the read model on a cluster by hand and for the cluster benchmarks
# (the tests start clusters of their own: tests/src/services.rs). Debian's
# redis-server and redis-cli (installed if missing); nothing is persisted but
# each node's nodes.conf.
#
#   scripts/redis-cluster.sh up       # start nodes 0..5 (ports 7301-7306) and form the cluster
#   scripts/redis-cluster.sh down     # stop them (their nodes.conf is kept)
#   scripts/redis-cluster.sh kill N   # SIGKILL node N (0-5): its replica takes over in ~2 s
#   scripts/redis-cluster.sh start N  # start node N again: it rejoins (as a replica)
#   scripts/redis-cluster.sh status   # the cluster's nodes and state
#   scripts/redis-cluster.sh clean    # stop them and delete their folders
#
# Then: NEURECTOMY_REDIS_CLUSTER=true
#       NEURECTOMY_REDIS_URL=redis://127.0.0.1:7301,redis://127.0.0.1:7302,redis://127.0.0.1:7303
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${REDIS_CLUSTER_DIR:-$ROOT/.run/redis-cluster}"
BASE_PORT="${REDIS_CLUSTER_PORT:-7301}"
NODES=6
NODE_TIMEOUT_MS="${REDIS_CLUSTER_NODE_TIMEOUT_MS:-1000}"

log() { printf '[redis-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# sudo_if_needed, apt_install, stop_pid_file
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

port() { echo $((BASE_PORT + $1)); }
pid_file() { echo "$DIR/$1/pid"; }
cli() { redis-cli -h 127.0.0.1 "$@"; }

answers() { # node
  [ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$(port "$1")" ping 2>/dev/null)" = PONG ]
}

start() { # node
  local n="$1"
  answers "$n" && { log "node $n is up on 127.0.0.1:$(port "$n")"; return; }
  command -v redis-server >/dev/null || apt_install redis-server
  command -v redis-cli >/dev/null || apt_install redis-tools
  mkdir -p "$DIR/$n"
  redis-server --bind 127.0.0.1 --port "$(port "$n")" --cluster-enabled yes \
    --cluster-config-file nodes.conf --cluster-node-timeout "$NODE_TIMEOUT_MS" \
    --save "" --appendonly no --daemonize no --dir "$DIR/$n" >>"$DIR/$n/output.log" 2>&1 &
  echo $! >"$(pid_file "$n")"
  for _ in $(seq 1 100); do
    answers "$n" && { log "node $n is up on 127.0.0.1:$(port "$n") (log: $DIR/$n/output.log)"; return; }
    sleep 0.1
  done
  die "node $n did not answer within 10 s; see $DIR/$n/output.log"
}

stop() { # node, signal
  local n="$1"
  stop_pid_file "$(pid_file "$n")" "$2" "node $n"
}

live_node() {
  for n in $(seq 0 $((NODES - 1))); do answers "$n" && { echo "$n"; return; }; done
  return 1
}

formed() {
  local n
  n="$(live_node)" || return 1
  cli -p "$(port "$n")" cluster info 2>/dev/null | grep -q 'cluster_state:ok'
}

# Every replica attached and replicating: until then a killed primary has
# nothing to fail over to.
replicated() {
  local n linked=0
  for n in $(seq 0 $((NODES - 1))); do
    cli -p "$(port "$n")" info replication 2>/dev/null | grep -q 'master_link_status:up' && linked=$((linked + 1))
  done
  [ "$linked" -ge $((NODES / 2)) ]
}

form() {
  if formed; then
    log "the cluster is formed"
    return
  fi
  local nodes=()
  for n in $(seq 0 $((NODES - 1))); do nodes+=("127.0.0.1:$(port "$n")"); done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >>"$DIR/create.log" 2>&1 \
    || die "redis-cli --cluster create failed; see $DIR/create.log"
  for _ in $(seq 1 150); do
    formed && replicated && { log "the cluster is formed: 3 primaries, 3 replicas replicating (node timeout ${NODE_TIMEOUT_MS} ms)"; return; }
    sleep 0.2
  done
  die "the cluster did not reach cluster_state:ok with its replicas replicating within 30 s"
}

node_arg() {
  [[ "${1:-}" =~ ^[0-5]$ ]] || die "name a node: 0 to 5"
  echo "$1"
}

case "${1:-up}" in
  up)
    for n in $(seq 0 $((NODES - 1))); do start "$n"; done
    form ;;
  down) for n in $(seq 0 $((NODES - 1))); do stop "$n" TERM; done ;;
  kill) stop "$(node_arg "${2:-}")" KILL ;;
  start) start "$(node_arg "${2:-}")" ;;
  status)
    for n in $(seq 0 $((NODES - 1))); do
      if answers "$n"; then
        cli -p "$(port "$n")" cluster nodes | grep myself | awk -v n="$n" '{print "[redis-cluster] node " n " " $2 " " $3 " " $9}' >&2
      else
        log "node $n is DOWN"
      fi
    done
    formed || { log "cluster_state is not ok"; exit 1; } ;;
  clean)
    for n in $(seq 0 $((NODES - 1))); do stop "$n" TERM; done
    rm -rf "$DIR"
    log "removed $DIR" ;;
  *) die "usage: $0 up|down|kill N|start N|status|clean" ;;
esac
