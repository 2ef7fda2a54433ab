#!/usr/bin/env bash
# Set up the Matter controller that the end-to-end test of the Matter bridge (tests/matter_bridge/e2e) and
# bench/matter.py drive: python-matter-server (CHIP SDK) in its own virtualenv, .venv-matter at the repository
# root, plus what the CHIP SDK needs from the system:
#   * Debian's libnl-3-200 and libnl-route-3-200 (_ChipDeviceCtrl.so links them) and iproute2 (`ip netns`),
#     installed with apt-get when missing and we are root; otherwise a message says what to install;
#   * an empty /data directory (the CHIP SDK hard-codes /data/chip_*.ini; the tests bind a per-run directory
#     over it in a private mount namespace, so /data itself stays empty), made when we are root.
# Idempotent, and quick when everything is already in place: the venv is rebuilt only when the requirements
# file or the Python version changed (a stamp file in the venv records both) or matter-server is missing.
# Environment: PYTHON (default python3), ORES_MATTER_VENV (default <repo>/.venv-matter).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQ="$ROOT/tests/matter_bridge/controller-requirements.txt"
VENV=${ORES_MATTER_VENV:-$ROOT/.venv-matter}
PYTHON=${PYTHON:-python3}
LIBS=(libnl-3-200 libnl-route-3-200)

say() { printf 'setup-matter-controller: %s\n' "$*"; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# ---- system libraries ----------------------------------------------------------------------------------------
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for lib in "${LIBS[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$lib")
        fi
    done
else  # not Debian: look for the shared objects themselves
    for so in libnl-3.so.200 libnl-route-3.so.200; do
        ldconfig -p 2>/dev/null | grep -q "$so" || missing+=("$so")
    done
fi
# iproute2 (`ip netns`) is not in minimal images; util-linux (`unshare`, `mount`) is essential on Debian.
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -eq 0 ]; then
    :
elif is_root && command -v apt-get >/dev/null 2>&1; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "skipping system libraries: ${missing[*]} missing and not root with apt-get (install them yourself)"
fi

# ---- /data, the CHIP SDK's mount point ---------------------------------------------------------------------------
if is_root; then
    mkdir -p /data
elif [ ! -d /data ]; then
    say "skipping /data: not root (the end-to-end test needs root anyway)"
fi

# ---- the controller's virtualenv -----------------------------------------------------------------------------------
pyver=$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
stamp="$(sha256sum "$REQ" | cut -d' ' -f1) python-$pyver"
if [ -x "$VENV/bin/matter-server" ] && [ "$(cat "$VENV/.ores-stamp" 2>/dev/null || true)" = "$stamp" ]; then
    say "$VENV is up to date"
    exit 0
fi
say "creating $VENV (python $pyver)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --disable-pip-version-check --no-input -q -r "$REQ"
# The CHIP SDK's native part must load (this is where a missing libnl shows up).
"$VENV/bin/python" -c 'import ctypes, chip.native as n; ctypes.CDLL(n.FindNativeLibraryPath(n.Library.CONTROLLER))' \
    >/dev/null 2>&1 ||
    say "warning: the CHIP SDK's native library does not load (missing system libraries?)"
printf '%s\n' "$stamp" >"$VENV/.ores-stamp"
say "done: $VENV/bin/matter-server"
