"""The Python API for other applications: `enqueue_rows` and `wait`, exported by ``producer``.

    import producer

    job_id = producer.enqueue_rows(
        ({"image": path} for path in paths), output="out/qa.jsonl", max_pairs=4, temperature=0.5
    )
    status = producer.wait(job_id, progress=lambda st: print(st.done, "/", st.total))

Both read the ``IMAGEQA_*`` settings (Redis URL, broker, image key ...) as the ``imageqa`` command does,
unless ``settings`` (a `ProducerSettings`) or ``redis_url`` is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from producer.broker import check_redis, redis_client
from producer.contract import GenerationParams
from producer.enqueue import enqueue_iter
from producer.jobs import JobStatus
from producer.settings import ProducerSettings
from producer.wait import wait_for_job


def enqueue_rows(
    rows: Iterable[Mapping[str, Any]],
    output: str | Path,
    *,
    job_id: str | None = None,
    errors: str | Path | None = None,
    media_base: str | Path | None = None,
    keep_rows: bool = True,
    redis_url: str | None = None,
    settings: ProducerSettings | None = None,
    params: GenerationParams | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_done_task: str | None = None,
    on_done_queue: str | None = None,
    **generation: Any,
) -> str:
    """Enqueues ``rows`` as one job whose collector writes ``output``; returns the job id.

    ``rows`` is any iterable of dicts shaped as the rows of an input file (``{"image": "a.jpg"}``,
    ``{"image": ["a.jpg", "b.jpg"], "id": 7}``, image URLs ...); it is read once, in batches, so a
    generator of millions of rows is fine. No file is needed. Each row becomes one task (or, when it
    cannot, such as a row without images or one that is not JSON, an error row in the errors file);
    every row lands once, in ``output`` or in the errors file (default: ``<output stem>.errors.jsonl``).
    Relative image paths resolve against ``media_base`` (default: the working folder); they must be
    readable by the workers.

    Generation settings are keyword arguments named as the fields of `GenerationParams` (``model``,
    ``min_pairs``, ``max_pairs``, ``temperature``, ``max_tokens``, ``prompt_version``,
    ``system_prompt``, ``verify`` ...), or ``params``, a whole `GenerationParams`; an unknown name or
    a value out of range raises ``ValueError``.

    The job id defaults to a hash of ``output`` and the settings: enqueueing again to the same output
    with the same settings continues the same job, and rows already written are skipped (so an
    application that crashed mid-way sends its rows again and gets no duplicates). Pass ``job_id``
    to choose it.

    ``keep_rows`` (default): the rows are kept in Redis with the job (about their JSON size), so that
    rows lost in transit (a worker killed at the instant it takes a task) are sent again by the
    collector or by `wait`, with nobody holding them. ``keep_rows=False`` saves that memory for very
    large jobs; then such rows can only be sent again by calling `enqueue_rows` once more with the
    same rows and job id (it sends exactly the rows not yet written), and `wait` raises ``ImageQAError``
    if they are lost.

    ``on_progress`` is called with the number of rows read so far after each batch is sent;
    ``on_done_task`` names a Celery task sent (to ``on_done_queue``) with the job's figures when it
    finishes. Raises ``ImageQAError`` (``BrokerUnavailable``) when Redis does not answer.
    """
    if isinstance(rows, Mapping | str | bytes):
        raise TypeError(
            f"rows must be an iterable of rows, not a {type(rows).__name__}: wrap one row in a list"
        )
    params = _params(params, generation)
    settings = _settings(settings, redis_url)
    summary = enqueue_iter(
        rows,
        Path(output),
        settings=settings,
        params=params,
        errors_path=Path(errors) if errors is not None else None,
        job_id=job_id,
        media_base=Path(media_base) if media_base is not None else None,
        keep_rows=keep_rows,
        on_progress=on_progress,
        on_done_task=on_done_task,
        on_done_queue=on_done_queue,
    )
    return summary.job_id


def wait(
    job_id: str,
    *,
    progress: Callable[[JobStatus], object] | None = None,
    timeout_s: float | None = None,
    stall_timeout_s: float | None = None,
    poll_s: float = 0.5,
    resend_lost: bool = True,
    redis_url: str | None = None,
    settings: ProducerSettings | None = None,
) -> JobStatus:
    """Waits until the job is finished (every row written or failed, or the job cancelled) and
    returns its final `JobStatus` (``written``, ``failed``, ``failures`` by error code,
    ``output_path``, ``errors_path`` ...).

    ``progress`` is called with every status read (every ``poll_s``), for a progress bar or a log.
    Raises ``ImageQAError`` when the job is not in Redis, after ``timeout_s`` in all, or when no row
    has finished for ``stall_timeout_s`` (None: no limit); the job itself goes on.

    ``resend_lost``: rows lost in transit (nothing is queued, running or uncollected, and the job is
    not done) are sent again from the job's recorded input: its input file, or its rows kept in Redis
    (`enqueue_rows` with ``keep_rows``). The collector does the same by itself after a grace period;
    this only makes it sooner for whoever waits.
    """
    from producer.broker import celery_app
    from producer.resend import resend_missing

    settings = _settings(settings, redis_url)
    check_redis(settings.redis_url)
    r = redis_client(settings.redis_url)
    resend = None
    if resend_lost:
        app = celery_app(settings.broker, settings.visibility_timeout_s, name="imageqa-producer")

        def resend(_: JobStatus) -> None:
            resend_missing(app, r, job_id)

    try:
        return wait_for_job(
            r,
            job_id,
            poll_s=poll_s,
            on_progress=progress,
            timeout_s=timeout_s,
            stall_timeout_s=stall_timeout_s,
            resend=resend,
            broker=settings.broker,
        )
    finally:
        r.close()


def _params(params: GenerationParams | None, generation: Mapping[str, Any]) -> GenerationParams:
    if params is not None and generation:
        raise ValueError(f"pass params or generation settings ({', '.join(generation)}), not both")
    if params is not None:
        return params
    unknown = set(generation) - set(GenerationParams.model_fields)
    if unknown:
        import difflib

        hints = []
        for name in sorted(unknown):
            close = difflib.get_close_matches(name, GenerationParams.model_fields, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown generation setting {', '.join(hints)}; see producer.GenerationParams")
    return GenerationParams(**generation)


def _settings(settings: ProducerSettings | None, redis_url: str | None) -> ProducerSettings:
    settings = settings or ProducerSettings()
    return settings.model_copy(update={"redis_url": redis_url}) if redis_url else settings
