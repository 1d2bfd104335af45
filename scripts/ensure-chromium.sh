#!/usr/bin/env bash
# Installs Debian's Chromium and its WebDriver (chromedriver) when missing: the console's test
# (tests/console.rs) drives the real browser headless. Nothing runs until a test starts them.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
echo "==> installing chromium and chromium-driver (the console's browser test; once per machine)" >&2
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
