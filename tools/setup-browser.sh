#!/usr/bin/env bash
# Install the browser that the end-to-end test of the web dashboard (tests/hub/test_dashboard.py) drives:
# Debian's chromium package, run headless over the Chrome DevTools Protocol (no browser download of its own).
# When chromium is missing and we are root with apt-get, it is installed with --no-install-recommends;
# otherwise a message says what is skipped and what to install (the test then skips, or fails under CI=true).
# Idempotent, and quick when the browser is already there (nothing is installed or updated then).
# Environment: ORES_CHROMIUM, a browser to use instead of chromium on the PATH (then nothing is installed).
set -euo pipefail

say() { printf 'setup-browser: %s\n' "$*"; }

is_root() { [ "$(id -u)" -eq 0 ]; }

find_browser() {
    if [ -n "${ORES_CHROMIUM:-}" ]; then
        [ -x "$ORES_CHROMIUM" ] && printf '%s\n' "$ORES_CHROMIUM"
        return 0
    fi
    for name in chromium chromium-browser google-chrome; do  # as tests/hub/browser.py looks for it
        if command -v "$name" 2>/dev/null; then
            return 0
        fi
    done
}

# Debian's launcher script prints shell noise on stderr on some machines: keep only the version line.
version_of() { "$1" --version 2>/dev/null | head -n 1 || true; }

browser=$(find_browser)
if [ -n "$browser" ]; then
    say "$browser is present ($(version_of "$browser")); nothing to do"
    exit 0
fi
if [ -n "${ORES_CHROMIUM:-}" ]; then
    say "skipping: ORES_CHROMIUM=$ORES_CHROMIUM is not an executable (unset it to use Debian's chromium)"
    exit 0
fi
if ! is_root || ! command -v apt-get >/dev/null 2>&1; then
    say "skipping: chromium is missing and we are not root with apt-get;" \
        "install Debian's chromium package (or set ORES_CHROMIUM) to run the dashboard test"
    exit 0
fi

say "installing Debian's chromium (apt-get, --no-install-recommends)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
browser=$(find_browser)
if [ -z "$browser" ]; then
    say "error: chromium was installed but is not on the PATH"
    exit 1
fi
say "done: $browser ($(version_of "$browser"))"
