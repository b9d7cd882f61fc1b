"""Fixtures: a real Redis (dedicated databases, flushed per test), real Celery workers (one with the
instant fake engine, one with the real vLLM engine on the tiny model), each started once a session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from producer.broker import redis_client
from tests.helpers import ROOT, WorkerProcess, free_port

REDIS_BASE = os.environ.get("IMAGEQA_TEST_REDIS", "redis://127.0.0.1:6379")
FAKE_DB, ENGINE_DB, PLAIN_DB = 13, 14, 15
TINY_MODEL = ROOT / ".cache" / "tiny-qwen2.5-vl"


def _flushed(url: str) -> str:
    client = redis_client(url)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"tests need a Redis at {REDIS_BASE} (IMAGEQA_TEST_REDIS): {e}")
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def redis_url() -> str:
    """A flushed Redis database no worker listens on."""
    return _flushed(f"{REDIS_BASE}/{PLAIN_DB}")


@pytest.fixture(scope="session")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the session's workers may read images from."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture
def media(media_root: Path, request: pytest.FixtureRequest) -> Path:
    folder = media_root / request.node.name.replace("[", "_").replace("]", "_")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Cluster:
    redis_url: str
    worker: WorkerProcess
    model: str


def _worker(
    tmp_path_factory: pytest.TempPathFactory, name: str, db: int, media_root: Path, **env: str
) -> WorkerProcess:
    url = _flushed(f"{REDIS_BASE}/{db}")
    log = tmp_path_factory.mktemp(name) / "worker.log"
    base = {
        "IMAGEQA_REDIS_URL": url,
        "IMAGEQA_MEDIA_ROOTS": str(media_root),
        "IMAGEQA_CONCURRENCY": "32",
        "IMAGEQA_METRICS_PORT": "0",
    }
    return WorkerProcess({**base, **env}, log)


@pytest.fixture(scope="session")
def fake_worker(tmp_path_factory: pytest.TempPathFactory, media_root: Path) -> Iterator[Cluster]:
    worker = _worker(
        tmp_path_factory, "fake-worker", FAKE_DB, media_root, IMAGEQA_ENGINE="fake", IMAGEQA_MODEL="fake"
    )
    worker.start(60)
    yield Cluster(worker.env["IMAGEQA_REDIS_URL"], worker, "fake")
    worker.stop()


@pytest.fixture
def fake_cluster(fake_worker: Cluster) -> Cluster:
    _flushed(fake_worker.redis_url)
    return fake_worker


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    subprocess.run(
        [sys.executable, str(ROOT / "ops" / "build_tiny_model.py"), "--out", str(TINY_MODEL)], check=True
    )
    return TINY_MODEL


@pytest.fixture(scope="session")
def engine_worker(
    tmp_path_factory: pytest.TempPathFactory, media_root: Path, tiny_model: Path
) -> Iterator[Cluster]:
    worker = _worker(
        tmp_path_factory,
        "engine-worker",
        ENGINE_DB,
        media_root,
        IMAGEQA_ENGINE="vllm",
        IMAGEQA_MODEL=str(tiny_model),
        IMAGEQA_MAX_MODEL_LEN="4096",
        # Its /metrics (vLLM's engine metrics included) on a free port: tests/test_dashboard.py.
        IMAGEQA_METRICS_PORT=str(free_port()),
    )
    worker.start(600)
    yield Cluster(worker.env["IMAGEQA_REDIS_URL"], worker, str(tiny_model))
    code = worker.stop(120)
    assert code == 0, f"engine worker exited with {code} on shutdown:\n{worker.log()[-3000:]}"


@pytest.fixture
def engine_cluster(engine_worker: Cluster) -> Cluster:
    _flushed(engine_worker.redis_url)
    return engine_worker
