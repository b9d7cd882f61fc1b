"""One error tree. Every error has a stable ``code`` that lands in the errors file."""

from __future__ import annotations


class ImageQAError(Exception):
    """Base of every imageqa error; ``code`` is a stable string for the errors file."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class InputError(ImageQAError):
    """Raised when an input row cannot become a task (malformed, no images, bad references)."""

    code = "row_malformed"


class ContractError(ImageQAError):
    """Raised when a task message or result record does not match the contract."""

    code = "message_invalid"


class ImageError(ImageQAError):
    """Raised when an image cannot be loaded or is not allowed."""

    code = "image_unreadable"


class GenerationError(ImageQAError):
    """Raised when the engine fails for one request."""

    code = "engine_error"


class QAValidationError(ImageQAError):
    """Raised when the model's answer yields too few valid question-answer pairs."""

    code = "qa_invalid"


class BrokerUnavailable(ImageQAError):
    """Raised when Redis (broker or job registry) cannot be reached."""

    code = "redis_unavailable"
