"""One task message in, one result record out: load images, prompt, generate, check the pairs.

Generation is a loop: ask, parse leniently, check every pair, optionally verify the kept ones, put
them to the blind check and the judge (`workers.checks`), and merge them; while fewer than
``min_pairs`` pairs are kept, ask again (``generation_tries`` requests at most, each a new request
that lists the questions already taken) and finally fail with ``qa_invalid`` and the rejection
counts. No Celery here, so the whole step is testable with any
engine and no broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from PIL.Image import Image

from producer.contract import ErrorInfo, GenerationParams, QAPair, ResultRecord, TaskMessage
from producer.errors import ErrorCode, GenerationError, ImageQAError
from workers import checks, metrics
from workers.diversity import TemplateGate
from workers.engines.base import Engine, EngineDead, EngineRequest, SamplingSettings
from workers.parsing import parse_answer
from workers.preprocess import load_images
from workers.prompts import (
    GREEDY_RETRY_TEMPERATURE,
    VERIFY_TEMPERATURE,
    PromptSpec,
    prompt_spec,
    retry_prompt,
    verify_spec,
)
from workers.provenance import provenance
from workers.qa import PairPool, Rejection, answers_agree, check_output
from workers.runtime import EngineRuntime
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)
WORKER_NAME = f"{os.uname().nodename}:{os.getpid()}"
T = TypeVar("T")


def process(
    message: TaskMessage,
    runtime: EngineRuntime,
    settings: WorkerSettings,
    templates: TemplateGate | None = None,
) -> ResultRecord:
    """Never raises for a problem with this item: every failure becomes an error record.

    Raises `EngineDead` only, when the engine itself is gone. The record carries ``qa_stats`` (tries,
    rejected pairs by reason, verification counts) once the engine has answered at least once.
    ``templates`` is the job-wide gate of ``max_template_share`` (without it the share is not checked).
    """
    started = time.perf_counter()
    pool = PairPool(message.params)
    tally = checks.CheckTally()
    try:
        pairs = _generate(message, runtime, settings, pool, tally, templates)
        outcome: dict[str, object] = {"qa_pairs": pairs}
    except ImageQAError as e:
        outcome = {"error": ErrorInfo(code=e.code, message=e.message)}
    except EngineDead:
        raise
    except Exception as e:  # a bug must cost one row, not the job
        log.exception("job %s item %s: unexpected failure", message.job_id, message.item_id)
        outcome = {"error": ErrorInfo(code=ErrorCode.INTERNAL_ERROR, message=f"{type(e).__name__}: {e}")}
    elapsed_s = time.perf_counter() - started
    error = outcome.get("error")
    metrics.count_row(
        str(error.code) if isinstance(error, ErrorInfo) else None, len(pool.pairs), pool.reasons, elapsed_s
    )
    record = ResultRecord(
        job_id=message.job_id,
        item_id=message.item_id,
        row_index=message.row_index,
        row=message.row,
        model=settings.engine.model,
        worker=WORKER_NAME,
        elapsed_s=round(elapsed_s, 4),
        qa_stats=tally.stats(pool.stats(), pool.pairs) if pool.tries else None,
        job_total=message.job_total,
        provenance=provenance(message.params, len(message.images), settings.engine.model),
        **outcome,  # type: ignore[arg-type]
    )
    log.info(
        "job %s item %s: %s in %.3f s (%d tries, %d pairs rejected)",
        message.job_id,
        message.item_id,
        "ok" if record.ok else record.error.code,  # type: ignore[union-attr]
        elapsed_s,
        pool.tries,
        sum(pool.reasons.values()),
    )
    return record


def _generate(
    message: TaskMessage,
    runtime: EngineRuntime,
    settings: WorkerSettings,
    pool: PairPool,
    tally: checks.CheckTally,
    templates: TemplateGate | None = None,
) -> list[QAPair]:
    params = message.params
    if params.model and params.model != settings.engine.model:
        raise ImageQAError(
            f"task asks for model {params.model!r}; this worker serves {settings.engine.model!r}",
            code=ErrorCode.MODEL_MISMATCH,
        )
    limit = settings.engine.max_images()
    if limit is not None and len(message.images) > limit:  # refused before any image is loaded
        raise ImageQAError(
            f"{len(message.images)} images in one row; this worker's engine takes at most {limit} per "
            "prompt (--limit-mm-per-prompt)",
            code=ErrorCode.TOO_MANY_IMAGES,
        )
    with metrics.stage("load"):
        images = load_images(message.images, settings)
    metrics.IMAGES.inc(len(images))
    spec = prompt_spec(params, len(images))
    deadline = time.monotonic() + max(1, settings.task_time_limit_s - 30)

    def ask(requests: list[EngineRequest]) -> list[str]:
        return _run(runtime, _generate_all(runtime.engine, requests), deadline - time.monotonic())

    for attempt in range(params.generation_tries):
        remaining_s = deadline - time.monotonic()
        if attempt and remaining_s < 1:
            log.warning("job %s item %s: no time left to ask again", message.job_id, message.item_id)
            break
        request = _request(message, spec, images, params, attempt, [p.question for p in pool.pairs], pool)
        text = _run(runtime, runtime.engine.generate(request), remaining_s)
        pool.tries += 1
        with metrics.stage("validate"):
            check = check_output(text, params, seen=pool.seen)
        pool.reject(check.rejected)
        kept = check.pairs
        if params.verify and kept:
            kept = _verify(message, runtime, images, kept, pool, deadline)
        check_id = f"{message.job_id}:{message.item_id}:{attempt}"
        if params.blind_check and kept:
            kept = checks.blind_check(ask, check_id, params, kept, pool, tally)
        if params.judge and kept:
            kept = checks.judge(ask, check_id, params, images, kept, pool, tally)
        if params.max_template_share is not None and templates is not None and kept:
            # The job-wide share is the last check: it counts the pairs it lets through.
            kept, dropped = pool.admissible(kept)
            pool.reject(dropped)
            kept, overused = templates.admit(message.job_id, kept, params.max_template_share)
            pool.reject(overused)
        pool.accept(kept)
        if pool.enough:
            break
        log.info(
            "job %s item %s: %d of %d pairs after try %d (rejected so far: %s)",
            message.job_id,
            message.item_id,
            len(pool.pairs),
            params.min_pairs,
            attempt + 1,
            dict(pool.reasons),
        )
    return pool.result()


def _request(
    message: TaskMessage,
    spec: PromptSpec,
    images: list[Image],
    params: GenerationParams,
    attempt: int,
    taken: list[str],
    pool: PairPool | None = None,
) -> EngineRequest:
    temperature = params.temperature
    if attempt and temperature == 0:
        temperature = GREEDY_RETRY_TEMPERATURE  # a greedy retry would write the same answer again
    # No per-request seed: it crashes vLLM's AsyncLLM on CPU. A new request samples anew anyway.
    return EngineRequest(
        request_id=f"{message.job_id}:{message.item_id}:{attempt}:{time.monotonic_ns()}",
        images=images,
        prompt=_retry_prompt(spec.text, taken, pool) if attempt else spec.text,
        system_prompt=spec.system_prompt,
        json_schema=spec.json_schema,
        sampling=SamplingSettings(temperature=temperature, top_p=params.top_p, max_tokens=params.max_tokens),
    )


def _retry_prompt(text: str, taken: list[str], pool: PairPool | None) -> str:
    missing = pool.missing() if pool is not None else None
    if not missing:
        return retry_prompt(text, taken)
    return retry_prompt(text, taken, missing.counts, missing.distinct)


def _verify(
    message: TaskMessage,
    runtime: EngineRuntime,
    images: list[Image],
    pairs: list[QAPair],
    pool: PairPool,
    deadline: float,
) -> list[QAPair]:
    """Asks every question again, without its answer, and keeps the pairs whose answers agree."""
    params = message.params
    requests = []
    for i, pair in enumerate(pairs):
        spec = verify_spec(params, pair.question, len(images))
        requests.append(
            EngineRequest(
                request_id=f"{message.job_id}:{message.item_id}:verify{i}:{time.monotonic_ns()}",
                images=images,
                prompt=spec.text,
                system_prompt=spec.system_prompt,
                json_schema=spec.json_schema,
                sampling=SamplingSettings(
                    temperature=VERIFY_TEMPERATURE, top_p=1.0, max_tokens=params.max_tokens
                ),
            )
        )
    texts = _run(runtime, _generate_all(runtime.engine, requests), deadline - time.monotonic())
    kept = []
    for pair, text in zip(pairs, texts, strict=True):
        pool.verified += 1
        if answers_agree(pair.answer, parse_answer(text)):
            pool.agreed += 1
            kept.append(pair)
        else:
            pool.reject([Rejection("unverified", pair.question, pair.answer)])
    return kept


async def _generate_all(engine: Engine, requests: list[EngineRequest]) -> list[str]:
    """All requests at once (the engine batches them); the first failure is raised."""
    results = await asyncio.gather(*(engine.generate(r) for r in requests), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [str(r) for r in results]


def _run(runtime: EngineRuntime, coro: Coroutine[Any, Any, T], remaining_s: float) -> T:
    """Runs an engine call within the item's time budget; engine failures become `GenerationError`."""
    try:
        with metrics.stage("engine"):
            return runtime.run(coro, timeout_s=max(1.0, remaining_s))
    except TimeoutError as e:
        raise GenerationError(str(e), code=ErrorCode.ENGINE_TIMEOUT) from e
    except (ImageQAError, EngineDead):
        raise
    except Exception as e:
        raise GenerationError(f"engine failed: {type(e).__name__}: {e}") from e
