#!/usr/bin/env bash
# Reproduces the service benchmarks of BENCHMARKS.md in one command:
#   benches/load.sh [MACHINES] [CONCURRENCY] [SECONDS] [STANDBY]
# Builds the release binaries, starts `duffy serve` on a fresh SQLite file
# (synchronous=FULL) with a simulated farm of MACHINES nodes and zero install
# time, waits for the pool to fill, then runs in one go: fsync probe, the
# HTTP baseline (/healthz), the get+done load at CONCURRENCY, one job at a
# time, and /Inventory and /Node/get timings; prints the server's RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
machines=${1:-1000}
conc=${2:-64}
secs=${3:-10}
standby=${4:-$(( machines * 9 / 10 ))}
cargo build -q --release -p duffy-http -p duffy-benches
work=$(mktemp -d /tmp/duffy-load.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/duffy.toml" <<TOML
listen = "127.0.0.1:$port"
database = "$work/duffy.db"
[policy]
rate_limit = "off"
fail_cap = "off"
max_concurrent_installs = $machines
power_check_interval = "off"
tick = 1
[[pools]]
release = "7"
arch = "x86_64"
standby = $standby
[hardware]
kind = "simulated"
machines = $machines
install_min_ms = 0
install_max_ms = 0
prepare_ms = 0
TOML
keys=()
for i in 1 2 3 4; do keys+=(--key "$(target/release/duffy --db "$work/duffy.db" key create --project "load$i")"); done
target/release/duffy serve --config "$work/duffy.toml" 2>"$work/serve.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
url="http://127.0.0.1:$port"
for _ in $(seq 600); do
  # Not listening yet while it creates a big farm: that is not an error.
  ready=$( (curl -s "$url/metrics" || true) | sed -n 's/^duffy_nodes{state="Ready",pool="7\/x86_64"} //p')
  [ "${ready:-0}" -ge "$standby" ] && break
  sleep 0.5
done
echo "== farm: $machines machines, $ready Ready; server pid $server"
echo "== HTTP baseline: GET /healthz, $conc connections"
target/release/duffy-load --url "$url" "${keys[@]}" -c "$conc" --duration "$secs" --quiet --baseline-path /healthz
echo "== get+done, $conc concurrent jobs, hold 0 (synchronous=FULL)"
target/release/duffy-load --url "$url" "${keys[@]}" -c "$conc" --duration "$secs" --quiet --fsync-dir "$work"
echo "== one job at a time"
target/release/duffy-load --url "$url" "${keys[@]}" -c 1 --duration "$secs" --quiet --fsync-dir "$work"
echo "== /Node/get alone, one job at a time, 200 calls (ms)"
k=${keys[1]}
for i in $(seq 200); do
  t=$(curl -s -o "$work/get.json" -w '%{time_total}' "$url/Node/get?key=$k")
  ssid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ssid"])' "$work/get.json")
  curl -s -o /dev/null "$url/Node/done?key=$k&ssid=$ssid"
  echo "$t"
done | sort -n | awk '{a[NR]=$1} END {printf "p50 %.2f ms  p99 %.2f ms\n", a[int(NR/2)]*1000, a[int(NR*0.99)]*1000}'
echo "== full /Inventory ($machines nodes), 20 calls"
for i in $(seq 20); do curl -s -o /dev/null -w '%{time_total}\n' "$url/Inventory"; done | sort -n | awk '{a[NR]=$1} END {printf "p50 %.1f ms  max %.1f ms\n", a[int(NR/2)]*1000, a[NR]*1000}'
echo "== server resident memory"
grep VmRSS "/proc/$server/status"
