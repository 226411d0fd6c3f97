#!/usr/bin/env bash
# Reconciler refill benchmark (BENCHMARKS.md):
#   benches/refill.sh D C T_MS
# Starts `duffy serve` (release, SQLite synchronous=FULL) with D simulated
# machines, none installed, a pool target of D, install time T_MS and
# install concurrency C, and measures the time until all D are Ready against
# the ideal T x ceil(D/C), and the server's CPU time per install.
set -euo pipefail
cd "$(dirname "$0")/.."
d=${1:-64}
c=${2:-16}
t=${3:-1000}
cargo build -q --release -p duffy-http
work=$(mktemp -d /tmp/duffy-refill.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/duffy.toml" <<TOML
listen = "127.0.0.1:$port"
database = "$work/duffy.db"
[policy]
max_concurrent_installs = $c
power_check_interval = "off"
[[pools]]
release = "7"
arch = "x86_64"
standby = $d
[hardware]
kind = "simulated"
machines = $d
install_min_ms = $t
install_max_ms = $t
prepare_ms = 0
TOML
start=$(date +%s.%N)
target/release/duffy serve --config "$work/duffy.toml" 2>"$work/serve.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
url="http://127.0.0.1:$port"
base_ticks=""
while :; do
  ready=$( (curl -s "$url/metrics" || true) | sed -n 's/^duffy_nodes{state="Ready",pool="7\/x86_64"} //p')
  # CPU is counted from the moment the service answers (start-up excluded).
  [ -z "$base_ticks" ] && [ -n "$ready" ] && base_ticks=$(( $(awk '{print $14 + $15}' "/proc/$server/stat") - base_ticks ))
  [ "${ready:-0}" -ge "$d" ] && break
  sleep 0.02
done
end=$(date +%s.%N)
ticks=$(( $(awk '{print $14 + $15}' "/proc/$server/stat") - base_ticks ))
hz=$(getconf CLK_TCK)
python3 - "$start" "$end" "$d" "$c" "$t" "$ticks" "$hz" <<'PY'
import math, sys
start, end, d, c, t, ticks, hz = map(float, sys.argv[1:])
took = end - start
ideal = t / 1000 * math.ceil(d / c)
cpu = ticks / hz
print(f"D={d:.0f} C={c:.0f} T={t/1000:.2f}s: all Ready after {took:.2f} s; ideal {ideal:.2f} s; "
      f"overhead {100 * (took / ideal - 1):+.1f}%; server CPU {cpu * 1000:.0f} ms in all, "
      f"{cpu * 1000 / d:.2f} ms per install (from the first answer on; /metrics polled every 20 ms)")
PY
