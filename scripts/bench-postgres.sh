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
exec target/release/duffy-pg-bench \
  --duffy target/release/duffy --load target/release/duffy-load \
  --json "${TMPDIR:-/tmp}/duffy-pg-bench.json" "$@"
