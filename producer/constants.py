"""Every Redis key, stream, queue and task name, under one prefix."""

PREFIX = "imageqa"

TASK_GENERATE = "imageqa.generate"
"""Celery task name of the generate task; its kwargs are a `TaskMessage`."""

QUEUE_GENERATE = "imageqa.generate"
"""Celery queue the generate tasks go to."""

RESULTS_STREAM = f"{PREFIX}:results"
"""Redis Stream that workers append results to and the collector reads."""

COLLECTOR_GROUP = "collectors"
"""Consumer group of the collector on RESULTS_STREAM."""

JOBS_INDEX = f"{PREFIX}:jobs"
"""Sorted set of job ids, scored by creation time."""


def job_key(job_id: str) -> str:
    """Hash: the job's settings, output paths and counters."""
    return f"{PREFIX}:job:{job_id}"


def job_items_key(job_id: str) -> str:
    """Set: item ids that belong to the job."""
    return f"{PREFIX}:job:{job_id}:items"


def job_done_key(job_id: str) -> str:
    """Set: item ids already written to the output or errors file."""
    return f"{PREFIX}:job:{job_id}:done"


def job_attempts_key(job_id: str) -> str:
    """Hash: item id -> number of times a worker started it."""
    return f"{PREFIX}:job:{job_id}:attempts"


def job_writing_key(job_id: str) -> str:
    """Hash: the collector's write marker (file sizes before a write) while a batch is in progress."""
    return f"{PREFIX}:job:{job_id}:writing"


def job_pass_key(job_id: str, token: str) -> str:
    """Prefix of one enqueue pass's scratch keys (the row digests it has seen), deleted when it ends."""
    return f"{PREFIX}:job:{job_id}:pass:{token}"


def job_events_channel(job_id: str) -> str:
    """Pub/sub channel on which the job announces that it is done."""
    return f"{PREFIX}:job:{job_id}:events"
