"""Memory targets: worker RSS over many tasks, producer RSS on a huge input, collector RSS vs job size.

1. Worker: a real ``imageqa worker`` (fake engine, threads pool) runs 1,000 tasks, then 9,000 more;
   its RSS after the second batch must stay within 10% of its RSS after the first.
2. Producer: ``imageqa enqueue`` streams a 1,000,000-row JSONL into Redis (no worker runs); its peak
   RSS must stay under 200 MB.
3. Collector: N result records are put on the results stream and a fresh collector process writes
   them; its peak RSS for 100,000 rows must stay within 10% of its peak for 10,000.

Redis: by default a private ``redis-server`` on a free port, shut down at the end; with ``--redis-url``
that database is used and FLUSHED. Prints a table per section and ``BENCH name=value target=value``.

    python ops/bench_memory.py
    python ops/bench_memory.py --producer-rows 100000 --sections producer,collector
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import redis  # noqa: E402

from ops.benchlib import (  # noqa: E402
    adopt,
    private_redis,
    proc_cpu_s,
    proc_memory,
    put_results,
    spawn,
    stop_children,
    wait_child,
)
from producer.broker import redis_client  # noqa: E402
from producer.contract import GenerationParams  # noqa: E402
from producer.enqueue import enqueue_file  # noqa: E402
from producer.jobs import JobStatus, job_status  # noqa: E402
from producer.settings import ProducerSettings  # noqa: E402
from tests.helpers import CollectorThread, WorkerProcess, make_images  # noqa: E402

MB = 1024 * 1024
SECTIONS = ("worker", "producer", "collector")


def wait_job(
    r: redis.Redis, job_id: str, timeout_s: float, alive: Callable[[], bool] = lambda: True
) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = job_status(r, job_id)
        if st is not None and st.finished:
            return st
        if not alive():
            raise SystemExit(f"the worker exited before job {job_id} was done")
        time.sleep(0.05)
    raise SystemExit(f"job {job_id} not done after {timeout_s:.0f} s: {job_status(r, job_id)}")


def _enqueued(r: redis.Redis, job_id: str) -> int:
    st = job_status(r, job_id)
    return st.enqueued if st is not None else 0


def image_refs(folder: Path, count: int) -> list[str]:
    return [str(p) for p in make_images(folder, count)]


def write_rows(path: Path, images: list[str], start: int, stop: int) -> Path:
    """JSONL rows ``{"image": [path], "n": i}``: images repeat, ``n`` makes every row its own item."""
    with path.open("wb") as f:
        for chunk in range(start, stop, 10_000):
            end = min(stop, chunk + 10_000)
            f.write(
                b"".join(
                    orjson.dumps({"image": [images[i % len(images)]], "n": i}) + b"\n"
                    for i in range(chunk, end)
                )
            )
    return path


def short(n: int) -> str:
    """1000 -> 1k, 1000000 -> 1m (for BENCH names)."""
    for unit, size in (("m", 1_000_000), ("k", 1_000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def table(header: list[str], rows: list[list[Any]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()


def meets(value: float, limit: float, strict: bool = False) -> str:
    return "yes" if (value < limit if strict else value <= limit) else "NO"


# --- 1. worker --------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    tasks: int
    rss: int
    cpu_s: float
    elapsed_s: float
    failed: int


def worker_section(args: argparse.Namespace, url: str, tmp: Path, images: list[str]) -> list[str]:
    checkpoints = sorted(args.worker_tasks)
    r = redis_client(url)
    r.flushdb()
    env = {
        "IMAGEQA_ENGINE": "fake",
        "IMAGEQA_MODEL": "fake",
        "IMAGEQA_REDIS_URL": url,
        "IMAGEQA_METRICS_PORT": "0",
        "IMAGEQA_MEDIA_ROOTS": str(Path(images[0]).parent),
        "IMAGEQA_CONCURRENCY": str(args.concurrency),
    }
    worker = WorkerProcess(env, tmp / "worker.log")
    params = GenerationParams()
    settings = ProducerSettings(redis_url=url)
    print(f"worker: starting (fake engine, concurrency {args.concurrency})", flush=True)
    points: list[Checkpoint] = []
    try:
        worker.start(120)
        assert worker.proc is not None
        adopt(worker.proc)
        pid = worker.proc.pid
        base = proc_memory(pid)["VmRSS"]
        done = 0
        with CollectorThread(url, consumer="bench-memory"):
            for target in checkpoints:
                source = write_rows(tmp / f"worker-in-{target}.jsonl", images, done, target)
                cpu0, t0 = proc_cpu_s(pid), time.perf_counter()
                summary = enqueue_file(
                    source, tmp / f"worker-out-{target}.jsonl", settings=settings, params=params
                )
                st = wait_job(r, summary.job_id, args.timeout_s, lambda: worker.proc.poll() is None)  # type: ignore[union-attr]
                elapsed = time.perf_counter() - t0
                time.sleep(1.0)  # acks and bookkeeping of the last tasks settle
                points.append(
                    Checkpoint(target, proc_memory(pid)["VmRSS"], proc_cpu_s(pid) - cpu0, elapsed, st.failed)
                )
                done = target
                print(
                    f"worker: {target} tasks done ({target - (points[-2].tasks if len(points) > 1 else 0)}"
                    f" in {elapsed:.1f} s), RSS {points[-1].rss / MB:.1f} MB",
                    flush=True,
                )
                if st.failed:
                    print(f"  note: {st.failed} rows failed: {st.failures}")
        peak = proc_memory(pid)["VmHWM"]
    finally:
        code = worker.stop(60)
    if code not in (0, None):
        print(f"  note: worker exited with {code} on shutdown; log {worker.log_path}")

    first, last = points[0], points[-1]
    ratio = last.rss / first.rss
    later = points[1:]
    cpu_per_task = sum(p.cpu_s for p in later) / max(1, last.tasks - first.tasks) if later else math.nan
    print()
    print(f"### Worker RSS (fake engine, concurrency {args.concurrency}, {len(images)} distinct images)")
    print()
    rows: list[list[Any]] = [["after start", 0, f"{base / MB:.1f}", "-", "-", "-"]]
    prev = 0
    for p in points:
        rows.append(
            [
                f"after {p.tasks} tasks",
                p.tasks - prev,
                f"{p.rss / MB:.1f}",
                f"{(p.tasks - prev) / p.elapsed_s:.0f}",
                f"{p.cpu_s * 1000 / (p.tasks - prev):.2f}",
                p.failed,
            ]
        )
        prev = p.tasks
    table(["checkpoint", "tasks in phase", "VmRSS MB", "tasks/s", "CPU ms/task", "failed"], rows)
    print(
        f"- RSS after {last.tasks} / after {first.tasks}: {ratio:.3f} (target <= 1.10: {meets(ratio, 1.10)})"
    )
    print(f"- worker peak RSS (VmHWM): {peak / MB:.1f} MB")
    print(
        f"- worker CPU per task (fake engine, includes image decode), tasks {first.tasks + 1}-{last.tasks}: "
        f"{cpu_per_task * 1000:.2f} ms"
    )
    print()
    name = f"{short(first.tasks)}_to_{short(last.tasks)}"
    lines = [f"BENCH worker_rss_growth_{name}={ratio:.3f} target=<=1.10"]
    lines += [f"BENCH worker_rss_{short(p.tasks)}_mb={p.rss / MB:.1f} target=-" for p in points]
    if later:
        lines.append(f"BENCH worker_cpu_ms_per_task={cpu_per_task * 1000:.2f} target=-")
        rate = (last.tasks - first.tasks) / sum(p.elapsed_s for p in later)
        lines.append(f"BENCH worker_tasks_per_s={rate:.0f} target=-")
    return lines


# --- 2. producer ------------------------------------------------------------------------------


def producer_section(args: argparse.Namespace, url: str, tmp: Path, images: list[str]) -> list[str]:
    n = args.producer_rows
    r = redis_client(url)
    r.flushdb()
    print(f"producer: writing a {n}-row JSONL", flush=True)
    source = write_rows(tmp / "producer-in.jsonl", images, 0, n)
    job_id = "bench-memory-producer"
    imageqa = Path(sys.executable).with_name("imageqa")
    command = [str(imageqa)] if imageqa.exists() else [sys.executable, "-m", "workers.cli"]
    command += ["enqueue", str(source), "-o", str(tmp / "producer-out.jsonl"), "--job-id", job_id]
    print(f"producer: {' '.join(command[-6:])} ({source.stat().st_size / MB:.0f} MB input)", flush=True)
    log_path = tmp / "producer.log"
    # RSS against rows enqueued so far: the slope is per-row state that the producer keeps.
    samples: list[tuple[float, int, int]] = []
    started = time.perf_counter()
    with log_path.open("wb") as log:
        # No worker runs: lift the queue limit so the whole input streams into Redis.
        env = {**os.environ, "IMAGEQA_REDIS_URL": url, "IMAGEQA_MAX_QUEUED": "0"}
        proc = spawn(command, env=env, stdout=log, stderr=log)

    def sample() -> None:
        try:
            rss = proc_memory(proc.pid)["VmRSS"]
            enqueued = _enqueued(r, job_id)
        except (OSError, KeyError, redis.RedisError):
            return
        samples.append((time.perf_counter() - started, enqueued, rss))
        if len(samples) % 50 == 0:
            print(f"producer: {enqueued} rows, RSS {rss / MB:.1f} MB", flush=True)

    peak = wait_child(proc, sample, 0.2)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"imageqa enqueue failed ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
    enqueued = _enqueued(r, job_id)
    redis_mb = int(r.info("memory")["used_memory"]) / MB
    r.flushdb()
    polled = max((s[2] for s in samples), default=0)
    print()
    print(f"### Producer RSS (`imageqa enqueue`, {n} rows, no worker)")
    print()
    rows: list[list[Any]] = []
    for share in (0.1, 0.25, 0.5, 0.75, 1.0):
        hit = next((s for s in samples if s[1] >= share * n), samples[-1] if samples else None)
        if hit is not None:
            rows.append([f"{share:.0%}", hit[1], f"{hit[0]:.1f}", f"{hit[2] / MB:.1f}"])
    table(["rows share", "rows enqueued", "elapsed s", "VmRSS MB"], rows)
    slope = math.nan
    low = next((s for s in samples if s[1] >= 0.1 * n), None)
    high = max(samples, key=lambda s: s[1], default=None)
    if low is not None and high is not None and high[1] > low[1]:
        slope = (high[2] - low[2]) / (high[1] - low[1])
    print(
        f"- peak RSS (ru_maxrss = VmHWM at exit): {peak / MB:.1f} MB "
        f"(target < 200: {meets(peak / MB, 200, True)}); highest polled VmRSS {polled / MB:.1f} MB"
    )
    print(f"- RSS growth from 10% to the end of the stream: {slope:.0f} bytes per row")
    print(f"- {enqueued} rows enqueued in {elapsed:.1f} s (process start to exit): {n / elapsed:.0f} rows/s")
    print(f"- Redis used_memory with the {enqueued} queued tasks: {redis_mb:.0f} MB (flushed after)")
    print()
    if enqueued != n:
        print(f"  note: expected {n} rows enqueued, Redis says {enqueued}")
    return [
        f"BENCH producer_peak_rss_mb={peak / MB:.1f} target=<200",
        f"BENCH producer_rows_per_s={n / elapsed:.0f} target=-",
        f"BENCH producer_rss_bytes_per_row={slope:.0f} target=-",
    ]


# --- 3. collector -----------------------------------------------------------------------------


def collector_child(url: str, job_id: str, rows: int) -> None:
    """Runs a `Collector` until ``rows`` rows of ``job_id`` are written; prints its figures."""
    from workers.collector import Collector
    from workers.settings import CollectorSettings

    fsyncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: Any) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    os.fsync = counting_fsync
    settings = CollectorSettings(redis_url=url, block_ms=100, metrics_port=0, consumer="bench-collector")
    collector = Collector(settings)
    r = redis_client(url)
    base = proc_memory(os.getpid())["VmRSS"]
    stop = threading.Event()
    thread = threading.Thread(target=collector.run, args=(stop,), daemon=True)
    started = time.perf_counter()
    thread.start()
    while (st := job_status(r, job_id)) is None or st.written < rows:
        if not thread.is_alive():
            raise SystemExit("the collector stopped early")
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join(30)
    result = {
        "elapsed_s": elapsed,
        "base_rss": base,
        "hwm": proc_memory(os.getpid())["VmHWM"],
        "fsyncs": fsyncs,
        "batch_size": settings.batch_size,
    }
    print("RESULT " + orjson.dumps(result).decode(), flush=True)


def collector_section(args: argparse.Namespace, url: str, tmp: Path, images: list[str]) -> list[str]:
    r = redis_client(url)
    results: list[dict[str, Any]] = []
    for n in args.collector_rows:
        r.flushdb()
        job_id = f"bench-memory-collector-{n}"
        output = tmp / f"collector-{n}.jsonl"
        t0 = time.perf_counter()
        put_results(r, job_id, output, n, images)
        print(f"collector: {n} records on the stream in {time.perf_counter() - t0:.1f} s", flush=True)
        log_path = tmp / f"collector-{n}.log"
        with log_path.open("wb") as log:
            proc = spawn(
                [sys.executable, __file__, "--collector-child", url, job_id, str(n)],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        peak = wait_child(proc, None, 0.05)
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"collector child failed ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        with output.open("rb") as f:
            written = sum(1 for _ in f)
        if written != n:
            raise SystemExit(f"collector wrote {written} rows of {n} to {output}")
        result = orjson.loads(line[7:])
        result.update(rows=n, peak=max(peak, result["hwm"]))
        results.append(result)
        print(
            f"collector: {n} rows written in {result['elapsed_s']:.1f} s, "
            f"peak RSS {result['peak'] / MB:.1f} MB",
            flush=True,
        )
        output.unlink()
    r.flushdb()
    print()
    print("### Collector RSS against job size (fresh process and stream per size)")
    print()
    table(
        ["rows", "RSS before MB", "peak RSS MB", "growth MB", "rows/s", "fsyncs", "rows per fsync"],
        [
            [
                x["rows"],
                f"{x['base_rss'] / MB:.1f}",
                f"{x['peak'] / MB:.1f}",
                f"{(x['peak'] - x['base_rss']) / MB:.1f}",
                f"{x['rows'] / x['elapsed_s']:.0f}",
                x["fsyncs"],
                f"{x['rows'] / x['fsyncs']:.0f}" if x["fsyncs"] else "-",
            ]
            for x in results
        ],
    )
    small, large = results[0], results[-1]
    ratio = large["peak"] / small["peak"]
    print(
        f"- peak RSS {large['rows']} vs {small['rows']} rows: {ratio:.3f} "
        f"(target <= 1.10: {meets(ratio, 1.10)})"
    )
    print(
        f"- fsync policy: one fsync per file per batch (up to batch_size={large['batch_size']} stream "
        "entries read, written and fsynced, then acked)"
    )
    print()
    name = f"{short(large['rows'])}_vs_{short(small['rows'])}"
    lines = [f"BENCH collector_rss_ratio_{name}={ratio:.3f} target=<=1.10"]
    lines += [
        f"BENCH collector_peak_rss_{short(x['rows'])}_mb={x['peak'] / MB:.1f} target=-" for x in results
    ]
    lines.append(f"BENCH collector_rows_per_s={large['rows'] / large['elapsed_s']:.0f} target=-")
    return lines


# --- main -------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(x.replace("_", "")) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated counts, e.g. 1000,10000"
        ) from None
    if not sizes or sizes[0] <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive counts")
    return sizes


def _sections(text: str) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(sorted(unknown))}; choose {SECTIONS}"
        )
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--collector-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help="use (and flush) this Redis database instead of a private server")
    parser.add_argument(
        "--sections", type=_sections, default=list(SECTIONS), help="worker,producer,collector"
    )
    parser.add_argument("--worker-tasks", type=_sizes, default=[1000, 10000], help="cumulative checkpoints")
    parser.add_argument("--worker-images", type=int, default=300, help="distinct image files the rows reuse")
    parser.add_argument("--concurrency", type=int, default=8, help="worker tasks in flight")
    parser.add_argument("--producer-rows", type=int, default=1_000_000)
    parser.add_argument("--collector-rows", type=_sizes, default=[10_000, 100_000])
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="longest wait for one job")
    args = parser.parse_args()
    if args.collector_child:
        url, job_id, rows = args.collector_child
        collector_child(url, job_id, int(rows))
        return
    if "collector" in args.sections and len(args.collector_rows) < 2:
        parser.error("--collector-rows needs two sizes or more, e.g. 10000,100000")
    if "worker" in args.sections and len(args.worker_tasks) < 2:
        parser.error("--worker-tasks needs two checkpoints or more, e.g. 1000,10000")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lines: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as name:
            tmp = Path(name)
            images = image_refs(tmp / "media", args.worker_images)
            with private_redis(tmp) if args.redis_url is None else _given(args.redis_url) as url:
                print(
                    f"Redis: {url}" + (" (private)" if args.redis_url is None else " (flushed)"), flush=True
                )
                for section in SECTIONS:
                    if section in args.sections:
                        lines += globals()[f"{section}_section"](args, url, tmp, images)
    finally:
        stop_children()
    print("\n".join(lines))


@contextmanager
def _given(url: str) -> Iterator[str]:
    client = redis_client(url)
    try:
        client.ping()
    except redis.RedisError as e:
        raise SystemExit(f"cannot reach Redis at {url}: {e}") from None
    try:
        yield url
    finally:
        with suppress(redis.RedisError):
            client.flushdb()
        client.close()


if __name__ == "__main__":
    main()
