"""Shared-path capacity: what every GPU shares (producer, Redis, collector), and the worker's own cost.

Four figures, each against a private Redis this script starts (so nothing else competes for it):

- **enqueue**: `producer.enqueue.enqueue_file` over an N-row JSONL (tasks/s);
- **collect**: a `workers.collector.Collector` draining N result entries into JSONL, fsync once per
  batch (rows/s);
- **end to end**: a real ``imageqa worker`` (Celery, threads pool) with the instant fake engine, a
  collector, and the producer, all on this machine at once (images/s from the first enqueue to the job
  marked done);
- **worker CPU per image**: the worker process's CPU seconds (user + system, from /proc) over the
  end-to-end run divided by its images; the images are 32x24 JPEGs, so this is the worker's overhead
  (Celery, Redis round trips, validation, encoding), not image decoding;
- **Redis CPU per image**: the Redis server's CPU seconds over the end-to-end run per image, every
  round trip of producer, worker and collector included; 1 s divided by it is the images/s one Redis
  core carries for any number of workers (Redis runs commands on one thread);
- **Celery alone**: the same messages through a Celery worker with the same broker settings whose
  task does nothing, the floor any Celery worker on this Redis transport pays per task.

    python ops/bench_shared.py --rows 20000 --e2e-rows 20000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ops.benchlib import private_redis, proc_cpu_s, put_results  # noqa: E402
from producer.broker import redis_client  # noqa: E402
from producer.constants import QUEUE_GENERATE, TASK_GENERATE  # noqa: E402
from producer.contract import GenerationParams  # noqa: E402
from producer.enqueue import enqueue_file  # noqa: E402
from producer.jobs import job_status  # noqa: E402
from producer.settings import ProducerSettings  # noqa: E402
from tests.helpers import WorkerProcess, make_images, read_jsonl, write_jsonl  # noqa: E402
from workers.collector import Collector  # noqa: E402
from workers.settings import CollectorSettings  # noqa: E402

TARGETS = {"enqueue": 5000.0, "collect": 10000.0, "e2e": 2000.0, "worker_cpu_ms": 1.0}


def bench_enqueue(url: str, folder: Path, rows: int, image: Path) -> dict[str, float]:
    redis_client(url).flushdb()
    source = write_jsonl(folder / "enqueue.jsonl", [{"image": [str(image)], "n": i} for i in range(rows)])
    settings = ProducerSettings(redis_url=url)
    started = time.perf_counter()
    summary = enqueue_file(source, folder / "enqueue-out.jsonl", settings=settings, params=GenerationParams())
    elapsed = time.perf_counter() - started
    queued = redis_client(url).llen(QUEUE_GENERATE)
    assert summary.enqueued == rows == queued, (summary, queued)
    redis_client(url).flushdb()
    return {"rows": rows, "seconds": elapsed, "rate": rows / elapsed}


def bench_collect(url: str, folder: Path, rows: int, image: Path) -> dict[str, float]:
    r = redis_client(url)
    r.flushdb()
    out = folder / "collect-out.jsonl"
    out.unlink(missing_ok=True)
    put_results(r, "bench-collect", out, rows, [str(image)])
    collector = Collector(CollectorSettings(redis_url=url, block_ms=10, metrics_port=0))
    collector.ensure_group()
    started = time.perf_counter()
    while collector.rows_written < rows:
        collector.step(block_ms=10)
    elapsed = time.perf_counter() - started
    written = len(out.read_bytes().splitlines())
    assert written == rows, (written, rows)
    r.flushdb()
    return {
        "rows": rows,
        "seconds": elapsed,
        "rate": rows / elapsed,
        "batch": collector.settings.batch_size,
    }


def bench_e2e(url: str, folder: Path, rows: int, concurrency: int, broker_url: str = "") -> dict[str, float]:
    r = redis_client(url)
    r.flushdb()
    media = folder / "e2e-media"
    images = make_images(media, 64, size=(32, 24))
    source = write_jsonl(
        folder / "e2e.jsonl", [{"image": [str(images[i % len(images)])], "n": i} for i in range(rows)]
    )
    out = folder / "e2e-out.jsonl"
    out.unlink(missing_ok=True)
    worker = WorkerProcess(
        {
            "IMAGEQA_REDIS_URL": url,
            "IMAGEQA_ENGINE": "fake",
            "IMAGEQA_MODEL": "fake",
            "IMAGEQA_MEDIA_ROOTS": str(media),
            "IMAGEQA_CONCURRENCY": str(concurrency),
            "IMAGEQA_METRICS_PORT": "0",
            "IMAGEQA_BROKER_URL": broker_url,
        },
        folder / "e2e-worker.log",
    )
    worker.start(120)
    assert worker.proc is not None
    stop = threading.Event()
    collector = Collector(
        CollectorSettings(redis_url=url, broker_url=broker_url, block_ms=100, metrics_port=0)
    )
    thread = threading.Thread(target=collector.run, args=(stop,), daemon=True)
    thread.start()
    try:
        redis_pid = int(r.info("server")["process_id"])
        r.config_resetstat()
        cpu_before, redis_before = proc_cpu_s(worker.proc.pid), proc_cpu_s(redis_pid)
        started = time.perf_counter()
        summary = enqueue_file(
            source,
            out,
            settings=ProducerSettings(redis_url=url, broker_url=broker_url),
            params=GenerationParams(),
        )
        enqueued_s = time.perf_counter() - started
        while True:
            status = job_status(r, summary.job_id)
            if status is not None and status.finished:
                break
            if worker.proc.poll() is not None:
                raise SystemExit(f"worker exited:\n{worker.log()[-3000:]}")
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        cpu = proc_cpu_s(worker.proc.pid) - cpu_before
        redis_cpu = proc_cpu_s(redis_pid) - redis_before
        commands = command_counts(r)
    finally:
        stop.set()
        thread.join(10)
        worker.stop()
    written = read_jsonl(out)
    assert len(written) == rows and status.failed == 0, (len(written), status)
    r.flushdb()
    return {
        "rows": rows,
        "seconds": elapsed,
        "rate": rows / elapsed,
        "enqueue_s": enqueued_s,
        "worker_cpu_ms": cpu / rows * 1000,
        "redis_cpu_ms": redis_cpu / rows * 1000,
        "redis_commands": sum(commands.values()) / rows,
        **{f"cmd:{name}": calls / rows for name, calls in commands.items()},
    }


def command_counts(r: redis.Redis) -> dict[str, int]:
    """Calls per Redis command since the last ``CONFIG RESETSTAT`` (``INFO commandstats``); the
    benchmark's own polling of the job (HGETALL and SCARD every 20 ms) is in them."""
    stats: dict[str, dict[str, int]] = r.info("commandstats")
    counts = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}
    for own in ("info", "config|resetstat"):  # this reading
        counts.pop(own, None)
    return counts


def bench_celery_floor(url: str, folder: Path, rows: int, concurrency: int) -> dict[str, float]:
    """The same messages through a Celery worker with the same broker settings whose task does nothing:
    what Celery and Kombu alone cost per task (fetch, unacked bookkeeping, ack), for comparison."""
    r = redis_client(url)
    r.flushdb()
    source = write_jsonl(folder / "floor.jsonl", [{"image": ["/nowhere.jpg"], "n": i} for i in range(rows)])
    log = folder / "floor-worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--floor-child", url, "--concurrency", str(concurrency)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"no-op worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        cpu_before = proc_cpu_s(proc.pid)
        started = time.perf_counter()
        enqueue_file(
            source,
            folder / "floor-out.jsonl",
            settings=ProducerSettings(redis_url=url),
            params=GenerationParams(),
        )
        while r.llen(QUEUE_GENERATE) or r.hlen("unacked"):
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        cpu = proc_cpu_s(proc.pid) - cpu_before
    finally:
        proc.terminate()
        proc.wait(30)
    r.flushdb()
    return {"rows": rows, "seconds": elapsed, "rate": rows / elapsed, "worker_cpu_ms": cpu / rows * 1000}


def floor_child(url: str, concurrency: int) -> None:
    from producer.broker import celery_app
    from producer.settings import DEFAULT_VISIBILITY_TIMEOUT_S

    app = celery_app(url, DEFAULT_VISIBILITY_TIMEOUT_S, name="imageqa-floor")

    @app.task(name=TASK_GENERATE, acks_late=True, ignore_result=True)
    def generate(**kwargs: object) -> None:
        return None

    app.worker_main(
        [
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(concurrency),
            "--queues",
            QUEUE_GENERATE,
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--hostname",
            "floor@%h",
        ]
    )


FIGURES = ("enqueue", "collect", "e2e", "floor")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20000, help="rows for the enqueue and collect figures")
    parser.add_argument("--e2e-rows", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3, help="each figure is the median of this many runs")
    parser.add_argument("--concurrency", type=int, default=128, help="worker threads (the worker default)")
    parser.add_argument(
        "--only", action="append", choices=FIGURES, help="measure only this figure (repeatable; default: all)"
    )
    parser.add_argument(
        "--redis-url",
        help="use this Redis (its database is FLUSHED before and after each figure) instead of a private one",
    )
    parser.add_argument(
        "--broker-url",
        default="",
        help="end to end: tasks on this broker (amqp:// for RabbitMQ) instead of the Redis, which keeps "
        "the job registry and the results",
    )
    parser.add_argument("--floor-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_child:
        floor_child(args.floor_child, args.concurrency)
        return

    only = set(args.only or FIGURES)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in FIGURES}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with contextlib.ExitStack() as stack:
            url = args.redis_url or stack.enter_context(private_redis(folder))
            image = make_images(folder / "media", 1, size=(32, 24))[0]
            for _ in range(args.rounds):
                if "enqueue" in only:
                    runs["enqueue"].append(bench_enqueue(url, folder, args.rows, image))
                if "collect" in only:
                    runs["collect"].append(bench_collect(url, folder, args.rows, image))
                if "e2e" in only:
                    runs["e2e"].append(
                        bench_e2e(url, folder, args.e2e_rows, args.concurrency, args.broker_url)
                    )
                if "floor" in only:
                    runs["floor"].append(bench_celery_floor(url, folder, args.e2e_rows, args.concurrency))
    report(runs, args)


def report(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    def median(name: str, key: str = "rate") -> float:
        return statistics.median(run.get(key, 0.0) for run in runs[name])

    print(f"\nShared path on {os.cpu_count()} cores, median of {args.rounds} runs:\n")
    print("| figure | rows | runs (per s) | median | target |")
    print("|---|---|---|---|---|")
    for name, label, unit in (
        ("enqueue", "producer enqueue", "tasks/s"),
        ("collect", "collector write (fsync per batch)", "rows/s"),
        ("e2e", "end to end, fake engine", "images/s"),
    ):
        if runs[name]:
            rates = ", ".join(f"{run['rate']:,.0f}" for run in runs[name])
            rows = int(runs[name][0]["rows"])
            print(f"| {label} | {rows:,} | {rates} | {median(name):,.0f} {unit} | ≥ {TARGETS[name]:,.0f} |")
    if runs["e2e"]:
        cpu_ms = median("e2e", "worker_cpu_ms")
        cpus = ", ".join(f"{run['worker_cpu_ms']:.2f}" for run in runs["e2e"])
        print(f"| worker CPU per image (ms) | {args.e2e_rows:,} | {cpus} | {cpu_ms:.2f} ms | < 1 |")
        redis_ms = median("e2e", "redis_cpu_ms")
        redis_runs = ", ".join(f"{run['redis_cpu_ms']:.3f}" for run in runs["e2e"])
        label = "Redis CPU per image, end to end (ms)"
        print(f"| {label} | {args.e2e_rows:,} | {redis_runs} | {redis_ms:.3f} ms | - |")
        label = "one Redis core's ceiling: 1 s / Redis CPU per image"
        print(f"| {label} | | | {1000 / redis_ms:,.0f} images/s | ≥ 5,000 |")
        commands = median("e2e", "redis_commands")
        label = "Redis commands per image, end to end"
        print(f"| {label} | {args.e2e_rows:,} | | {commands:.1f} | - |")
    if runs["floor"]:
        floor_ms = median("floor", "worker_cpu_ms")
        floors = ", ".join(f"{run['worker_cpu_ms']:.2f}" for run in runs["floor"])
        label = "Celery alone: no-op task, CPU per task (ms)"
        print(f"| {label} | {args.e2e_rows:,} | {floors} | {floor_ms:.2f} ms | - |")
        floor_rates = ", ".join(f"{run['rate']:,.0f}" for run in runs["floor"])
        label = "Celery alone: no-op task rate"
        print(f"| {label} | {args.e2e_rows:,} | {floor_rates} | {median('floor'):,.0f}/s | - |")
    if runs["e2e"]:
        names = sorted({key for run in runs["e2e"] for key in run if key.startswith("cmd:")})
        per_image = sorted(((median("e2e", key), key.removeprefix("cmd:")) for key in names), reverse=True)
        print(
            "\nRedis commands per image, end to end (median): "
            + ", ".join(f"{name} {calls:.2f}" for calls, name in per_image if calls >= 0.005)
        )
    print()
    if runs["enqueue"]:
        print(f"BENCH enqueue_tasks_per_s={median('enqueue'):.0f} target=5000")
    if runs["collect"]:
        print(f"BENCH collect_rows_per_s={median('collect'):.0f} target=10000")
    if runs["e2e"]:
        print(f"BENCH e2e_fake_images_per_s={median('e2e'):.0f} target=2000")
        print(f"BENCH worker_cpu_ms_per_image={cpu_ms:.3f} target=1.0")
        print(f"BENCH redis_cpu_ms_per_image={redis_ms:.3f} target=-")
        print(f"BENCH redis_commands_per_image={commands:.2f} target=-")
        print(f"BENCH redis_images_per_s_per_core={1000 / redis_ms:.0f} target=5000")
    if runs["floor"]:
        print(f"BENCH celery_noop_cpu_ms_per_task={floor_ms:.3f} target=-")
    if runs["e2e"] and runs["floor"]:
        print(f"BENCH worker_cpu_over_celery_noop={cpu_ms / floor_ms:.2f} target=-")


if __name__ == "__main__":
    main()
