#!/usr/bin/env bash
# A Jenkins job on API v1, through `duffy client`: the counterpart of
# jenkins_job.py (which speaks the legacy API).
#
# Asks Duffy for freshly installed machines, waiting in Duffy's queue when
# the pool is short (no retry loop of our own), runs the test command once
# per host, and hands the machines back: released when the tests pass,
# failed (kept for debugging, your SSH keys on root) when they do not, or
# when the job is interrupted.
#
#   export DUFFY_URL=http://duffy.example.org:8080
#   export DUFFY_KEY=...        # or ~/.config/duffy/client.toml, chmod 600
#   examples/jenkins_job_v1.sh --pool 9/x86_64 --count 2 --lifetime 2h \
#       --run 'ssh -o StrictHostKeyChecking=no root@{host} "cd /tmp && ./run-tests.sh"'
#
# The key never appears on a command line. Set DUFFY to the duffy binary
# if it is not on PATH. Needs bash and python3 (to read --json).
set -euo pipefail

duffy=${DUFFY:-duffy}
pool=7/x86_64
count=1
lifetime=
run="ssh -o StrictHostKeyChecking=no root@{host} 'uname -a'"

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: --pool RELEASE/ARCH[/FLAVOR] --count N --lifetime DURATION --run CMD ({host} is replaced)"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --pool) pool=$2; shift 2 ;;
        --count) count=$2; shift 2 ;;
        --lifetime) lifetime=$2; shift 2 ;;
        --run) run=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

# Progress ("waiting for 2 node(s) of 9/x86_64: 3 ahead, about 4m") goes
# to stderr, the session as JSON to stdout.
session=$("$duffy" client --json request-session --pool "$pool" --count "$count" ${lifetime:+--lifetime "$lifetime"})
field() { python3 -c 'import json, sys; v = json.load(sys.stdin)[sys.argv[1]]; print(" ".join(v) if isinstance(v, list) else v)' "$1" <<<"$session"; }
ssid=$(field id)
hosts=$(field hosts)
echo "session $ssid: $hosts (expires $(field expires_at))"

failed=1
finish() {
    if [ "$failed" -eq 0 ]; then
        "$duffy" client release "$ssid"
        echo "tests passed; nodes released"
    else
        "$duffy" client fail "$ssid"
        echo "tests failed; nodes kept for debugging (session $ssid)"
    fi
}
trap finish EXIT

for host in $hosts; do
    cmd=${run//\{host\}/$host}
    echo "+ $cmd"
    bash -c "$cmd" || exit 1
done
failed=0
