"""Enqueue images for imageqa workers from any Python application, with plain Celery.

Needs only ``pip install 'celery[redis]'``: no imageqa code. Each image becomes one task
``imageqa.generate`` (JSON kwargs, see docs/enqueue.md); the collector writes the results to
``<IMAGEQA_OUTPUT_DIR>/<job id>.jsonl`` and failures to ``<job id>.errors.jsonl``, one line per image.
Every message declares the job's size (``job_total``), so the job is marked done, and announced on
the Redis channel ``imageqa:job:<job id>:events``, once every image has its line.

    python enqueue_plain_celery.py redis://:PASSWORD@HOST:6379/0 my-job /data/a.jpg /data/b.jpg

Image paths must be the paths the workers see (under their IMAGEQA_MEDIA_ROOTS, /data in the compose
deployment); http(s):// and data: references are sent unchanged.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from pathlib import Path

from celery import Celery

TASK = "imageqa.generate"
QUEUE = "imageqa.generate"
URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def task_kwargs(job_id: str, index: int, image: str, total: int) -> dict:
    """The kwargs of one task: a row with one image, default generation parameters, and the number of
    tasks in the job."""
    ref = image if URI.match(image) else str(Path(image).absolute())
    row = {"image": [ref]}
    # Stable across resends of the same input, so a resent image is written once, not twice.
    item_id = hashlib.sha256(f"{index}\n{ref}".encode()).hexdigest()[:32]
    return {
        "schema_version": 1,
        "job_id": job_id,
        "item_id": item_id,
        "row_index": index,
        "images": [ref],
        "row": row,
        "enqueued_at": time.time(),  # optional: lets the workers measure queue wait
        "job_total": total,  # optional: the job is marked done once this many rows are written
    }


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    redis_url, job_id, *images = argv
    app = Celery("imageqa-client", broker=redis_url)
    # JSON only: the workers accept nothing else.
    app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True)
    with app.producer_or_acquire() as producer:
        for index, image in enumerate(images):
            kwargs = task_kwargs(job_id, index, image, len(images))
            app.send_task(
                TASK, kwargs=kwargs, queue=QUEUE, task_id=f"{job_id}:{kwargs['item_id']}", producer=producer
            )
    print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
