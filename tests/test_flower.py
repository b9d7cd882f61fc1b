"""Flower, started the way docker-compose.yml starts it, sees the real worker and its finished tasks."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery import Celery

from producer.broker import QueueDepth, queue_depth, redis_client
from producer.constants import TASK_GENERATE
from producer.contract import GenerationParams
from producer.enqueue import enqueue_file
from producer.settings import ProducerSettings
from tests.conftest import Cluster
from tests.helpers import ROOT, CollectorThread, make_images, read_jsonl, wait_done, write_jsonl

USER, PASSWORD = "operator", "flower-test-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Flower:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path)
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)


def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout_s} s")
        time.sleep(0.25)


def compose_command(port: int) -> list[str]:
    """The flower service's command in docker-compose.yml, on a free loopback port instead."""
    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["flower"]["command"]
    assert command[:2] == ["celery", "flower"]
    local = {"--address": "127.0.0.1", "--port": str(port)}
    args = [f"{name}={local[name]}" if (name := arg.split("=")[0]) in local else arg for arg in command]
    assert sum(a != b for a, b in zip(args, command, strict=True)) == len(local)
    return [sys.executable, "-m", *args]


@pytest.fixture
def flower(fake_cluster: Cluster, tmp_path: Path) -> Iterator[Flower]:
    """``celery flower`` as docker-compose.yml runs it (command line and environment), on a free
    loopback port."""
    port = free_port()
    env = {
        **os.environ,
        "CELERY_BROKER_URL": fake_cluster.redis_url,
        "FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
    }
    log_path = tmp_path / "flower.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            compose_command(port),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    flower = Flower(f"http://127.0.0.1:{port}")

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"flower exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            return flower.get("/healthcheck", auth=None) == (200, b"OK")
        except OSError:
            return False

    try:
        wait_until(answers, 30, "flower does not answer")
        yield flower
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_flower_needs_its_password(flower: Flower):
    assert flower.get("/api/workers", auth=None)[0] == 401
    assert flower.get("/api/workers", auth=(USER, "wrong"))[0] == 401
    assert flower.get("/api/tasks", auth=None)[0] == 401
    assert flower.get("/api/workers")[0] == 200


def test_flower_sees_the_worker_and_its_finished_tasks(
    flower: Flower, fake_cluster: Cluster, media: Path, tmp_path: Path
):
    assert fake_cluster.worker.proc is not None
    worker_name = f"imageqa-{fake_cluster.worker.proc.pid}@{socket.gethostname()}"
    workers = wait_until(
        lambda: worker_name in (w := flower.json("/api/workers?refresh=1")) and w,
        30,
        f"flower does not list {worker_name}",
    )
    assert TASK_GENERATE in workers[worker_name]["registered"]
    # Workers send task events only while a monitor asks for them: Flower does, every few seconds. An
    # earlier Flower may have switched them on already: switch them off, so that only this one can
    # switch them back on (the worker logs it once per switch).
    log_start = len(fake_cluster.worker.log())
    with Celery(broker=fake_cluster.redis_url) as control:
        control.control.disable_events()
    wait_until(
        lambda: "Events of group {task} enabled by remote" in fake_cluster.worker.log()[log_start:],
        30,
        "flower did not switch on the worker's task events",
    )

    # When a job of three rows runs to the end,
    images = make_images(media, 3)
    source = write_jsonl(media / "in.jsonl", [{"image": [p.name]} for p in images])
    with CollectorThread(fake_cluster.redis_url):
        summary = enqueue_file(
            source,
            tmp_path / "out.jsonl",
            settings=ProducerSettings(redis_url=fake_cluster.redis_url),
            params=GenerationParams(),
        )
        assert wait_done(fake_cluster.redis_url, summary.job_id, timeout_s=60).written == 3

    # then Flower has seen each of its tasks succeed on that worker,
    def job_tasks() -> dict[str, Any]:
        tasks = flower.json(f"/api/tasks?taskname={TASK_GENERATE}&state=SUCCESS")
        mine = {tid: t for tid, t in tasks.items() if tid.startswith(f"{summary.job_id}:")}
        return mine if len(mine) == 3 else {}

    tasks = wait_until(job_tasks, 30, "flower did not see three succeeded tasks of the job")
    for task in tasks.values():
        assert task["name"] == TASK_GENERATE
        assert task["worker"] == worker_name
        assert task["succeeded"] >= task["started"] >= task["received"] > 0
        # Its arguments in short form: which job, item, row and images (not the whole row).
        assert f"job {summary.job_id}" in task["kwargs"] and ".jpg]" in task["kwargs"]

    # and its Prometheus endpoint, which Prometheus scrapes without credentials, counts them.
    status, body = flower.get("/metrics", auth=None)
    assert status == 200
    succeeded = [
        line
        for line in body.decode().splitlines()
        if line.startswith("flower_events_total{")
        and f'task="{TASK_GENERATE}"' in line
        and 'type="task-succeeded"' in line
        and f'worker="{worker_name}"' in line
    ]
    assert succeeded and float(succeeded[0].rsplit(" ", 1)[1]) >= 3


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's headless chromium through selenium (ops/ensure_chromium.sh installs it in make test)."""
    chromium, driver_path = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not (chromium.exists() and driver_path.exists()):
        pytest.skip(
            "needs /usr/bin/chromium and /usr/bin/chromedriver (apt install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_flower_shows_each_rows_outcome_and_counts_error_rows_as_failed(
    flower: Flower, fake_cluster: Cluster, media: Path, tmp_path: Path, browser: Any
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # Given Flower watching the worker (it switches the worker's task events on),
    assert fake_cluster.worker.proc is not None
    worker_name = f"imageqa-{fake_cluster.worker.proc.pid}@{socket.gethostname()}"
    wait_until(
        lambda: worker_name in flower.json("/api/workers?refresh=1"),
        30,
        f"flower does not list {worker_name}",
    )
    wait_until(
        lambda: "Events of group {task} enabled by remote" in fake_cluster.worker.log(),
        30,
        "flower did not switch on the worker's task events",
    )

    # when a job runs with one good row and one whose image is missing,
    (image,) = make_images(media, 1)
    source = write_jsonl(media / "in.jsonl", [{"image": [image.name]}, {"image": ["missing.jpg"]}])
    with CollectorThread(fake_cluster.redis_url):
        summary = enqueue_file(
            source,
            tmp_path / "out.jsonl",
            settings=ProducerSettings(redis_url=fake_cluster.redis_url),
            params=GenerationParams(),
        )
        status = wait_done(fake_cluster.redis_url, summary.job_id, timeout_s=60)
    assert (status.written, status.failed) == (1, 1)
    mine = lambda tasks: {tid: t for tid, t in tasks.items() if tid.startswith(f"{summary.job_id}:")}  # noqa: E731
    tasks = wait_until(
        lambda: (
            (t := mine(flower.json(f"/api/tasks?taskname={TASK_GENERATE}")))
            and len(t) == 2
            and all(x["state"] in ("SUCCESS", "FAILURE") for x in t.values())
            and t
        ),
        30,
        "flower did not see both tasks of the job finish",
    )
    failed_id = next(tid for tid, t in tasks.items() if t["state"] == "FAILURE")
    ok_id = next(tid for tid, t in tasks.items() if t["state"] == "SUCCESS")

    # then Flower's task list, in a browser, shows the good row's pair count and the other's error code,
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
    browser.get(f"{flower.url}/tasks")

    def table_rows() -> dict[str, dict[str, str]]:
        # The list is filled by script (DataTables asks /tasks/datatable): read what is on screen.
        headers = [
            th.get_attribute("data-column")
            for th in browser.find_elements(By.CSS_SELECTOR, "#tasks-table thead th")
        ]
        shown = {}
        for tr in browser.find_elements(By.CSS_SELECTOR, "#tasks-table tbody tr"):
            cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            if len(cells) == len(headers):
                row = dict(zip(headers, cells, strict=True))
                shown[tr.get_attribute("id")] = row
        return shown

    rows = WebDriverWait(browser, 30, poll_frequency=0.25).until(
        lambda _: (r := table_rows()) and failed_id in r and ok_id in r and r,
        "the task list never showed the job's two tasks",
    )
    assert rows[ok_id]["state"] == "SUCCESS"
    assert rows[ok_id]["result"] == "'ok: 3 pairs'"
    assert rows[failed_id]["state"] == "FAILURE"
    assert rows[failed_id]["exception"].startswith("RowFailed('image_not_found: ")

    # and its Failed filter lists the error row's task, not the good one.
    browser.find_element(By.CSS_SELECTOR, '.task-state-filter[data-task-state="FAILURE"]').click()
    failed_rows = WebDriverWait(browser, 30, poll_frequency=0.25).until(
        lambda _: (r := table_rows()) and ok_id not in r and failed_id in r and r,
        "the Failed filter did not list the error row's task alone",
    )
    assert all(row["state"] == "FAILURE" for row in failed_rows.values())

    # The failed task was acknowledged, not put back: nothing waits or is held, and it ran once.
    broker = redis_client(fake_cluster.redis_url)
    time.sleep(1)
    assert queue_depth(broker) == QueueDepth(0, 0)
    log = fake_cluster.worker.log()
    assert log.count(f"Task {TASK_GENERATE}[{failed_id}] received") == 1
    assert f"Task {TASK_GENERATE}[{failed_id}] raised expected: RowFailed('image_not_found: " in log
    assert read_jsonl(tmp_path / "out.errors.jsonl")[0]["error"]["code"] == "image_not_found"
