#!/usr/bin/env bash
# The standard Midge-vs-mosquitto comparison on this machine, written to docs/benchmarks.md
# (charts under docs/img/). One command, bounded (every run stops by itself; ~45 min in all):
#
#   benches/compare-standard.sh            # 3 alternating rounds per scenario
#   RUNS=1 benches/compare-standard.sh     # quicker smoke run
#
# Each scenario runs through `midge-loadgen compare`: mosquitto and Midge started fresh for
# every run from the same generated mosquitto.conf, each pinned to CPU $BROKER_CPU (taskset),
# the loadgen pinned to CPU $LOADGEN_CPU, order alternated each round. Midge gets
# `--shards 1`: one core, like mosquitto's single thread.
#
# Every client writes one packet per write syscall (`--write-mode per-packet`, the loadgen's
# default), as device libraries do: those are the headline figures. Scenarios: 1 QoS 0 pairs,
# max rate · 2 QoS 1 pairs, max rate · 3 QoS 1 at 20k msg/s, 16 pairs, plain TCP and 4 over
# mutual TLS (open loop: CPU per message and latency) · 5 fan-out 1 → 100 and 6 1 → 1,000 ·
# 7 mTLS connect, full and resumed handshakes · 8 idle mTLS connections (RSS per connection) ·
# 9 fleet: FLEET_DEVICES mTLS devices, QoS 1 telemetry every 3 s, shared-subscription
# backends, commands, idle phase · X1/X2 extras: QoS 0/1 pairs with coalesced writes (NOT how
# devices send; kept to compare with older reports).
#
# Env: RUNS (3), NO_BUILD (set: skip `cargo build --release`), OUT (docs/benchmarks.md), IMG (docs/img), BROKER_CPU (0), LOADGEN_CPU (1),
#      MOSQUITTO (mosquitto from PATH or /usr/sbin/mosquitto), IDLE_CONNS (10000),
#      FLEET_DEVICES (15000; capped by RLIMIT_NOFILE), FLEET_RAMP (400 handshakes/s),
#      PKI_DIR (/var/tmp/midge-bench-pki: test CA, device certificates and the fleet's cached
#      identities, kept across runs so 15,000 identities are minted once),
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
FLEET_DEVICES=${FLEET_DEVICES:-15000}
FLEET_RAMP=${FLEET_RAMP:-400}
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
  idle_note="\`ulimit -n\` is $nofile here (could not be raised), so scenario 8 uses 5,000 connections instead of $IDLE_CONNS."
  IDLE_CONNS=5000
fi
# The fleet's loadgen and broker each hold one descriptor per device (plus a few hundred).
if [ "$nofile" != unlimited ] && [ "$nofile" -lt $((FLEET_DEVICES + 300)) ]; then
  FLEET_DEVICES=$((nofile - 300))
fi

work=$(mktemp -d /tmp/midge-bench.XXXXXX)
sampler=""
cleanup() {
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# TLS material: a test CA, a server certificate for 127.0.0.1/localhost, 1,000 device
# certificates (CN = lg-dN, clientAuth) so mTLS devices have distinct identities. Kept in
# PKI_DIR across runs, with the fleet's minted identities (PKI_DIR/identities).
P=${PKI_DIR:-/var/tmp/midge-bench-pki}
if [ ! -s "$P/ca.crt" ] || [ ! -s "$P/server.key" ] || [ ! -s "$P/devices/lg-d999.key" ]; then
  rm -rf "$P"
  "$LOADGEN" pki --out "$P" --devices 1000 >/dev/null || die "pki failed"
fi
# mosquitto started as root drops to its own user: it must be able to read the test PKI.
chmod -R a+rX "$work" "$P"

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

per_packet="Every client writes each MQTT packet with its own write syscall (one TLS record each), as device libraries do (\`--write-mode per-packet\`)."

run qos0-pairs "1. QoS 0 pairs, maximum rate" \
  "10 publishers → 10 subscribers (\`fleet/i/telemetry\`), 64-byte payload, plain TCP, MQTT 3.1.1, closed loop: each publisher keeps at most 64 messages not yet received by its subscriber (an end-to-end window, so neither broker can hide queued messages). Throughput is the broker's maximum on one core; latency here is queueing delay by construction. $per_packet" \
  -- pubsub --mode pairs --qos 0 --publishers 10 --subscribers 10 --warmup 2s --duration 10s --drain 5s --write-mode per-packet

run qos1-pairs "2. QoS 1 pairs, maximum rate" \
  "As 1, at QoS 1 (publisher waits for PUBACK; at most 64 un-acknowledged and un-received messages per publisher). $per_packet" \
  -- pubsub --mode pairs --qos 1 --publishers 10 --subscribers 10 --warmup 2s --duration 10s --drain 5s --write-mode per-packet

run qos1-20k-plain "3. QoS 1 at 20,000 msg/s, 16 pairs, plain TCP: CPU per message and latency" \
  "16 publishers → 16 subscribers, MQTT 3.1.1, QoS 1, 64-byte payload, plain TCP, **open loop** at a fixed 20,000 msg/s in total: every message has an intended send time and latency is measured from it, so a stalled broker cannot hide its stall (no coordinated omission). 3 s warm-up, 20 s measured. The issue-13 target is broker CPU per message ≤ 0.4× and p99 ≤ 0.5× mosquitto's. $per_packet" \
  -- pubsub --mode pairs --qos 1 --rate 20000 --publishers 16 --subscribers 16 \
  --warmup 3s --duration 20s --drain 10s --write-mode per-packet

run qos1-20k-mtls "4. QoS 1 at 20,000 msg/s, 16 pairs, mutual TLS: CPU per message and latency" \
  "As 3, over mutual TLS: each client presents its own certificate (\`require_certificate true\`). $per_packet" \
  "${mtls_broker[@]}" -- pubsub --mode pairs --qos 1 --rate 20000 --publishers 16 --subscribers 16 \
  --warmup 3s --duration 20s --drain 10s "${common_tls[@]}" --cert-dir "$P/devices" --write-mode per-packet

run fanout-100 "5. Fan-out: 1 publisher → 100 subscribers" \
  "One publisher at 1,000 msg/s (open loop), QoS 0, 64-byte payload, plain TCP; 100 subscribers on the same topic: 100,000 deliveries/s offered. \"broker CPU-s per M msgs\" is per delivery. $per_packet" \
  -- pubsub --mode fan-out --qos 0 --publishers 1 --subscribers 100 --rate 1000 --warmup 2s --duration 10s --drain 5s --write-mode per-packet

run fanout-1000 "6. Fan-out: 1 publisher → 1,000 subscribers" \
  "One publisher at 100 msg/s (open loop), QoS 0, 64-byte payload, plain TCP; 1,000 subscribers on the same topic, so the broker is offered 100,000 deliveries/s. That is above what mosquitto sustains on one core (its CPU per delivery, below, is over 10 µs): its received rate is its ceiling and its latency is queueing delay; Midge's latency is that of a broker keeping up." \
  -- pubsub --mode fan-out --qos 0 --publishers 1 --subscribers 1000 --rate 100 --warmup 2s --duration 10s --drain 5s --write-mode per-packet

run mtls-full "7a. Mutual-TLS connect: full handshakes" \
  "2,000 devices connect over TLS 1.3 with their own client certificates (1,000 identities, round robin), 64 attempts in flight, no session resumption: every handshake is a full one (certificate verification both ways). Connections stay open until all are up. \"broker CPU-ms per handshake\" is also broker CPU-seconds per thousand handshakes." \
  "${mtls_broker[@]}" -- connect --connections 2000 --concurrency 64 "${common_tls[@]}" --cert-dir "$P/devices"

run mtls-resumed "7b. Mutual-TLS connect: resumed handshakes" \
  "2,000 connections with TLS 1.3 session resumption (tickets), 8 attempts in flight, all presenting one client certificate: the client keeps tickets per client identity, so resumption is only possible when the same identity reconnects (with 1,000 distinct identities no connection here would reconnect). The first connections are full handshakes; the \"resumed\" row counts the resumed ones. Both brokers resume TLS 1.3 sessions here with \`require_certificate true\` (mosquitto 2.0.11 with OpenSSL 3 included), as the \"resumed\" counts show." \
  "${mtls_broker[@]}" -- connect --connections 2000 --concurrency 8 --tls-resume "${common_tls[@]}" \
  --cert "$P/devices/lg-d0.crt" --key "$P/devices/lg-d0.key"

run idle-mtls "8. $IDLE_CONNS idle mutual-TLS connections: memory" \
  "$IDLE_CONNS devices (own certificates, full handshakes, 64 in flight) connect and stay idle for 5 s. \"broker RSS bytes per conn\" is (RSS after − RSS before) / connections on a freshly started broker. ${idle_note}" \
  "${mtls_broker[@]}" -- connect --connections "$IDLE_CONNS" --concurrency 64 --hold 5s --max-time 300s "${common_tls[@]}" --cert-dir "$P/devices"

run fleet "9. Fleet: $FLEET_DEVICES mutual-TLS devices" \
  "$FLEET_DEVICES devices, each with its own minted client certificate (CN = client id; cached in \`$P/identities\` across runs), connect over mutual TLS at $FLEET_RAMP handshakes/s (open loop; \"connect\" latency counts from each device's slot, so a broker slower than the ramp shows it) from source addresses spread over 127.0.0.0/8, subscribe \`fleet/ID/cmd\`, sit **idle for 30 s** (only PINGREQs, 30 s keep-alive: \"idle broker CPU %\") and then each publishes QoS 1 telemetry (64 bytes) to \`fleet/ID/telemetry\` every 3 s with 20 % jitter — $((FLEET_DEVICES / 3)) msg/s in total — to 4 backend consumers on \`\$share/backend/fleet/+/telemetry\`, while a backend publishes 10 commands/s to devices. 5 s warm-up, 30 s measured. \"broker CPU-s per M msgs\" is the broker's CPU over the measured window per message sent in it (telemetry + commands); \"broker RSS bytes per device\" is (RSS after the ramp − RSS before) / devices. Issue-13 targets: CPU per message ≤ 0.4× and p99 ≤ 0.5× mosquitto's, ≤ 6 KB per device, idle CPU ≤ mosquitto's. $per_packet" \
  "${mtls_broker[@]}" -- fleet --devices "$FLEET_DEVICES" --interval 3s --jitter 0.2 --backends 4 --cmd-rate 10 \
  --ramp-rate "$FLEET_RAMP" --max-ramp 300s --settle 3s --idle 30s --warmup 5s --duration 30s --drain 10s \
  "${common_tls[@]}" --mint-ca-cert "$P/ca.crt" --mint-ca-key "$P/ca.key" --cert-cache "$P/identities" --write-mode per-packet

coalesced="**Extra, not a headline:** the loadgen's old coalesced writes (\`--write-mode coalesced\`): everything due at once in one write, which no device library does; kept to compare with reports made before per-packet writes became the default."

run qos0-pairs-coalesced "X1. QoS 0 pairs, maximum rate, coalesced writes (extra)" \
  "As 1 with coalesced writes. $coalesced" \
  -- pubsub --mode pairs --qos 0 --publishers 10 --subscribers 10 --warmup 2s --duration 10s --drain 5s --write-mode coalesced

run qos1-pairs-coalesced "X2. QoS 1 pairs, maximum rate, coalesced writes (extra)" \
  "As 2 with coalesced writes. $coalesced" \
  -- pubsub --mode pairs --qos 1 --publishers 10 --subscribers 10 --warmup 2s --duration 10s --drain 5s --write-mode coalesced

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
row "3 QoS 1 20k/s plain" qos1-20k-plain "broker CPU-s per M msgs in window"
row "3 QoS 1 20k/s plain" qos1-20k-plain "p50 µs"
row "3 QoS 1 20k/s plain" qos1-20k-plain "p99 µs"
row "4 QoS 1 20k/s mTLS" qos1-20k-mtls "broker CPU-s per M msgs in window"
row "4 QoS 1 20k/s mTLS" qos1-20k-mtls "p50 µs"
row "4 QoS 1 20k/s mTLS" qos1-20k-mtls "p99 µs"
row "5 fan-out 1→100" fanout-100 "received msg/s"
row "5 fan-out 1→100" fanout-100 "broker CPU-s per M msgs"
row "6 fan-out 1→1000" fanout-1000 "received msg/s"
row "6 fan-out 1→1000" fanout-1000 "p99 µs"
row "6 fan-out 1→1000" fanout-1000 "broker CPU-s per M msgs"
row "7a mTLS full" mtls-full "handshakes/s"
row "7a mTLS full" mtls-full "broker CPU-ms per handshake"
row "7b mTLS resumed" mtls-resumed "resumed"
row "7b mTLS resumed" mtls-resumed "handshakes/s"
row "7b mTLS resumed" mtls-resumed "broker CPU-ms per handshake"
row "8 idle mTLS" idle-mtls "broker RSS bytes per conn"
row "9 fleet" fleet "devices connected"
row "9 fleet" fleet "broker CPU-s per M msgs"
row "9 fleet" fleet "p50 µs"
row "9 fleet" fleet "p99 µs"
row "9 fleet" fleet "broker RSS bytes per device"
row "9 fleet" fleet "idle broker CPU %"
row "9 fleet" fleet "handshakes/s"
row "X1 QoS 0 pairs, coalesced (extra)" qos0-pairs-coalesced "broker CPU-s per M msgs"
row "X2 QoS 1 pairs, coalesced (extra)" qos1-pairs-coalesced "broker CPU-s per M msgs"

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
  echo "- Clients send like devices: one write syscall per MQTT packet (one TLS record each; \`--write-mode per-packet\`). Only the X scenarios, marked as extras, coalesce writes."
  echo "- \"broker CPU-s per M msgs\" is the broker's CPU time (user + system, \`/proc/PID/stat\`) over the whole run divided by messages delivered (fleet: over the measured window, per message sent in it; "… in window": pubsub over the measured window only, per delivery of a message sent in it), in seconds per million: it does not depend on whether the load generator or a busy machine limited the rate. \"loadgen CPU-s per M msgs\" and \"loadgen busy %\" show the load generator's own cost; a run is marked loadgen-bound when its core was ≥ 90 % busy."
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
