#!/usr/bin/env bash
# Prepare every sandbox backend on a fresh Debian bookworm machine (run as root; idempotent).
#
#   1. apt-get install docker.io bubblewrap debootstrap chromium (skipped when already installed)
#   2. start dockerd in the background if `docker info` fails; log to $DOCKERD_LOG; wait for it
#   3. build the sandbox image with the project's own command (skips when it exists)
#   4. print `agentopd sandbox check`
#
# Expects the project's venv to be active or at $VENV (default .venv), with agentopd installed.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/agentopd-dockerd.log}"
export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-sandbox.sh: must run as root (apt-get, dockerd, debootstrap)" >&2
    exit 1
fi

if [ -x "$VENV/bin/python" ]; then
    PY="$VENV/bin/python"
else
    PY="$(command -v python3)"
fi

# ---------------------------------------------------------------- packages
missing=()
for pkg in docker.io bubblewrap debootstrap chromium; do  # chromium: the HTML viewer tests
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "== docker.io bubblewrap debootstrap chromium already installed"
fi

# ---------------------------------------------------------------- dockerd
if docker info >/dev/null 2>&1; then
    echo "== dockerd already running"
else
    echo "== starting dockerd (log: $DOCKERD_LOG)"
    # Its own session: stopping the shell or job that ran this script must not take dockerd
    # down with it.
    setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 < /dev/null &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        echo "dockerd did not come up within 60 s; last log lines:" >&2
        tail -n 20 "$DOCKERD_LOG" >&2 || true
        exit 1
    fi
fi

# ---------------------------------------------------------------- image
echo "== agentopd sandbox build-image"
if command -v agentopd >/dev/null 2>&1 && agentopd sandbox --help >/dev/null 2>&1; then
    agentopd sandbox build-image
elif [ -x "$VENV/bin/agentopd" ] && "$VENV/bin/agentopd" sandbox --help >/dev/null 2>&1; then
    "$VENV/bin/agentopd" sandbox build-image
else  # the top-level CLI does not expose `sandbox` yet: same code, module entry point
    "$PY" -m agentopd.sandbox.cli build-image
fi

# ---------------------------------------------------------------- report
"$PY" -m agentopd.sandbox.cli check
echo "== sandbox setup done in $(($(date +%s) - start)) s"
