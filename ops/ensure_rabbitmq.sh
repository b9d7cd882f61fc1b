#!/usr/bin/env bash
# Makes sure a RabbitMQ answers on 127.0.0.1:5672 for the tests: the one running, else the system's
# rabbitmq-server started here. Without either, the RabbitMQ tests are skipped (pytest says why), so
# this never fails the test run.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

up() { "$ROOT/.venv/bin/python" -c "import socket; socket.create_connection(('127.0.0.1', 5672), 1).close()" 2>/dev/null; }
up && exit 0

SERVER="$(command -v rabbitmq-server || true)"
[ -z "$SERVER" ] && [ -x /usr/sbin/rabbitmq-server ] && SERVER=/usr/sbin/rabbitmq-server
if [ -z "$SERVER" ]; then
    echo "no RabbitMQ on 127.0.0.1:5672 and rabbitmq-server is not installed: RabbitMQ tests will be skipped" >&2
    exit 0
fi
echo "no RabbitMQ on 127.0.0.1:5672; starting $SERVER" >&2
"$SERVER" -detached
for _ in $(seq 90); do up && exit 0; sleep 1; done
echo "RabbitMQ did not start on 127.0.0.1:5672: RabbitMQ tests will be skipped" >&2
exit 0
