#!/usr/bin/env bash
# Run the node-network integration suite against a real loopback network:
#
#   scripts/run_integration_tests.sh [N] [pytest args...]     (N = nodes, default 4)
#
# Starts N nodes with scripts/start_test_network.sh (fresh node dirs), exports the network's
# description (SWARMLM_TEST_NETWORK = the nodes' web URLs, comma separated, node 1 first; see
# start_test_network.sh for the other variables), runs
# tests/integration/test_node_network.py, and stops the network on every exit path (a trap),
# including a failed start and Ctrl+C. Exits with pytest's status.
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
else
    PYTHON="${PYTHON:-python3}"
fi
TESTNET_DIR="${TESTNET_DIR:-runs/testnet}"
export TESTNET_DIR

trap 'scripts/start_test_network.sh stop' EXIT
TESTNET_FRESH=1 scripts/start_test_network.sh "$N"

set -a
# shellcheck source=/dev/null
. "$TESTNET_DIR/network.env"
set +a
echo "run_integration_tests: SWARMLM_TEST_NETWORK=$SWARMLM_TEST_NETWORK" >&2

status=0
"$PYTHON" -m pytest -q "$TEST_FILE" "$@" || status=$?
exit "$status"
