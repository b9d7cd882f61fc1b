"""Fixtures: a real Redis (dedicated databases, flushed per test), real Celery workers (one with the
instant fake engine, one with the real vLLM engine on the tiny model), each started once a session,
and a real S3-compatible server (moto's) on 127.0.0.1 that the tests and the workers share."""

from __future__ import annotations

import os
import socket
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
S3_PORT = int(os.environ.get("IMAGEQA_TEST_S3_PORT", "0"))
"""Port of the test S3 server; 0: a free one."""
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
class ObjectStore:
    """moto's S3 server on loopback; ``env`` holds the standard AWS variables that point at it."""

    endpoint_url: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def object_store() -> Iterator[ObjectStore]:
    """A real S3 HTTP API (moto's server, in a thread of the test process) for the session; the AWS
    variables are set in this process too, so the producer and the workers reach the same store."""
    from moto.server import ThreadedMotoServer

    port = S3_PORT or _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield ObjectStore(endpoint, env)
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    redis_url: str
    worker: WorkerProcess
    model: str


def _worker(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    db: int,
    media_root: Path,
    store: ObjectStore,
    **env: str,
) -> WorkerProcess:
    url = _flushed(f"{REDIS_BASE}/{db}")
    log = tmp_path_factory.mktemp(name) / "worker.log"
    base = {
        "IMAGEQA_REDIS_URL": url,
        "IMAGEQA_MEDIA_ROOTS": str(media_root),
        "IMAGEQA_CONCURRENCY": "32",
        "IMAGEQA_METRICS_PORT": "0",
        **store.env,
    }
    return WorkerProcess({**base, **env}, log)


@pytest.fixture(scope="session")
def fake_worker(
    tmp_path_factory: pytest.TempPathFactory, media_root: Path, object_store: ObjectStore
) -> Iterator[Cluster]:
    worker = _worker(
        tmp_path_factory,
        "fake-worker",
        FAKE_DB,
        media_root,
        object_store,
        IMAGEQA_ENGINE="fake",
        IMAGEQA_MODEL="fake",
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
    tmp_path_factory: pytest.TempPathFactory, media_root: Path, tiny_model: Path, object_store: ObjectStore
) -> Iterator[Cluster]:
    worker = _worker(
        tmp_path_factory,
        "engine-worker",
        ENGINE_DB,
        media_root,
        object_store,
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
