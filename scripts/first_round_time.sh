#!/usr/bin/env bash
# How long `make run NODES=N` takes to decide its first round, measured as a user sees it.
#
#   scripts/first_round_time.sh [N]    (default 3)
#
# Starts the local swarm `make run NODES=N` starts (the same node arguments, read from
# `make local-swarm-args`) on spare ports (FIRST_ROUND_P2P_BASE 27777, FIRST_ROUND_WEB_BASE
# 28080) in a fresh temporary directory, and prints the seconds from the start of the script
# until node 1 prints its first decided round ("round    1  members ...", printed once the
# round is applied and evaluated), with the load average then: other work on the machine
# slows every node, so quote both. Stops the swarm
# and removes the directory afterwards. Needs the prepared corpus (runs/data/kjv), as
# `make run` does.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${1:-3}"
case "$N" in
    '' | *[!0-9]*) echo "usage: $0 [N]  (N >= 2)" >&2; exit 2 ;;
esac
# `make run` (NODES=1) starts configs/node.yaml alone, not these arguments
if [ "$N" -lt 2 ]; then echo "usage: $0 [N]  (N >= 2: a local swarm)" >&2; exit 2; fi
TIMEOUT="${FIRST_ROUND_TIMEOUT:-900}"
dir="$(mktemp -d)"
args="$(make -s local-swarm-args NODES="$N")"
export TESTNET_DIR="$dir/net" TESTNET_P2P_BASE="${FIRST_ROUND_P2P_BASE:-27777}"
export TESTNET_WEB_BASE="${FIRST_ROUND_WEB_BASE:-28080}"

cleanup() {
    bash scripts/start_test_network.sh stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT

start=$(date +%s.%N)
SWARMLM_NODE_ARGS="$args" bash scripts/start_test_network.sh "$N" >"$dir/start.log" 2>&1 &
log="$TESTNET_DIR/logs/node-1.log"
until grep -qE '^round +1 +members' "$log" 2>/dev/null; do
    if [ "$(echo "$(date +%s.%N) - $start > $TIMEOUT" | bc)" = 1 ]; then
        echo "no decided round within ${TIMEOUT}s; node 1 log:" >&2
        tail -n 20 "$log" >&2 || true
        exit 1
    fi
    sleep 0.5
done
end=$(date +%s.%N)
wait || true
printf 'NODES=%s: first decided round after %.1f s (load average %s; %s cores)\n' \
    "$N" "$(echo "$end - $start" | bc)" "$(cut -d' ' -f1-3 /proc/loadavg)" "$(nproc)"
echo "node arguments: $args"
