#!/usr/bin/env bash
# The PostgreSQL benchmark (BENCHMARKS.md): builds the release binaries and
# runs duffy-pg-bench, which starts a throwaway PostgreSQL cluster from
# Debian's binaries (durable defaults: fsync and synchronous commit on; or
# the server of DUFFY_TEST_POSTGRES_URL), and measures, for 1,000 and
# 100,000 Ready nodes, a raw SKIP LOCKED claim+release loop, the same loop
# writing what a Duffy cycle writes, the PgStore API, and one and three
# `duffy serve` replicas under duffy-load, all with 64 clients. Extra
# arguments go to duffy-pg-bench (e.g. --seconds 30, --nodes 1000).
# About 4 minutes on 2 cores. Needs scripts/install-test-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p duffy-http --bin duffy -p duffy-benches --bin duffy-load --bin duffy-pg-bench
# What an fsync costs where the cluster lives (4 KiB write + fdatasync, 200
# times), and the machine's load, before and after: the context of the
# figures (BENCHMARKS.md reports them beside every run).
probe() {
  python3 - "${TMPDIR:-/tmp}" <<'EOF'
import os, sys, time
path = os.path.join(sys.argv[1], ".duffy-pg-bench-fsync-probe")
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
load = " ".join(open("/proc/loadavg").read().split()[0:3])
print(f"fsync p50 {ts[len(ts)//2]:.3f} ms, p99 {ts[int(len(ts)*0.99)]:.3f} ms; load average {load}")
EOF
}
echo "before: $(probe)" >&2
target/release/duffy-pg-bench \
  --duffy target/release/duffy --load target/release/duffy-load \
  --json "${TMPDIR:-/tmp}/duffy-pg-bench.json" "$@"
echo "after: $(probe)" >&2
