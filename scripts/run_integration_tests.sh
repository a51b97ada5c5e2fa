#!/usr/bin/env bash
# Run the node-network integration suite after checking that a scripted network comes up:
#
#   scripts/run_integration_tests.sh [N] [pytest args...]     (N = nodes, default 4)
#
# 1. starts N nodes with scripts/start_test_network.sh (fresh node dirs) and checks each with
#    `swarmlm status` (the command operators and the Docker HEALTHCHECK use);
# 2. runs tests/integration/test_node_network.py. By default the network is stopped first:
#    the test starts its own nodes, and two networks training at once on two cores would
#    only slow each other down. With TESTNET_KEEP=1 the network stays up during the test and
#    its description is exported (SWARMLM_TEST_NETWORK = the nodes' web URLs, comma
#    separated, node 1 first; see start_test_network.sh for the other variables).
# The network is stopped on every exit path (a trap), including a failed start and Ctrl+C.
# Exits with pytest's status (1 when a node does not answer its status check; a degraded
# node is reported and the run continues).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TEST_FILE="tests/integration/test_node_network.py"
N=4
if [ "$#" -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
    N="$1"
    shift
fi
if [ "$N" -lt 4 ]; then
    echo "run_integration_tests: the suite needs full, training and annotation nodes: N >= 4" >&2
    exit 2
fi
if [ ! -f "$TEST_FILE" ]; then
    echo "run_integration_tests: $TEST_FILE does not exist yet; nothing to run" >&2
    exit 1
fi
if [ -x "$ROOT/.venv/bin/python" ]; then
    PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
    SWARMLM="${SWARMLM:-$ROOT/.venv/bin/swarmlm}"
else
    PYTHON="${PYTHON:-python3}"
    SWARMLM="${SWARMLM:-swarmlm}"
fi
export SWARMLM PYTHON
TESTNET_DIR="${TESTNET_DIR:-runs/testnet}"
export TESTNET_DIR
export TESTNET_ANNOTATION=1 # the last node is an annotation node (the suite needs one)

trap 'scripts/start_test_network.sh stop' EXIT
TESTNET_FRESH=1 scripts/start_test_network.sh "$N"

set -a
# shellcheck source=/dev/null
. "$TESTNET_DIR/network.env"
set +a
IFS=, read -r -a urls <<<"$SWARMLM_TEST_NETWORK"
for url in "${urls[@]}"; do
    rc=0
    "$SWARMLM" status --node "$url" >&2 || rc=$?
    if [ "$rc" -eq 1 ]; then
        echo "run_integration_tests: warning: node at $url is degraded or down (table above)" >&2
    elif [ "$rc" -ne 0 ]; then
        echo "run_integration_tests: node at $url failed its status check (exit $rc)" >&2
        exit 1
    fi
done

if [ "${TESTNET_KEEP:-0}" = "1" ]; then
    echo "run_integration_tests: SWARMLM_TEST_NETWORK=$SWARMLM_TEST_NETWORK" >&2
else
    scripts/start_test_network.sh stop
    unset SWARMLM_TEST_NETWORK SWARMLM_TEST_NETWORK_TYPES SWARMLM_TEST_NETWORK_P2P \
        SWARMLM_TEST_NETWORK_LOGS SWARMLM_TEST_NETWORK_PIDS
fi

status=0
"$PYTHON" -m pytest -q "$TEST_FILE" "$@" || status=$?
exit "$status"
