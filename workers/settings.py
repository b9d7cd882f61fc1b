"""Settings of the worker, collector and one-box roles (``IMAGEQA_*``), read once at the entry point.

Nested settings read flat variables too: ``WorkerSettings.engine.vllm.max_num_seqs`` is
``IMAGEQA_MAX_NUM_SEQS``, ``engine.kind`` is ``IMAGEQA_ENGINE`` (`env_names` lists them all).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import to_jsonable_python
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from producer.contract import MAX_ROW_BYTES
from producer.errors import EngineArgsError
from producer.settings import ProducerSettings, RedisSettings
from workers.engines.vllm_args import parse_engine_args
from workers.fetch import AllowedNetwork, FetchPolicy

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
DEFAULT_MAX_MESSAGE_BYTES = 2 * MAX_ROW_BYTES + 1024 * 1024
"""33 MiB: the largest message the producer sends (a row of up to `MAX_ROW_BYTES`, its image
references again in ``images``, parameters), so the limit refuses nothing it accepted."""


class ImageSettings(RedisSettings):
    media_roots: Annotated[list[Path], NoDecode] = []
    """Folders that image paths must lie under (``os.pathsep``-separated). Empty: the working folder."""
    max_pixels: int = 1024 * 1024
    """Images above this many pixels are downscaled before the engine (vision tokens grow with pixels)."""
    size_multiple: int = Field(default=28, ge=1, le=256)
    """A downscaled image's sides go to multiples of this, as `workers.images.capped_size` says: 28 is
    the patch grid of Qwen2-VL and Qwen2.5-VL (patch 14, 2x2 merge), so the model's image processor has
    nothing left to resize (32 for Qwen3-VL; 1: exact aspect). Images needing no downscale
    stay as they are."""
    max_image_pixels: int = 100_000_000
    """Images whose header claims more pixels are refused as decompression bombs."""
    max_image_bytes: int = 50 * 1024 * 1024
    url_timeout_s: float = 10.0
    """Longest wait for one connect or one read of an http(s) image."""
    url_total_timeout_s: float = 30.0
    """Deadline of a whole http(s) image fetch: redirects, retries, backoff and reading the body."""
    allow_private_urls: bool = False
    """Allow http(s) images on any non-public address: loopback, private, link-local (off: an SSRF guard)."""
    allowed_url_networks: Annotated[list[str], NoDecode] = []
    """Non-public addresses http(s) images may still come from, comma-separated: ``10.0.0.0/8``,
    ``10.1.2.3``, ``10.1.2.3:8080`` (that port only), ``[fd00::1]:443``. Public addresses need no entry."""
    allowed_stores: Annotated[list[str], NoDecode] = ["s3", "gs", "az", "hf"]
    """Object stores images may come from, comma-separated: a scheme (``s3``: any bucket) or a scheme
    and bucket or prefix (``s3://media``, ``gs://data/images``); empty: none. Credentials come from
    each store's standard environment (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``HF_TOKEN``)."""
    dataset_cache_bytes: int = 512 * 1024 * 1024
    """Parquet columns and Arrow files read for images stored inside them, kept per worker process so
    the next image of the same row group is not read again."""

    @field_validator("media_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [p for p in value.split(os.pathsep) if p]
        return value

    @field_validator("allowed_stores", mode="before")
    @classmethod
    def _split_stores(cls, value: object) -> object:
        if isinstance(value, str):
            return [n.strip() for n in value.split(",") if n.strip()]
        return value

    @field_validator("allowed_url_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            return [n.strip() for n in value.split(",") if n.strip()]
        return value

    @field_validator("allowed_url_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for text in value:
            AllowedNetwork.parse(text)
        return value

    def fetch_policy(self) -> FetchPolicy:
        """What an http(s) image fetch may do, from these settings."""
        return FetchPolicy(
            max_bytes=self.max_image_bytes,
            timeout_s=self.url_timeout_s,
            total_timeout_s=self.url_total_timeout_s,
            allow_private=self.allow_private_urls,
            allowed_networks=_networks(tuple(self.allowed_url_networks)),
        )

    def roots(self) -> list[Path]:
        """The media roots, resolved (once per set of roots: resolving costs a syscall per path part)."""
        return _resolved(tuple(self.media_roots) or (Path.cwd(),))


@functools.lru_cache(maxsize=64)
def _networks(texts: tuple[str, ...]) -> tuple[AllowedNetwork, ...]:
    return tuple(AllowedNetwork.parse(text) for text in texts)


@functools.lru_cache(maxsize=64)
def _resolved(roots: tuple[Path, ...]) -> list[Path]:
    return [p.resolve() for p in roots]


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEQA_", extra="ignore", populate_by_name=True)


class VLLMSettings(_Settings):
    """engine=vllm: how the vLLM engine is built (`workers.engines.vllm_config`).

    Fields are vLLM's engine arguments under vLLM's names (``max_images_per_prompt`` is the image
    count of its ``limit_mm_per_prompt``); ``engine_args`` takes any other. An argument given in
    ``engine_args`` that has a field here goes to that field.
    """

    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_num_seqs: int = 64
    max_images_per_prompt: int = 4
    """Most images in one prompt (vLLM's ``limit_mm_per_prompt`` image count); a row with more
    fails as ``too_many_images`` before its images are loaded."""
    dtype: str = "auto"
    enforce_eager: bool | None = None
    """Skip torch.compile and CUDA graphs; unset: on for CPU, off for GPU."""
    kv_cache_memory_bytes: int | None = None
    """KV cache size; unset: vLLM's share of GPU memory, or 1 GiB on a CPU."""
    quantization: str | None = None
    """Weight quantization method (``awq``, ``gptq``, ``fp8``, ...); unset: the checkpoint's own."""
    revision: str | None = None
    """Model revision on the hub: a branch, tag or commit; unset: the default branch."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (models transformers does not know)."""
    enable_prefix_caching: bool | None = None
    """Reuse the KV cache of shared prompt prefixes; unset: vLLM's default."""
    max_num_batched_tokens: int | None = None
    """Most tokens in one engine step; unset: vLLM's default."""
    engine_args: Annotated[dict[str, Any], NoDecode] = {}
    """Any other ``AsyncEngineArgs`` field by vLLM's name: a JSON object or ``@file`` (JSON or YAML),
    checked against vLLM when the engine is built (`workers.engines.vllm_args`)."""

    @model_validator(mode="before")
    @classmethod
    def _fold_engine_args(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "engine_args" not in data:
            return data
        return cls.fold(data)

    @classmethod
    def fold(cls, data: dict[str, Any]) -> dict[str, Any]:
        """`fold_engine_args` for these settings; raises `EngineArgsError`."""
        return fold_engine_args(data, set(cls.model_fields) - {"engine_args", "max_images_per_prompt"})


class OpenAISettings(_Settings):
    """engine=openai: an OpenAI-compatible server (a hosted API or ``vllm serve``)."""

    base_url: str = "https://api.openai.com/v1"
    """Root of the API (e.g. ``http://gpu-7:8000/v1`` for vllm serve)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable that holds the API key (unset: no key)."""
    max_concurrency: int = Field(default=64, validation_alias="IMAGEQA_OPENAI_MAX_CONCURRENCY")
    """Requests in flight to the server at once."""

    def api_key(self) -> str | None:
        """The key held by the variable ``api_key_env`` names; read here so it never sits in settings."""
        return read_api_key(self.api_key_env)


class FakeSettings(_Settings):
    """engine=fake: the instant engine of plumbing and fault tests."""

    model_config = SettingsConfigDict(env_prefix="IMAGEQA_FAKE_")

    delay_s: float = 0.0
    faults: dict[str, str] = {}
    """Image size (``"13x17"``) -> ``"crash"`` or ``"hang"``."""


class SimGPUSettings(_Settings):
    """engine=simgpu: vLLM's real front end and a simulated GPU (benchmarks; `workers.engines.simgpu`)."""

    model_config = SettingsConfigDict(env_prefix="IMAGEQA_SIMGPU_")

    service_s: float = 0.64
    """Time the simulated GPU holds each request."""
    slots: int = 64
    """Requests it holds at once: its capacity is ``slots / service_s`` requests/s (default 100)."""


class EngineSettings(_Settings):
    """Which engine serves which model, and each engine's own settings (only ``kind``'s are used)."""

    kind: Literal["vllm", "fake", "openai", "simgpu"] = Field(
        default="vllm", validation_alias="IMAGEQA_ENGINE"
    )
    model: str = DEFAULT_MODEL
    """A local checkpoint folder or a model hub id (engine=openai: the served model name)."""
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    fake: FakeSettings = Field(default_factory=FakeSettings)
    simgpu: SimGPUSettings = Field(default_factory=SimGPUSettings)

    def max_images(self) -> int | None:
        """Most images one prompt of this engine takes; None: no limit known here."""
        return self.vllm.max_images_per_prompt if self.kind == "vllm" else None


class WorkerSettings(ImageSettings):
    """Settings of a worker process: Celery, delivery and metrics here, the engine in ``engine``.

    Nested settings given as a dict (``WorkerSettings(engine={"kind": "fake"})``) take the rest of
    their values from the environment, as the top level does.
    """

    engine: Annotated[EngineSettings, NoDecode] = Field(default_factory=EngineSettings)
    """``IMAGEQA_ENGINE`` names its kind; its other settings have variables of their own."""
    concurrency: int = 128
    """Tasks in flight per worker process. Twice max_num_seqs keeps requests waiting in the engine, so a
    finished sequence's slot is refilled at once instead of after a round trip to the broker."""
    max_attempts: int = 3
    """Deliveries of one item before it becomes an error row (``poison_item``) instead of looping."""
    restore_interval_s: int = 10
    """How often the worker sweeps for tasks whose worker died, to redeliver them."""
    task_time_limit_s: int = 600
    """Hard per-task limit; the engine request is cancelled after ``task_time_limit_s - 30``."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """A task message whose arguments are larger than this as JSON is refused before it is decoded:
    an error row (``message_too_large``) if it names its job and item, else quarantined."""
    metrics_port: int = 9100
    """Prometheus /metrics of this worker (0: off). One per process: give each worker on a host its own."""
    metrics_address: str = "127.0.0.1"
    preprocess_workers: int | None = None
    """Processes per worker that load images (read, decode, downscale) beside its own, so it feeds its
    engine with more than one core. Unset: one per CPU the worker may run on (its affinity) when four or
    more; 0: images load in the worker's own process."""
    task_events: bool = False
    """Send Celery task events from the start. Off: Flower (or ``celery control enable_events``) turns them
    on while it monitors, so a cluster nobody watches does not pay three Redis publishes per task."""

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_kind(cls, value: object) -> object:
        # IMAGEQA_ENGINE has always named the kind of engine; the rest has variables of its own.
        return {"kind": value} if isinstance(value, str) else value


class CollectorSettings(RedisSettings):
    consumer: str = f"collector-{os.uname().nodename}"
    batch_size: int = 500
    """Stream entries read, written and fsynced per batch."""
    block_ms: int = 1000
    linger_ms: int = 50
    """After a batch smaller than ``batch_size``, wait this long for more results before reading
    again: fewer, larger batches (fewer Redis round trips and fsyncs per row) for 50 ms of latency."""
    metrics_port: int = 9101
    """Prometheus /metrics of the collector (0: off)."""
    metrics_address: str = "127.0.0.1"
    claim_idle_s: float = 300.0
    """Entries another collector read but left unacked this long are taken over (it is presumed dead)."""
    output_dir: Path = Path("imageqa-output")
    """Where jobs that no producer registered (tasks sent by other applications) are written."""
    stall_check_s: float = 10.0
    """How often the collector looks for jobs that lost rows in transit (0: never; see `workers.stall`)."""
    stall_grace_s: float = 30.0
    """A job is stalled once seen lost in transit, without progress, at two checks this far apart;
    its missing rows are then sent again from its input."""


class RunSettings(_Settings):
    """Settings of ``imageqa run`` (the whole system on one box), with those of each role it runs."""

    redis_url: str | None = None
    """The Redis to use if it answers; unset or not answering: an embedded one, kept in ``cache_dir``."""
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "imageqa")
    """Embedded Redis state and worker logs."""
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    collector: CollectorSettings = Field(default_factory=CollectorSettings)
    producer: ProducerSettings = Field(default_factory=ProducerSettings)


def fold_engine_args(data: dict[str, Any], fields: set[str]) -> dict[str, Any]:
    """``data`` (a `VLLMSettings` input) with its ``engine_args`` read (JSON, ``@file`` or dict) and the
    arguments that are fields of their own moved there; ``limit_mm_per_prompt``'s image count goes to
    ``max_images_per_prompt``. An argument given both ways with two values is an error."""
    data = dict(data)
    args = parse_engine_args(data["engine_args"])
    moved = {name: args.pop(name) for name in list(args) if name in fields}
    limits = args.get("limit_mm_per_prompt")
    if isinstance(limits, dict) and "image" in limits:
        image = limits["image"]
        count = image.get("count") if isinstance(image, dict) else image
        if not isinstance(image, dict):
            limits = {k: v for k, v in limits.items() if k != "image"}
            if limits:
                args["limit_mm_per_prompt"] = limits
            else:
                del args["limit_mm_per_prompt"]
        if count is not None:
            moved["max_images_per_prompt"] = count
    for name, value in moved.items():
        if name in data and str(data[name]).lower() != str(value).lower():
            given = "image count of limit_mm_per_prompt" if name == "max_images_per_prompt" else name
            raise EngineArgsError(
                f"engine argument {given} is given twice: {value!r} in the engine arguments and "
                f"{data[name]!r} by its own option or IMAGEQA_{name.upper()}; keep one"
            )
        data[name] = value
    data["engine_args"] = args
    return data


def read_api_key(env_name: str) -> str | None:
    """The API key held by the environment variable ``env_name``; None when it is unset or empty."""
    return os.environ.get(env_name) or None


def env_names(settings_cls: type[BaseSettings]) -> set[str]:
    """Every ``IMAGEQA_*`` variable that ``settings_cls`` reads, those of its nested settings included."""
    names: set[str] = set()
    for name, field in settings_cls.model_fields.items():
        if _is_settings(field.annotation):
            names |= env_names(field.annotation)  # type: ignore[arg-type]
        else:
            names.add(_env_name(settings_cls, name))
    return names


def environ(settings: BaseSettings) -> dict[str, str]:
    """The ``IMAGEQA_*`` variables from which a process reads ``settings`` back, nested settings
    flattened and unset optional values left out: how one process hands its settings to another."""
    env: dict[str, str] = {}
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if isinstance(value, BaseSettings):
            env.update(environ(value))
        elif value is not None:
            if NoDecode in field.metadata and isinstance(value, list):  # a list of paths or of names
                sep = os.pathsep if value and isinstance(value[0], Path) else ","
                text = sep.join(str(v) for v in value)
            elif isinstance(value, str):
                text = value
            else:
                text = json.dumps(to_jsonable_python(value))
            env[_env_name(type(settings), name)] = text
    return env


def child_environ(settings: BaseSettings) -> dict[str, str]:
    """The environment for a child process that reads ``settings``: this process's own (``PATH``, API
    keys, ``CUDA_VISIBLE_DEVICES``, ...) with every variable of ``settings`` set to its value."""
    return {**os.environ, **environ(settings)}


def _env_name(settings_cls: type[BaseSettings], name: str) -> str:
    alias = settings_cls.model_fields[name].validation_alias
    if isinstance(alias, str):
        return alias.upper()
    return f"{settings_cls.model_config.get('env_prefix', '')}{name}".upper()


def _is_settings(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseSettings)
