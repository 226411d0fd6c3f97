#!/usr/bin/env bash
# `duffy serve` against the reference (../shared/bench/reference), in one run:
#   benches/vs-reference.sh [MACHINES ...]          default: 1000 100000
# For each farm size: builds `duffy serve` (release), starts it on a fresh
# SQLite file (synchronous=FULL, the default) with MACHINES simulated
# machines, a pool 7/x86_64 with a standby target of STANDBY_PCT% of them,
# zero install time (released nodes are reinstalled at once, through the
# reconciler), no rate limit, no quota, no fail cap; creates a key; waits
# for the pool to fill; runs the reference's compare.sh against it (A = the
# reference with NODES=MACHINES, B = duffy, A B A B ...); prints B/A and the
# fsync cost (4 KiB write + fdatasync beside the database) measured before
# and after the comparison; stops the server.
#
# Env: CONNS=64 SECS=15 REPS=3 WARM=2 (passed to compare.sh), STANDBY_PCT=90,
#      REFERENCE=<dir of compare.sh> (default ../shared/bench/reference from
#      the repository), KEEP_LOG=1 (keep the server's log, which ends with
#      the SQLite writer's time per kind of operation), QUOTA=N (the key's
#      project's quota; default: the number of machines, so every claim
#      checks a quota that never refuses; QUOTA=none for no quota),
#      DUFFY=path (run that duffy binary instead of building this
#      checkout's).
# CONNS=1 measures one job at a time (the get and done latency targets).
# Before trusting a figure, check the machine's load (printed at the start
# and the end of every comparison): a build starting mid-run skews it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
REFERENCE=${REFERENCE:-$root/../shared/bench/reference}
[ -x "$REFERENCE/compare.sh" ] || REFERENCE=/work/shared/bench/reference
[ -x "$REFERENCE/compare.sh" ] || { echo "no reference compare.sh (set REFERENCE=dir)" >&2; exit 2; }
STANDBY_PCT=${STANDBY_PCT:-90}
export CONNS=${CONNS:-64} SECS=${SECS:-15} REPS=${REPS:-3} WARM=${WARM:-2}
machines_list=("$@")
[ ${#machines_list[@]} -gt 0 ] || machines_list=(1000 100000)

if [ -z "${DUFFY:-}" ]; then cargo build -q --release -p duffy-http; fi
duffy=${DUFFY:-$root/target/release/duffy}

work=
server=
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; server=; fi
  if [ -n "$work" ]; then
    [ -n "${KEEP_LOG:-}" ] && [ -f "$work/serve.log" ] && cp "$work/serve.log" "/tmp/duffy-vs-reference-$$.log"
    rm -rf "$work"; work=
  fi
}
trap cleanup EXIT

# fsync cost where the database lives: N x (write 4 KiB at offset 0 + fdatasync).
fsync_probe() {
  python3 - "$1" <<'EOF'
import os, sys, time, statistics
path = os.path.join(sys.argv[1], ".fsync-probe")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
buf = os.urandom(4096)
ts = []
for _ in range(200):
    t = time.perf_counter()
    os.pwrite(fd, buf, 0)
    os.fdatasync(fd)
    ts.append((time.perf_counter() - t) * 1e3)
os.close(fd); os.unlink(path)
ts.sort()
print(f"p50={ts[len(ts)//2]:.3f}ms p99={ts[int(len(ts)*0.99)]:.3f}ms")
EOF
}

for machines in "${machines_list[@]}"; do
  standby=$(( machines * STANDBY_PCT / 100 ))
  work=$(mktemp -d /tmp/duffy-vs-ref.XXXXXX)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat > "$work/duffy.toml" <<TOML
listen = "127.0.0.1:$port"
database = "$work/duffy.db"
[policy]
rate_limit = "off"
fail_cap = "off"
max_concurrent_installs = $machines
power_check_interval = "off"
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
  quota=${QUOTA:-$machines}; [ "$quota" = none ] && quota=
  key=$("$duffy" --db "$work/duffy.db" key create --project bench ${quota:+--quota "$quota"})
  RUST_LOG=${RUST_LOG:-info} "$duffy" serve --config "$work/duffy.toml" 2>"$work/serve.log" &
  server=$!
  url="http://127.0.0.1:$port"
  ready=0
  for _ in $(seq 1200); do
    # Not listening yet while it creates a big farm: that is not an error.
    ready=$( (curl -s "$url/metrics" || true) | sed -n 's/^duffy_nodes{state="Ready",pool="7\/x86_64"} //p')
    [ "${ready:-0}" -ge "$standby" ] && break
    kill -0 "$server" 2>/dev/null || { echo "duffy serve died:" >&2; tail -20 "$work/serve.log" >&2; exit 1; }
    sleep 0.5
  done
  [ "${ready:-0}" -ge "$standby" ] || { echo "the pool did not fill ($ready of $standby Ready)" >&2; exit 1; }
  echo "== $machines machines, $ready Ready (standby $standby); duffy serve pid $server at $url"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "fsync before: $(fsync_probe "$work")"
  cpu0=$(awk '{print $14+$15}' "/proc/$server/stat")
  curl -s "$url/metrics" > "$work/metrics0"
  NODES=$machines "$REFERENCE/compare.sh" "$url" "$key" | tee "$work/compare.out"
  curl -s "$url/metrics" > "$work/metrics1"
  cpu1=$(awk '{print $14+$15}' "/proc/$server/stat")
  # The store's own fsyncs and group commits during the B runs (the
  # reference runs leave duffy idle), from its histograms in /metrics.
  python3 - "$work/metrics0" "$work/metrics1" "$work/compare.out" "$SECS" "$WARM" <<'EOF'
import json, re, sys
def scrape(path):
    out = {}
    for line in open(path):
        m = re.match(r'^(duffy_store_(?:fsync_duration_seconds|batch_operations)_(?:sum|count)) (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out
a, b = scrape(sys.argv[1]), scrape(sys.argv[2])
d = {k: b.get(k, 0) - a.get(k, 0) for k in b}
secs, warm = float(sys.argv[4]), float(sys.argv[5])
runs = [json.loads(l.split(' ', 2)[2]) for l in open(sys.argv[3]) if re.match(r'B \d+ ', l)]
cycles = sum(r['cycles'] for r in runs) * (secs + warm) / secs
f, fs = d.get('duffy_store_fsync_duration_seconds_count', 0), d.get('duffy_store_fsync_duration_seconds_sum', 0)
t, ops = d.get('duffy_store_batch_operations_count', 0), d.get('duffy_store_batch_operations_sum', 0)
if f and t and cycles:
    print(f"duffy's store during the B runs: {f:.0f} WAL fsyncs, mean {fs / f * 1e3:.3f} ms "
          f"({f / cycles:.3f} per cycle, warm-up included), {t:.0f} transactions of {ops / t:.1f} operations "
          f"({ops / cycles:.2f} write operations per cycle)")
EOF
  echo "fsync after: $(fsync_probe "$work")"
  echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
  # Server CPU over the B runs (timed part and warm-up; A runs leave it idle).
  python3 - "$work/compare.out" "$cpu0" "$cpu1" "$(getconf CLK_TCK)" "$SECS" "$WARM" <<'EOF'
import json, sys
out, c0, c1, hz, secs, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
import re
b = [json.loads(l.split(' ', 2)[2]) for l in open(out) if re.match(r'B \d+ ', l)]
cycles = sum(r['cycles'] for r in b) * (secs + warm) / secs
if cycles:
    print(f"duffy serve CPU: {(c1 - c0) / hz / cycles * 1e6:.0f} us per cycle (warm-up included, estimated)")
EOF
  if grep -q '^B/A' "$work/compare.out"; then
    grep '^B/A' "$work/compare.out" | python3 -c '
import sys
f = dict(kv.split("=") for kv in sys.stdin.read().split()[1:])
print("RESULT B/A: throughput %s  cycle p99 %s  get p50 %s  done p50 %s  get p99 %s  done p99 %s" % (
    f["cycles_per_s"], f["cycle_p99_ms"], f["get_p50_ms"], f["done_p50_ms"], f["get_p99_ms"], f["done_p99_ms"]))'
  fi
  cleanup
done
