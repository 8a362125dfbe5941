#!/usr/bin/env bash
# A three-node NATS JetStream cluster on loopback, for trying the relay and
# the projectors against a replicated stream by hand and for the cluster
# benchmarks (the tests start clusters of their own: tests/src/services.rs).
#
#   scripts/nats-cluster.sh up       # start nodes n0..n2 (client ports 4301-4303)
#   scripts/nats-cluster.sh down     # stop them (their stores are kept)
#   scripts/nats-cluster.sh kill N   # SIGKILL node N (0, 1 or 2)
#   scripts/nats-cluster.sh start N  # start node N again on its store
#   scripts/nats-cluster.sh status   # which nodes answer
#   scripts/nats-cluster.sh clean    # stop them and delete their stores
#
# Then: NEURECTOMY_NATS_URL=nats://127.0.0.1:4301 NEURECTOMY_JETSTREAM_REPLICAS=3
# (the client learns the other nodes from the first one).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${NATS_CLUSTER_DIR:-$ROOT/.run/nats-cluster}"
BASE_PORT="${NATS_CLUSTER_PORT:-4301}"
BASE_ROUTE="${NATS_CLUSTER_ROUTE_PORT:-6301}"
NODES=3

log() { printf '[nats-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# sudo_if_needed, apt_install, stop_pid_file
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

port() { echo $((BASE_PORT + $1)); }
route_port() { echo $((BASE_ROUTE + $1)); }
pid_file() { echo "$DIR/n$1/pid"; }

answers() { # node
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$(port "$1"); IFS= read -r line <&3; printf '%s' \"\$line\"" 2>/dev/null \
    | grep -q '"jetstream":true'
}

routes() {
  local out="" i
  for i in $(seq 0 $((NODES - 1))); do out="$out${out:+,}nats://127.0.0.1:$(route_port "$i")"; done
  echo "$out"
}

start() { # node
  local n="$1" bin
  answers "$n" && { log "n$n is up on 127.0.0.1:$(port "$n")"; return; }
  command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server
  bin="$(command -v nats-server || echo /usr/sbin/nats-server)"
  mkdir -p "$DIR/n$n"
  "$bin" -js -a 127.0.0.1 -p "$(port "$n")" -n "n$n" --cluster_name neurectomy-local \
    --cluster "nats://127.0.0.1:$(route_port "$n")" --routes "$(routes)" \
    -sd "$DIR/n$n/jetstream" >>"$DIR/n$n/output.log" 2>&1 &
  echo $! >"$(pid_file "$n")"
  for _ in $(seq 1 150); do
    answers "$n" && { log "n$n is up on 127.0.0.1:$(port "$n") (log: $DIR/n$n/output.log)"; return; }
    sleep 0.2
  done
  die "n$n did not answer within 30 s; see $DIR/n$n/output.log"
}

stop() { # node, signal
  local n="$1"
  stop_pid_file "$(pid_file "$n")" "$2" "n$n"
}

node_arg() {
  [[ "${1:-}" =~ ^[0-2]$ ]] || die "name a node: 0, 1 or 2"
  echo "$1"
}

case "${1:-up}" in
  up) for n in $(seq 0 $((NODES - 1))); do start "$n"; done ;;
  down) for n in $(seq 0 $((NODES - 1))); do stop "$n" TERM; done ;;
  kill) stop "$(node_arg "${2:-}")" KILL ;;
  start) start "$(node_arg "${2:-}")" ;;
  status)
    status=0
    for n in $(seq 0 $((NODES - 1))); do
      if answers "$n"; then log "n$n is up on 127.0.0.1:$(port "$n")"; else log "n$n is DOWN"; status=1; fi
    done
    exit "$status" ;;
  clean)
    for n in $(seq 0 $((NODES - 1))); do stop "$n" TERM; done
    rm -rf "$DIR"
    log "removed $DIR" ;;
  *) die "usage: $0 up|down|kill N|start N|status|clean" ;;
esac
