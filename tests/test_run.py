"""``imageqa run``: the whole system on one box, and the same rows as the separate-process cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import EXAMPLES, make_images, read_jsonl, wait_done, write_jsonl

SHORT = ["--max-question-chars", "40", "--max-answer-chars", "40"]


def imageqa_run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEQA_")}
    clean.update({"IMAGEQA_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "120", **env})
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "run", *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=900,
    )


def canonical(rows: list[dict]) -> list[str]:
    """The rows, each with the part of its ``qa_meta`` that does not depend on the run (the job id,
    worker, model name and timing do)."""
    same = ("item_id", "row_index", "prompt_name", "prompt_hash", "sampling", "qa_stats")
    return sorted(
        json.dumps({**r, "qa_meta": {k: r["qa_meta"][k] for k in same}}, sort_keys=True) for r in rows
    )


def test_run_on_an_embedded_redis_writes_every_row_and_reports_failures(tmp_path):
    folder = tmp_path / "photos"
    images = make_images(folder, 5)
    (folder / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out.jsonl"

    done = imageqa_run([str(folder), "-o", str(out), "--engine", "fake", *SHORT], tmp_path)

    assert done.returncode == 0, done.stderr
    assert "5 rows written, 1 rows failed" in done.stderr
    assert sorted(r["image"][0] for r in read_jsonl(out)) == sorted(p.name for p in images)
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [(e["row"]["image"], e["error"]["code"]) for e in errors] == [(["broken.jpg"], "image_unreadable")]

    again = imageqa_run([str(folder), "-o", str(out), "--engine", "fake", *SHORT], tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(read_jsonl(out)) == 5, "a rerun of a finished job writes nothing again"


def test_run_fails_clearly_when_the_input_is_missing(tmp_path):
    done = imageqa_run(
        [str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--engine", "fake"], tmp_path
    )
    assert done.returncode == 2
    assert "input not found" in done.stderr


def test_separate_processes_and_run_produce_the_same_rows(fake_cluster, media, tmp_path):
    # Given one input, processed once by `imageqa enqueue` + a worker + `imageqa collect` (three
    # processes) and once by `imageqa run`
    images = make_images(media, 6)
    rows = [{"image": p.name, "n": i} for i, p in enumerate(images)] + [{"image": "missing.jpg"}]
    source = write_jsonl(media / "in.jsonl", rows)
    env = {**os.environ, "IMAGEQA_REDIS_URL": fake_cluster.redis_url}
    collector = subprocess.Popen([sys.executable, "-m", "workers.cli", "collect"], env=env)
    try:
        enqueue = subprocess.run(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "enqueue",
                str(source),
                "-o",
                str(tmp_path / "cluster.jsonl"),
                *SHORT,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        wait_done(fake_cluster.redis_url, enqueue.stdout.strip())
    finally:
        collector.terminate()
        collector_code = collector.wait(30)
    assert collector_code == 0
    done = imageqa_run([str(source), "-o", str(tmp_path / "run.jsonl"), "--engine", "fake", *SHORT], tmp_path)
    assert done.returncode == 0, done.stderr

    # Then both wrote the same output rows and the same error rows
    cluster_rows, run_rows = read_jsonl(tmp_path / "cluster.jsonl"), read_jsonl(tmp_path / "run.jsonl")
    assert len(cluster_rows) == 6
    assert canonical(cluster_rows) == canonical(run_rows)
    cluster_errors = read_jsonl(tmp_path / "cluster.errors.jsonl")
    run_errors = read_jsonl(tmp_path / "run.errors.jsonl")
    assert (
        [e["error"]["code"] for e in cluster_errors]
        == [e["error"]["code"] for e in run_errors]
        == ["image_not_found"]
    )


@pytest.mark.engine
def test_run_with_the_real_engine_on_the_example_photos(tiny_model, tmp_path):
    out = tmp_path / "demo.jsonl"
    done = imageqa_run(
        [str(EXAMPLES), "-o", str(out), "--model", str(tiny_model), *SHORT],
        tmp_path,
        IMAGEQA_MAX_MODEL_LEN="4096",
    )
    assert done.returncode == 0, done.stderr
    rows = read_jsonl(out)
    assert sorted(r["image"][0] for r in rows) == ["china.jpg", "flower.jpg", "grace_hopper.jpg"]
    for row in rows:
        assert 3 <= len(row["qa_pairs"]) <= 5
        assert all(p["question"].strip() and p["answer"].strip() for p in row["qa_pairs"])


def test_run_writes_a_parquet_output_in_input_order_and_a_rerun_makes_it_again(tmp_path):
    folder = tmp_path / "photos"
    images = make_images(folder, 4)
    source = write_jsonl(folder / "rows.jsonl", [{"image": p.name, "n": i} for i, p in enumerate(images)])
    out = tmp_path / "out.parquet"
    done = imageqa_run([str(source), "-o", str(out), "--engine", "fake", "--no-meta"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"output: {out}" in done.stderr.replace("\n", "")
    table = pq.read_table(out)
    assert table.column_names == ["image", "n", "qa_pairs"] and table.column("n").to_pylist() == [0, 1, 2, 3]

    # A rerun of the finished job generates nothing, and writes the same output from its journal
    out.unlink()
    again = imageqa_run([str(source), "-o", str(out), "--engine", "fake", "--no-meta"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert pq.read_table(out).equals(table)
