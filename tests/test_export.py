"""``imageqa export``: a finished output becomes a LLaVA, ShareGPT, OpenAI-messages or Parquet file
that Hugging Face ``datasets`` loads, in input order with ``--ordered``."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from producer.contract import GenerationParams
from producer.enqueue import enqueue_file
from producer.settings import ProducerSettings
from tests.conftest import Cluster
from tests.helpers import CollectorThread, make_images, read_jsonl, run_cli, wait_done, write_jsonl


@pytest.fixture
def finished(fake_cluster: Cluster, media: Path, tmp_path: Path) -> tuple[Path, list[dict]]:
    """A finished job's output, its lines reversed (so file order is not input order), and the input."""
    images = make_images(media, 5)
    rows = [{"image": [p.name], "id": i} for i, p in enumerate(images[:4])]
    rows.append({"image": [images[0].name, images[4].name], "id": 4})
    source = write_jsonl(media / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with CollectorThread(fake_cluster.redis_url):
        summary = enqueue_file(
            source,
            out,
            settings=ProducerSettings(redis_url=fake_cluster.redis_url),
            params=GenerationParams(),
        )
        wait_done(fake_cluster.redis_url, summary.job_id)
    written = sorted(read_jsonl(out), key=lambda row: row["id"], reverse=True)
    write_jsonl(out, written)
    return out, rows


def load(kind: str, path: Path, cache: Path) -> datasets.Dataset:
    return datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache))


def export(redis_url: str, *args: str) -> None:
    done = run_cli(redis_url, "export", *args)
    assert done.returncode == 0, done.stderr


def by_input(out: Path) -> list[dict]:
    return sorted(read_jsonl(out), key=lambda row: row["qa_meta"]["row_index"])


def test_llava_export_loads_with_datasets_in_input_order(finished, fake_cluster, tmp_path):
    out, rows = finished
    target = tmp_path / "llava.json"
    export(fake_cluster.redis_url, str(out), "--format", "llava", "--ordered", "-o", str(target))

    ds = load("json", target, tmp_path / "hf")
    expected = by_input(out)
    assert ds["id"] == [row["qa_meta"]["item_id"] for row in expected]
    # One row has two images, so every row lists its images
    assert ds["image"] == [row["image"] for row in rows]
    for record, row in zip(ds, expected, strict=True):
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(row["qa_pairs"])
        tokens = "<image>\n" * len(row["image"])
        assert turns[0]["value"] == tokens + row["qa_pairs"][0]["question"]
        assert [t["value"] for t in turns[2::2]] == [p["question"] for p in row["qa_pairs"][1:]]
        assert [t["value"] for t in turns[1::2]] == [p["answer"] for p in row["qa_pairs"]]
        assert "<image>" not in "".join(t["value"] for t in turns[1:])


def test_sharegpt_and_messages_exports_load_with_datasets(finished, fake_cluster, tmp_path):
    out, rows = finished
    expected = by_input(out)
    export(
        fake_cluster.redis_url, str(out), "--format", "sharegpt", "--ordered", "-o", str(tmp_path / "s.jsonl")
    )
    export(
        fake_cluster.redis_url, str(out), "--format", "messages", "--ordered", "-o", str(tmp_path / "m.jsonl")
    )

    sharegpt = load("json", tmp_path / "s.jsonl", tmp_path / "hf")
    assert sharegpt["images"] == [row["image"] for row in rows]
    for record, row in zip(sharegpt, expected, strict=True):
        assert record["conversations"][0]["value"].count("<image>") == len(row["image"])
        assert [t["value"] for t in record["conversations"][1::2]] == [p["answer"] for p in row["qa_pairs"]]

    messages = load("json", tmp_path / "m.jsonl", tmp_path / "hf")
    assert messages["id"] == [row["qa_meta"]["item_id"] for row in expected]
    for record, row in zip(messages, expected, strict=True):
        chat = record["messages"]
        assert [m["role"] for m in chat] == ["user", "assistant"] * len(row["qa_pairs"])
        first = chat[0]["content"]
        assert [p["image_url"]["url"] for p in first if p["type"] == "image_url"] == row["image"]
        assert [p["text"] for p in first if p["type"] == "text"] == [row["qa_pairs"][0]["question"]]
        answers = [m["content"][0]["text"] for m in chat if m["role"] == "assistant"]
        assert answers == [p["answer"] for p in row["qa_pairs"]]


def test_parquet_export_keeps_the_rows_with_pairs_and_meta_as_structs(finished, fake_cluster, tmp_path):
    out, _ = finished
    target = tmp_path / "rows.parquet"
    export(fake_cluster.redis_url, str(out), "--format", "parquet", "--ordered", "-o", str(target))

    ds = load("parquet", target, tmp_path / "hf")
    expected = by_input(out)
    assert ds["id"] == list(range(5))
    assert ds["qa_pairs"] == [row["qa_pairs"] for row in expected]
    assert [m["item_id"] for m in ds["qa_meta"]] == [row["qa_meta"]["item_id"] for row in expected]
    assert all(m["qa_stats"]["tries"] == 1 for m in ds["qa_meta"])


def test_without_ordered_the_file_order_is_kept(finished, fake_cluster, tmp_path):
    out, _ = finished
    export(fake_cluster.redis_url, str(out), "--format", "llava", "-o", str(tmp_path / "l.jsonl"))
    assert [r["id"] for r in read_jsonl(tmp_path / "l.jsonl")] == [
        r["qa_meta"]["item_id"] for r in read_jsonl(out)
    ]


def test_a_missing_output_and_an_unknown_format_are_clear_errors(redis_url, tmp_path):
    missing = run_cli(redis_url, "export", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "x.json"))
    assert missing.returncode == 2 and "no such output" in missing.stderr
    unknown = run_cli(redis_url, "export", str(tmp_path / "nope.jsonl"), "--format", "alpaca", "-o", "x")
    assert unknown.returncode == 2 and "alpaca" in unknown.stderr
    assert not (tmp_path / "x.json").exists()
