#!/usr/bin/env bash
# Makes sure a headless browser is there for the tests that check pages people look at (Flower's task
# list, the quality report): Debian's chromium and chromium-driver, installed with apt when missing
# and when this runs as root. Without them those tests are skipped (pytest says why).
set -uo pipefail

[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
    echo "chromium/chromedriver missing and not installable here: browser tests will be skipped" >&2
    exit 0
fi
echo "installing Debian's chromium and chromium-driver for the browser tests" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq > /dev/null && apt-get install -y -qq chromium chromium-driver > /dev/null \
    || echo "chromium install failed: browser tests will be skipped" >&2
exit 0
