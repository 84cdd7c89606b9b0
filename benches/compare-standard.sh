#!/usr/bin/env bash
# The standard Midge-vs-mosquitto comparison on this machine, written to docs/benchmarks.md
# (charts under docs/img/). One command, bounded (every run stops by itself; ~15 min in all):
#
#   benches/compare-standard.sh            # 3 alternating rounds per scenario
#   RUNS=1 benches/compare-standard.sh     # quicker smoke run
#
# Each scenario runs through `midge-loadgen compare`: mosquitto and Midge started fresh for
# every run from the same generated mosquitto.conf, each pinned to CPU $BROKER_CPU (taskset),
# the loadgen pinned to CPU $LOADGEN_CPU, order alternated each round. Midge gets
# `--shards 1`: one core, like mosquitto's single thread.
#
# Scenarios: 1 QoS 0 pairs, max rate · 2 QoS 1 pairs, max rate · 3 QoS 1 at 20k msg/s open
# loop over mutual TLS (latency) · 4 fan-out 1 → 1,000 subscribers · 5 mTLS connect, full and
# resumed handshakes · 6 idle mTLS connections (RSS per connection).
#
# Env: RUNS (3), NO_BUILD (set: skip `cargo build --release`), OUT (docs/benchmarks.md), IMG (docs/img), BROKER_CPU (0), LOADGEN_CPU (1),
#      MOSQUITTO (mosquitto from PATH or /usr/sbin/mosquitto), IDLE_CONNS (10000),
#      ONLY (space-separated scenario names, e.g. "qos0-pairs mtls-full": run just those).
# Exit status: 0 if every scenario ran cleanly, 1 if any run failed (the report says which).
set -uo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
RUNS=${RUNS:-3}
OUT=${OUT:-docs/benchmarks.md}
IMG=${IMG:-docs/img}
BROKER_CPU=${BROKER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
IDLE_CONNS=${IDLE_CONNS:-10000}
MIDGE=$here/target/release/midge
LOADGEN=$here/target/release/midge-loadgen
# A fresh machine: install the broker to compare against (Debian's mosquitto) if missing.
if [ -z "${MOSQUITTO:-}" ] && ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "installing mosquitto…" >&2
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
MOSQUITTO=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}

die() { echo "compare-standard: $*" >&2; exit 2; }
[ -x "$MOSQUITTO" ] || die "mosquitto not found (apt-get install -y mosquitto)"
command -v taskset >/dev/null || die "taskset not found (util-linux)"
# Build (a no-op when the release binaries are current; NO_BUILD=1 uses them as they are).
if [ -z "${NO_BUILD:-}" ] || [ ! -x "$MIDGE" ] || [ ! -x "$LOADGEN" ]; then
  echo "building release binaries…" >&2
  { cargo build --release --bin midge && cargo build --release -p midge-loadgen; } >&2 ||
    die "build failed"
fi
[ "$(nproc --all)" -ge 2 ] || die "needs 2 CPUs (broker and loadgen on separate cores)"

# 10k idle connections need ~10k descriptors in the loadgen and in the broker (which inherits
# this limit). Raise the soft limit as far as allowed; fall back to 5k connections.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)
idle_note=""
if [ "$nofile" != unlimited ] && [ "$nofile" -lt $((IDLE_CONNS + 500)) ]; then
  idle_note="\`ulimit -n\` is $nofile here (could not be raised), so scenario 6 uses 5,000 connections instead of $IDLE_CONNS."
  IDLE_CONNS=5000
fi

work=$(mktemp -d /tmp/midge-bench.XXXXXX)
sampler=""
cleanup() {
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# TLS material: a test CA, a server certificate for 127.0.0.1/localhost, 1,000 device
# certificates (CN = lg-dN, clientAuth) so mTLS devices have distinct identities.
"$LOADGEN" pki --out "$work/pki" --devices 1000 >/dev/null || die "pki failed"
P=$work/pki
# mosquitto started as root drops to its own user: it must be able to read the test PKI.
chmod -R a+rX "$work"

# Load average during the run, sampled every 5 s (the machine may be shared).
( while :; do cut -d' ' -f1 /proc/loadavg >>"$work/loadavg"; sleep 5; done ) &
sampler=$!

mkdir -p "$(dirname "$OUT")" "$IMG"
started=$(date -u '+%Y-%m-%d %H:%M UTC')
t_start=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
busy_start=$(ps -eo pcpu=,comm= --sort=-pcpu | head -5 | awk '{printf "%s%s (%s%%)", (NR>1?", ":""), $2, $1}')
failures=0
sections=()
summary_rows=()

# run NAME TITLE DESCRIPTION [compare options…] -- SCENARIO ARGS…
run() {
  local name=$1 title=$2 desc=$3; shift 3
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  local copts=()
  while [ "$1" != "--" ]; do copts+=("$1"); shift; done
  shift
  local scen=$1; shift
  local md=$work/$name.md log=$work/$name.log
  echo "== $name: $title" >&2
  local t0=$SECONDS
  taskset -c "$LOADGEN_CPU" "$LOADGEN" compare \
    --broker "mosquitto=$MOSQUITTO -c {conf}" \
    --broker "midge=$MIDGE -c {conf} --shards 1" \
    --runs "$RUNS" --broker-cpu "$BROKER_CPU" --out "$md" "${copts[@]}" \
    "$scen" --cores "$LOADGEN_CPU" -q --plot "$IMG/$name" "$@" >/dev/null 2>"$log"
  local rc=$?
  echo "   done in $((SECONDS - t0)) s (exit $rc)" >&2
  {
    echo "## $title"
    echo
    echo "$desc"
    echo
    if [ $rc -ne 0 ]; then
      failures=$((failures + 1))
      echo "**This scenario did not complete cleanly (exit status $rc).** Loadgen output:"
      echo
      echo '```'
      grep -v '^compare:   ' "$log" | tail -20
      echo '```'
      echo
    fi
    if [ -s "$md" ]; then
      # compare's report, its headings moved under this section.
      sed -e 's/^## /#### /' -e '/^# Broker comparison$/,/^$/d' "$md"
      echo
      for f in "$IMG/$name"/*.svg; do
        [ -e "$f" ] && echo "![$title]($(basename "$IMG")/$name/$(basename "$f"))"
      done
      echo
    fi
  } >"$work/$name.section"
  sections+=("$work/$name.section")
}

# med NAME METRIC → "mosquitto midge ratio" from the Medians table of scenario NAME.
med() {
  awk -F'|' -v m="$2" '
    /^## Medians/ { on = 1; next }
    /^## / { on = 0 }
    on { k = $2; gsub(/^ +| +$/, "", k); if (k == m) {
      for (i = 3; i <= 5; i++) { v = $i; gsub(/^ +| +$/, "", v); printf "%s%s", v, (i < 5 ? "|" : "\n") }
      exit } }' "$work/$1.md" 2>/dev/null
}

# row SCENARIO-LABEL NAME METRIC [unit]: one line of the headline table.
row() {
  local v
  v=$(med "$2" "$3")
  [ -z "$v" ] && v="–|–|–"
  summary_rows+=("| $1 | $3 | ${v//|/ | } |")
}

common_tls=(--cafile "$P/ca.crt")
mtls_broker=(--server-cert "$P/server.crt" --server-key "$P/server.key" --require-cert)

run qos0-pairs "1. QoS 0 pairs, maximum rate" \
  "10 publishers → 10 subscribers (\`fleet/i/telemetry\`), 64-byte payload, plain TCP, MQTT 3.1.1, closed loop: each publisher keeps at most 64 messages not yet received by its subscriber (an end-to-end window, so neither broker can hide queued messages). Throughput is the broker's maximum on one core; latency here is queueing delay by construction." \
  -- pubsub --mode pairs --qos 0 --publishers 10 --subscribers 10 --warmup 2s --duration 10s --drain 5s

run qos1-pairs "2. QoS 1 pairs, maximum rate" \
  "As 1, at QoS 1 (publisher waits for PUBACK; at most 64 un-acknowledged and un-received messages per publisher)." \
  -- pubsub --mode pairs --qos 1 --publishers 10 --subscribers 10 --warmup 2s --duration 10s --drain 5s

run qos1-mtls-20k "3. QoS 1 at 20,000 msg/s over mutual TLS: latency" \
  "100 publishers → 100 subscribers, each with its own client certificate (mutual TLS, \`require_certificate true\`), MQTT 5, QoS 1, 64-byte payload, **open loop** at a fixed 20,000 msg/s in total: every message has an intended send time and latency is measured from it, so a stalled broker cannot hide its stall (no coordinated omission). 3 s warm-up, 20 s measured." \
  "${mtls_broker[@]}" -- pubsub --mode pairs --qos 1 --mqtt 5 --rate 20000 --publishers 100 --subscribers 100 \
  --warmup 3s --duration 20s --drain 10s "${common_tls[@]}" --cert-dir "$P/devices"

run fanout-1000 "4. Fan-out: 1 publisher → 1,000 subscribers" \
  "One publisher at 100 msg/s (open loop), QoS 0, 64-byte payload, plain TCP; 1,000 subscribers on the same topic, so the broker is offered 100,000 deliveries/s. That is above what mosquitto sustains on one core (its CPU per delivery, below, is over 10 µs): its received rate is its ceiling and its latency is queueing delay; Midge's latency is that of a broker keeping up." \
  -- pubsub --mode fan-out --qos 0 --publishers 1 --subscribers 1000 --rate 100 --warmup 2s --duration 10s --drain 5s

run mtls-full "5a. Mutual-TLS connect: full handshakes" \
  "2,000 devices connect over TLS 1.3 with their own client certificates (1,000 identities, round robin), 64 attempts in flight, no session resumption: every handshake is a full one (certificate verification both ways). Connections stay open until all are up. \"broker CPU-ms per handshake\" is also broker CPU-seconds per thousand handshakes." \
  "${mtls_broker[@]}" -- connect --connections 2000 --concurrency 64 "${common_tls[@]}" --cert-dir "$P/devices"

run mtls-resumed "5b. Mutual-TLS connect: resumed handshakes" \
  "2,000 connections with TLS 1.3 session resumption (tickets), 8 attempts in flight, all presenting one client certificate: the client keeps tickets per client identity, so resumption is only possible when the same identity reconnects (with 1,000 distinct identities no connection here would reconnect). The first connections are full handshakes; the \"resumed\" row counts the resumed ones. Both brokers resume TLS 1.3 sessions here with \`require_certificate true\` (mosquitto 2.0.11 with OpenSSL 3 included), as the \"resumed\" counts show." \
  "${mtls_broker[@]}" -- connect --connections 2000 --concurrency 8 --tls-resume "${common_tls[@]}" \
  --cert "$P/devices/lg-d0.crt" --key "$P/devices/lg-d0.key"

run idle-mtls "6. $IDLE_CONNS idle mutual-TLS connections: memory" \
  "$IDLE_CONNS devices (own certificates, full handshakes, 64 in flight) connect and stay idle for 5 s. \"broker RSS bytes per conn\" is (RSS after − RSS before) / connections on a freshly started broker. ${idle_note}" \
  "${mtls_broker[@]}" -- connect --connections "$IDLE_CONNS" --concurrency 64 --hold 5s --max-time 300s "${common_tls[@]}" --cert-dir "$P/devices"

kill "$sampler" 2>/dev/null; sampler=""
elapsed=$(( $(date +%s) - t_start ))
load_stats=$(awk '{ s += $1; if (NR == 1 || $1 < lo) lo = $1; if ($1 > hi) hi = $1 } END { if (NR) printf "min %.2f, mean %.2f, max %.2f over %d samples", lo, s / NR, hi, NR }' "$work/loadavg")
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
# Runs (scenario, round, broker) with a CPU-starvation warning from the loadgen.
starved=$(for f in "$work"/*.md; do grep -o '^- round [0-9]* [^:]*: .*waited .*for a CPU' "$f" |
  cut -d: -f1 | sort -u | sed "s|^|$f |"; done 2>/dev/null | wc -l)
total_runs=$(cat "$work"/*.md 2>/dev/null | grep -c '^| [0-9][0-9]* | [a-z][a-z]* |' || true)

row "1 QoS 0 pairs" qos0-pairs "received msg/s"
row "1 QoS 0 pairs" qos0-pairs "broker CPU-s per M msgs"
row "2 QoS 1 pairs" qos1-pairs "received msg/s"
row "2 QoS 1 pairs" qos1-pairs "broker CPU-s per M msgs"
row "3 QoS 1 20k/s mTLS" qos1-mtls-20k "p50 µs"
row "3 QoS 1 20k/s mTLS" qos1-mtls-20k "p90 µs"
row "3 QoS 1 20k/s mTLS" qos1-mtls-20k "p99 µs"
row "3 QoS 1 20k/s mTLS" qos1-mtls-20k "p99.9 µs"
row "3 QoS 1 20k/s mTLS" qos1-mtls-20k "broker CPU-s per M msgs"
row "4 fan-out 1→1000" fanout-1000 "received msg/s"
row "4 fan-out 1→1000" fanout-1000 "p99 µs"
row "4 fan-out 1→1000" fanout-1000 "broker CPU-s per M msgs"
row "5a mTLS full" mtls-full "handshakes/s"
row "5a mTLS full" mtls-full "broker CPU-ms per handshake"
row "5b mTLS resumed" mtls-resumed "resumed"
row "5b mTLS resumed" mtls-resumed "handshakes/s"
row "5b mTLS resumed" mtls-resumed "broker CPU-ms per handshake"
row "6 idle mTLS" idle-mtls "broker RSS bytes per conn"

{
  echo "# Midge vs mosquitto: benchmarks"
  echo
  echo "Generated by \`benches/compare-standard.sh\` (RUNS=$RUNS) on $started; the whole set took $((elapsed / 60)) min $((elapsed % 60)) s."
  echo
  echo "## Machine and method"
  echo
  echo "- $(nproc --all) CPUs ($cpu_model), Linux $(uname -r), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo)."
  echo "- Load average (1 min) at the start: $load_start; during the run: ${load_stats:-not sampled}."
  echo "- Busiest processes at the start: $busy_start."
  echo "- mosquitto: \`$("$MOSQUITTO" -h 2>/dev/null | head -1)\`; Midge: \`$("$MIDGE" --version)\` at commit \`$(git rev-parse --short HEAD 2>/dev/null || echo '?')\`$(git diff --quiet HEAD -- src loadgen 2>/dev/null || echo ' (with uncommitted changes)') with \`--shards 1\`."
  echo "- Each broker is started fresh for every run from the same generated mosquitto.conf (listener on 127.0.0.1, \`persistence false\`, \`set_tcp_nodelay true\`; TLS scenarios add \`cafile\`/\`certfile\`/\`keyfile\`/\`require_certificate true\`), pinned to CPU $BROKER_CPU with \`taskset\`; the load generator (\`midge-loadgen\`, one executor) is pinned to CPU $LOADGEN_CPU. $RUNS rounds per scenario, broker order alternated each round; tables show medians, ratios are Midge / mosquitto (below 1 is better for latency, CPU and memory; above 1 is better for throughput)."
  echo "- \"broker CPU-s per M msgs\" is the broker's CPU time (user + system, \`/proc/PID/stat\`) over the whole run divided by messages delivered, in seconds per million: it does not depend on whether the load generator or a busy machine limited the rate. \"loadgen CPU-s per M msgs\" and \"loadgen busy %\" show the load generator's own cost; a run is marked loadgen-bound when its core was ≥ 90 % busy."
  echo "- \"waited for CPU %\" is the share of the run a process was runnable but waiting for a CPU (\`/proc/…/schedstat\`): above ~10 % other processes on the machine took its CPU, and throughput and latency describe the machine more than the broker (CPU per message stays valid)."
  if [ "$starved" -gt 0 ]; then
    echo
    echo "> **This run was made on a busy machine**: in $starved of $total_runs runs the broker or the load generator waited ≥ 10 % of the time for a CPU held by other processes (see each scenario's warnings). Absolute throughput and latency are therefore low and noisy; the CPU-per-message and CPU-per-handshake figures and memory figures are still valid, and ratios compare brokers under the same conditions only approximately."
  fi
  if [ "$failures" -gt 0 ]; then
    echo
    echo "> **$failures scenario(s) did not complete cleanly** — see the sections below."
  fi
  echo
  echo "Command: \`benches/compare-standard.sh\`$( [ "$RUNS" != 3 ] && echo " (with \`RUNS=$RUNS\`)")"
  echo
  echo "## Headline (medians)"
  echo
  echo "| scenario | metric | mosquitto | Midge | Midge/mosquitto |"
  echo "|---|---|---:|---:|---:|"
  printf '%s\n' "${summary_rows[@]}"
  echo
  cat "${sections[@]}"
} >"$OUT"
echo "wrote $OUT (failures: $failures)" >&2
[ "$failures" -eq 0 ]
