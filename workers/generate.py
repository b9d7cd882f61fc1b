"""One task message in, one result record out: load images, prompt, generate, check the pairs.

Generation is a loop: ask, parse leniently, check every pair, optionally verify the kept ones, and
merge them; while fewer than ``min_pairs`` pairs are kept, ask again (``generation_tries`` requests
at most, each a new request that lists the questions already taken) and finally fail with
``qa_invalid`` and the rejection counts. No Celery here, so the whole step is testable with any
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
from workers import metrics
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
from workers.qa import PairPool, Rejection, answers_agree, check_output
from workers.runtime import EngineRuntime
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)
WORKER_NAME = f"{os.uname().nodename}:{os.getpid()}"
T = TypeVar("T")


def process(message: TaskMessage, runtime: EngineRuntime, settings: WorkerSettings) -> ResultRecord:
    """Never raises for a problem with this item: every failure becomes an error record.

    Raises `EngineDead` only, when the engine itself is gone. The record carries ``qa_stats`` (tries,
    rejected pairs by reason, verification counts) once the engine has answered at least once.
    """
    started = time.perf_counter()
    pool = PairPool(message.params)
    try:
        pairs = _generate(message, runtime, settings, pool)
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
    metrics.IMAGES.labels(
        "failed" if error else "ok", error.code if isinstance(error, ErrorInfo) else ""
    ).inc()
    record = ResultRecord(
        job_id=message.job_id,
        item_id=message.item_id,
        row_index=message.row_index,
        row=message.row,
        model=settings.engine.model,
        worker=WORKER_NAME,
        elapsed_s=round(elapsed_s, 4),
        qa_stats=pool.stats() if pool.tries else None,
        job_total=message.job_total,
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
    message: TaskMessage, runtime: EngineRuntime, settings: WorkerSettings, pool: PairPool
) -> list[QAPair]:
    params = message.params
    if params.model and params.model != settings.engine.model:
        raise ImageQAError(
            f"task asks for model {params.model!r}; this worker serves {settings.engine.model!r}",
            code=ErrorCode.MODEL_MISMATCH,
        )
    with metrics.stage("load"):
        images = load_images(message.images, settings)
    spec = prompt_spec(params, len(images))
    deadline = time.monotonic() + max(1, settings.task_time_limit_s - 30)
    for attempt in range(params.generation_tries):
        remaining_s = deadline - time.monotonic()
        if attempt and remaining_s < 1:
            log.warning("job %s item %s: no time left to ask again", message.job_id, message.item_id)
            break
        request = _request(message, spec, images, params, attempt, [p.question for p in pool.pairs])
        text = _run(runtime, runtime.engine.generate(request), remaining_s)
        pool.tries += 1
        with metrics.stage("validate"):
            check = check_output(text, params, seen=pool.seen)
        pool.reject(check.rejected)
        kept = check.pairs
        if params.verify and kept:
            kept = _verify(message, runtime, images, kept, pool, deadline)
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
) -> EngineRequest:
    temperature = params.temperature
    if attempt and temperature == 0:
        temperature = GREEDY_RETRY_TEMPERATURE  # a greedy retry would write the same answer again
    # No per-request seed: it crashes vLLM's AsyncLLM on CPU. A new request samples anew anyway.
    return EngineRequest(
        request_id=f"{message.job_id}:{message.item_id}:{attempt}:{time.monotonic_ns()}",
        images=images,
        prompt=retry_prompt(spec.text, taken) if attempt else spec.text,
        system_prompt=spec.system_prompt,
        json_schema=spec.json_schema,
        sampling=SamplingSettings(temperature=temperature, top_p=params.top_p, max_tokens=params.max_tokens),
    )


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
