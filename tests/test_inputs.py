import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.broker import redis_client
from producer.errors import InputError
from producer.inputs import ItemIds, RedisItemIds, read_rows, resolve_ref, row_images
from tests.helpers import write_jsonl

ROWS = [{"image": ["a.jpg"], "id": 1}, {"image": "b.jpg", "id": 2}, {"image": ["c.jpg", "d.jpg"], "id": 3}]


def _rows(path: Path) -> list:
    return [raw.row for raw in read_rows(path)]


def test_jsonl_streams_rows_and_marks_malformed_lines(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [ROWS[0], b"{not json", ROWS[1]])
    raws = list(read_rows(path))
    assert [r.index for r in raws] == [0, 1, 2]
    assert raws[0].row == ROWS[0] and raws[0].error is None
    assert raws[1].error is not None and raws[1].error.code == "row_malformed"
    assert raws[2].row == ROWS[1]


def test_json_list(tmp_path):
    import json

    path = tmp_path / "in.json"
    path.write_text(json.dumps(ROWS))
    assert _rows(path) == ROWS


def test_csv_with_single_paths_and_json_lists(tmp_path):
    path = tmp_path / "in.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "id"])
        writer.writerow(["a.jpg", "1"])
        writer.writerow(['["c.jpg", "d.jpg"]', "3"])
    rows = _rows(path)
    assert rows == [{"image": "a.jpg", "id": "1"}, {"image": ["c.jpg", "d.jpg"], "id": "3"}]
    assert [row_images(r, "image") for r in rows] == [["a.jpg"], ["c.jpg", "d.jpg"]]


def test_parquet(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"image": [["a.jpg"], ["b.jpg", "c.jpg"]], "id": [1, 2]}), path)
    assert _rows(path) == [{"image": ["a.jpg"], "id": 1}, {"image": ["b.jpg", "c.jpg"], "id": 2}]


def test_folder_gives_one_row_per_image_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.png", "a.jpg", "sub/c.webp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert _rows(tmp_path) == [{"image": ["a.jpg"]}, {"image": ["b.png"]}, {"image": ["sub/c.webp"]}]


def test_unknown_suffix_and_missing_input_are_clear_errors(tmp_path):
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(InputError, match="format"):
        list(read_rows(tmp_path / "x.txt"))
    with pytest.raises(InputError, match="not found"):
        list(read_rows(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize(
    ("row", "code"),
    [
        ("just a string", "row_malformed"),
        ({"other": 1}, "image_key_missing"),
        ({"image": []}, "image_list_empty"),
        ({"image": [1]}, "image_ref_invalid"),
        ({"image": [""]}, "image_ref_invalid"),
        ({"image": {"a": 1}}, "image_ref_invalid"),
    ],
)
def test_row_images_rejects_bad_rows(row, code):
    with pytest.raises(InputError) as e:
        row_images(row, "image")
    assert e.value.code == code


def test_a_bare_string_is_a_one_image_list():
    assert row_images({"image": "a.jpg"}, "image") == ["a.jpg"]


def test_resolve_ref(tmp_path):
    assert resolve_ref("a/b.jpg", tmp_path) == str(tmp_path / "a" / "b.jpg")
    assert resolve_ref("/abs/x.jpg", tmp_path) == "/abs/x.jpg"
    for uri in ["https://example.com/x.jpg", "file:///x.jpg", "data:image/png;base64,AAAA"]:
        assert resolve_ref(uri, tmp_path) == uri
    with pytest.raises(InputError):
        resolve_ref("ftp://host/x.jpg", tmp_path)


def test_item_ids_differ_by_any_field_and_number_verbatim_repeats():
    ids = ItemIds("settings-a")
    a = ids.next_ids([{"image": ["x.jpg"], "split": "train"}])[0]
    b = ids.next_ids([{"image": ["x.jpg"], "split": "test"}])[0]
    a_again = ids.next_ids([{"split": "train", "image": ["x.jpg"]}])[0]  # same row, keys reordered
    a_third = ids.next_ids([{"image": ["x.jpg"], "split": "train"}])[0]
    assert len({a, b, a_again, a_third}) == 4
    assert a_again.startswith(a) and a_third.startswith(a)
    # The same input read again gives the same ids, in the same order.
    again = ItemIds("settings-a")
    assert [again.next_ids([r])[0] for r in ({"image": ["x.jpg"], "split": "train"},) * 2] == [a, a_again]
    # Other output settings give other ids.
    assert ItemIds("settings-b").next_ids([{"image": ["x.jpg"], "split": "train"}])[0] != a


def test_item_ids_kept_in_redis_are_the_same_ids_and_leave_nothing_behind(redis_url):
    rows = [{"image": [f"{i % 7}.jpg"], "n": i % 5} for i in range(60)]  # many verbatim repeats
    local = ItemIds("s")
    expected = [local.next_ids([row])[0] for row in rows]
    r = redis_client(redis_url)
    ids = RedisItemIds("s", r, "imageqa:test:pass")
    # In batches of several sizes, repeats both within a batch and across batches.
    got = ids.next_ids(rows[:1]) + ids.next_ids(rows[1:25]) + ids.next_ids(rows[25:60])
    assert got == expected and len(set(got)) == 60
    assert r.ttl("imageqa:test:pass:seen") > 0 and r.ttl("imageqa:test:pass:repeats") > 0
    ids.close()
    assert not r.keys("imageqa:test:pass*")
