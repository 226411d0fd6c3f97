#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine that has Rust:
# the BMC simulator and IPMI client, an SSH server for contextualization
# tests, curl (the PXE test runs the kickstart's first-boot reporter), a
# Python venv with the legacy `cico` client, mount tools and e2fsprogs for
# the disk-full and read-only tests (tmpfs, loop-mounted ext4), a C
# compiler for the power-cut test's LD_PRELOAD shim, Chromium with its
# WebDriver server for the dashboard's browser tests, and schemathesis (in
# the same venv) for the property test of /api/v1 against its OpenAPI
# document. Idempotent: a
# second run only checks. Needs root (or sudo) for the Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(openipmi ipmitool openssh-server openssh-client python3-venv curl mount util-linux e2fsprogs gcc libc6-dev chromium chromium-driver)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The legacy client, exactly the version Jenkins jobs use.
venv=.venv
if [ ! -x "$venv/bin/cico" ]; then
  echo "creating $venv with python-cicoclient 0.4.7"
  python3 -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; python3 -m venv --without-pip "$venv"; }
  "$venv/bin/python" -m pip --version >/dev/null 2>&1 || "$venv/bin/python" -m ensurepip -q
  "$venv/bin/python" -m pip install -q --disable-pip-version-check 'python-cicoclient==0.4.7'
fi
"$venv/bin/cico" --help >/dev/null

# Property tests of /api/v1 against its own OpenAPI document
# (duffy-http/tests/schemathesis.rs). Pinned to a major version: its CLI
# flags are what the test passes.
if [ ! -x "$venv/bin/schemathesis" ]; then
  echo "installing schemathesis 4 into $venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check 'schemathesis>=4,<5'
fi
"$venv/bin/schemathesis" --version >/dev/null

for tool in ipmi_sim ipmitool sshd ssh-keygen curl mount findmnt mkfs.ext4 e2fsck cc chromium chromedriver; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || { echo "missing $tool after install" >&2; exit 1; }
done
echo "test dependencies ready"
