#!/bin/sh
# Compare Midge with mosquitto on one machine, honestly: each broker pinned to CPU 0 with
# taskset, the loadgen on CPU 1, the same scenario alternating between brokers, and a markdown
# report with absolute figures, medians, ratios and broker CPU-seconds per million messages.
#
# usage: loadgen/compare.sh MIDGE_BINARY [runs] [out.md] [-- scenario args...]
#   e.g. loadgen/compare.sh target/release/midge 3 compare.md -- pubsub --qos 1 --rate 20000
# Default scenario: QoS 1 pairs, 10 publishers, closed loop, 10 s.
# Env: MIDGE_CMD overrides how Midge is started ({conf}/{port} substituted; default
#      "MIDGE_BINARY -c {conf}", the generated config is mosquitto.conf syntax);
#      MOSQUITTO (default: mosquitto from PATH or /usr/sbin); LOADGEN (default: built release
#      binary next to this script's workspace); BROKER_CPU (0); LOADGEN_CPU (1).
set -eu
[ $# -ge 1 ] || { sed -n '2,14p' "$0"; exit 2; }
MIDGE=$1; shift
RUNS=3; OUT=compare.md
if [ $# -ge 1 ] && [ "$1" != "--" ]; then RUNS=$1; shift; fi
if [ $# -ge 1 ] && [ "$1" != "--" ]; then OUT=$1; shift; fi
[ "${1:-}" = "--" ] && shift
here=$(cd "$(dirname "$0")/.." && pwd)
LOADGEN=${LOADGEN:-$here/target/release/midge-loadgen}
if [ ! -x "$LOADGEN" ]; then
  echo "building midge-loadgen (release)…" >&2
  (cd "$here" && cargo build --release -p midge-loadgen) >&2
fi
MOSQUITTO=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
[ -x "$MOSQUITTO" ] || { echo "mosquitto not found (apt-get install -y mosquitto)" >&2; exit 2; }
command -v taskset >/dev/null || { echo "taskset not found (util-linux)" >&2; exit 2; }
MIDGE_CMD=${MIDGE_CMD:-"$MIDGE -c {conf}"}
BROKER_CPU=${BROKER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
if [ $# -eq 0 ]; then
  set -- pubsub --qos 1 --publishers 10 --subscribers 10 --duration 10s --warmup 2s
fi
scenario=$1; shift
# The loadgen itself runs on LOADGEN_CPU (taskset) with one executor pinned there (--cores).
exec taskset -c "$LOADGEN_CPU" "$LOADGEN" compare \
  --broker "mosquitto=$MOSQUITTO -c {conf}" \
  --broker "midge=$MIDGE_CMD" \
  --runs "$RUNS" --broker-cpu "$BROKER_CPU" --out "$OUT" \
  "$scenario" --cores "$LOADGEN_CPU" -q "$@"
