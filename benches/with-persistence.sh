#!/bin/bash
# Run a broker on a copy of the load generator's generated config with persistence turned on
# at a fresh directory (benches/persistence-compare.sh uses it; 127.0.0.1 only):
#   with-persistence.sh CONF DIR [EXTRA_LINE] -- BROKER ARGS...   (@CONF@ in ARGS: the copy)
set -eu
conf=$1 dir=$2; shift 2
extra=""
if [ "$1" != "--" ]; then extra=$1; shift; fi
shift
rm -rf "$dir"; mkdir -p "$dir"; chmod 777 "$dir"   # mosquitto drops root for its own user
out=$dir.conf
grep -v '^persistence' "$conf" > "$out"
printf 'persistence true\npersistence_location %s/\n%s\n' "$dir" "$extra" >> "$out"
args=()
for a in "$@"; do args+=("${a//@CONF@/$out}"); done
exec "${args[@]}"
