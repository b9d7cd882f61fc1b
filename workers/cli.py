"""The ``imageqa`` command: the producer's commands plus worker, collect and the one-box ``run``."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from producer.cli import (
    AnswerCharsOption,
    MaxTokensOption,
    ModelOption,
    PairsOption,
    QuestionCharsOption,
    TemperatureOption,
    app,
    console,
    fail,
    generation_params,
    setup_logging,
    wait_for_job,
)
from producer.errors import ImageQAError

EngineOption = Annotated[str | None, typer.Option("--engine", help="vllm (default) or fake.")]


@app.command()
def worker(
    model: ModelOption = None,
    engine: EngineOption = None,
    concurrency: Annotated[int | None, typer.Option(help="Tasks in flight (default 64).")] = None,
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker with one warm engine (one per GPU); settings from IMAGEQA_*."""
    for name, value in (
        ("IMAGEQA_MODEL", model),
        ("IMAGEQA_ENGINE", engine),
        ("IMAGEQA_CONCURRENCY", concurrency),
    ):
        if value is not None:
            os.environ[name] = str(value)
    setup_logging(loglevel)
    from producer.constants import QUEUE_GENERATE
    from workers.app import app as celery

    celery.worker_main(
        [
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(celery.conf.worker_concurrency),
            "--queues",
            QUEUE_GENERATE,
            "--loglevel",
            loglevel,
            "--hostname",
            f"imageqa-{os.getpid()}@%h",
        ]
    )


@app.command()
def collect(loglevel: str = "INFO") -> None:
    """Run the results collector: writes every job's output and errors JSONL."""
    setup_logging(loglevel)
    from workers.collector import run_collector
    from workers.settings import CollectorSettings

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        run_collector(CollectorSettings(), stop)


@app.command()
def run(
    input_path: Annotated[Path, typer.Argument(help="JSONL, JSON, CSV, Parquet or a folder of images.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output JSONL.")],
    model: ModelOption = None,
    pairs: PairsOption = "3-5",
    engine: EngineOption = None,
    concurrency: Annotated[int | None, typer.Option(help="Tasks in flight.")] = None,
    input_format: Annotated[str | None, typer.Option("--format")] = None,
    max_tokens: MaxTokensOption = 1024,
    max_question_chars: QuestionCharsOption = 300,
    max_answer_chars: AnswerCharsOption = 500,
    temperature: TemperatureOption = 0.7,
) -> None:
    """Run the whole system on this box: Redis (embedded unless IMAGEQA_REDIS_URL answers), a worker,
    the collector and the producer; exits 0 when every row is written or failed."""
    from workers.local import LocalCluster

    params = generation_params(model, pairs, max_tokens, max_question_chars, max_answer_chars, temperature)
    try:
        with LocalCluster(
            media_root=(input_path if input_path.is_dir() else input_path.parent).resolve(),
            model=model,
            engine=engine,
            concurrency=concurrency,
            log=console,
        ) as cluster:
            summary = cluster.enqueue(input_path, output, params, input_format=input_format)
            st = wait_for_job(cluster.redis, summary.job_id, console, alive=cluster.worker_alive)
    except ImageQAError as e:
        raise fail(e) from None
    console.print(f"[green]done[/green]: {st.written} rows written, {st.failed} rows failed")
    console.print(f"output: {st.output_path}")
    if st.failed:
        console.print(f"errors: {st.errors_path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
