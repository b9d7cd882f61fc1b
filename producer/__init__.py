"""imageqa producer: the message contract, input readers and the client that enqueues work.

Light by design (celery, redis, pydantic): other applications install it to put work in
without torch or vLLM.
"""

from producer.contract import GenerationParams, QAPair, ResultRecord, TaskMessage

__all__ = ["GenerationParams", "QAPair", "ResultRecord", "TaskMessage"]
