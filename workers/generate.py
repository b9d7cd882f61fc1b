"""One task message in, one result record out: load images, prompt, generate, check the pairs.

No Celery here, so the whole step is testable with any engine and no broker.
"""

from __future__ import annotations

import logging
import os
import time

from producer.contract import ErrorInfo, ResultRecord, TaskMessage
from producer.errors import GenerationError, ImageQAError
from workers import metrics
from workers.engines.base import EngineRequest, SamplingSettings
from workers.images import load_image
from workers.prompts import SYSTEM_PROMPT, build_prompt, qa_schema
from workers.qa import parse_and_check
from workers.runtime import EngineRuntime
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)
WORKER_NAME = f"{os.uname().nodename}:{os.getpid()}"


def process(message: TaskMessage, runtime: EngineRuntime, settings: WorkerSettings) -> ResultRecord:
    """Never raises for a problem with this item: every failure becomes an error record."""
    started = time.perf_counter()
    try:
        pairs = _generate(message, runtime, settings)
        outcome: dict[str, object] = {"qa_pairs": pairs}
    except ImageQAError as e:
        outcome = {"error": ErrorInfo(code=e.code, message=e.message)}
    except EngineDead:
        raise
    except Exception as e:  # a bug must cost one row, not the job
        log.exception("job %s item %s: unexpected failure", message.job_id, message.item_id)
        outcome = {"error": ErrorInfo(code="internal_error", message=f"{type(e).__name__}: {e}")}
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
        model=settings.model,
        worker=WORKER_NAME,
        elapsed_s=round(elapsed_s, 4),
        **outcome,  # type: ignore[arg-type]
    )
    log.info(
        "job %s item %s: %s in %.3f s",
        message.job_id,
        message.item_id,
        "ok" if record.ok else record.error.code,  # type: ignore[union-attr]
        elapsed_s,
    )
    return record


def _generate(message: TaskMessage, runtime: EngineRuntime, settings: WorkerSettings) -> list:
    params = message.params
    if params.model and params.model != settings.model:
        raise ImageQAError(
            f"task asks for model {params.model!r}; this worker serves {settings.model!r}",
            code="model_mismatch",
        )
    with metrics.stage("load"):
        images = [load_image(ref, settings) for ref in message.images]
    request = EngineRequest(
        request_id=f"{message.job_id}:{message.item_id}:{time.monotonic_ns()}",
        images=images,
        prompt=build_prompt(params, len(images)),
        system_prompt=SYSTEM_PROMPT,
        json_schema=qa_schema(params),
        sampling=SamplingSettings(
            temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens
        ),
    )
    try:
        with metrics.stage("engine"):
            text = runtime.run(
                runtime.engine.generate(request), timeout_s=max(1, settings.task_time_limit_s - 30)
            )
    except TimeoutError as e:
        raise GenerationError(str(e), code="engine_timeout") from e
    except ImageQAError:
        raise
    except Exception as e:
        if type(e).__name__ == "EngineDeadError":
            raise EngineDead(str(e)) from e
        raise GenerationError(f"engine failed: {type(e).__name__}: {e}") from e
    with metrics.stage("validate"):
        return parse_and_check(text, params).pairs


class EngineDead(Exception):
    """Raised when the engine process is gone: not the item's fault, so no error row is written."""
