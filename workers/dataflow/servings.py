"""Servings: what generates the pairs for `ImageQAGenerate`. One interface, three ways to run it.

- `LocalServing` runs any `Engine` in this process, through the worker's own `workers.generate.process`
  (same image loading, prompt, JSON schema and pair checks), with every row in flight at once so the
  engine batches them continuously. `LocalModelVLMServing_vllm` and `APIVLMServing_openai` are
  `LocalServing` on the vLLM engine and on an OpenAI-compatible server.
- `workers.dataflow.cluster.ClusterServing` sends the rows to a running Celery cluster instead.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import sys
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from producer.cli import progress_bar
from producer.contract import ErrorInfo, GenerationParams, QAPair, TaskMessage, output_meta
from producer.errors import ContractError, DataFlowError, ErrorCode
from workers.engines.base import Engine
from workers.engines.vllm_args import parse_engine_args
from workers.generate import process
from workers.runtime import EngineRuntime
from workers.settings import VLLMSettings, WorkerSettings, read_api_key

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class RowInput:
    """One row to generate for: its position, the row itself and its resolved image references."""

    index: int
    row: dict[str, Any]
    images: list[str]


@dataclass(frozen=True)
class RowResult:
    """The pairs for one row, or why there are none."""

    pairs: list[QAPair] | None = None
    error: ErrorInfo | None = None
    meta: dict[str, Any] | None = None
    """How the pairs were made (`producer.contract.output_meta`), when the serving knows."""


@dataclass(frozen=True)
class RunContext:
    """What a serving may need to know about the run besides the rows."""

    image_key: str
    output_key: str
    workdir: Path
    """A folder for the serving's own files (the storage's cache folder)."""


class Serving(abc.ABC):
    """Generates pairs for many rows at once. ``cleanup()`` releases the engine; a later run starts
    it again. Usable as a context manager, which calls ``cleanup()`` on exit."""

    params: GenerationParams

    @abc.abstractmethod
    def generate(self, rows: Sequence[RowInput], context: RunContext) -> list[RowResult]:
        """One result per row, in the rows' order. A problem with one row is that row's result."""

    @abc.abstractmethod
    def cleanup(self) -> None: ...

    def __enter__(self) -> Serving:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def generation_params(
    *,
    model: str | None = None,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_tokens: int = 1024,
    **pairs: Any,
) -> GenerationParams:
    """`GenerationParams` from serving arguments; ``pairs`` takes ``min_pairs``, ``max_pairs``,
    ``max_question_chars``, ``max_answer_chars`` and ``prompt_version``. Raises ``ValueError``."""
    return GenerationParams(model=model, temperature=temperature, top_p=top_p, max_tokens=max_tokens, **pairs)


def serving_settings(settings: WorkerSettings | None, **changes: Any) -> WorkerSettings:
    """Worker settings for a serving in this process: ``settings`` (default: from ``IMAGEQA_*``) with
    ``changes``; a dict changes the nested settings of that name (``engine={"model": ...}``). Unless
    ``settings`` says otherwise, any local path may be read: the media-roots guard protects workers
    from other people's rows, and here the rows are the user's own."""
    if settings is None:
        return WorkerSettings(media_roots=[Path("/")], **changes)
    return _updated(settings, changes)


def _updated(settings: M, changes: dict[str, Any]) -> M:
    update = {
        name: _updated(getattr(settings, name), value)
        if isinstance(value, dict) and isinstance(getattr(settings, name), BaseModel)
        else value
        for name, value in changes.items()
    }
    return settings.model_copy(update=update)


class LocalServing(Serving):
    """Any `Engine` in this process, started on first use on a background loop (`EngineRuntime`).

    Every row goes through `workers.generate.process`, exactly as on a worker; ``max_in_flight``
    rows are submitted at once (threads waiting on the engine), and the engine batches them.
    ``request_timeout_s`` bounds one row's engine call. ``settings`` (`WorkerSettings`) holds the
    image limits (``max_pixels``, ``media_roots``, ...); by default any local path may be read and
    the rest comes from ``IMAGEQA_*`` variables. The engine is shut down by ``cleanup()``, or at
    interpreter exit if it was never called.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        params: GenerationParams | None = None,
        model_name: str = "local",
        settings: WorkerSettings | None = None,
        max_in_flight: int = 128,
        request_timeout_s: float = 600.0,
        show_progress: bool = True,
    ) -> None:
        if max_in_flight < 1:
            raise DataFlowError("max_in_flight must be at least 1")
        self.engine = engine
        self.params = params or GenerationParams()
        # process() cancels the engine call after task_time_limit_s - 30 s.
        self.settings = serving_settings(
            settings, engine={"model": model_name}, task_time_limit_s=int(request_timeout_s) + 30
        )
        self.max_in_flight = max_in_flight
        self.show_progress = show_progress
        self._runtime: EngineRuntime | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def generate(self, rows: Sequence[RowInput], context: RunContext) -> list[RowResult]:
        runtime = self._start()
        results: list[RowResult | None] = [None] * len(rows)
        pool = ThreadPoolExecutor(max_workers=min(self.max_in_flight, max(1, len(rows))))
        try:
            futures = {}
            for i, row in enumerate(rows):
                try:
                    message = self._message(row)
                except ContractError as e:  # e.g. a data: URI over the message size limit
                    results[i] = RowResult(error=ErrorInfo(code=e.code, message=e.message))
                    continue
                futures[pool.submit(process, message, runtime, self.settings)] = i
            with progress_bar(f"{self.engine.name} engine", len(rows), enabled=self.show_progress) as update:
                done, failed = len(rows) - len(futures), len(rows) - len(futures)
                update(done, failed)
                for future in as_completed(futures):
                    record = future.result()  # raises only when the engine itself is gone
                    results[futures[future]] = RowResult(
                        pairs=record.qa_pairs, error=record.error, meta=output_meta(record)
                    )
                    done, failed = done + 1, failed + (not record.ok)
                    update(done, failed)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return [r if r is not None else RowResult(error=_lost()) for r in results]

    def cleanup(self) -> None:
        """Shut the engine down (a later ``generate`` starts it again). Idempotent."""
        if self._finalizer is not None:
            self._finalizer()  # stops the runtime once and detaches the exit hook
            self._finalizer = None
        self._runtime = None

    def _start(self) -> EngineRuntime:
        if self._runtime is None:
            runtime = EngineRuntime(self.engine)
            log.info("starting the %s engine", self.engine.name)
            try:
                self._start_runtime(runtime)
            except BaseException:
                runtime.stop()
                raise
            self._runtime = runtime
            # Without cleanup() an engine's child process could outlive the interpreter.
            self._finalizer = weakref.finalize(self, runtime.stop)
        return self._runtime

    def _start_runtime(self, runtime: EngineRuntime) -> None:
        runtime.start()

    def _message(self, row: RowInput) -> TaskMessage:
        return TaskMessage.decode(
            {
                "job_id": "dataflow",
                "item_id": f"row-{row.index}",
                "row_index": row.index,
                "images": row.images,
                "row": row.row,
                "params": self.params,
            }
        )


class LocalModelVLMServing_vllm(LocalServing):
    """The vLLM engine in this process, as on a worker (`workers.engines.vllm_config`).

    ``hf_model_name_or_path`` is a local checkpoint folder or a hub id. The ``vllm_*`` arguments are
    DataFlow's and vLLM's engine arguments of the same name (unset: the worker's defaults, e.g. one
    GPU and 0.9 of its memory); ``vllm_limit_mm_per_prompt`` is the most images one row may have
    (default 4; or vLLM's dict, ``{"image": 2}``), and a row with more fails as ``too_many_images``.
    ``engine_args`` takes any other vLLM engine argument by vLLM's name (a dict, a JSON object or
    ``@file``), checked against vLLM here: an unknown name raises `EngineArgsError` naming the
    closest ones. The keyword-only arguments shape the pairs: ``min_pairs``/``max_pairs`` (3-5) and the
    longest question and answer in characters (300, 500). Other engine settings come from
    ``IMAGEQA_*`` variables as for a worker (``IMAGEQA_KV_CACHE_MEMORY_BYTES``, ...). The engine starts
    on first use (seconds to minutes; a model that cannot be loaded raises `ModelUnavailable` at once)
    and stays warm until ``cleanup()``.
    """

    def __init__(
        self,
        hf_model_name_or_path: str,
        vllm_tensor_parallel_size: int | None = None,
        vllm_temperature: float = 0.7,
        vllm_top_p: float = 0.9,
        vllm_max_tokens: int = 1024,
        vllm_max_model_len: int | None = None,
        vllm_gpu_memory_utilization: float | None = None,
        vllm_limit_mm_per_prompt: int | dict[str, Any] | None = None,
        vllm_seed: int | None = None,
        *,
        vllm_max_num_seqs: int | None = None,
        vllm_dtype: str | None = None,
        vllm_quantization: str | None = None,
        vllm_revision: str | None = None,
        vllm_trust_remote_code: bool | None = None,
        vllm_enable_prefix_caching: bool | None = None,
        engine_args: dict[str, Any] | str | None = None,
        settings: WorkerSettings | None = None,
        max_in_flight: int | None = None,
        request_timeout_s: float = 600.0,
        show_progress: bool = True,
        **pairs: Any,
    ) -> None:
        from workers.engines import vllm_config
        from workers.engines.vllm import VLLMEngine

        given = dict(
            tensor_parallel_size=vllm_tensor_parallel_size,
            gpu_memory_utilization=vllm_gpu_memory_utilization,
            max_model_len=vllm_max_model_len,
            max_num_seqs=vllm_max_num_seqs,
            dtype=vllm_dtype,
            quantization=vllm_quantization,
            revision=vllm_revision,
            trust_remote_code=vllm_trust_remote_code,
            enable_prefix_caching=vllm_enable_prefix_caching,
        )
        # Unset: IMAGEQA_* variables, else the worker's defaults (the model's own max_model_len, ...).
        vllm: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
        args = parse_engine_args(engine_args)
        if isinstance(vllm_limit_mm_per_prompt, dict):
            args["limit_mm_per_prompt"] = vllm_limit_mm_per_prompt
        elif vllm_limit_mm_per_prompt is not None:
            vllm["max_images_per_prompt"] = vllm_limit_mm_per_prompt
        if engine_args is not None or args:
            vllm = VLLMSettings.fold({**vllm, "engine_args": args})
        settings = serving_settings(settings, engine={"model": hf_model_name_or_path, "vllm": vllm})
        config = vllm_config(settings.engine)
        if vllm_seed is not None:
            config = dataclasses.replace(config, seed=vllm_seed)
        params = generation_params(
            temperature=vllm_temperature, top_p=vllm_top_p, max_tokens=vllm_max_tokens, **pairs
        )
        super().__init__(
            VLLMEngine(config),
            params=params,
            model_name=hf_model_name_or_path,
            settings=settings,
            # Twice the engine's batch keeps it full while finished rows are parsed (as a worker does).
            max_in_flight=max_in_flight or 2 * settings.engine.vllm.max_num_seqs,
            request_timeout_s=request_timeout_s,
            show_progress=show_progress,
        )

    def _start_runtime(self, runtime: EngineRuntime) -> None:
        from workers.preflight import check_engine_model

        check_engine_model(self.settings.engine)  # a missing model: one clear error, not vLLM's start
        with _main_script_hidden():
            runtime.start()


class APIVLMServing_openai(LocalServing):
    """An OpenAI-compatible server (`workers.engines.openai.OpenAIEngine`): a hosted API or ``vllm serve``.

    ``api_url`` is the API root; the key is read from the environment variable named by
    ``key_name_of_api_key`` (set it to any value for a server without authentication).
    ``max_workers`` requests are in flight at once; ``timeout`` (seconds) bounds one HTTP attempt,
    and failed attempts (429, 5xx, connection errors, timeouts) are retried ``max_retries`` times
    with exponential backoff. The default model takes ``temperature``; OpenAI's reasoning models do
    not. Keyword-only arguments shape the pairs, as for `LocalModelVLMServing_vllm`.
    """

    def __init__(
        self,
        api_url: str = "https://api.openai.com/v1",
        key_name_of_api_key: str = "DF_API_KEY",
        model_name: str = "gpt-4o-mini",
        max_workers: int = 10,
        timeout: float = 1800,
        *,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_tokens: int = 1024,
        max_retries: int = 5,
        settings: WorkerSettings | None = None,
        show_progress: bool = True,
        **pairs: Any,
    ) -> None:
        from workers.engines.openai import OpenAIEngine, OpenAIEngineConfig

        api_key = read_api_key(key_name_of_api_key)
        if not api_key:
            raise DataFlowError(
                f"environment variable {key_name_of_api_key!r} is not set: set it to the API key "
                "(any value for a server without authentication)"
            )
        engine = OpenAIEngine(
            OpenAIEngineConfig(
                base_url=api_url,
                model=model_name,
                api_key=api_key,
                max_concurrency=max_workers,
                request_timeout_s=timeout,
                max_retries=max_retries,
            )
        )
        super().__init__(
            engine,
            params=generation_params(temperature=temperature, top_p=top_p, max_tokens=max_tokens, **pairs),
            model_name=model_name,
            settings=settings,
            # Twice the cap: images load and encode while earlier requests are on the wire.
            max_in_flight=2 * max_workers,
            # Every attempt may time out, with a backoff of up to 30 s between attempts.
            request_timeout_s=timeout * (max_retries + 1) + 30 * max_retries,
            show_progress=show_progress,
        )


@contextlib.contextmanager
def _main_script_hidden() -> Iterator[None]:
    """Hide the main script from multiprocessing while the vLLM engine starts.

    On a CPU vLLM starts its engine process with ``spawn``, and a spawned child first re-runs the
    parent's main script, which starts another engine, unless the script guards its code with
    ``if __name__ == "__main__":``. DataFlow's example has no guard. The engine process needs nothing
    from the script, so the script is hidden (``__main__`` without ``__file__`` and ``__spec__``) for
    the few seconds of the start and restored after.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved_spec, saved_file = getattr(main, "__spec__", None), main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__spec__ = saved_spec
        if saved_file is not None:
            main.__file__ = saved_file


def _lost() -> ErrorInfo:  # pragma: no cover - every future yields a record or raises
    return ErrorInfo(code=ErrorCode.INTERNAL_ERROR, message="no result for this row")
