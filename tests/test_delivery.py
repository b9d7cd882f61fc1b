"""Delivery across worker deaths, on Redis and RabbitMQ: a SIGKILLed worker's in-flight tasks run on
another worker within a minute, and a task on a live worker runs once however long it takes.

RabbitMQ tests use the broker named by ``IMAGEQA_TEST_AMQP`` (default guest on 127.0.0.1:5672;
``ops/ensure_rabbitmq.sh`` starts one), in a virtual host of their own when ``rabbitmqctl`` can make
one; they are skipped, saying why, when no RabbitMQ answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from kombu import Connection

from producer.broker import celery_app, celery_config, queue_depth, redis_client
from producer.constants import QUEUE_GENERATE, TASK_GENERATE, job_attempts_key
from producer.enqueue import enqueue_file
from producer.jobs import nothing_in_flight
from producer.settings import DEFAULT_VISIBILITY_TIMEOUT_S, ProducerSettings, RedisSettings
from tests.helpers import CollectorThread, WorkerProcess, make_images, wait_done, write_jsonl
from tests.test_faults import PARAMS, assert_exactly_once, lines_written, wait_for
from workers.delivery import REFRESHES_PER_TIMEOUT, DeliveryRefresher, refresh_interval_s
from workers.health import check_worker

REDIS_URL = os.environ.get("IMAGEQA_TEST_REDIS", "redis://127.0.0.1:6379") + "/12"
AMQP_BASE = os.environ.get("IMAGEQA_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
DELIVERY_SETTINGS = ("IMAGEQA_VISIBILITY_TIMEOUT_S", "IMAGEQA_RESTORE_INTERVAL_S", "IMAGEQA_BROKER_URL")


@dataclass(frozen=True)
class Broker:
    name: str
    redis_url: str
    """Job registry and results."""
    url: str
    """Where the tasks queue."""

    def producer_settings(self, **values: object) -> ProducerSettings:
        return ProducerSettings(redis_url=self.redis_url, broker_url=self.url, **values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A RabbitMQ virtual host for this session (deleted at the end), else the default one."""
    try:
        with Connection(f"{AMQP_BASE}//", connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as e:
        pytest.skip(f"no RabbitMQ answers at {AMQP_BASE} (start one with ops/ensure_rabbitmq.sh): {e}")
    ctl = shutil.which("rabbitmqctl")
    vhost = f"imageqa_test_{uuid.uuid4().hex[:8]}"
    user = urlsplit(AMQP_BASE).username or "guest"
    made = ctl is not None and _rabbitmqctl(ctl, "add_vhost", vhost)
    if made and ctl is not None and _rabbitmqctl(ctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*"):
        yield f"{AMQP_BASE}/{vhost}"
    else:
        yield f"{AMQP_BASE}//"  # shared: each test empties the queue first
    if made and ctl is not None:
        _rabbitmqctl(ctl, "delete_vhost", vhost)


def _rabbitmqctl(ctl: str, *args: str) -> bool:
    return subprocess.run([ctl, *args], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> Broker:
    redis_client(REDIS_URL).flushdb()
    if request.param == "redis":
        return Broker("redis", REDIS_URL, REDIS_URL)
    url: str = request.getfixturevalue("amqp_url")
    purge_amqp(url)
    return Broker("amqp", REDIS_URL, url)


def purge_amqp(url: str) -> None:
    """Empties the queue. Deleting it would not do: Kombu's producer pools, shared by every Celery app
    of a process, remember that they declared it and would publish to an exchange bound to nothing."""
    with Connection(url) as conn, conn.channel() as channel, contextlib.suppress(conn.channel_errors):
        channel.queue_purge(QUEUE_GENERATE)  # suppressed: not declared yet


@pytest.fixture
def workers(tmp_path: Path, media: Path) -> Iterator[list[WorkerProcess]]:
    """Started workers; all are stopped at the end, and none may be left running."""
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        w.stop(60)
    assert all(w.proc is None or w.proc.poll() is not None for w in started)


def start_worker(
    started: list[WorkerProcess], tmp_path: Path, media: Path, broker: Broker, name: str, **env: str
) -> WorkerProcess:
    base = {
        "IMAGEQA_REDIS_URL": broker.redis_url,
        "IMAGEQA_BROKER_URL": broker.url,
        "IMAGEQA_MEDIA_ROOTS": str(media),
        "IMAGEQA_ENGINE": "fake",
        "IMAGEQA_MODEL": "fake",
    }
    w = WorkerProcess({**base, **env}, tmp_path / f"{name}.log")
    for key in DELIVERY_SETTINGS:  # the defaults are under test, whatever this shell has set
        if key not in base and key not in env:
            w.env.pop(key, None)
    started.append(w)
    return w.start(60)


def received(w: WorkerProcess) -> int:
    return sum(
        1 for line in w.log().splitlines() if f"Task {TASK_GENERATE}[" in line and "] received" in line
    )


def job_rows(media: Path, count: int) -> Path:
    images = make_images(media, count)
    return write_jsonl(media / "in.jsonl", [{"image": p.name, "n": i} for i, p in enumerate(images)])


def test_a_killed_workers_128_tasks_run_elsewhere_within_a_minute(broker, workers, media, tmp_path, capsys):
    # Given a worker with the default delivery settings holding 128 slow tasks, 32 more queued
    rows, held = 160, 128
    source, output = job_rows(media, rows), tmp_path / "out.jsonl"
    first = start_worker(
        workers, tmp_path, media, broker, "first", IMAGEQA_CONCURRENCY=str(held), IMAGEQA_FAKE_DELAY_S="300"
    )
    assert first.proc is not None
    with CollectorThread(broker.redis_url):
        settings = broker.producer_settings()
        job_id = enqueue_file(source, output, settings=settings, params=PARAMS).job_id
        wait_for(lambda: received(first) >= held, 60, "the first worker to take 128 tasks")
        wait_for(lambda: queue_depth(broker.url).waiting == rows - held, 30, "the rest to stay queued")
        assert lines_written(output) == 0

        # When it is SIGKILLed (only it: the fake engine has no child process) and another starts
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
        killed_at = time.monotonic()
        # Each request takes 2 s there: the 128 redelivered tasks must run side by side, not one
        # after another (that would take over four minutes).
        start_worker(workers, tmp_path, media, broker, "second", IMAGEQA_FAKE_DELAY_S="2")

        # Then every row is written within 90 s of the kill, once
        wait_for(
            lambda: lines_written(output) >= rows, 90, f"all rows within 90 s of the kill ({broker.name})"
        )
        recovery_s = time.monotonic() - killed_at
        status = wait_done(broker.redis_url, job_id, timeout_s=30)
    assert_exactly_once(output, rows)
    assert status.written == rows
    with capsys.disabled():
        print(f"\n[{broker.name}] SIGKILL to last row: {recovery_s:.1f} s ({held} tasks held, {rows} rows)")
    if broker.name == "redis":
        # Visibility timeout, plus at most a refresh interval of age, plus the sweep period.
        assert recovery_s < 60


def test_a_task_longer_than_three_visibility_timeouts_runs_once_on_a_live_worker(
    workers, media, tmp_path, monkeypatch
):
    # The default refresh interval follows the visibility timeout, so the short timeout here tests the
    # mechanism the default runs on.
    assert refresh_interval_s(DEFAULT_VISIBILITY_TIMEOUT_S) == DEFAULT_VISIBILITY_TIMEOUT_S / 3
    assert REFRESHES_PER_TIMEOUT == 3
    redis_client(REDIS_URL).flushdb()
    broker = Broker("redis", REDIS_URL, REDIS_URL)
    visibility_s, delay_s = 6, 20
    source, output = job_rows(media, 2), tmp_path / "out.jsonl"
    # Two live workers: either one's sweep would take a task that looked abandoned.
    env = {"IMAGEQA_VISIBILITY_TIMEOUT_S": str(visibility_s), "IMAGEQA_FAKE_DELAY_S": str(delay_s)}
    pair = [start_worker(workers, tmp_path, media, broker, f"w{i}", **env) for i in range(2)]
    for w in pair:
        assert f"refreshing in-flight deliveries every {visibility_s / 3:.1f} s" in w.log()
    with CollectorThread(REDIS_URL):
        started = time.monotonic()
        job_id = enqueue_file(source, output, settings=broker.producer_settings(), params=PARAMS).job_id
        status = wait_done(REDIS_URL, job_id, timeout_s=delay_s * 3)
    assert time.monotonic() - started >= delay_s > 3 * visibility_s
    assert_exactly_once(output, 2)
    assert status.written == 2
    assert sum(received(w) for w in pair) == 2, "a task was delivered again while it ran"
    assert not redis_client(REDIS_URL).hgetall(job_attempts_key(job_id)), "a redelivered start"


def test_refreshing_survives_a_consumer_restart_after_a_broker_reconnection(workers, media, tmp_path):
    redis_client(REDIS_URL).flushdb()
    broker = Broker("redis", REDIS_URL, REDIS_URL)
    w = start_worker(
        workers, tmp_path, media, broker, "w", IMAGEQA_VISIBILITY_TIMEOUT_S="6", IMAGEQA_FAKE_DELAY_S="20"
    )
    # Given a worker whose broker connections were all cut, and that reconnected
    r = redis_client(REDIS_URL)
    r.client_kill_filter(_type="normal", skipme=True)
    wait_for(lambda: w.log().count("Connected to redis://") >= 2, 60, "the consumer to reconnect")
    # When a long task arrives on the new connection
    source, output = job_rows(media, 1), tmp_path / "out.jsonl"
    with CollectorThread(REDIS_URL):
        job_id = enqueue_file(source, output, settings=broker.producer_settings(), params=PARAMS).job_id
        wait_done(REDIS_URL, job_id, timeout_s=60)
    # Then it runs once: the refresher watches the restarted consumer's channel
    assert received(w) == 1, w.log()[-3000:]
    assert_exactly_once(output, 1)


def test_queue_depth_on_redis_counts_waiting_and_taken_tasks(workers, media, tmp_path):
    redis_client(REDIS_URL).flushdb()
    broker = Broker("redis", REDIS_URL, REDIS_URL)
    assert queue_depth(REDIS_URL) == queue_depth(redis_client(REDIS_URL))
    assert (queue_depth(REDIS_URL).waiting, queue_depth(REDIS_URL).unacked) == (0, 0)
    app = celery_app(REDIS_URL, DEFAULT_VISIBILITY_TIMEOUT_S, name="test-depth")
    for i in range(5):
        app.send_task(TASK_GENERATE, kwargs={"n": i}, queue=QUEUE_GENERATE)
    assert (queue_depth(app).waiting, queue_depth(app).unacked) == (5, 0)
    assert not nothing_in_flight(redis_client(REDIS_URL))
    redis_client(REDIS_URL).delete(QUEUE_GENERATE)
    start_worker(workers, tmp_path, media, broker, "w", IMAGEQA_CONCURRENCY="4", IMAGEQA_FAKE_DELAY_S="10")
    source, output = job_rows(media, 6), tmp_path / "out.jsonl"
    enqueue_file(source, output, settings=broker.producer_settings(), params=PARAMS)
    wait_for(lambda: queue_depth(app).unacked == 4, 30, "four tasks taken")
    assert queue_depth(app).waiting == 2
    assert not nothing_in_flight(redis_client(REDIS_URL), app)


def test_a_job_runs_end_to_end_on_rabbitmq(amqp_url, workers, media, tmp_path):
    redis_client(REDIS_URL).flushdb()
    purge_amqp(amqp_url)
    broker = Broker("amqp", REDIS_URL, amqp_url)
    # Nothing waits; RabbitMQ does not say how many are taken; a queue not declared yet holds nothing
    assert queue_depth(amqp_url).waiting == 0 and queue_depth(amqp_url).unacked is None
    assert queue_depth(amqp_url, "imageqa.not-declared") == queue_depth(amqp_url)
    source, output = job_rows(media, 40), tmp_path / "out.jsonl"
    # Tasks wait in a durable queue on RabbitMQ until a worker comes
    summary = enqueue_file(source, output, settings=broker.producer_settings(), params=PARAMS)
    assert queue_depth(amqp_url).waiting == 40
    assert redis_client(REDIS_URL).llen(QUEUE_GENERATE) == 0  # not on Redis
    assert not nothing_in_flight(redis_client(REDIS_URL), amqp_url)  # unknown, so not "nothing"
    assert _durable(amqp_url) is not False
    start_worker(workers, tmp_path, media, broker, "w", IMAGEQA_CONCURRENCY="8")
    with CollectorThread(REDIS_URL):
        status = wait_done(REDIS_URL, summary.job_id, timeout_s=60)
    health = check_worker(RedisSettings(redis_url=REDIS_URL, broker_url=amqp_url), timeout_s=10)
    assert health.ok, health.detail  # the container health check pings through RabbitMQ
    assert status.written == 40
    assert_exactly_once(output, 40)
    assert queue_depth(amqp_url).waiting == 0


def _durable(amqp_url: str) -> bool | None:
    """Whether RabbitMQ keeps the queue across restarts (None: rabbitmqctl cannot tell here)."""
    ctl = shutil.which("rabbitmqctl")
    vhost = urlsplit(amqp_url).path.lstrip("/") or "/"
    if ctl is None:
        return None
    out = subprocess.run(
        [ctl, "list_queues", "-q", "-p", vhost, "name", "durable"], capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == QUEUE_GENERATE:
            return parts[1] == "true"
    return None


class _QoS:
    """Stands for a Kombu channel's QoS: delivered tags in order, acknowledged ones not yet dropped."""

    def __init__(self, delivered: list[str], acked: set[str]) -> None:
        self._delivered = OrderedDict.fromkeys(delivered)
        self._dirty = acked


def test_the_refresher_rescores_only_held_deliveries_that_are_still_recorded():
    r = redis_client(REDIS_URL)
    r.flushdb()
    r.zadd("unacked_index", {"running": 1.0, "acked-late": 1.0, "someone-elses": 1.0})
    refresher = DeliveryRefresher(redis_client(REDIS_URL), "unacked_index", visibility_timeout_s=30)
    assert refresher.interval_s == 10
    first, restarted = _QoS(["running", "acked-late"], {"acked-late"}), _QoS(["swept", "prefetched"], set())
    refresher.watch(first)
    refresher.watch(restarted)  # a consumer restart brings a second channel; both are watched
    r.zadd("unacked_index", {"prefetched": 2.0})

    assert sorted(refresher.in_flight()) == ["prefetched", "running", "swept"]
    before = time.time()
    assert refresher.refresh() == 3
    scores = dict(r.zrange("unacked_index", 0, -1, withscores=True))
    assert scores[b"running"] >= before and scores[b"prefetched"] >= before
    assert scores[b"acked-late"] == 1.0 and scores[b"someone-elses"] == 1.0
    assert b"swept" not in scores  # put back by a sweep, or acknowledged: never added again
    refresher.stop()


def test_a_worker_killed_mid_sweep_holds_the_sweep_lock_briefly():
    options = celery_config(REDIS_URL, DEFAULT_VISIBILITY_TIMEOUT_S)["broker_transport_options"]
    assert options["unacked_mutex_expire"] == 2 * options["unacked_restore_interval"] == 20
    app = celery_app(REDIS_URL, DEFAULT_VISIBILITY_TIMEOUT_S, name="test-options")
    with app.connection() as conn:
        channel = conn.default_channel
        assert (channel.unacked_mutex_expire, channel.visibility_timeout) == (
            20,
            DEFAULT_VISIBILITY_TIMEOUT_S,
        )


def test_a_late_or_failed_refresh_is_logged_and_retried(caplog, monkeypatch):
    refresher = DeliveryRefresher(redis_client(REDIS_URL), "unacked_index", visibility_timeout_s=0.3)
    calls: list[float] = []

    def refresh() -> int:
        calls.append(time.monotonic())
        if len(calls) == 1:
            time.sleep(0.25)  # held up (a busy GIL, a slow Redis): past 1.5 intervals since the start
        if len(calls) == 2:
            raise redis.ConnectionError("Redis went away")
        return 0

    monkeypatch.setattr(refresher, "refresh", refresh)
    with caplog.at_level(logging.WARNING, logger="workers.delivery"):
        refresher.start()
        wait_for(lambda: len(calls) >= 4, 10, "refreshes after the failure")
        refresher.stop()
    messages = [r.getMessage() for r in caplog.records]
    late = re.compile(r"refreshed 0\.[3-9] s after the previous time instead of 0\.1 s; past 0\.3 s")
    assert any(late.search(m) for m in messages), messages
    assert "could not refresh in-flight deliveries (Redis went away); retrying in 0.1 s" in messages
