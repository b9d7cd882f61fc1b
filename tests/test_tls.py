"""Every role (producer, a real Celery worker, the collector, ``imageqa status``) on a TLS-only Redis
(``rediss://``), with certificates from a throwaway test CA."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trustme
from kombu.exceptions import OperationalError

from producer.broker import celery_app, check_redis, redis_client
from producer.errors import BrokerUnavailable
from tests.helpers import WorkerProcess, make_images, read_jsonl, wait_done, write_jsonl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TLSRedis:
    """A redis-server that speaks only TLS on a free loopback port, with certificates from a test CA."""

    def __init__(self, folder: Path, auth_clients: bool) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "server.key"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        self.port = _free_port()
        self.log = folder / "redis.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    "0",
                    "--tls-port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--tls-cert-file",
                    str(cert_file),
                    "--tls-key-file",
                    str(key_file),
                    "--tls-ca-cert-file",
                    str(self.ca_file),
                    "--tls-auth-clients",
                    "yes" if auth_clients else "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.base = f"rediss://127.0.0.1:{self.port}/0"

    def wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                redis_client(url).ping()
                return
            except redis.RedisError:
                # A redis-server built without TLS exits here, saying so in its log.
                assert self.proc.poll() is None, f"redis-server did not start: {self.log.read_text()}"
                assert time.monotonic() < deadline
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TLSRedis]:
    server = TLSRedis(tmp_path, auth_clients=False)
    try:
        server.wait_ready(f"{server.base}?ssl_cert_reqs=required&ssl_ca_certs={server.ca_file}")
        yield server
    finally:
        server.stop()


def _imageqa(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", *args], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_every_role_works_with_a_tls_redis(tls_redis, media, tmp_path):
    url = f"{tls_redis.base}?ssl_cert_reqs=required&ssl_ca_certs={tls_redis.ca_file}"
    images = make_images(media, 3)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images])
    env = {
        "IMAGEQA_REDIS_URL": url,
        "IMAGEQA_MEDIA_ROOTS": str(media),
        "IMAGEQA_ENGINE": "fake",
        "IMAGEQA_METRICS_PORT": "0",
    }
    full_env = {**os.environ, **env}
    worker = WorkerProcess(env, tmp_path / "worker.log").start(60)
    with (tmp_path / "collector.log").open("wb") as log:
        collector = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "collect"], env=full_env, stdout=log, stderr=log
        )
    try:
        job_id = _imageqa(full_env, "enqueue", str(source), "-o", str(tmp_path / "out.jsonl")).strip()
        wait_done(url, job_id, timeout_s=60)
        status = json.loads(_imageqa(full_env, "status", job_id, "--json"))
    finally:
        collector.terminate()
        collector.wait(30)
        worker.stop()
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(row["image"] for row in rows) == sorted(p.name for p in images)
    assert all(row["qa_pairs"] for row in rows)
    assert status["written"] == 3
    for log_text in (worker.log(), (tmp_path / "collector.log").read_text()):
        assert "insecure" not in log_text.lower()


def test_no_role_connects_to_a_tls_redis_whose_certificate_it_cannot_verify(tls_redis):
    # Without the test CA (the system's CAs do not include it), verification fails: the redis-py
    # clients and the Celery broker connection both refuse, rather than connecting unverified.
    with pytest.raises(BrokerUnavailable, match="does not answer"):
        check_redis(tls_redis.base)
    with (
        pytest.raises(OperationalError, match="CERTIFICATE_VERIFY_FAILED"),
        celery_app(tls_redis.base, 60).connection_for_write() as conn,
    ):
        conn.ensure_connection(max_retries=1)
    with celery_app(f"{tls_redis.base}?ssl_ca_certs={tls_redis.ca_file}", 60).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        assert conn.default_channel.client.ping()


def test_client_certificates_from_the_url(tmp_path):
    server = TLSRedis(tmp_path, auth_clients=True)
    client = server.ca.issue_cert("imageqa-client")
    client.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    url = (
        f"{server.base}?ssl_ca_certs={server.ca_file}"
        f"&ssl_certfile={tmp_path / 'client.pem'}&ssl_keyfile={tmp_path / 'client.pem'}"
    )
    try:
        server.wait_ready(url)
        with pytest.raises(BrokerUnavailable):
            check_redis(f"{server.base}?ssl_ca_certs={server.ca_file}")  # no client certificate
        with celery_app(url, 60).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            assert conn.default_channel.client.ping()
    finally:
        server.stop()
