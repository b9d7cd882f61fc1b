"""The image pool: images loaded in child processes equal those loaded in-process, errors keep their codes,
a dead child is replaced, and no child outlives a SIGKILLed worker."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from PIL import Image

from producer.errors import ImageError
from tests.helpers import EXAMPLES, WorkerProcess
from tests.test_bad_input import bomb_png, run, size_seen
from tests.test_engine_lifetime import kill_all, wait_gone
from workers.images import load_image
from workers.preprocess import ImagePool
from workers.settings import ImageSettings


@pytest.fixture(scope="module")
def pool() -> Iterator[ImagePool]:
    pool = ImagePool(2)
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture
def settings(tmp_path: Path) -> ImageSettings:
    return ImageSettings(media_roots=[tmp_path, EXAMPLES], max_pixels=512 * 512)


def images(folder: Path) -> list[str]:
    """Every path through `load_image`: a JPEG decoded at reduced scale, EXIF rotation, CMYK, 16-bit,
    transparency, palettes, an animation, a data: URI and real photos."""
    big = Image.radial_gradient("L").resize((3000, 2000)).convert("RGB")
    big.save(folder / "big.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    big.resize((1200, 900)).save(folder / "rotated.jpg", exif=exif)
    Image.new("CMYK", (400, 300), (0, 255, 40, 0)).save(folder / "cmyk.jpg")
    Image.linear_gradient("L").convert("I;16").save(folder / "sixteen.png")
    rgba = big.resize((800, 600)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((800, 600)))
    rgba.save(folder / "alpha.png")
    big.resize((300, 200)).convert("P").save(folder / "palette.png", transparency=0)
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    buf = io.BytesIO()
    big.resize((64, 48)).save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    names = ["big.jpg", "rotated.jpg", "cmyk.jpg", "sixteen.png", "alpha.png", "palette.png", "anim.gif"]
    return [str(folder / n) for n in names] + [uri] + [str(p) for p in sorted(EXAMPLES.glob("*.jpg"))]


def test_pool_results_equal_in_process_results(pool, settings, tmp_path):
    refs = images(tmp_path)
    loaded = pool.load(refs, settings)
    assert len(loaded) == len(refs)
    for ref, image in zip(refs, loaded, strict=True):
        expected = load_image(ref, settings)
        assert (image.mode, image.size) == (expected.mode, expected.size), ref[:80]
        assert image.tobytes() == expected.tobytes(), ref[:80]
    assert loaded[1].height > loaded[1].width  # the EXIF rotation was applied in the child


def same_text(message: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", message)  # object addresses differ between processes


def test_pool_errors_keep_their_codes(pool, settings, tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    (tmp_path / "text.jpg").write_text("not an image")
    bomb_png(tmp_path / "bomb.png", 60000, 60000)
    cases = {
        "corrupt.jpg": "image_unreadable",
        "text.jpg": "image_unreadable",
        "bomb.png": "image_too_large",
        "missing.jpg": "image_not_found",
        "../../etc/passwd": "path_not_allowed",
    }
    for name, code in cases.items():
        ref = str(tmp_path / name)
        with pytest.raises(ImageError) as in_process:
            load_image(ref, settings)
        with pytest.raises(ImageError) as in_pool:
            pool.load([ref], settings)
        assert in_pool.value.code == in_process.value.code == code
        assert same_text(in_pool.value.message) == same_text(in_process.value.message)


def test_an_error_beside_good_images_leaves_no_shared_memory(pool, settings, tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    photos = [str(p) for p in sorted(EXAMPLES.glob("*.jpg"))]
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ImageError) as e:
        pool.load([photos[0], str(tmp_path / "corrupt.jpg"), photos[1]], settings)
    assert e.value.code == "image_unreadable"
    assert len(pool.load(photos, settings)) == len(photos)
    assert set(os.listdir("/dev/shm")) <= before


def test_a_killed_pool_process_is_replaced(settings):
    pool = ImagePool(2)
    pool.start()
    try:
        before = pool.pids()
        assert len(before) == 2
        old = [psutil.Process(pid) for pid in before]
        os.kill(before[0], signal.SIGKILL)
        photo = str(sorted(EXAMPLES.glob("*.jpg"))[0])
        # A load that meets the dead process is tried again on another; the dead one is replaced.
        for _ in range(3):
            (image,) = pool.load([photo], settings)
            assert image.tobytes() == load_image(photo, settings).tobytes()
        after = pool.pids()
        assert len(after) == 2 and before[0] not in after and before[1] in after
        assert not wait_gone(old[:1], 10.0)
    finally:
        pool.stop()


def _pool_worker(tmp_path: Path, redis_url: str, media: Path) -> WorkerProcess:
    env = {
        "IMAGEQA_REDIS_URL": redis_url,
        "IMAGEQA_MEDIA_ROOTS": str(media),
        "IMAGEQA_ENGINE": "fake",
        "IMAGEQA_MODEL": "fake",
        "IMAGEQA_CONCURRENCY": "8",
        "IMAGEQA_PREPROCESS_WORKERS": "2",
    }
    return WorkerProcess(env, tmp_path / "worker.log")


def _pool_children(worker: WorkerProcess) -> list[psutil.Process]:
    assert worker.proc is not None
    children = psutil.Process(worker.proc.pid).children(recursive=True)
    return [p for p in children if "spawn_main" in " ".join(p.cmdline())]


def test_a_worker_with_an_image_pool_writes_rows_and_error_rows(tmp_path, redis_url):
    media = tmp_path / "media"
    media.mkdir()
    Image.new("RGB", (4000, 3000), "green").save(media / "huge.jpg", quality=50)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), "white").save(media / "rotated.jpg", exif=exif)
    (media / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    (media / "empty.jpg").write_bytes(b"")
    names = ["huge.jpg", "rotated.jpg", "corrupt.jpg", "empty.jpg", "missing.jpg"]
    worker = _pool_worker(tmp_path, redis_url, media)
    try:
        worker.start(120)
        assert "images load in 2 processes" in worker.log()
        assert len(_pool_children(worker)) == 2
        out, errors = run(
            redis_url, [{"image": n, "n": i} for i, n in enumerate(names)], media, tmp_path / "o.jsonl"
        )
    finally:
        worker.stop()
    width, height = size_seen(out[0])
    assert width * height <= 1024 * 1024 and abs(width / height - 4 / 3) < 0.03  # on the 28-pixel grid
    assert size_seen(out[1]) == (20, 40)
    codes = {names[i]: e["code"] for i, e in errors.items()}
    assert codes == {
        "corrupt.jpg": "image_unreadable",
        "empty.jpg": "image_unreadable",
        "missing.jpg": "image_not_found",
    }


def test_a_sigkilled_worker_leaves_no_image_processes(tmp_path, redis_url):
    worker = _pool_worker(tmp_path, redis_url, tmp_path)
    descendants: list[psutil.Process] = []
    try:
        worker.start(120)
        assert worker.proc is not None
        pool = _pool_children(worker)
        assert len(pool) == 2, [p.cmdline() for p in psutil.Process(worker.proc.pid).children(recursive=True)]
        descendants = psutil.Process(worker.proc.pid).children(recursive=True)

        worker.proc.send_signal(signal.SIGKILL)  # the worker alone, not its process group
        assert worker.proc.wait(30) == -signal.SIGKILL

        left = wait_gone(descendants, 15.0)
        assert not left, f"outlived the worker: {[(p.pid, ' '.join(p.cmdline()).strip()) for p in left]}"
    finally:
        worker.stop(10)
        kill_all(descendants)
