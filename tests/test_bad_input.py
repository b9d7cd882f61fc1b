"""Bad input through the real cluster: each becomes a clear error row (or is repaired), and the rest of
the job completes. Runs on the fake engine, which answers with the size of the image it was given."""

from __future__ import annotations

import base64
import http.server
import io
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from producer.broker import redis_client
from producer.contract import GenerationParams
from producer.enqueue import enqueue_file
from producer.settings import ProducerSettings
from tests.helpers import CollectorThread, WorkerProcess, make_images, read_jsonl, wait_done, write_jsonl

PARAMS = GenerationParams(max_question_chars=40, max_answer_chars=40)
MAX_PIXELS = 1024 * 1024


def run(redis_url: str, rows: list, media: Path, output: Path):  # type: ignore[no-untyped-def]
    source = write_jsonl(media / "in.jsonl", rows)
    with CollectorThread(redis_url):
        summary = enqueue_file(source, output, settings=ProducerSettings(redis_url=redis_url), params=PARAMS)
        wait_done(redis_url, summary.job_id, timeout_s=120)
    out = {r["n"]: r for r in read_jsonl(output) if isinstance(r, dict) and "n" in r}
    errors = {e["row_index"]: e["error"] for e in read_jsonl(output.with_name(output.stem + ".errors.jsonl"))}
    return out, errors


def size_seen(row: dict) -> tuple[int, int]:
    """The fake engine answers 'What size is the image?' with the size it received."""
    answer = next(p["answer"] for p in row["qa_pairs"] if p["question"] == "What size is the image?")
    width, height = answer.split("x")
    return int(width), int(height)


def bomb_png(path: Path, width: int, height: int) -> None:
    """A tiny file whose header claims a huge image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_broken_and_unusual_images(fake_cluster, media, tmp_path):
    (good,) = make_images(media, 1)
    Image.new("RGB", (4000, 3000), "green").save(media / "huge.jpg", quality=50)
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(media / "cmyk.jpg")
    Image.new("I;16", (40, 30)).save(media / "sixteen.png")
    palette = Image.new("P", (40, 30))
    palette.info["transparency"] = 0
    palette.save(media / "palette.png", transparency=0)
    Image.new("L", (40, 30), 128).save(media / "gray.png")
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    frames[0].save(media / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.new("RGB", (40, 20), "white").save(media / "rotated.jpg", exif=exif)
    full = io.BytesIO()
    Image.new("RGB", (200, 200), "red").save(full, "JPEG")
    (media / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 3])
    (media / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    (media / "empty.jpg").write_bytes(b"")
    (media / "text.jpg").write_text("this is a text file with a .jpg name")
    bomb_png(media / "bomb.png", 60000, 60000)
    names = [
        "huge.jpg",
        "cmyk.jpg",
        "sixteen.png",
        "palette.png",
        "gray.png",
        "anim.gif",
        "rotated.jpg",
        "truncated.jpg",
        "corrupt.jpg",
        "empty.jpg",
        "text.jpg",
        "bomb.png",
        "missing.jpg",
        "../../etc/passwd",
        good.name,
    ]
    rows = [{"image": name, "n": i} for i, name in enumerate(names)]

    out, errors = run(fake_cluster.redis_url, rows, media, tmp_path / "out.jsonl")

    by_name = {names[n]: row for n, row in out.items()}
    width, height = size_seen(by_name["huge.jpg"])
    assert (
        width * height <= MAX_PIXELS and abs(width / height - 4 / 3) < 0.03
    )  # downscaled (on the 28-pixel grid), not rejected
    assert size_seen(by_name["rotated.jpg"]) == (20, 40)  # turned upright
    for name in ("cmyk.jpg", "sixteen.png", "palette.png", "gray.png", "anim.gif", good.name):
        assert size_seen(by_name[name]) == ((40, 30) if name != good.name else Image.open(good).size)
    codes = {names[i]: e["code"] for i, e in errors.items()}
    assert codes == {
        "truncated.jpg": "image_unreadable",
        "corrupt.jpg": "image_unreadable",
        "empty.jpg": "image_unreadable",
        "text.jpg": "image_unreadable",
        "bomb.png": "image_too_large",
        "missing.jpg": "image_not_found",
        "../../etc/passwd": "path_not_allowed",
    }
    assert all(e["message"] for e in errors.values())


def test_malformed_rows_are_error_rows(fake_cluster, media, tmp_path):
    (good,) = make_images(media, 1)
    rows = [
        b"{not json",
        {"caption": "no image", "n": 1},
        {"image": [], "n": 2},
        {"image": [7], "n": 3},
        {"image": None, "n": 4},
        b"[1, 2]",
        {"image": good.name, "n": 6},
        {"image": "data:image/png;base64,@@@", "n": 7},
        {"image": "ftp://host/x.jpg", "n": 8},
    ]
    out, errors = run(fake_cluster.redis_url, rows, media, tmp_path / "out.jsonl")
    assert list(out) == [6]
    assert {i: e["code"] for i, e in errors.items()} == {
        0: "row_malformed",
        1: "image_key_missing",
        2: "image_list_empty",
        3: "image_ref_invalid",
        4: "image_ref_invalid",
        5: "row_malformed",
        7: "image_ref_invalid",
        8: "image_ref_invalid",
    }


def test_a_data_uri_image(fake_cluster, media, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (24, 12), "blue").save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    out, errors = run(fake_cluster.redis_url, [{"image": uri, "n": 0}], media, tmp_path / "out.jsonl")
    assert errors == {} and size_seen(out[0]) == (24, 12)


def test_urls_on_private_addresses_are_refused_by_default(fake_cluster, media, tmp_path):
    rows = [{"image": "http://127.0.0.1:9/x.jpg", "n": 0}, {"image": "http://10.0.0.1/x.jpg", "n": 1}]
    _, errors = run(fake_cluster.redis_url, rows, media, tmp_path / "out.jsonl")
    assert {i: e["code"] for i, e in errors.items()} == {0: "url_not_allowed", 1: "url_not_allowed"}


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow.jpg":
            time.sleep(3)
        buf = io.BytesIO()
        Image.new("RGB", (30, 20), "red").save(buf, "JPEG")
        body = buf.getvalue() if self.path != "/big.jpg" else b"\xff" * 300_000
        if self.path == "/missing.jpg":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def url_worker(media_root, tmp_path):
    url = os.environ.get("IMAGEQA_TEST_REDIS", "redis://127.0.0.1:6379") + "/11"
    redis_client(url).flushdb()
    env = {
        "IMAGEQA_REDIS_URL": url,
        "IMAGEQA_MEDIA_ROOTS": str(media_root),
        "IMAGEQA_ENGINE": "fake",
        "IMAGEQA_ALLOW_PRIVATE_URLS": "true",
        "IMAGEQA_URL_TIMEOUT_S": "1",
        "IMAGEQA_MAX_IMAGE_BYTES": "200000",
    }
    worker = WorkerProcess(env, tmp_path / "url-worker.log").start(60)
    yield url
    worker.stop()


def test_http_images_fetch_time_out_and_size_limits(url_worker, media, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        rows = [
            {"image": f"{base}/{name}", "n": i}
            for i, name in enumerate(["ok.jpg", "slow.jpg", "big.jpg", "missing.jpg"])
        ]
        out, errors = run(url_worker, rows, media, tmp_path / "out.jsonl")
    finally:
        server.shutdown()
    assert size_seen(out[0]) == (30, 20)
    assert {i: e["code"] for i, e in errors.items()} == {
        1: "image_fetch_failed",
        2: "image_too_large",
        3: "image_fetch_failed",
    }
    assert "timed out" in errors[1]["message"]
