"""An engine on any OpenAI-compatible chat completions server: a hosted API or a fleet of ``vllm serve``.

The images arrive already loaded, checked and downscaled by `workers.images` (exactly as for the local
vLLM engine) and travel as base64 ``data:`` URLs. Requests run concurrently on the caller's asyncio
loop, capped by a semaphore; 429, 408/409, 5xx, connection errors and timeouts are retried with
exponential backoff (honouring ``Retry-After``). The answer is constrained with
``response_format={"type": "json_schema", ...}``; a server that refuses that format is asked again
with ``json_object``, then with no format at all (the prompt still asks for JSON, and every answer is
validated anyway).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from producer.errors import ErrorCode, GenerationError
from workers import metrics
from workers.engines.base import Engine, EngineRequest

if TYPE_CHECKING:
    import openai
    from PIL.Image import Image

__all__ = ["OpenAIEngine", "OpenAIEngineConfig"]

log = logging.getLogger(__name__)

ResponseFormat = Literal["json_schema", "json_object", "none"]
_FORMAT_LADDER: tuple[ResponseFormat, ...] = ("json_schema", "json_object", "none")
_RETRY_STATUS = frozenset({408, 409, 429})
NO_API_KEY = "EMPTY"
"""Sent when no key is configured: the client needs one, servers without authentication ignore it."""


@dataclass(frozen=True)
class OpenAIEngineConfig:
    """Settings of one OpenAI-compatible engine.

    Attributes:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://gpu-7:8000/v1``.
        model: the model name the server serves (``--served-model-name`` for ``vllm serve``).
        api_key: the bearer key; ``None`` for a server without authentication.
        max_concurrency: requests in flight at once; the rest wait on a semaphore.
        request_timeout_s: limit of one HTTP attempt; a timed-out attempt is retried.
        max_retries: further attempts after a retryable failure (so ``max_retries + 1`` in all).
        retry_initial_delay_s, retry_max_delay_s: exponential backoff with jitter between attempts.
        response_format: the strongest answer format to ask for (see the module docstring).
        image_format, jpeg_quality: how images are encoded for the data URLs. JPEG at 95 is about
            ten times smaller than PNG at no visible cost; PNG is lossless.
        check_model: ``start`` asks ``GET /models`` so that a wrong URL or key fails at start, not
            on every item.
    """

    base_url: str
    model: str
    api_key: str | None = None
    max_concurrency: int = 64
    request_timeout_s: float = 600.0
    max_retries: int = 5
    retry_initial_delay_s: float = 0.5
    retry_max_delay_s: float = 30.0
    response_format: ResponseFormat = "json_schema"
    image_format: Literal["JPEG", "PNG"] = "JPEG"
    jpeg_quality: int = 95
    check_model: bool = True


class OpenAIEngine(Engine):
    """``Engine`` over ``openai.AsyncOpenAI``; ``generate`` may be awaited concurrently many times.

    Errors reach the caller as `GenerationError` (code ``engine_timeout`` when every attempt timed
    out, else ``engine_error``) with the server's status and message.
    """

    name = "openai"

    def __init__(self, config: OpenAIEngineConfig) -> None:
        if config.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.config = config
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._format_level = _FORMAT_LADDER.index(config.response_format)

    async def start(self) -> None:
        """Create the client and, with ``check_model``, check that the server answers. Idempotent."""
        if self._client is not None:
            return
        import openai

        self._client = openai.AsyncOpenAI(
            base_url=self.config.base_url,
            api_key=self.config.api_key or NO_API_KEY,
            timeout=self.config.request_timeout_s,
            max_retries=0,  # retried here, with our own limits and logging
        )
        self._semaphore = asyncio.Semaphore(self.config.max_concurrency)
        if self.config.check_model:
            try:
                await self._check_model()
            except BaseException:
                await self.shutdown()
                raise

    async def generate(self, request: EngineRequest) -> str:
        """The text of the single completion for ``request``. Raises `GenerationError`."""
        if self._client is None or self._semaphore is None:
            raise RuntimeError("OpenAIEngine.start() has not been awaited")
        # Encoding a megapixel image takes milliseconds of CPU: keep it off the shared loop.
        image_urls = await asyncio.to_thread(self._data_urls, list(request.images))
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
        parts.append({"type": "text", "text": request.prompt})
        messages: list[dict[str, Any]] = [{"role": "user", "content": parts}]
        if request.system_prompt:
            messages.insert(0, {"role": "system", "content": request.system_prompt})
        async with self._semaphore:
            return await self._complete(request, messages)

    async def shutdown(self) -> None:
        """Close the HTTP connections. Idempotent."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _complete(self, request: EngineRequest, messages: list[dict[str, Any]]) -> str:
        import openai

        assert self._client is not None
        retries = 0
        while True:
            kwargs = self._request_kwargs(request, messages)
            try:
                response = await self._client.chat.completions.create(**kwargs)
            except openai.BadRequestError as e:
                if self._step_down_format(e, kwargs):
                    continue
                raise GenerationError(f"{self.config.base_url} refused the request: {_describe(e)}") from e
            except openai.APIError as e:
                if not _retryable(e) or retries >= self.config.max_retries:
                    code = (
                        ErrorCode.ENGINE_TIMEOUT
                        if isinstance(e, openai.APITimeoutError)
                        else ErrorCode.ENGINE_ERROR
                    )
                    attempts = f" after {retries + 1} attempts" if retries else ""
                    raise GenerationError(
                        f"{self.config.base_url} failed{attempts}: {_describe(e)}", code=code
                    ) from e
                delay_s = self._backoff_s(retries, e)
                retries += 1
                log.warning(
                    "request %s: %s; retry %d/%d in %.2f s",
                    request.request_id,
                    _describe(e),
                    retries,
                    self.config.max_retries,
                    delay_s,
                )
                await asyncio.sleep(delay_s)
                continue
            usage = getattr(response, "usage", None)
            if usage is not None:
                metrics.count_tokens(usage.prompt_tokens, usage.completion_tokens)
            return _text(response, request.request_id)

    def _request_kwargs(self, request: EngineRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
        s = request.sampling
        kwargs: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "temperature": s.temperature,
            "top_p": s.top_p,
            # max_tokens is refused by OpenAI's reasoning models; vLLM accepts both names.
            "max_completion_tokens": s.max_tokens,
        }
        fmt = _FORMAT_LADDER[self._format_level]
        if request.json_schema is not None and fmt == "json_schema":
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.json_schema, "strict": True},
            }
        elif request.json_schema is not None and fmt == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        return kwargs

    def _step_down_format(self, error: openai.BadRequestError, kwargs: dict[str, Any]) -> bool:
        """After a 400 about the answer format, ask with the next weaker one (once per level)."""
        text = _describe(error).lower()
        if "response_format" not in kwargs or not any(w in text for w in ("response_format", "schema")):
            return False
        if kwargs["response_format"]["type"] != _FORMAT_LADDER[self._format_level]:
            return True  # a concurrent request has stepped down already: ask again at the new level
        if self._format_level + 1 >= len(_FORMAT_LADDER):
            return False
        self._format_level += 1
        log.warning(
            "%s refused response_format %s (%s); asking for %s from now on",
            self.config.base_url,
            kwargs["response_format"]["type"],
            _describe(error),
            _FORMAT_LADDER[self._format_level],
        )
        return True

    def _backoff_s(self, retries: int, error: Exception) -> float:
        delay_s = min(self.config.retry_max_delay_s, self.config.retry_initial_delay_s * 2**retries)
        delay_s *= 0.5 + random.random() / 2  # jitter: concurrent retries do not arrive together
        wait_s = _retry_after_s(error)
        if wait_s is not None:
            delay_s = max(delay_s, min(wait_s, self.config.retry_max_delay_s))
        return delay_s

    def _data_urls(self, images: list[Image]) -> list[str]:
        urls = []
        for image in images:
            buffer = io.BytesIO()
            if self.config.image_format == "JPEG":
                image.save(buffer, format="JPEG", quality=self.config.jpeg_quality)
            else:
                image.save(buffer, format="PNG")
            encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
            urls.append(f"data:image/{self.config.image_format.lower()};base64,{encoded}")
        return urls

    async def _check_model(self) -> None:
        import openai

        assert self._client is not None
        retries = 0
        while True:
            try:
                page = await self._client.models.list()
                break
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise GenerationError(f"{self.config.base_url} refused the API key: {_describe(e)}") from e
            except openai.NotFoundError:
                log.info(
                    "%s has no /models endpoint; model %r not checked",
                    self.config.base_url,
                    self.config.model,
                )
                return
            except openai.APIError as e:
                if not _retryable(e) or retries >= self.config.max_retries:
                    raise GenerationError(f"cannot reach {self.config.base_url}: {_describe(e)}") from e
                delay_s = self._backoff_s(retries, e)
                retries += 1
                await asyncio.sleep(delay_s)
        served = [m.id for m in page.data]
        if served and self.config.model not in served:
            log.warning(
                "%s does not list model %r (it lists %s); requests may fail",
                self.config.base_url,
                self.config.model,
                ", ".join(served[:10]),
            )


def _retryable(error: Exception) -> bool:
    import openai

    if isinstance(error, openai.APIConnectionError):  # includes timeouts
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in _RETRY_STATUS or error.status_code >= 500
    return False


def _retry_after_s(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
        if "retry-after" in headers:
            return float(headers["retry-after"])
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None
    return None


def _describe(error: Exception) -> str:
    import openai

    if isinstance(error, openai.APIStatusError):
        body = error.body
        message = body.get("message") if isinstance(body, dict) else None
        return f"HTTP {error.status_code}: {message or error.message}"[:500]
    if isinstance(error, openai.APITimeoutError):
        return "request timed out"
    return f"{type(error).__name__}: {error}"[:500]


def _text(response: Any, request_id: str) -> str:
    if not response.choices:
        raise GenerationError(f"request {request_id}: the server returned no choices")
    choice = response.choices[0]
    text = choice.message.content
    if not text:
        refusal = getattr(choice.message, "refusal", None)
        reason = f"refused: {refusal}" if refusal else f"finish_reason={choice.finish_reason}"
        raise GenerationError(f"request {request_id}: empty answer ({reason})")
    if choice.finish_reason == "length":
        log.warning("request %s hit max_tokens; output is truncated", request_id)
    return str(text)
