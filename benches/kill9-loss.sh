#!/bin/bash
# Messages lost after kill -9 (issue 11), mosquitto `persistence true` against Midge
# `persistence_sync always`, same procedure, 127.0.0.1 only:
#   N=20000 benches/kill9-loss.sh        (MIDGE=path, MOSQUITTO=path)
# One offline persistent session (mosquitto_sub -c, QoS 1) gets N QoS 1 messages from
# benches/pub-qos1.py, which exits once all N are PUBACKed; then the broker is killed with
# SIGKILL, restarted on the same files, and the session reconnects: every acknowledged
# message should arrive. Prints, per broker, how many of the N acknowledged messages came.
set -u
N=${N:-20000}
PORT=${PORT:-18941}
MIDGE=${MIDGE:-target/release/midge}
MOSQUITTO=${MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
here=$(dirname "$0")
run() { # name, command (with CONF), conf text
  local name=$1 cmd=$2 D=/tmp/kill9-$1
  rm -rf "$D"; mkdir -p "$D/data"
  printf '%s\n' "$3" > "$D/broker.conf"
  local CONF=$D/broker.conf
  start() { eval "exec $cmd" >>"$D/log" 2>&1 & echo $! > "$D/pid"; }
  wait_listen() { for _ in $(seq 1 2000); do ss -ltn | grep -q "127.0.0.1:$PORT " && return 0; sleep 0.01; done; echo "$name did not listen" >&2; exit 2; }
  start; wait_listen
  mosquitto_sub -p "$PORT" -i k9-sub -c -q 1 -t bench/x -E
  python3 "$here/pub-qos1.py" "$PORT" "$N"
  kill -9 "$(cat "$D/pid")"; sleep 0.5
  while ss -ltn | grep -q "127.0.0.1:$PORT "; do sleep 0.05; done
  start; wait_listen
  local got
  got=$(timeout 20 mosquitto_sub -p "$PORT" -i k9-sub -c -q 1 -t bench/x -C "$N" -W 10 2>/dev/null | sort -u | wc -l)
  echo "$name: $got of $N PUBACKed messages delivered after kill -9 (lost $((N - got)))"
  kill "$(cat "$D/pid")" 2>/dev/null; wait 2>/dev/null
}
run mosquitto "$MOSQUITTO -c \$CONF" "listener $PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location /tmp/kill9-mosquitto/data/
max_queued_messages $((N * 2))"
run midge "$MIDGE -c \$CONF --shards 1" "listener $PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location /tmp/kill9-midge/data
max_queued_messages $((N * 2))"
