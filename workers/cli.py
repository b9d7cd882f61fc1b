"""The ``imageqa`` command: the producer's commands plus worker, collect and the one-box ``run``."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from producer.cli import (
    INPUT_HELP,
    OUTPUT_HELP,
    AnswerCharsOption,
    ConfigOption,
    ImageColumnOption,
    MinAnswerCharsOption,
    MinQuestionCharsOption,
    ModelOption,
    NoMetaOption,
    PairsOption,
    QuestionCharsOption,
    SkipCheckOption,
    SplitOption,
    app,
    console,
    describe_checks,
    fail,
    generation_params,
    progress_bar,
    setup_logging,
    with_generation_options,
)
from producer.contract import GenerationParams
from producer.errors import ImageQAError
from producer.jobs import JobStatus
from producer.sources import is_dir, location
from producer.wait import wait_for_job
from workers.engine_options import with_engine_options

if TYPE_CHECKING:
    from workers.settings import WorkerSettings

EngineOption = Annotated[str | None, typer.Option("--engine", help="vllm (default), openai or fake.")]


@app.command()
@with_engine_options
def worker(
    model: ModelOption = None,
    engine: EngineOption = None,
    concurrency: Annotated[int | None, typer.Option(help="Tasks in flight (default 128).")] = None,
    loglevel: str = "INFO",
    *,
    vllm: dict[str, Any],
) -> None:
    """Run a Celery worker with one warm engine (one per GPU); settings from IMAGEQA_*.

    Before the engine starts, the engine arguments are checked against vLLM and the model is looked
    for (a folder with a checkpoint, or a hub id in the local cache or on a reachable hub): a worker
    that could not serve exits at once with one line saying why."""
    settings = worker_settings(model, engine, concurrency, vllm)
    setup_logging(loglevel)
    from workers.preflight import check_engine

    try:
        check_engine(settings.engine)
    except ImageQAError as e:
        raise fail(e) from None
    from celery import signals as celery_signals

    from producer.constants import QUEUE_GENERATE
    from workers.app import create_app

    # `worker_main` drops Celery's exit status; the worker's own is read as it shuts down. A worker
    # Celery stops on an error (an "Unrecoverable error", say when Redis goes away under it) must
    # exit non-zero, so that a supervisor restarting only failed processes restarts it.
    exit_codes: list[int | None] = []
    celery_signals.worker_shutdown.connect(lambda sender, **_: exit_codes.append(sender.exitcode), weak=False)
    create_app(settings).worker_main(
        [
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(settings.concurrency),
            "--queues",
            QUEUE_GENERATE,
            "--loglevel",
            loglevel,
            "--hostname",
            f"imageqa-{os.getpid()}@%h",
            # Gossip (workers reading every other worker's events) and mingle (syncing revokes at start)
            # serve nothing here and cost every worker work per event of every other worker.
            "--without-gossip",
            "--without-mingle",
        ]
    )
    if exit_codes and exit_codes[-1]:
        raise typer.Exit(exit_codes[-1])


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
def healthcheck(
    role: Annotated[str, typer.Argument(help="worker or collector.")],
    timeout_s: Annotated[float, typer.Option(help="worker: seconds to wait for the ping reply.")] = 5.0,
    max_idle_s: Annotated[
        float, typer.Option(help="collector: longest time since it last read the results stream.")
    ] = 60.0,
) -> None:
    """Exit 0 if this host's worker answers a ping, or the collector is reading; for container health
    checks. Settings from IMAGEQA_* (the same as the process being checked)."""
    from producer.settings import RedisSettings
    from workers.health import check_collector, check_worker
    from workers.settings import CollectorSettings

    if role == "worker":
        health = check_worker(RedisSettings(), timeout_s)
    elif role == "collector":
        health = check_collector(CollectorSettings(), max_idle_s)
    else:
        raise typer.BadParameter(f"{role!r}: expected worker or collector", param_hint="ROLE")
    typer.echo(f"{'ok' if health.ok else 'unhealthy'}: {health.detail}")
    raise typer.Exit(0 if health.ok else 1)


@app.command()
@with_generation_options
@with_engine_options
def run(
    input_path: Annotated[str, typer.Argument(help=INPUT_HELP)],
    output: Annotated[str, typer.Option("-o", "--output", help=OUTPUT_HELP)],
    engine: EngineOption = None,
    concurrency: Annotated[int | None, typer.Option(help="Tasks in flight.")] = None,
    input_format: Annotated[str | None, typer.Option("--format")] = None,
    stall_timeout_s: Annotated[
        float, typer.Option(help="Give up when no row finishes for this long (0: wait forever).")
    ] = 3600.0,
    image_column: ImageColumnOption = None,
    split: SplitOption = None,
    report_html: Annotated[
        Path | None, typer.Option("--report", help="Also write the job's HTML quality report here.")
    ] = None,
    no_meta: NoMetaOption = False,
    config: ConfigOption = None,
    *,
    params: GenerationParams,
    vllm: dict[str, Any],
) -> None:
    """Run the whole system on this box: Redis (embedded unless IMAGEQA_REDIS_URL answers), a worker,
    the collector and the producer; exits 0 when every row is written or failed."""
    from workers.local import LocalCluster
    from workers.preflight import check_engine_model
    from workers.settings import RunSettings

    settings = RunSettings(worker=worker_settings(params.model, engine, concurrency, vllm))
    try:
        check_engine_model(settings.worker.engine)  # the worker checks the rest (it imports vLLM)
    except ImageQAError as e:
        raise fail(e) from None
    if image_column:
        settings.producer = settings.producer.model_copy(update={"image_key": image_column})
    source = location(input_path)
    try:
        with LocalCluster(
            settings,
            # Local images next to a local input; a remote input's images are the stores' business.
            media_root=None
            if isinstance(source, str)
            else (source if is_dir(source) else source.parent).resolve(),
            log=console,
        ) as cluster:
            meta = not no_meta
            summary = cluster.enqueue(
                input_path, output, params, input_format=input_format, split=split, meta=meta
            )

            def resend(st: JobStatus) -> None:
                console.print(
                    f"[yellow]{st.total - st.done} rows were lost in transit; sending them again[/yellow]"
                )
                cluster.enqueue(input_path, output, params, input_format=input_format, split=split, meta=meta)

            try:
                with progress_bar("images") as update:
                    st = wait_for_job(
                        cluster.redis,
                        summary.job_id,
                        on_progress=lambda latest: update(latest.done, latest.failed, latest.total),
                        alive=cluster.worker_alive,
                        stall_timeout_s=stall_timeout_s or None,
                        resend=resend,
                        broker=cluster.broker,
                    )
            except ImageQAError as e:
                if (refused := cluster.worker_refusal()) is not None:
                    raise ImageQAError(refused, code=e.code) from e
                raise ImageQAError(
                    f"{e.message}\nlast lines of the worker log:\n{cluster.worker_log_tail()}"
                ) from e
            if report_html is not None:  # while the job's record is at hand (an embedded Redis stops)
                from workers.report import job_report, write_report

                write_report(report_html, job_report(None, r=cluster.redis, job_id=summary.job_id)[1])
    except ImageQAError as e:
        if "\n" not in e.message:
            raise fail(e) from None
        raise fail(e) from None
    console.print(f"[green]done[/green]: {st.written} rows written, {st.failed} rows failed")
    rejected = ", ".join(f"{reason} {n}" for reason, n in sorted(st.rejected.items())) or "none"
    console.print(
        f"pairs: {st.qa.get('pairs', 0)} kept in {st.qa.get('tries', 0)} generation requests; "
        f"rejected: {rejected}"
    )
    if st.agreement_rate is not None:
        console.print(f"verification: {st.agreement_rate:.0%} of {st.qa.get('verified', 0)} answers agreed")
    checked = describe_checks(st)
    if checked:
        console.print(checked.removeprefix("; ").replace("; ", "\n"))
    if st.publish_error:
        console.print(f"[red]output not written[/red]: {st.publish_error}")
        console.print(f"the rows are in {st.output_path}; rerun the command to try again")
        raise typer.Exit(1)
    console.print(f"output: {st.output}")
    if st.failed:
        console.print(f"errors: {st.errors}")
    if report_html is not None:
        console.print(f"report: {report_html}")


@app.command()
def report(
    output: Annotated[
        Path | None, typer.Argument(help="A job's output JSONL (optional with --job).", show_default=False)
    ] = None,
    html: Annotated[
        Path | None, typer.Option("-o", "--html", help="The page to write (default: OUTPUT.report.html).")
    ] = None,
    job: Annotated[
        str | None, typer.Option(help="The job (default: the newest one writing OUTPUT, if Redis knows it).")
    ] = None,
    sample: Annotated[int, typer.Option(help="Rows shown with their images and pairs.")] = 12,
    images_from: Annotated[
        Path | None,
        typer.Option(help="Folder of relative image paths (default: the job's input folder, else OUTPUT's)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the row sample.")] = 0,
) -> None:
    """Write an HTML quality report of a job: counts by outcome and reason, checks, question types and
    templates, and a sample of rows with image thumbnails and pairs. Figures come from the job's record
    in Redis when it answers, else from the output and errors files."""
    from producer.broker import check_redis, redis_client
    from producer.settings import ProducerSettings
    from workers.report import job_report, write_report

    url = ProducerSettings().redis_url
    r = None
    try:
        check_redis(url)
        r = redis_client(url)
    except ImageQAError as e:
        if job:
            raise fail(e) from None
        console.print(f"[yellow]{e.message}; the figures come from the files alone[/yellow]")
    if output is None and job is None:
        raise typer.BadParameter("name the output file or --job", param_hint="OUTPUT")
    try:
        output, page, job_id = job_report(
            output, r=r, job_id=job, images_from=images_from, sample_rows=sample, seed=seed
        )
    except ValueError as e:
        raise fail(e) from None
    target = html or output.with_name(output.stem + ".report.html")
    write_report(target, page)
    console.print(f"report of {f'job {job_id}' if job_id else output}: {target}")


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="A finished output: JSONL or Parquet, a path or a URL.")],
    output: Annotated[str, typer.Option("-o", "--output", help="The file to write (a path or a URL).")],
    fmt: Annotated[
        str, typer.Option("--format", help="llava, sharegpt, messages (OpenAI chat) or parquet.")
    ] = "llava",
    ordered: Annotated[
        bool, typer.Option("--ordered", help="Rows in input order (by qa_meta.row_index).")
    ] = False,
    image_key: Annotated[str, typer.Option(help="The rows' image field.")] = "image",
    pairs_key: Annotated[str, typer.Option(help="The rows' pairs field.")] = "qa_pairs",
) -> None:
    """Turn a finished output into a training file: LLaVA conversations (with <image> placeholders),
    ShareGPT, OpenAI chat messages, or Parquet. A .json target gets one JSON array, others JSONL."""
    from workers.export import FORMATS
    from workers.export import export as export_output

    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r}: expected one of {', '.join(FORMATS)}", param_hint="--format")
    setup_logging("WARNING")
    try:
        written = export_output(
            source, output, fmt, ordered=ordered, image_key=image_key, pairs_key=pairs_key
        )
    except ImageQAError as e:
        raise fail(e) from None
    console.print(f"{written} {fmt} records -> {output}")


@app.command("parse-qa")
def parse_qa(
    file: Annotated[
        Path, typer.Argument(help="One raw model output per line, as a JSON string ('-': stdin).")
    ],
    pairs: PairsOption = "3-5",
    max_question_chars: QuestionCharsOption = 300,
    max_answer_chars: AnswerCharsOption = 500,
    min_question_chars: MinQuestionCharsOption = 8,
    min_answer_chars: MinAnswerCharsOption = 1,
    skip_check: SkipCheckOption = None,
) -> None:
    """Check raw model outputs offline, as a worker would: parse each leniently (JSON, fenced JSON,
    Question:/Answer: text, Q1:/A1:, numbered lists) and apply the pair rules. Prints one JSON line
    per output: the valid pairs, the rejected ones with their reasons, and whether there are enough;
    a summary goes to stderr."""
    import sys
    from collections import Counter

    import orjson

    from workers.qa import check_output

    params = generation_params(
        None,
        pairs,
        max_question_chars=max_question_chars,
        max_answer_chars=max_answer_chars,
        min_question_chars=min_question_chars,
        min_answer_chars=min_answer_chars,
        skip_checks=skip_check,
    )
    try:
        lines = sys.stdin.read().splitlines() if str(file) == "-" else file.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise fail(e) from None
    totals: Counter[str] = Counter()
    outputs = enough = kept = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError:
            raw = line  # not JSON: the line itself is the output
        text = raw if isinstance(raw, str) else line
        check = check_output(text, params)
        ok = len(check.pairs) >= params.min_pairs
        outputs, enough, kept = outputs + 1, enough + ok, kept + len(check.pairs)
        totals.update(check.reasons())
        report = {
            "line": number,
            "ok": ok,
            "shape": check.shape,
            "qa_pairs": [p.model_dump(exclude_none=True) for p in check.pairs],
            "rejected": [
                {"reason": r.reason, "question": r.question, "answer": r.answer} for r in check.rejected
            ],
            "reasons": check.reasons(),
        }
        sys.stdout.write(orjson.dumps(report).decode() + "\n")
    sys.stdout.flush()
    counted = ", ".join(f"{reason} {n}" for reason, n in sorted(totals.items())) or "none"
    console.print(
        f"{outputs} outputs: {enough} with at least {params.min_pairs} valid pairs, {kept} pairs kept; "
        f"rejected: {counted}"
    )


def worker_settings(
    model: str | None, engine: str | None, concurrency: int | None, vllm: dict[str, Any] | None = None
) -> WorkerSettings:
    """The worker's settings: ``IMAGEQA_*`` variables, with the command line's options over them
    (``vllm``: the engine options given, `workers.engine_options`). Invalid settings exit with one
    line per problem."""
    from pydantic import ValidationError

    from workers.settings import EngineSettings, VLLMSettings, WorkerSettings

    try:
        engine_settings = EngineSettings(**_given(kind=engine, model=model, vllm=VLLMSettings(**vllm or {})))
        return WorkerSettings(**_given(concurrency=concurrency), engine=engine_settings)
    except ValidationError as e:
        raise fail(ImageQAError(_settings_problems(e))) from None


def _settings_problems(error: Any) -> str:
    problems = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        where = ".".join(str(part) for part in item["loc"])
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def _given(**options: Any) -> dict[str, Any]:
    return {name: value for name, value in options.items() if value is not None}


def main() -> None:
    app()


if __name__ == "__main__":
    main()
