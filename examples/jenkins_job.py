#!/usr/bin/env python3
"""A Jenkins job in the style of the CentOS CI job scripts.

Asks Duffy for freshly installed machines, runs the test command on each,
and hands the machines back: /Node/done when the tests pass, /Node/fail when
they do not (so the machines stay up for debugging with your SSH keys on
root). Uses only Python's standard library.

    CICO_API_KEY=... python3 examples/jenkins_job.py \\
        --url http://127.0.0.1:8080 --count 2 \\
        --run 'ssh -o StrictHostKeyChecking=no root@{host} "cd /tmp && ./run-tests.sh"'

The key comes from --key, $CICO_API_KEY, or ~/duffy.key, as cico does.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def api_key(cli_key):
    if cli_key:
        return cli_key
    if os.environ.get("CICO_API_KEY"):
        return os.environ["CICO_API_KEY"]
    for path in ("~/.duffy.key", "~/duffy.key"):
        try:
            with open(os.path.expanduser(path)) as f:
                return f.read().strip()
        except OSError:
            pass
    sys.exit("no API key: pass --key, set CICO_API_KEY or write ~/duffy.key")


def call(base, path, **params):
    """GET base/path?params; returns the body as JSON when it is JSON, else text."""
    url = "%s/%s?%s" % (base.rstrip("/"), path, urllib.parse.urlencode(params))
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            body = r.read().decode()
    except urllib.error.HTTPError as e:
        # Duffy answers errors with a body that says what went wrong.
        body = e.read().decode()
    try:
        return json.loads(body)
    except ValueError:
        return body


def get_nodes(base, key, ver, arch, count, wait, interval):
    deadline = time.time() + wait
    while True:
        reply = call(base, "Node/get", key=key, ver=ver, arch=arch, count=count)
        if isinstance(reply, dict) and "hosts" in reply:
            return reply["hosts"], reply["ssid"]
        if reply == "Insufficient Nodes in READY State" and time.time() < deadline:
            print("no Ready nodes yet; retrying in %ds" % interval, flush=True)
            time.sleep(interval)
            continue
        sys.exit("could not get nodes: %s" % (reply.get("msg") if isinstance(reply, dict) else reply))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("DUFFY_URL", "http://127.0.0.1:8080"))
    p.add_argument("--key")
    p.add_argument("--ver", default="7")
    p.add_argument("--arch", default="x86_64")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--wait", type=int, default=600, help="seconds to wait for Ready nodes")
    p.add_argument("--interval", type=int, default=10, help="seconds between retries")
    p.add_argument("--run", default="ssh -o StrictHostKeyChecking=no root@{host} 'uname -a'",
                   help="command run once per host; {host} is replaced by the host name")
    args = p.parse_args()
    key = api_key(args.key)

    hosts, ssid = get_nodes(args.url, key, args.ver, args.arch, args.count, args.wait, args.interval)
    print("session %s: %s" % (ssid, " ".join(hosts)), flush=True)
    failed = False
    try:
        for host in hosts:
            cmd = args.run.format(host=host)
            print("+ %s" % cmd, flush=True)
            if subprocess.call(cmd, shell=True) != 0:
                failed = True
                break
    except KeyboardInterrupt:
        failed = True
    finally:
        if failed:
            reply = call(args.url, "Node/fail", key=key, ssid=ssid)
            print("tests failed; nodes kept for debugging (session %s): %s" % (ssid, reply), flush=True)
        else:
            reply = call(args.url, "Node/done", key=key, ssid=ssid)
            print("tests passed; nodes released: %s" % reply, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
