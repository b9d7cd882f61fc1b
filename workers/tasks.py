"""The ``imageqa.generate`` task: thin glue between Celery, `workers.generate` and the results stream."""

from __future__ import annotations

import logging
from typing import Any

from producer import constants as k
from producer.contract import ErrorInfo, ResultRecord, TaskMessage
from producer.errors import ContractError
from producer.results import publish
from workers.app import app, results_client, runtime, settings
from workers.generate import WORKER_NAME, process

log = logging.getLogger(__name__)


@app.task(name=k.TASK_GENERATE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def generate(**kwargs: Any) -> None:
    try:
        message = TaskMessage.decode(kwargs)
    except ContractError as e:
        _reject(kwargs, e)
        return
    r = results_client()
    r.hincrby(k.job_attempts_key(message.job_id), message.item_id, 1)
    record = process(message, runtime(), settings)
    publish(r, record)


def _reject(kwargs: dict[str, Any], error: ContractError) -> None:
    """An invalid message still becomes an error row when it names its job and item."""
    job_id, item_id = kwargs.get("job_id"), kwargs.get("item_id")
    if not (isinstance(job_id, str) and isinstance(item_id, str)):
        log.error("dropping a task message without job_id/item_id: %s", error.message)
        return
    row_index = kwargs.get("row_index")
    record = ResultRecord(
        job_id=job_id,
        item_id=item_id,
        row_index=row_index if isinstance(row_index, int) and row_index >= 0 else 0,
        row=kwargs.get("row"),
        error=ErrorInfo(code=error.code, message=error.message),
        worker=WORKER_NAME,
    )
    publish(results_client(), record)
