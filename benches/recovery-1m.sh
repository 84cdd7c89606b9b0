#!/bin/bash
# Recovery time for 1,000,000 queued QoS 1 messages (issue 11). 127.0.0.1 only.
# Usage: N=1000000 AUTOSAVE=1800 benches/recovery-1m.sh   (MIDGE=path to the binary)
# One offline persistent session (mosquitto_sub -c) gets N QoS 1 messages (benches/pub-qos1.py,
# a raw-socket publisher with 2,000 in flight), the broker is killed with SIGKILL and
# restarted: time to its listener, its recovery log line, RSS, bytes on disk; then the session
# reconnects and must receive all N (the last payload printed is N-1).
set -u
N=${N:-1000000}
PORT=${PORT:-18931}
D=/tmp/bench1m; rm -rf $D; mkdir -p $D
cat > $D/midge.conf <<C
listener $PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $D/data
max_queued_messages 2000000
autosave_interval ${AUTOSAVE:-1800}
log_dest stderr
C
start() { RUST_LOG=info ${MIDGE:-target/release/midge} -c $D/midge.conf --shards 2 2>>$D/log.$1 & echo $! > $D/pid; }
wait_listen() { for i in $(seq 1 6000); do grep -q "listening on 127.0.0.1:$PORT" $D/log.$1 2>/dev/null && return 0; sleep 0.01; done; return 1; }
start 1; wait_listen 1
mosquitto_sub -p $PORT -i bench-sub -c -q 1 -t bench/x -E
t0=$(date +%s.%N)
python3 "$(dirname "$0")/pub-qos1.py" $PORT $N
t1=$(date +%s.%N)
echo "published $N in $(echo "$t1 - $t0" | bc) s"
sleep 3   # (benchmark only: let a last compaction tick pass when AUTOSAVE is short)
du -sb $D/data; find $D/data -type f -printf '%s %p\n' | sort -k2
kill -9 $(cat $D/pid); sleep 1
while ss -ltn | grep -q ":$PORT "; do sleep 0.05; done
s0=$(date +%s.%N); start 2; wait_listen 2; s1=$(date +%s.%N)
echo "restart to listening: $(echo "$s1 - $s0" | bc) s"
grep -E "records read|compacted" $D/log.2 | tail -3
echo "RSS after recovery: $(ps -o rss= -p $(cat $D/pid)) KiB"
du -sb $D/data
# Everything arrives:
timeout 120 mosquitto_sub -p $PORT -i bench-sub -c -q 1 -t bench/x -C $N | tail -1
kill $(cat $D/pid)
