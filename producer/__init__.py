"""imageqa producer: the message contract, input readers and the client that enqueues work.

Light by design (celery, redis, pydantic): other applications install it to put work in
without torch or vLLM. Their Python API (`producer.api`):

- `enqueue_rows(rows, output=..., **params) -> job_id`: rows from any iterable become one job;
- `wait(job_id, progress=...) -> JobStatus`: waits for the job, with a progress callback.

(``producer.wait`` is the function; the module of the wait loop stays importable as
``from producer.wait import wait_for_job``.)
"""

from producer.api import enqueue_rows, wait
from producer.contract import GenerationParams, QAPair, ResultRecord, TaskMessage
from producer.jobs import JobStatus
from producer.settings import ProducerSettings

__all__ = [
    "GenerationParams",
    "JobStatus",
    "ProducerSettings",
    "QAPair",
    "ResultRecord",
    "TaskMessage",
    "enqueue_rows",
    "wait",
]
