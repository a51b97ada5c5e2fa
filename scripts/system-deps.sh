#!/usr/bin/env bash
# Installs the Debian packages the curation/web tests need: PostgreSQL (the store tests start
# their own server on a loopback port), Chromium (Playwright drives /usr/bin/chromium; no
# browser is ever downloaded) and shellcheck (the deployment scripts' lint test). Idempotent:
# installs only what is missing, runs `apt-get update` at most once, and does nothing
# (successfully) when not root or when apt-get is absent, so the tests that need these
# binaries skip with a clear reason instead.
set -euo pipefail

missing=()
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    missing+=(postgresql)
fi
if [ ! -x /usr/bin/chromium ]; then
    missing+=(chromium)
fi
if ! command -v shellcheck >/dev/null 2>&1; then
    missing+=(shellcheck) # lints scripts/start_test_network.sh and run_integration_tests.sh
fi

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing ${missing[*]} but cannot install (need root and apt-get);" \
        "the tests that need them will skip" >&2
    exit 0
fi

echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
