"""Dataset inputs: Parquet with ``datasets`` image structs, ``save_to_disk`` folders, hub datasets and
WebDataset shards, read by the producer as rows and by the workers one image at a time."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import boto3
import datasets
import fsspec
import orjson
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from producer.errors import ErrorCode, ImageError, InputError
from producer.inputs import ItemIds, read_rows
from producer.sources import EmbeddedRef
from tests.helpers import CollectorThread, make_images, read_jsonl, run_cli, wait_done
from workers import storage
from workers.images import read_bytes
from workers.settings import ImageSettings

SHORT = ["--max-question-chars", "40", "--max-answer-chars", "40"]


def image_dataset(paths: list[Path], **columns: list) -> datasets.Dataset:
    """A Hugging Face dataset with an Image feature, the images' bytes inside it."""
    images = [{"bytes": p.read_bytes(), "path": p.name} for p in paths]
    data = {"image": images, "caption": [p.stem for p in paths], **columns}
    return datasets.Dataset.from_dict(data).cast_column("image", datasets.Image())


def fake_sizes(rows: list[dict]) -> list[str]:
    """The image size the fake engine reports in each output row ("WxH")."""
    return sorted(next(p["answer"] for p in r["qa_pairs"] if "size" in p["question"]) for r in rows)


def expected_sizes(indexes: range | list[int]) -> list[str]:
    return sorted(f"{96 + i % 7}x64" for i in indexes)


def enqueue_and_wait(cluster, *args: str, out: Path):
    with CollectorThread(cluster.redis_url):
        done = run_cli(cluster.redis_url, "enqueue", *args, "-o", str(out), *SHORT)
        assert done.returncode == 0, done.stdout + done.stderr
        return wait_done(cluster.redis_url, done.stdout.strip().splitlines()[-1])


def test_run_on_a_local_datasets_parquet_reads_the_images_from_the_file(tmp_path):
    # Given a Parquet file written by `datasets` with images inside (the layout that used to crash run)
    images = make_images(tmp_path / "src", 4)
    parquet = tmp_path / "data" / "train.parquet"
    parquet.parent.mkdir()
    image_dataset(images).to_parquet(str(parquet))
    out = tmp_path / "out.jsonl"

    # When the user runs the whole system on it
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEQA_")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "run",
            str(parquet),
            "-o",
            str(out),
            "--engine",
            "fake",
            *SHORT,
        ],
        env={**clean, "IMAGEQA_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=600,
    )

    # Then every row is written, each from its own image, and the output points at the cell
    assert done.returncode == 0, done.stderr
    assert "4 rows written, 0 rows failed" in done.stderr
    rows = read_jsonl(out)
    assert fake_sizes(rows) == expected_sizes(range(4))
    assert sorted(r["image"] for r in rows) == [f"{parquet}#parquet:col=image&rg=0&row={i}" for i in range(4)]
    assert sorted(r["caption"] for r in rows) == [p.stem for p in images]


def test_a_save_to_disk_folder_reads_the_split_asked_for(fake_cluster, media, tmp_path):
    # Given a DatasetDict saved to disk, with different images in its two splits
    images = make_images(tmp_path / "src", 5)
    folder = media / "saved"
    datasets.DatasetDict(
        {"train": image_dataset(images[:3]), "test": image_dataset(images[3:])}
    ).save_to_disk(str(folder))

    # When the test split is enqueued, then the default one (train)
    test_st = enqueue_and_wait(fake_cluster, str(folder), "--split", "test", out=tmp_path / "test.jsonl")
    train_st = enqueue_and_wait(fake_cluster, str(folder), out=tmp_path / "train.jsonl")

    # Then each job holds its split's images, read by the worker from the Arrow files
    assert (test_st.done, test_st.failed, train_st.done, train_st.failed) == (2, 0, 3, 0)
    assert fake_sizes(read_jsonl(tmp_path / "test.jsonl")) == expected_sizes([3, 4])
    train = read_jsonl(tmp_path / "train.jsonl")
    assert fake_sizes(train) == expected_sizes(range(3))
    assert all("#arrow:col=image&row=" in r["image"] for r in train)

    missing = run_cli(
        fake_cluster.redis_url, "enqueue", str(folder), "--split", "valid", "-o", str(tmp_path / "v")
    )
    assert missing.returncode == 2
    assert "has no split 'valid'; choose one with --split (train, test)" in " ".join(missing.stderr.split())


def write_shard(path: Path, images: list[Path], start: int) -> Path:
    """A WebDataset shard: KEY.jpg, KEY.json and KEY.txt per sample."""
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images, start):
            key = f"sample{i:04d}"
            for ext, data in (
                ("jpg", image.read_bytes()),
                ("json", orjson.dumps({"n": i})),
                ("txt", f"caption {i}".encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_local_and_in_a_bucket(fake_cluster, media, object_store, tmp_path):
    images = make_images(tmp_path / "src", 6)
    shards = [write_shard(media / f"shard-{n}.tar", images[n * 3 : n * 3 + 3], n * 3) for n in range(2)]
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="shards")
    for shard in shards:
        s3.upload_file(str(shard), "shards", f"wds/{shard.name}")

    for name, source in (("local", str(media / "shard-*.tar")), ("bucket", "s3://shards/wds/shard-*.tar")):
        st = enqueue_and_wait(fake_cluster, source, out=tmp_path / f"{name}.jsonl")
        assert (st.done, st.failed) == (6, 0), name
        rows = read_jsonl(tmp_path / f"{name}.jsonl")
        assert fake_sizes(rows) == expected_sizes(range(6)), name
        by_key = {r["__key__"]: r for r in rows}
        assert by_key["sample0004"]["json"] == {"n": 4} and by_key["sample0004"]["txt"] == "caption 4"
        assert "#tar:offset=" in by_key["sample0004"]["image"] and "jpg" not in by_key["sample0004"]


class LocalHub(DirFileSystem):
    """Stands in for huggingface_hub's ``hf://`` filesystem (no hub here): the same paths
    (``datasets/ORG/NAME/...``) under a local folder."""

    protocol = "hf"
    root = ""

    def __init__(self, **kwargs):
        super().__init__(path=self.root, fs=LocalFileSystem(), **kwargs)


@pytest.fixture
def local_hub(tmp_path):
    """``hf://`` served from a local folder in this process, for the test's length."""
    LocalHub.root = str(tmp_path / "hub")
    LocalHub.clear_instance_cache()
    original = fsspec.get_filesystem_class("hf")
    fsspec.register_implementation("hf", LocalHub, clobber=True)
    yield Path(LocalHub.root)
    fsspec.register_implementation("hf", original, clobber=True)


def test_a_hub_dataset_reads_the_parquet_files_of_a_split(local_hub, tmp_path):
    # Given a dataset repository laid out as push_to_hub writes it: data/SPLIT-xxxxx-of-yyyyy.parquet
    images = make_images(tmp_path / "src", 5)
    data = local_hub / "datasets" / "org" / "name" / "data"
    data.mkdir(parents=True)
    image_dataset(images[:2]).to_parquet(str(data / "train-00000-of-00002.parquet"))
    image_dataset(images[2:4]).to_parquet(str(data / "train-00001-of-00002.parquet"))
    image_dataset(images[4:]).to_parquet(str(data / "test-00000-of-00001.parquet"))

    # When its splits are read through hf://
    train = list(read_rows("hf://datasets/org/name"))
    test = list(read_rows("hf://datasets/org/name", split="test"))

    # Then the rows are those of the split's files, in order, referring to their cells on the hub
    assert [r.row["caption"] for r in train] == [p.stem for p in images[:4]]
    assert [r.index for r in train] == [0, 1, 2, 3]
    assert train[3].row["image"] == (
        "hf://datasets/org/name/data/train-00001-of-00002.parquet#parquet:col=image&rg=0&row=1"
    )
    assert [r.row["caption"] for r in test] == [images[4].stem]
    # And a worker reads exactly that image back through hf://
    assert read_bytes(train[3].row["image"], ImageSettings()) == images[3].read_bytes()
    assert read_bytes(test[0].row["image"], ImageSettings()) == images[4].read_bytes()
    with pytest.raises(InputError, match=r"no split 'valid'.*test, train"):
        read_rows("hf://datasets/org/name", split="valid")


def test_item_ids_hash_the_image_bytes_so_they_are_stable_and_distinct(tmp_path):
    images = make_images(tmp_path / "src", 2)
    # Same caption in every row: only the image tells rows 0 and 1 apart; row 2 repeats row 0.
    ds = image_dataset([images[0], images[1], images[0]], caption=["same"] * 3)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.to_parquet(str(tmp_path / "copy.parquet"))

    first = ItemIds("fp").next_ids([r.identity for r in read_rows(tmp_path / "a.parquet")])
    again = ItemIds("fp").next_ids([r.identity for r in read_rows(tmp_path / "copy.parquet")])

    assert first == again, "the same rows and images give the same ids wherever the file is"
    assert first[0] != first[1] and first[2] == f"{first[0]}-1"


def test_a_row_group_is_read_once_for_all_its_images(tmp_path, monkeypatch):
    images = make_images(tmp_path / "src", 3)
    ds = image_dataset(images * 20)
    ds.to_parquet(str(tmp_path / "big.parquet"))
    refs = [r.row["image"] for r in read_rows(tmp_path / "big.parquet")]
    settings = ImageSettings(media_roots=[tmp_path])
    loads = []
    original = storage._parquet_column
    monkeypatch.setattr(storage, "_parquet_column", lambda *a: loads.append(a) or original(*a))

    results: dict[str, bytes] = {}
    threads = [
        threading.Thread(target=lambda ref=ref: results.update({ref: read_bytes(ref, settings)}))
        for ref in refs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert [results[ref] for ref in refs] == [p.read_bytes() for p in images * 20]
    assert len(loads) == 1


def test_references_into_files_obey_the_worker_rules(tmp_path):
    images = make_images(tmp_path / "src", 1)
    image_dataset(images).to_parquet(str(tmp_path / "a.parquet"))
    (row,) = read_rows(tmp_path / "a.parquet")
    ref = row.row["image"]

    with pytest.raises(ImageError) as outside:
        read_bytes(ref, ImageSettings(media_roots=[tmp_path / "src"]))
    assert outside.value.code == ErrorCode.PATH_NOT_ALLOWED
    with pytest.raises(ImageError) as no_row:
        read_bytes(ref.replace("row=0", "row=5"), ImageSettings(media_roots=[tmp_path]))
    assert no_row.value.code == ErrorCode.IMAGE_NOT_FOUND
    with pytest.raises(ImageError) as over_http:
        read_bytes("https://example.org/a.parquet#parquet:col=image&rg=0&row=0", ImageSettings())
    assert over_http.value.code == ErrorCode.URL_NOT_ALLOWED
    with pytest.raises(ImageError) as small:
        read_bytes(ref, ImageSettings(media_roots=[tmp_path], max_image_bytes=100))
    assert small.value.code == ErrorCode.IMAGE_TOO_LARGE


def test_an_embedded_reference_reads_back_as_written():
    for ref in (
        EmbeddedRef("s3://b/d/train.parquet", "parquet", column="image col", row_group=2, row=7, item=1),
        EmbeddedRef("/data/x.arrow", "arrow", column="image", row=12),
        EmbeddedRef("gs://b/shard-0.tar", "tar", offset=1536, size=5120, name="a/000007.jpg"),
    ):
        assert EmbeddedRef.parse(str(ref)) == ref
    for text in (
        "/photos/a#1.jpg",
        "https://example.org/a.jpg#parquet",
        "s3://b/x.parquet#parquet:col=image&row=1",  # no row group
        "s3://b/x.parquet#parquet:col=image&rg=0&row=x",
        "s3://b/x.tar#tar:offset=1&size=2&evil=3",
    ):
        assert EmbeddedRef.parse(text) is None, text
