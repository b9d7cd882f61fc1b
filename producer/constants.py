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

QUARANTINE_STREAM = f"{PREFIX}:quarantine"
"""Redis Stream of what the workers and the collector could not use (an undecodable result entry, a
task message without job and item id): the raw entry and the reason, kept for inspection."""

QUARANTINE_MAXLEN = 100_000
"""The quarantine stream keeps about this many of the newest entries (``XADD MAXLEN ~``)."""

QUARANTINE_COUNT = f"{PREFIX}:quarantine:count"
"""Counter: entries ever quarantined (the stream itself is bounded)."""

PUBLISH_PENDING = f"{PREFIX}:publish"
"""Set of job ids that are complete but whose final output (`JOB_FINAL_OUTPUT`) is not written yet."""


# Fields of the job hash (`job_key`). Only `producer.jobs` reads or writes them.

JOB_STATE = "state"
"""Job hash field: ``enqueuing``, ``running``, ``done`` or ``cancelled``."""

JOB_CREATED_AT = "created_at"
"""Job hash field: when the job was first registered, Unix time in seconds."""

JOB_FINISHED_AT = "finished_at"
"""Job hash field: when every row was accounted for, Unix time in seconds; absent while it runs."""

JOB_OUTPUT_PATH = "output_path"
"""Job hash field: the output JSONL the collector appends written rows to."""

JOB_ERRORS_PATH = "errors_path"
"""Job hash field: the errors JSONL the collector appends failed rows to."""

JOB_OUTPUT_KEY = "output_key"
"""Job hash field: the key of the pairs in each output row."""

JOB_INPUT_PATH = "input_path"
"""Job hash field: the enqueued input; absent for a job the collector adopted."""

JOB_PARAMS = "params"
"""Job hash field: the `GenerationParams` of the job, as JSON."""

JOB_ENQUEUE_COMPLETE = "enqueue_complete"
"""Job hash field: 1 once an enqueue pass has sent every row, 0 while one is under way."""

JOB_CANCELLED = "cancelled"
"""Job hash field: 1 once the job is cancelled; workers turn its remaining rows into error rows."""

JOB_SOURCE = "source"
"""Job hash field: how to read the input again (JSON: ``format``, ``media_base``, ``image_key``), so
that lost rows can be re-sent and failed rows retried; absent for a job the collector adopted."""

JOB_ON_DONE_TASK = "on_done_task"
"""Job hash field: Celery task sent with the job's figures when it finishes (optional)."""

JOB_ON_DONE_QUEUE = "on_done_queue"
"""Job hash field: queue of the ``on_done_task``."""

JOB_FINAL_OUTPUT = "final_output"
"""Job hash field: the output made from the collector's journal (``output_path``) when the job
completes (Parquet, ``--no-meta``, object storage: `producer.outputs`); absent when the journal is
the output."""

JOB_FINAL_ERRORS = "final_errors"
"""Job hash field: where the errors file is uploaded when the job completes (object storage)."""

JOB_META = "meta"
"""Job hash field: 1 if the final output keeps each row's ``qa_meta``, 0 if not (the journal always does)."""

JOB_PUBLISHED_AT = "published_at"
"""Job hash field: when the final output was last written, Unix time in seconds."""

JOB_PUBLISH_ERROR = "publish_error"
"""Job hash field: why the final output could not be written (the collector tries again)."""

JOB_WRITTEN = "written"
"""Job hash counter: rows written to the output file."""

JOB_FAILED = "failed"
"""Job hash counter: rows written to the errors file."""

JOB_ENQUEUED = "enqueued"
"""Job hash counter: tasks sent, over every enqueue pass."""

JOB_SKIPPED = "skipped"
"""Job hash counter: rows an enqueue pass found already written, over every pass."""

JOB_QUARANTINED = "quarantined"
"""Job hash counter: entries of this job put in the quarantine stream (`QUARANTINE_STREAM`)."""

JOB_DECLARED_TOTAL = "declared_total"
"""Job hash field: the number of rows an application that enqueues without registering the job
declared (``job_total`` in its task messages); the job is done once that many are written."""

JOB_RESENT = "resent"
"""Job hash counter: rows the collector sent again after they were lost in transit (a stall)."""

JOB_RETRIED = "retried"
"""Job hash counter: failed rows taken back by ``imageqa retry``, over every retry."""

JOB_FAILED_PREFIX = "failed:"
"""Job hash counters ``failed:<error code>``: failed rows by error code."""

JOB_REJECTED_PREFIX = "rejected:"
"""Job hash counters ``rejected:<reason>``: rejected question-answer pairs by reason."""

JOB_QA_PREFIX = "qa:"
"""Job hash counters ``qa:pairs``, ``qa:tries``, ``qa:verified``, ``qa:agreed``, ``qa:blind_checked``,
``qa:blind_answerable``: pair figures."""
JOB_TYPE_PREFIX = "type:"
"""Job hash counters ``type:<question type>``: written pairs by question type."""

JOB_JUDGE_PREFIX = "judge:"
"""Job hash counters ``judge:<score>``: pairs the judge scored 1 to 5 (kept or dropped)."""


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


def job_retrying_key(job_id: str) -> str:
    """Set: item ids taken back by a retry whose new result the collector has not written yet (it
    removes their old errors-file lines when it writes it)."""
    return f"{PREFIX}:job:{job_id}:retrying"


def job_writing_key(job_id: str) -> str:
    """Hash: the collector's write marker: the file sizes Redis has a record of (before a batch is
    written, then after it is committed), kept until the job finishes."""
    return f"{PREFIX}:job:{job_id}:writing"


def job_questions_key(job_id: str) -> str:
    """HyperLogLog: the normalised questions of the job's written pairs (distinct count, ~1% error)."""
    return f"{PREFIX}:job:{job_id}:questions"


def job_templates_key(job_id: str) -> str:
    """Sorted set: question template (`producer.templates`) -> written pairs with it."""
    return f"{PREFIX}:job:{job_id}:templates"


def job_template_gate_key(job_id: str) -> str:
    """Hash: the workers' template-share gate (`workers.diversity`): kept pairs in all, by template
    group, and the MinHash bands that lead a near-duplicate template to its group."""
    return f"{PREFIX}:job:{job_id}:template-gate"


def job_rows_key(job_id: str) -> str:
    """Hash: item id -> ``[row index, row]`` of a job enqueued from rows in memory (`enqueue_rows`),
    kept so that its rows lost in transit can be sent again."""
    return f"{PREFIX}:job:{job_id}:rows"


def job_pass_key(job_id: str, token: str) -> str:
    """Prefix of one enqueue pass's scratch keys (the row digests it has seen), deleted when it ends."""
    return f"{PREFIX}:job:{job_id}:pass:{token}"


def job_events_channel(job_id: str) -> str:
    """Pub/sub channel on which the job announces that it is done."""
    return f"{PREFIX}:job:{job_id}:events"
