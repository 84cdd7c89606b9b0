#!/bin/bash
# Persistence cost (issue 11), one command, ~3 min: QoS 1 pairs at maximum rate (10 → 10) and
# at 20,000 msg/s (16 pairs, open loop), per-packet writes, 64-byte payloads:
# mosquitto `persistence true` vs Midge in memory vs Midge `persistence_sync always`.
# Brokers pinned to CPU 0, the loadgen to CPU 1 (as benches/compare-standard.sh). Reports go
# to $OUT_DIR (default /tmp/persist-compare); the figures are copied into
# docs/benchmarks-persistence.md by hand.
set -u
here=$(cd "$(dirname "$0")/.." && pwd); cd "$here"
RUNS=${RUNS:-1}
OUT_DIR=${OUT_DIR:-/tmp/persist-compare}; mkdir -p "$OUT_DIR"
MIDGE=$here/target/release/midge
LOADGEN=$here/target/release/midge-loadgen
MOSQUITTO=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
WP=$here/benches/with-persistence.sh
brokers=(
  --broker "mosquitto-persist=$WP {conf} /tmp/pc-mosq -- $MOSQUITTO -c @CONF@"
  --broker "midge-memory=$MIDGE -c {conf} --shards 1"
  --broker "midge-always=$WP {conf} /tmp/pc-midge persistence_sync\ always -- $MIDGE -c @CONF@ --shards 1"
)
taskset -c 1 "$LOADGEN" compare "${brokers[@]}" --runs "$RUNS" --broker-cpu 0 \
  --out "$OUT_DIR/qos1-max.md" pubsub --cores 1 -q --mode pairs --qos 1 --publishers 10 \
  --subscribers 10 --duration 10s --write-mode per-packet
taskset -c 1 "$LOADGEN" compare "${brokers[@]}" --runs "$RUNS" --broker-cpu 0 \
  --out "$OUT_DIR/qos1-20k.md" pubsub --cores 1 -q --mode pairs --qos 1 --rate 20000 \
  --publishers 16 --subscribers 16 --warmup 3s --duration 10s --drain 10s --write-mode per-packet
for d in /tmp/pc-midge; do
  [ -d "$d" ] && echo "last Midge log dir: $(du -sb "$d" | cut -f1) bytes" >&2
done
