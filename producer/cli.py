"""The light half of the ``imageqa`` command: enqueue, status, jobs, schema (no engine needed)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import redis
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from producer.broker import check_redis, redis_client
from producer.contract import GenerationParams, json_schemas
from producer.enqueue import enqueue_file
from producer.errors import ImageQAError
from producer.jobs import JobStatus, cancel_job, job_status, list_jobs
from producer.settings import ProducerSettings

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Turn images into checked question-answer pairs."
)
console = Console(stderr=True)

PairsOption = Annotated[str, typer.Option("--pairs", help="Pairs per image: N or MIN-MAX.")]
ModelOption = Annotated[str | None, typer.Option("--model", help="Local model folder or hub id.")]


def parse_pairs(text: str) -> tuple[int, int]:
    try:
        low, _, high = text.partition("-")
        return int(low), int(high or low)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected N or MIN-MAX, e.g. 3-5") from None


MaxTokensOption = Annotated[int, typer.Option(help="Token budget of one answer.")]
QuestionCharsOption = Annotated[int, typer.Option(help="Longest question, in characters.")]
AnswerCharsOption = Annotated[int, typer.Option(help="Longest answer, in characters.")]
TemperatureOption = Annotated[float, typer.Option(help="Sampling temperature.")]


def generation_params(
    model: str | None,
    pairs: str,
    max_tokens: int = 1024,
    max_question_chars: int = 300,
    max_answer_chars: int = 500,
    temperature: float = 0.7,
) -> GenerationParams:
    min_pairs, max_pairs = parse_pairs(pairs)
    try:
        return GenerationParams(
            model=model,
            min_pairs=min_pairs,
            max_pairs=max_pairs,
            max_tokens=max_tokens,
            max_question_chars=max_question_chars,
            max_answer_chars=max_answer_chars,
            temperature=temperature,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def fail(error: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {error}")
    return typer.Exit(2)


@app.command()
def enqueue(
    input_path: Annotated[Path, typer.Argument(help="JSONL, JSON, CSV, Parquet or a folder of images.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output JSONL, written by the collector.")],
    model: ModelOption = None,
    pairs: PairsOption = "3-5",
    max_tokens: MaxTokensOption = 1024,
    max_question_chars: QuestionCharsOption = 300,
    max_answer_chars: AnswerCharsOption = 500,
    temperature: TemperatureOption = 0.7,
    job_id: Annotated[
        str | None, typer.Option(help="Job id (default: from input, output, settings).")
    ] = None,
    input_format: Annotated[
        str | None, typer.Option("--format", help="Input format if not by suffix.")
    ] = None,
    on_done_task: Annotated[str | None, typer.Option(help="Celery task sent when the job finishes.")] = None,
    on_done_queue: Annotated[str, typer.Option(help="Queue of --on-done-task.")] = "celery",
) -> None:
    """Enqueue one task per input row for the workers; prints the job id."""
    settings = ProducerSettings()
    try:
        summary = enqueue_file(
            input_path,
            output,
            settings=settings,
            params=generation_params(
                model, pairs, max_tokens, max_question_chars, max_answer_chars, temperature
            ),
            job_id=job_id,
            input_format=input_format,
            on_done_task=on_done_task,
            on_done_queue=on_done_queue,
        )
    except ImageQAError as e:
        raise fail(e) from None
    console.print(
        f"{summary.rows} rows: {summary.enqueued} enqueued, {summary.rejected} rejected, "
        f"{summary.skipped} already done"
    )
    typer.echo(summary.job_id)


@app.command()
def status(
    job: Annotated[str, typer.Argument(help="Job id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait until the job is done.")] = False,
) -> None:
    """Progress of a job: rows written and failed out of the total."""
    settings = ProducerSettings()
    try:
        check_redis(settings.redis_url)
    except ImageQAError as e:
        raise fail(e) from None
    r = redis_client(settings.redis_url)
    st = job_status(r, job)
    if st is None:
        raise fail(ValueError(f"no job {job!r}"))
    if wait and not st.finished:
        st = wait_for_job(r, job, console)
    if as_json:
        typer.echo(json.dumps(st.as_dict()))
    else:
        console.print(describe(st))
    raise typer.Exit(0 if st.finished or not wait else 1)


@app.command("jobs")
def jobs_command(limit: int = 20) -> None:
    """The most recent jobs."""
    settings = ProducerSettings()
    r = redis_client(settings.redis_url)
    for job_id in list_jobs(r, limit):
        st = job_status(r, job_id)
        if st:
            typer.echo(describe(st))


@app.command()
def schema(output: Annotated[Path | None, typer.Option("-o", "--output")] = None) -> None:
    """Print the JSON Schema of the task message and the result record."""
    text = json.dumps(json_schemas(), indent=2, sort_keys=True) + "\n"
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text)


def describe(st: JobStatus) -> str:
    text = (
        f"{st.job_id} {st.state}: {st.done}/{st.total} done ({st.written} written, {st.failed} failed), "
        f"{st.rate_per_s:.1f} rows/s"
    )
    if st.eta_s is not None:
        text += f", about {st.eta_s:.0f} s left"
    if st.failures:
        text += "; failures: " + ", ".join(f"{code} {n}" for code, n in sorted(st.failures.items()))
    return text + f" -> {st.output_path}"


@app.command()
def cancel(job: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Cancel a job: its remaining rows are skipped and recorded as ``cancelled`` error rows."""
    settings = ProducerSettings()
    try:
        check_redis(settings.redis_url)
    except ImageQAError as e:
        raise fail(e) from None
    if not cancel_job(redis_client(settings.redis_url), job):
        raise fail(ValueError(f"no job {job!r}"))
    console.print(f"job {job} cancelled; rows already done stay written")


def wait_for_job(
    r: redis.Redis, job_id: str, out: Console, poll_s: float = 0.25, alive: Callable[[], bool] = lambda: True
) -> JobStatus:
    """Shows a progress bar until the job is done; ``alive`` returning False aborts the wait."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeRemainingColumn(),
        console=out,
        transient=False,
    ) as progress:
        bar = progress.add_task("images", total=None, failed=0)
        while True:
            st = job_status(r, job_id)
            if st is None:
                raise ImageQAError(f"job {job_id} disappeared from Redis")
            progress.update(bar, total=st.total, completed=st.done, failed=st.failed)
            if st.finished:
                return st
            if not alive():
                raise ImageQAError("the worker stopped before the job was done")
            time.sleep(poll_s)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
