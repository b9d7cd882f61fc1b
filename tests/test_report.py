"""The quality report (`imageqa report`), checked as a person sees it: rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.contract import GenerationParams, TaskMessage, output_row
from tests.helpers import EXAMPLES, make_images, read_jsonl, run_cli, write_jsonl
from tests.test_quality_engine import SHORT, enqueue_and_wait

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HOSTILE = '<script>window.__ran = 1; document.title = "owned"</script><img src=x onerror="window.__ran=2">'


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (ops/ensure_chromium.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,2000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def open_page(browser, path: Path):
    browser.get(path.resolve().as_uri())
    return browser


def text(browser, css: str) -> str:
    return " ".join(browser.find_element("css selector", css).text.split())


def loaded_images(browser) -> list[int]:
    """The natural widths of the page's images that the browser decoded."""
    return browser.execute_script(
        "return [...document.images].filter(i => i.complete && i.naturalWidth > 0).map(i => i.naturalWidth)"
    )


def test_the_report_shows_a_jobs_counts_checks_thumbnails_and_pairs(fake_cluster, media, tmp_path, browser):
    # Given a job with the blind check and the judge: 3 rows of one image, 2 of two images, and one
    # row whose image is missing (an error row)
    images = make_images(media, 7)
    rows = [{"image": p.name, "n": i} for i, p in enumerate(images[:3])]
    rows += [{"image": [a.name, b.name]} for a, b in (images[3:5], images[5:7])]
    rows += [{"image": "gone.jpg"}]
    source = write_jsonl(media / "in.jsonl", rows)
    output = tmp_path / "out.jsonl"
    params = SHORT.model_copy(update={"blind_check": True, "judge": True, "min_pairs": 1})
    job_id = enqueue_and_wait(fake_cluster, source, output, params)

    # When its report is written and opened
    done = run_cli(fake_cluster.redis_url, "report", str(output), "-o", str(tmp_path / "page.html"))
    assert done.returncode == 0, done.stderr
    page = open_page(browser, tmp_path / "page.html")

    # Then the counts, reasons and checks are those of the job's status
    assert text(page, "#job-id") == job_id
    assert (text(page, "#rows-total"), text(page, "#rows-written"), text(page, "#rows-failed")) == (
        "6",
        "5",
        "1",
    )
    assert text(page, "#pairs-kept") == "7"
    assert text(page, "#failures") == "image_not_found 1"
    assert text(page, "#rejected") == "judge_low 5 answerable_without_image 3"  # most first
    assert "3 of 15 pairs answerable without the image (20.0%)" in text(page, "#blind")
    assert text(page, "#judge") == "1 0 2 5 3 0 4 5 5 2"
    # and every row written is shown with its pairs and its images, which the browser decoded
    samples = page.find_elements("css selector", ".row.sample")
    assert len(samples) == 5
    assert sum(len(s.find_elements("css selector", "img")) for s in samples) == 3 + 2 * 2
    assert len(loaded_images(page)) == 3 + 2 * 2
    assert all(0 < width <= 160 for width in loaded_images(page))
    assert "What colour dominates the picture?" in page.find_element("tag name", "body").text
    answers = [e.text for e in page.find_elements("css selector", ".row.sample .answer")]
    assert len(answers) == 7 and all(answers)
    # and the failed row with its error and a placeholder for its image.
    failed = text(page, ".row.failed")
    assert "image_not_found" in failed and "image not found: gone.jpg" in failed


def test_model_text_is_shown_as_text_and_never_run(tmp_path, browser):
    # Given a row whose answer, written by the model, is markup with scripts
    from workers.engines.fake import FakeEngine
    from workers.generate import process
    from workers.report import build_report, write_report
    from workers.runtime import EngineRuntime
    from workers.settings import WorkerSettings

    (image,) = make_images(tmp_path, 1)
    pairs = [{"question": "What does the sign say?", "answer": HOSTILE}]
    runtime = EngineRuntime(FakeEngine(respond=lambda request: json.dumps({"qa_pairs": pairs})))
    runtime.start(10)
    try:
        record = process(
            TaskMessage(
                job_id="j",
                item_id="i",
                row_index=0,
                images=[str(image)],
                row={"image": image.name, "note": "<b>bold</b>"},
                params=GenerationParams(min_pairs=1, max_answer_chars=300),
            ),
            runtime,
            WorkerSettings(media_roots=[tmp_path], engine={"kind": "fake", "model": "fake"}, metrics_port=0),
        )
    finally:
        runtime.stop()
    assert record.ok and record.qa_pairs[0].answer == HOSTILE
    output = write_jsonl(tmp_path / "out.jsonl", [output_row(record, "qa_pairs")])

    # When the report is opened
    write_report(tmp_path / "page.html", build_report(output))
    page = open_page(browser, tmp_path / "page.html")

    # Then the answer is there as text, and nothing of it ran or became an element
    assert text(page, ".row.sample .answer") == HOSTILE
    assert page.execute_script("return window.__ran") is None
    assert page.title == "Quality report: out.jsonl"
    assert page.execute_script("return document.scripts.length") == 0
    assert len(page.find_elements("css selector", ".answer img, .fields b b")) == 0
    assert "<b>bold</b>" in text(page, ".row.sample .fields")
    assert loaded_images(page) and len(loaded_images(page)) == 1


def test_without_redis_the_report_reads_the_files_and_shows_placeholders(tmp_path, browser):
    # Given output files of a job whose Redis is gone: rows with a local photo, a missing one, a
    # remote one, a data: URI and a file that is no image, and a line that is not JSON
    shutil.copy(EXAMPLES / "flower.jpg", tmp_path / "flower.jpg")
    (tmp_path / "notes.jpg").write_text("not an image")
    tiny = make_images(tmp_path / "x", 1)[0].read_bytes()
    import base64

    data_uri = "data:image/jpeg;base64," + base64.b64encode(tiny).decode()
    judged = [{"score": 5, "reason": "Open petals are visible."}]
    meta = {
        "qa_stats": {"tries": 2, "rejected": {"not_a_question": 2}, "judge_scores": {"5": 1}, "judge": judged}
    }
    rows = [
        {"image": "flower.jpg", "qa_pairs": [{"question": "What flower is it?", "answer": "A dahlia."}]},
        {"image": "missing.jpg", "qa_pairs": [{"question": "What is shown?", "answer": "A car."}]},
        {
            "image": "https://example.com/a.jpg",
            "qa_pairs": [{"question": "What is shown?", "answer": "A bus."}],
        },
        {"image": [data_uri, "notes.jpg"], "qa_pairs": [{"question": "Which colour?", "answer": "Blue."}]},
        {"image": "flower.jpg", "qa_pairs": [{"question": "Is it open?", "answer": "Yes."}], "qa_meta": meta},
    ]
    output = write_jsonl(tmp_path / "out.jsonl", [*rows, b"{torn"])
    write_jsonl(
        tmp_path / "out.errors.jsonl",
        [
            {
                "row_index": 9,
                "item_id": "z",
                "row": {"image": "x.jpg"},
                "error": {"code": "qa_invalid", "message": "m"},
            }
        ],
    )

    # When the report is asked for while nothing answers at the Redis address
    done = run_cli("redis://127.0.0.1:1/0", "report", str(output), "--sample", "10")
    assert done.returncode == 0, done.stderr
    assert "figures come from the files alone" in " ".join(done.stderr.split())
    page = open_page(browser, tmp_path / "out.report.html")

    # Then the figures are the files' (rows, failures, and what the rows' qa_meta carries)
    assert (text(page, "#rows-total"), text(page, "#rows-written"), text(page, "#rows-failed")) == (
        "6",
        "5",
        "1",
    )
    assert text(page, "#pairs-kept") == "5"
    assert text(page, "#rejected") == "not_a_question 2"
    assert text(page, "#judge") == "1 0 2 0 3 0 4 0 5 1"
    assert "1 lines of the files could not be read" in page.find_element("tag name", "body").text
    assert "what is shown 2" in text(page, "#templates")
    judged_row = next(r for r in page.find_elements("css selector", ".row.sample") if "Is it open?" in r.text)
    assert "Is it open? Yes. 5 Open petals are visible." in " ".join(judged_row.text.split())
    # and the images that cannot be shown are placeholders saying why; the others loaded.
    placeholders = [" ".join(e.text.split()) for e in page.find_elements("css selector", ".placeholder")]
    assert sorted(placeholders) == sorted(
        [
            "image not found: missing.jpg",
            "remote image, not fetched: https://example.com/a.jpg",
            "image unreadable (UnidentifiedImageError): notes.jpg",
            "image not found: x.jpg",
        ]
    )
    assert len(loaded_images(page)) == 3  # the flower twice and the data: URI


def test_a_report_by_job_id_and_clear_errors(fake_cluster, media, tmp_path):
    images = make_images(media, 2)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images])
    output = tmp_path / "out.jsonl"
    job_id = enqueue_and_wait(fake_cluster, source, output, SHORT)

    done = run_cli(fake_cluster.redis_url, "report", "--job", job_id)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "out.report.html").read_text()
    assert job_id in page and page.count('class="row sample"') == len(read_jsonl(output)) == 2

    unknown = run_cli(fake_cluster.redis_url, "report", "--job", "nope")
    assert unknown.returncode == 2 and "no job 'nope'" in unknown.stderr
    nothing = run_cli(fake_cluster.redis_url, "report")
    assert nothing.returncode == 2 and "name the output file or --job" in " ".join(nothing.stderr.split())


def test_run_writes_the_report_with_the_jobs_figures(tmp_path, browser):
    from tests.test_run import SHORT as SHORT_ARGS
    from tests.test_run import imageqa_run

    folder = tmp_path / "photos"
    make_images(folder, 4)
    out, html = tmp_path / "out.jsonl", tmp_path / "report.html"
    checks = ["--pairs", "1-3", "--blind-check", "--judge", "--report", str(html)]
    done = imageqa_run([str(folder), "-o", str(out), "--engine", "fake", *checks, *SHORT_ARGS], tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"report: {html}" in " ".join(done.stderr.split())
    page = open_page(browser, html)
    # The embedded Redis is gone, but the page has the job's figures, rejections included.
    assert (text(page, "#rows-written"), text(page, "#rows-failed"), text(page, "#pairs-kept")) == (
        "4",
        "0",
        "4",
    )
    assert text(page, "#rejected") == "answerable_without_image 4 judge_low 4"
    assert text(page, "#judge") == "1 0 2 4 3 0 4 4 5 0"
    assert len(loaded_images(page)) == 4
