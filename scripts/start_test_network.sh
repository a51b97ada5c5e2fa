#!/usr/bin/env bash
# Start (or stop) a swarmlm test network on loopback: N real `swarmlm node` processes with
# distinct ports, each bootstrapping from all the others.
#
#   scripts/start_test_network.sh [N]    start N nodes (default 4) and wait until every
#                                        /api/health answers
#   scripts/start_test_network.sh stop   SIGTERM every node of the network, then wait for them
#
# Node 1 is a full node (web UI on its web port), the others are training nodes: all N hold
# rounds. The default is 4 because the round protocol tolerates f = (n - 1) // 3 faulty or
# crashed members: with fewer than 4 one crash stops every round (the script and the nodes
# warn). With TESTNET_ANNOTATION=1 the last node (N >= 2) is an annotation node instead, so a
# network has every curation and training path of a real deployment (the integration suite
# uses that; that node holds no rounds). Everything lives under $TESTNET_DIR (default
# runs/testnet): node-<i>/ (node dirs), logs/node-<i>.log, network.pid ("node-id pid" lines)
# and network.env, which scripts/run_integration_tests.sh (and you) can source:
#
#   SWARMLM_TEST_NETWORK       comma-separated web URLs, node 1 first
#   SWARMLM_TEST_NETWORK_TYPES comma-separated node types, same order
#   SWARMLM_TEST_NETWORK_P2P   comma-separated p2p host:port, same order
#   SWARMLM_TEST_NETWORK_LOGS  comma-separated log files, same order
#   SWARMLM_TEST_ADMIN_USER / SWARMLM_TEST_ADMIN_PASSWORD   admin account on full/annotation nodes
#
# Settings (environment): SWARMLM (the CLI, default .venv/bin/swarmlm), PYTHON,
# TESTNET_DIR, TESTNET_P2P_BASE (17777), TESTNET_WEB_BASE (18080), TESTNET_HEALTH_TIMEOUT
# (seconds, 180), TESTNET_DEGRADED_GRACE (seconds a node may answer "degraded" before it is
# accepted as started, with a warning naming the components; 20), TESTNET_STOP_TIMEOUT
# (seconds, 60), TESTNET_FRESH=1 (delete node dirs first), TESTNET_ANNOTATION (0 or 1, above),
# SWARMLM_NODE_ARGS (extra arguments for every node, e.g. "--set log_level=DEBUG").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ -x "$ROOT/.venv/bin/swarmlm" ]; then
    SWARMLM="${SWARMLM:-$ROOT/.venv/bin/swarmlm}"
    PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
else
    SWARMLM="${SWARMLM:-swarmlm}"
    PYTHON="${PYTHON:-python3}"
fi
TESTNET_DIR="${TESTNET_DIR:-runs/testnet}"
P2P_BASE="${TESTNET_P2P_BASE:-17777}"
WEB_BASE="${TESTNET_WEB_BASE:-18080}"
HEALTH_TIMEOUT="${TESTNET_HEALTH_TIMEOUT:-180}"
STOP_TIMEOUT="${TESTNET_STOP_TIMEOUT:-60}"
DEGRADED_GRACE="${TESTNET_DEGRADED_GRACE:-20}"
ANNOTATION="${TESTNET_ANNOTATION:-0}"
DEFAULT_NODES=4
ADMIN_USER="${SWARMLM_TEST_ADMIN_USER:-admin}"
ADMIN_PASSWORD="${SWARMLM_TEST_ADMIN_PASSWORD:-testnet-admin-password}"
PID_FILE="$TESTNET_DIR/network.pid"
ENV_FILE="$TESTNET_DIR/network.env"
DATA_DIR="runs/data/kjv"

usage() {
    echo "usage: $0 [N] | stop   (N = number of nodes, 1-64, default $DEFAULT_NODES)" >&2
    exit 2
}

log() { echo "testnet: $*" >&2; }

alive() { kill -0 "$1" 2>/dev/null; }

# SIGTERM every pid in the pid file, wait for them to exit (the node checkpoints and flushes
# its store on SIGTERM), SIGKILL what is left after the timeout, and say so.
stop_network() {
    if [ ! -f "$PID_FILE" ]; then
        log "no network running (no $PID_FILE)"
        return 0
    fi
    local ids=() pids=() id pid
    while read -r id pid; do
        [ -n "${pid:-}" ] || continue
        ids+=("$id")
        pids+=("$pid")
    done <"$PID_FILE"
    for pid in "${pids[@]}"; do
        if alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    local deadline=$((SECONDS + STOP_TIMEOUT)) i
    for i in "${!pids[@]}"; do
        while alive "${pids[$i]}" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        if alive "${pids[$i]}"; then
            log "${ids[$i]} (pid ${pids[$i]}) ignored SIGTERM for ${STOP_TIMEOUT}s: SIGKILL"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
    done
    rm -f "$PID_FILE" "$ENV_FILE"
    log "stopped ${#pids[@]} node(s)"
}

# Exit 0 when the URL's /api/health says ok, 1 when degraded (it prints the components that
# are not ok), 2 when it is down (503) or does not answer.
health_of() {
    "$PYTHON" - "$1" <<'PY' 2>/dev/null
import json, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "/api/health", timeout=2) as r:
        body = json.load(r)
except Exception:
    sys.exit(2)
if body.get("status") == "ok":
    sys.exit(0)
if body.get("status") == "degraded":
    comps = body.get("components") or {}
    print(", ".join(f"{k}: {v.get('detail') or v.get('status')}" for k, v in comps.items()
                    if isinstance(v, dict) and v.get("status") != "ok"))
    sys.exit(1)
sys.exit(2)
PY
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

[ "$#" -le 1 ] || usage
if [ "${1:-}" = "stop" ]; then
    stop_network
    exit 0
fi
N="${1-$DEFAULT_NODES}"
case "$N" in
    '' | *[!0-9]*) usage ;;
esac
if [ "$N" -lt 1 ] || [ "$N" -gt 64 ]; then usage; fi
case "$ANNOTATION" in
    0 | 1) ;;
    *) log "TESTNET_ANNOTATION must be 0 or 1, got '$ANNOTATION'"; exit 2 ;;
esac

if [ -f "$PID_FILE" ]; then
    while read -r _ pid; do
        if [ -n "${pid:-}" ] && alive "$pid"; then
            log "a network is already running (pid $pid in $PID_FILE); run '$0 stop' first"
            exit 1
        fi
    done <"$PID_FILE"
    rm -f "$PID_FILE"
fi
if ! command -v "$SWARMLM" >/dev/null 2>&1; then
    log "cannot run '$SWARMLM': run 'make setup' or set SWARMLM to the swarmlm command"
    exit 1
fi
for ((i = 1; i <= N; i++)); do
    for port in $((P2P_BASE + i - 1)) $((WEB_BASE + i - 1)); do
        if port_in_use "$port"; then
            log "port $port on 127.0.0.1 is in use; set TESTNET_P2P_BASE / TESTNET_WEB_BASE"
            exit 1
        fi
    done
done

# Training nodes read the tokenized corpus at start; prepare it once, as `make run` does.
if [ ! -f "$DATA_DIR/meta.json" ]; then
    log "tokenizing the bundled corpus into $DATA_DIR"
    "$SWARMLM" data prepare --input data/kjv.txt.gz --out "$DATA_DIR" --vocab-size 2048
fi

mkdir -p "$TESTNET_DIR/logs"
read -r -a extra <<<"${SWARMLM_NODE_ARGS:-}"

urls=() types=() addrs=() logs=()
for ((i = 1; i <= N; i++)); do
    if [ "$i" -eq 1 ]; then
        types+=(full)
    elif [ "$ANNOTATION" = "1" ] && [ "$i" -eq "$N" ]; then
        types+=(annotation)
    else
        types+=(training)
    fi
    addrs+=("127.0.0.1:$((P2P_BASE + i - 1))")
    urls+=("http://127.0.0.1:$((WEB_BASE + i - 1))")
    logs+=("$TESTNET_DIR/logs/node-$i.log")
done
members=0
for t in "${types[@]}"; do
    if [ "$t" != "annotation" ]; then members=$((members + 1)); fi
done
if [ "$members" -lt 4 ]; then
    log "warning: n = $members round member(s) tolerate no faulty or crashed member" \
        "(need n >= 4 for f = 1): one crash stops every round"
fi

: >"$PID_FILE"
# From here on, a failure stops what was started instead of leaving orphans.
trap 'log "start failed; stopping the nodes started so far"; stop_network' ERR

for ((i = 1; i <= N; i++)); do
    node_id="node-$i"
    node_dir="$TESTNET_DIR/$node_id"
    type="${types[$((i - 1))]}"
    if [ "${TESTNET_FRESH:-0}" = "1" ]; then rm -rf "$node_dir"; fi
    mkdir -p "$node_dir"
    peers=()
    for ((j = 1; j <= N; j++)); do
        if [ "$j" -ne "$i" ]; then peers+=("${addrs[$((j - 1))]}"); fi
    done
    bootstrap="$(IFS=,; echo "${peers[*]}")"
    admin=()
    if [ "$type" = "full" ] || [ "$type" = "annotation" ]; then
        admin=(--set "admin_username=$ADMIN_USER" --set "admin_password=$ADMIN_PASSWORD")
    fi
    # setsid: the node gets its own process group, so Ctrl+C in this shell does not reach it
    # and `stop` alone decides when it gets SIGTERM.
    setsid "$SWARMLM" node --type "$type" --node-id "$node_id" --host 127.0.0.1 \
        --p2p-port "$((P2P_BASE + i - 1))" --web-port "$((WEB_BASE + i - 1))" \
        --node-dir "$node_dir" --bootstrap "$bootstrap" "${admin[@]}" "${extra[@]}" \
        >"${logs[$((i - 1))]}" 2>&1 </dev/null &
    echo "$node_id $!" >>"$PID_FILE"
    log "$node_id ($type) pid $! p2p ${addrs[$((i - 1))]} web ${urls[$((i - 1))]}"
done

{
    echo "SWARMLM_TEST_NETWORK=$(IFS=,; echo "${urls[*]}")"
    echo "SWARMLM_TEST_NETWORK_TYPES=$(IFS=,; echo "${types[*]}")"
    echo "SWARMLM_TEST_NETWORK_P2P=$(IFS=,; echo "${addrs[*]}")"
    echo "SWARMLM_TEST_NETWORK_LOGS=$(IFS=,; echo "${logs[*]}")"
    echo "SWARMLM_TEST_NETWORK_PIDS=$PID_FILE"
    echo "SWARMLM_TEST_ADMIN_USER=$ADMIN_USER"
    echo "SWARMLM_TEST_ADMIN_PASSWORD=$ADMIN_PASSWORD"
} >"$ENV_FILE"

# A node counts as started when it says ok, or when it has said degraded for
# DEGRADED_GRACE seconds (peers still connecting is degraded; low disk stays degraded).
deadline=$((SECONDS + HEALTH_TIMEOUT))
pending=("${!urls[@]}")
declare -A degraded_since=()
while [ "${#pending[@]}" -gt 0 ]; do
    still=()
    for k in "${pending[@]}"; do
        pid="$(sed -n "$((k + 1))p" "$PID_FILE" | cut -d' ' -f2)"
        if ! alive "$pid"; then
            log "node-$((k + 1)) exited during start; last lines of ${logs[$k]}:"
            tail -n 30 "${logs[$k]}" >&2 || true
            false
        fi
        rc=0
        detail="$(health_of "${urls[$k]}")" || rc=$?
        if [ "$rc" -eq 1 ]; then
            : "${degraded_since[$k]:=$SECONDS}"
            if [ $((SECONDS - degraded_since[$k])) -ge "$DEGRADED_GRACE" ]; then
                log "warning: node-$((k + 1)) answers but is degraded ($detail)"
                continue
            fi
        fi
        if [ "$rc" -ne 0 ]; then still+=("$k"); fi
    done
    pending=("${still[@]+"${still[@]}"}")
    if [ "${#pending[@]}" -gt 0 ]; then
        if [ "$SECONDS" -ge "$deadline" ]; then
            for k in "${pending[@]}"; do
                log "node-$((k + 1)) not healthy after ${HEALTH_TIMEOUT}s (${urls[$k]}/api/health); log ${logs[$k]}"
            done
            false
        fi
        sleep 0.5
    fi
done
trap - ERR
log "all $N node(s) healthy; environment in $ENV_FILE; stop with '$0 stop'"
