#!/usr/bin/env bash
# The one test command (README, CI and newcomers run exactly this).
# Installs the outside programs the interop tests use, then runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
# The broker itself: the load generator's tests and comparisons run against it.
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# A Prometheus parser for the metrics tests: the Python prometheus_client (Debian's
# python3-prometheus-client, small and pure Python). promtool is used too where it is
# installed, but not installed here: Debian's prometheus package brings a server daemon.
python3 -c 'import prometheus_client' >/dev/null 2>&1 \
    || /usr/bin/python3 -c 'import prometheus_client' >/dev/null 2>&1 \
    || need+=(python3-prometheus-client)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "installing: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Run everything, keep cargo's output, and end with one total line (cargo's own last line is
# the doc-test binary's, which says "0 passed" for a crate without doc tests).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --release "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "\nsummary: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
