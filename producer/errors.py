"""One error tree. Every error has a stable ``code`` that lands in the errors file.

`ErrorCode` is the catalog of those codes and `MEANINGS` says what each one means; the README's
error table lists the same codes. Raise sites name a member, never a bare string.
"""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """A stable error code; a member is its plain string in JSON, Redis keys and log lines."""

    ROW_MALFORMED = "row_malformed"
    ROW_TOO_LARGE = "row_too_large"
    INPUT_NOT_FOUND = "input_not_found"
    INPUT_UNREADABLE = "input_unreadable"
    IMAGE_KEY_MISSING = "image_key_missing"
    IMAGE_LIST_EMPTY = "image_list_empty"
    IMAGE_REF_INVALID = "image_ref_invalid"
    TOO_MANY_IMAGES = "too_many_images"
    IMAGE_NOT_FOUND = "image_not_found"
    IMAGE_UNREADABLE = "image_unreadable"
    IMAGE_TOO_LARGE = "image_too_large"
    PATH_NOT_ALLOWED = "path_not_allowed"
    URL_NOT_ALLOWED = "url_not_allowed"
    IMAGE_FETCH_FAILED = "image_fetch_failed"
    STORAGE_DENIED = "storage_denied"
    STORAGE_UNREACHABLE = "storage_unreachable"
    QA_INVALID = "qa_invalid"
    PROMPT_INVALID = "prompt_invalid"
    ENGINE_ERROR = "engine_error"
    ENGINE_TIMEOUT = "engine_timeout"
    POISON_ITEM = "poison_item"
    MODEL_MISMATCH = "model_mismatch"
    CANCELLED = "cancelled"
    MESSAGE_INVALID = "message_invalid"
    MESSAGE_TOO_LARGE = "message_too_large"
    REDIS_UNAVAILABLE = "redis_unavailable"
    DATAFLOW_INVALID = "dataflow_invalid"
    STORAGE_ERROR = "storage_error"
    CLUSTER_ERROR = "cluster_error"
    OUTPUT_FAILED = "output_failed"
    MODEL_UNAVAILABLE = "model_unavailable"
    ENGINE_ARGS_INVALID = "engine_args_invalid"
    INTERNAL_ERROR = "internal_error"

    # Explicit, so that str(), f-strings and %-formatting give the value on every Python version.
    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, format_spec: str) -> str:
        return format(str(self.value), format_spec)


MEANINGS: dict[ErrorCode, str] = {
    ErrorCode.ROW_MALFORMED: "the line is not a JSON object",
    ErrorCode.ROW_TOO_LARGE: "the row is over 16 MiB as JSON",
    ErrorCode.INPUT_NOT_FOUND: "the input file or folder does not exist",
    ErrorCode.INPUT_UNREADABLE: "the input file cannot be read in its format",
    ErrorCode.IMAGE_KEY_MISSING: "the row has no image field",
    ErrorCode.IMAGE_LIST_EMPTY: "the row's image field is an empty list",
    ErrorCode.IMAGE_REF_INVALID: "an image reference is not a non-empty string of a supported kind",
    ErrorCode.TOO_MANY_IMAGES: "the row has more images than one prompt takes (16, or the worker's limit)",
    ErrorCode.IMAGE_NOT_FOUND: "the image file is missing",
    ErrorCode.IMAGE_UNREADABLE: "the image is not a decodable image",
    ErrorCode.IMAGE_TOO_LARGE: "the image is over the byte or pixel limits",
    ErrorCode.PATH_NOT_ALLOWED: "the image path is outside the allowed media roots",
    ErrorCode.URL_NOT_ALLOWED: "an http(s) image on a private address (SSRF guard)",
    ErrorCode.IMAGE_FETCH_FAILED: "an http(s) image could not be fetched",
    ErrorCode.STORAGE_DENIED: "the object store refused the image (credentials, permissions) or the "
    "worker's IMAGEQA_ALLOWED_STORES does not list it",
    ErrorCode.STORAGE_UNREACHABLE: "the object store could not be reached or failed (network, timeout, "
    "throttling, server error)",
    ErrorCode.QA_INVALID: "fewer valid pairs than the minimum after every try",
    ErrorCode.PROMPT_INVALID: "the task names a prompt this worker does not know",
    ErrorCode.ENGINE_ERROR: "the engine failed for this request",
    ErrorCode.ENGINE_TIMEOUT: "the engine did not finish within the task's time limit",
    ErrorCode.POISON_ITEM: "the item crashed or hung the worker too many times",
    ErrorCode.MODEL_MISMATCH: "the task asked for another model than the worker serves",
    ErrorCode.CANCELLED: "the job was cancelled before this row was processed",
    ErrorCode.MESSAGE_INVALID: "the task message or result record did not match the contract",
    ErrorCode.MESSAGE_TOO_LARGE: "the task message is over the workers' size limit",
    ErrorCode.REDIS_UNAVAILABLE: "Redis (broker or job registry) cannot be reached",
    ErrorCode.DATAFLOW_INVALID: "the DataFlow operator API was used wrongly",
    ErrorCode.STORAGE_ERROR: "a DataFlow step file cannot be read or written",
    ErrorCode.CLUSTER_ERROR: "a DataFlow cluster job cannot finish",
    ErrorCode.OUTPUT_FAILED: "a finished output cannot be read, converted, written or uploaded",
    ErrorCode.MODEL_UNAVAILABLE: "the model cannot be loaded: no checkpoint there, or not cached and no hub",
    ErrorCode.ENGINE_ARGS_INVALID: "an engine argument is unknown to vLLM, malformed or of the wrong type",
    ErrorCode.INTERNAL_ERROR: "an unexpected failure (a bug)",
}
"""One line per code: what it means."""

TRANSIENT: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.IMAGE_FETCH_FAILED,
        ErrorCode.STORAGE_UNREACHABLE,
        ErrorCode.ENGINE_ERROR,
        ErrorCode.ENGINE_TIMEOUT,
        ErrorCode.CANCELLED,
        ErrorCode.REDIS_UNAVAILABLE,
    }
)
"""Error rows that ``imageqa retry`` sends again by default: failures of a server, the network, the
engine or the operator that a later try may not meet. Not ``poison_item`` (it crashed or hung
workers, and would again), ``internal_error`` (a bug recurs), ``model_mismatch`` (fix the fleet,
then name it with ``--code``), nor anything about the row or its image, which fails the same way."""


class ImageQAError(Exception):
    """Base of every imageqa error; ``code`` is a stable `ErrorCode` for the errors file."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else str(self.code)


class InputError(ImageQAError):
    """Raised when an input row cannot become a task (malformed, no images, bad references)."""

    code = ErrorCode.ROW_MALFORMED


class ContractError(ImageQAError):
    """Raised when a task message or result record does not match the contract."""

    code = ErrorCode.MESSAGE_INVALID


class ImageError(ImageQAError):
    """Raised when an image cannot be loaded or is not allowed."""

    code = ErrorCode.IMAGE_UNREADABLE


class GenerationError(ImageQAError):
    """Raised when the engine fails for one request."""

    code = ErrorCode.ENGINE_ERROR


class QAValidationError(ImageQAError):
    """Raised when the model's answer yields too few valid question-answer pairs."""

    code = ErrorCode.QA_INVALID


class PromptError(ImageQAError):
    """Raised when a task names an unknown prompt."""

    code = ErrorCode.PROMPT_INVALID


class BrokerUnavailable(ImageQAError):
    """Raised when Redis (broker or job registry) cannot be reached."""

    code = ErrorCode.REDIS_UNAVAILABLE


class DataFlowError(ImageQAError, ValueError):
    """Raised when the operator API is used wrongly: a missing input key, an output key that exists.

    A ``ValueError`` too, where DataFlow raises one."""

    code = ErrorCode.DATAFLOW_INVALID


class StorageError(DataFlowError):
    """Raised when a step file cannot be read or written, or a storage setting is not supported."""

    code = ErrorCode.STORAGE_ERROR


class ClusterServingError(ImageQAError):
    """Raised when a cluster job cannot finish: Redis is gone, the wait timed out, results are missing."""

    code = ErrorCode.CLUSTER_ERROR


class OutputError(ImageQAError):
    """Raised when a job's final output (Parquet, object storage) or an export cannot be read,
    converted or written."""

    code = ErrorCode.OUTPUT_FAILED


class ModelUnavailable(ImageQAError):
    """Raised before the engine starts when its model cannot be loaded: a folder that holds no model,
    or a hub id that is neither in the local cache nor reachable."""

    code = ErrorCode.MODEL_UNAVAILABLE


class EngineArgsError(ImageQAError, ValueError):
    """Raised when an engine argument is unknown to vLLM, not valid JSON, or of the wrong type."""

    code = ErrorCode.ENGINE_ARGS_INVALID
