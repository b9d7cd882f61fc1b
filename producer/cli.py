"""The light half of the ``imageqa`` command: enqueue, status, jobs, schema (no engine needed)."""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import json
import logging
import sys
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from producer.broker import celery_app, check_redis, redis_client
from producer.contract import PROMPT_NAMES, PROMPT_VERSION, QA_TYPES, GenerationParams, json_schemas
from producer.enqueue import enqueue_file
from producer.errors import TRANSIENT, ErrorCode, ImageQAError
from producer.jobs import JobRecord, JobStatus, job_status, list_jobs
from producer.quarantine import QuarantineEntry, list_quarantined, quarantined_total
from producer.retry import retry_job
from producer.settings import ProducerSettings
from producer.sources import is_url
from producer.wait import wait_for_job

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Turn images into checked question-answer pairs."
)
console = Console(stderr=True)

PairsOption = Annotated[str, typer.Option("--pairs", help="Pairs per image: N or MIN-MAX.")]
ModelOption = Annotated[str | None, typer.Option("--model", help="Local model folder or hub id.")]


OUTPUT_HELP = (
    "Output: .jsonl (default) or .parquet, a path or a URL (s3://, gs://, ...). A local .jsonl with "
    "qa_meta is written as rows arrive; the others when the job completes, in input order."
)
NoMetaOption = Annotated[
    bool, typer.Option("--no-meta", help="Leave each row's qa_meta (provenance) out of the output.")
]


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

_QUALITY = "Pair quality"
CHECKS = ("question_mark", "refusal", "restated")
"""Rules that ``--skip-check`` turns off (the others always apply)."""
PromptOption = Annotated[
    str,
    typer.Option(
        "--prompt",
        help=f"Built-in prompt: {', '.join(PROMPT_NAMES)} (DataFlow style: Question:/Answer: lines).",
        rich_help_panel=_QUALITY,
    ),
]
PromptFileOption = Annotated[
    Path | None,
    typer.Option(
        "--prompt-file",
        help="Your own prompt template (its text is part of the item id). Placeholders: {count}, "
        "{min_pairs}, {max_pairs}, {schema}, {example}, {image_word}, {max_question_chars}, "
        "{max_answer_chars}.",
        rich_help_panel=_QUALITY,
    ),
]
SystemPromptOption = Annotated[
    str | None,
    typer.Option(
        "--system-prompt", help="System prompt text, or @FILE; '' sends none.", rich_help_panel=_QUALITY
    ),
]
MinQuestionCharsOption = Annotated[
    int, typer.Option(help="Shortest question, in characters.", rich_help_panel=_QUALITY)
]
MinAnswerCharsOption = Annotated[
    int, typer.Option(help="Shortest answer, in characters.", rich_help_panel=_QUALITY)
]
SkipCheckOption = Annotated[
    list[str] | None,
    typer.Option(
        "--skip-check",
        help=f"Turn a pair rule off (repeatable): {', '.join(CHECKS)}.",
        rich_help_panel=_QUALITY,
    ),
]
TriesOption = Annotated[
    int,
    typer.Option(
        "--tries",
        help="Generation requests per row at most: with too few valid pairs the model is asked again.",
        rich_help_panel=_QUALITY,
    ),
]
VerifyOption = Annotated[
    bool,
    typer.Option(
        "--verify/--no-verify",
        help="Ask every question again without its answer; drop pairs whose answers disagree.",
        rich_help_panel=_QUALITY,
    ),
]
BlindCheckOption = Annotated[
    bool,
    typer.Option(
        "--blind-check/--no-blind-check",
        help="Ask every kept question again without the image; drop pairs the model still answers alike "
        "(answerable_without_image). One short request per pair.",
        rich_help_panel=_QUALITY,
    ),
]
JudgeOption = Annotated[
    bool,
    typer.Option(
        "--judge/--no-judge",
        help="Have the model score every kept pair against the image (1-5, with a reason); drop pairs "
        "under --min-judge-score (judge_low). One request per pair.",
        rich_help_panel=_QUALITY,
    ),
]
MinJudgeScoreOption = Annotated[
    int,
    typer.Option("--min-judge-score", help="Lowest judge score kept (1-5).", rich_help_panel=_QUALITY),
]

TypesOption = Annotated[
    str | None,
    typer.Option(
        "--types",
        help="Least pairs of each question type per row, e.g. count=1,spatial=1 (types: "
        f"{', '.join(QA_TYPES)}).",
        rich_help_panel=_QUALITY,
    ),
]
MinTypesOption = Annotated[
    int, typer.Option("--min-types", help="Least distinct question types per row.", rich_help_panel=_QUALITY)
]
MaxTemplateShareOption = Annotated[
    float | None,
    typer.Option(
        "--max-template-share",
        help="Drop pairs whose question template already has this share (0-1] of the job's pairs.",
        rich_help_panel=_QUALITY,
    ),
]


def parse_types(value: str | None) -> dict[str, int]:
    """``count=1,spatial=2`` (``count`` alone is ``count=1``) as a dict; raises ``typer.BadParameter``."""
    quotas: dict[str, int] = {}
    for part in (value or "").split(","):
        name, _, number = part.strip().partition("=")
        if not name.strip():
            continue
        try:
            quotas[name.strip().lower()] = int(number) if number.strip() else 1
        except ValueError:
            raise typer.BadParameter(f"{part!r}: expected TYPE=N", param_hint="--types") from None
    return quotas


def generation_params(
    model: ModelOption = None,
    pairs: PairsOption = "3-5",
    max_tokens: MaxTokensOption = 1024,
    max_question_chars: QuestionCharsOption = 300,
    max_answer_chars: AnswerCharsOption = 500,
    temperature: TemperatureOption = 0.7,
    *,
    prompt: PromptOption = PROMPT_VERSION,
    prompt_file: PromptFileOption = None,
    system_prompt: SystemPromptOption = None,
    min_question_chars: MinQuestionCharsOption = 8,
    min_answer_chars: MinAnswerCharsOption = 1,
    skip_checks: SkipCheckOption = None,
    tries: TriesOption = 3,
    verify: VerifyOption = False,
    types: TypesOption = None,
    min_types: MinTypesOption = 0,
    max_template_share: MaxTemplateShareOption = None,
    blind_check: BlindCheckOption = False,
    judge: JudgeOption = False,
    min_judge_score: MinJudgeScoreOption = 3,
) -> GenerationParams:
    """`GenerationParams` from command-line options (declared here, for every command that generates:
    `with_generation_options`); raises ``typer.BadParameter``."""
    min_pairs, max_pairs = parse_pairs(pairs)
    if prompt not in PROMPT_NAMES:
        raise typer.BadParameter(
            f"{prompt!r}: expected one of {', '.join(PROMPT_NAMES)}", param_hint="--prompt"
        )
    skipped = set(skip_checks or ())
    unknown = skipped - set(CHECKS)
    if unknown:
        raise typer.BadParameter(
            f"{', '.join(sorted(unknown))}: expected {', '.join(CHECKS)}", param_hint="--skip-check"
        )
    try:
        return GenerationParams(
            model=model,
            min_pairs=min_pairs,
            max_pairs=max_pairs,
            max_tokens=max_tokens,
            max_question_chars=max_question_chars,
            max_answer_chars=max_answer_chars,
            temperature=temperature,
            prompt_version=prompt,
            prompt_template=_read_text(prompt_file, "--prompt-file") if prompt_file else None,
            system_prompt=_text_or_file(system_prompt),
            min_question_chars=min_question_chars,
            min_answer_chars=min_answer_chars,
            require_question_mark="question_mark" not in skipped,
            reject_refusals="refusal" not in skipped,
            reject_restated="restated" not in skipped,
            generation_tries=tries,
            verify=verify,
            types=parse_types(types),
            min_types=min_types,
            max_template_share=max_template_share,
            blind_check=blind_check,
            judge=judge,
            min_judge_score=min_judge_score,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def with_generation_options(command: Callable[..., None]) -> Callable[..., None]:
    """Gives a command the generation options of `generation_params` in place of its keyword
    parameter ``params``, which receives them as one `GenerationParams`."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "params"]
    options = list(inspect.signature(generation_params, eval_str=True).parameters.values())
    names = [p.name for p in options]

    @functools.wraps(command, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
    def wrapper(**kwargs: Any) -> None:
        params = generation_params(**{name: kwargs.pop(name) for name in names})
        command(params=params, **kwargs)

    parameters = own + options
    wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def _text_or_file(value: str | None) -> str | None:
    if value is None or not value.startswith("@"):
        return value
    return _read_text(Path(value[1:]), "--system-prompt")


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise typer.BadParameter(f"cannot read {path}: {e}", param_hint=option) from None


INPUT_HELP = (
    "JSONL, JSON, CSV, Parquet, Arrow, WebDataset .tar, a save_to_disk folder or a folder of images: "
    "a path, a glob, or a URL (s3://, gs://, az://, hf://datasets/ORG/NAME, https://)."
)
ImageColumnOption = Annotated[
    str | None,
    typer.Option("--image-column", help="The rows' image field (default: IMAGEQA_IMAGE_KEY, 'image')."),
]
SplitOption = Annotated[
    str | None, typer.Option(help="Split of a save_to_disk folder or hf://datasets/... (default: train).")
]


def load_job_file(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """``--config job.yaml``: the file's keys become the command's defaults (click's ``default_map``),
    so options given on the command line win. A key is an option's flag without dashes (``output``,
    ``format``, ``skip-check``; ``max-tokens`` or ``max_tokens``) or the input's name (``input``);
    relative paths in the file resolve against its folder. An unknown key fails naming the closest."""
    if value is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(value.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise typer.BadParameter(f"cannot read {value}: {e}", param_hint="--config") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value} must hold a mapping of option: value", param_hint="--config")
    params = {p.name: p for p in ctx.command.params if p.name and p.name != param.name}
    names: dict[str, str] = {}
    for name, p in params.items():
        spellings = {name, *(opt.lstrip("-") for opt in p.opts if opt.startswith("--"))}
        if name.endswith("_path") and p.param_type_name == "argument":
            spellings.add(name.removesuffix("_path"))
        for spelling in spellings:
            names[spelling] = names[spelling.replace("-", "_")] = names[spelling.replace("_", "-")] = name
    defaults: dict[str, Any] = {}
    for key, item in data.items():
        found = names.get(str(key))
        if found is None:
            close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise typer.BadParameter(
                f"{value}: unknown option {key!r} for imageqa {ctx.command.name}{hint}", param_hint="--config"
            )
        name = found
        if _is_path(params[name]) and isinstance(item, str) and not is_url(item):
            item = str(value.parent / Path(item).expanduser())
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


PATH_ARGUMENTS = frozenset({"input_path", "output"})
"""Parameters that take a path or a URL (declared as ``str`` so that URLs stay as written)."""


def _is_path(param: Any) -> bool:
    """Whether a command's parameter takes a file path (declared as ``Path``, or in PATH_ARGUMENTS)."""
    if param.name in PATH_ARGUMENTS:
        return True
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    return annotation is Path or Path in typing.get_args(annotation)


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Job file (YAML): any option of this command by its flag's name (and 'input'); "
        "options on the command line win.",
        is_eager=True,
        callback=load_job_file,
    ),
]


def fail(error: Exception) -> typer.Exit:
    """An error as one line of stderr however long it is (for people, scripts and logs), exit 2."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
    return typer.Exit(2)


@app.command()
@with_generation_options
def enqueue(
    input_path: Annotated[str, typer.Argument(help=INPUT_HELP)],
    output: Annotated[str, typer.Option("-o", "--output", help=OUTPUT_HELP)],
    job_id: Annotated[
        str | None, typer.Option(help="Job id (default: from input, output, settings).")
    ] = None,
    input_format: Annotated[
        str | None, typer.Option("--format", help="Input format if not by suffix.")
    ] = None,
    on_done_task: Annotated[str | None, typer.Option(help="Celery task sent when the job finishes.")] = None,
    on_done_queue: Annotated[str, typer.Option(help="Queue of --on-done-task.")] = "celery",
    image_column: ImageColumnOption = None,
    split: SplitOption = None,
    no_meta: NoMetaOption = False,
    config: ConfigOption = None,
    *,
    params: GenerationParams,
) -> None:
    """Enqueue one task per input row for the workers; prints the job id first (stdout), then shows
    the rows sent (stderr)."""
    settings = ProducerSettings()
    if image_column:
        settings = settings.model_copy(update={"image_key": image_column})

    def announce(job: str) -> None:
        typer.echo(job)
        sys.stdout.flush()

    try:
        with progress_bar("sending") as update:
            summary = enqueue_file(
                input_path,
                output,
                settings=settings,
                params=params,
                job_id=job_id,
                input_format=input_format,
                split=split,
                meta=not no_meta,
                on_progress=lambda rows: update(rows, 0),
                on_done_task=on_done_task,
                on_done_queue=on_done_queue,
                on_job=announce,
            )
    except ImageQAError as e:
        raise fail(e) from None
    console.print(
        f"{summary.rows} rows: {summary.enqueued} enqueued, {summary.rejected} rejected, "
        f"{summary.skipped} already done"
    )


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
        with progress_bar("images") as update:
            st = wait_for_job(
                r, job, on_progress=lambda latest: update(latest.done, latest.failed, latest.total)
            )
    held = quarantined_total(r)
    if as_json:
        typer.echo(json.dumps({**st.as_dict(), "quarantined_all_jobs": held}))
    else:
        console.print(describe(st))
        if held:
            console.print(
                f"quarantine: {held} messages in all ({st.quarantined} of this job); see imageqa quarantine"
            )
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
    if st.rejected:
        text += f"; {st.qa.get('pairs', 0)} pairs kept, rejected: " + ", ".join(
            f"{reason} {n}" for reason, n in sorted(st.rejected.items())
        )
    if st.agreement_rate is not None:
        text += f"; verification agreement {st.agreement_rate:.0%}"
    text += describe_checks(st)
    if st.quarantined:
        text += f"; {st.quarantined} messages quarantined"
    if st.resent:
        text += f"; {st.resent} rows re-sent after they were lost in transit"
    if st.retried:
        text += f"; {st.retried} failed rows retried"
    text += f" -> {st.output}"
    if st.publish_error:
        text += f" (not written yet: {st.publish_error}; the collector tries again)"
    elif st.final_output and st.finished_at is not None and st.published_at is None:
        text += " (being written)"
    return text


def describe_checks(st: JobStatus) -> str:
    """The blind check's and the judge's figures, as ``; ...`` clauses (empty when neither ran)."""
    text = ""
    blind = st.blind
    if blind["checked"]:
        text += f"; answerable without the image: {blind['answerable']} of {blind['checked']} pairs"
    if st.judge_scores:
        scores = ", ".join(f"{score}: {n}" for score, n in sorted(st.judge_scores.items()))
        text += f"; judge scores {scores}"
    return text


@app.command("quarantine")
def quarantine_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per line.")] = False,
    limit: Annotated[int, typer.Option(help="Show at most this many, newest first.")] = 20,
    job: Annotated[str | None, typer.Option(help="Only this job's.")] = None,
) -> None:
    """Messages that workers and the collector could not use, kept with the reason (newest first)."""
    r = connect_redis(ProducerSettings().redis_url)
    entries = list_quarantined(r, limit, job)
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(entry.as_dict()))
        return
    console.print(f"{quarantined_total(r)} messages quarantined in all; the newest {len(entries)}:")
    for entry in entries:
        typer.echo(describe_quarantined(entry))


def connect_redis(url: str) -> redis.Redis:
    """A client of the Redis at ``url``, or the command fails with a clear message if it does not answer."""
    try:
        check_redis(url)
    except ImageQAError as e:
        raise fail(e) from None
    return redis_client(url)


def describe_quarantined(entry: QuarantineEntry, raw_chars: int = 200) -> str:
    raw = entry.raw.decode("utf-8", "replace")
    if len(raw) > raw_chars or entry.truncated:
        raw = raw[:raw_chars] + f"... ({entry.raw_bytes} bytes)"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.at))
    return (
        f"{entry.entry_id} {when} {entry.source} {entry.ref or '-'} job {entry.job_id or '?'} "
        f"from {entry.origin}: {entry.code}: {entry.reason}\n    {raw}"
    )


@app.command()
def cancel(job: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Cancel a job: its remaining rows are skipped and recorded as ``cancelled`` error rows."""
    settings = ProducerSettings()
    try:
        check_redis(settings.redis_url)
    except ImageQAError as e:
        raise fail(e) from None
    if not JobRecord(redis_client(settings.redis_url), job).cancel():
        raise fail(ValueError(f"no job {job!r}"))
    console.print(f"job {job} cancelled; rows already done stay written")


@app.command()
def retry(
    job: Annotated[str, typer.Argument(help="Job id.")],
    codes: Annotated[
        list[str] | None,
        typer.Option(
            "--code",
            help="Retry the failed rows with this error code (repeatable; default: "
            + ", ".join(sorted(map(str, TRANSIENT)))
            + ").",
        ),
    ] = None,
) -> None:
    """Send a job's failed rows again: those that succeed move from the errors file to the output."""
    settings = ProducerSettings()
    try:
        selected = [ErrorCode(code) for code in codes] if codes else TRANSIENT
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--code") from None
    try:
        check_redis(settings.redis_url)
        app_ = celery_app(settings.redis_url, settings.visibility_timeout_s, name="imageqa-producer")
        summary = retry_job(app_, redis_client(settings.redis_url), job, selected)
    except ImageQAError as e:
        raise fail(e) from None
    by_code = ", ".join(f"{code} {n}" for code, n in sorted(summary.by_code.items()))
    console.print(
        f"job {job}: {summary.retried} failed rows sent again" + (f" ({by_code})" if by_code else "")
    )


@contextlib.contextmanager
def progress_bar(
    description: str, total: int | None = None, *, enabled: bool = True
) -> Iterator[Callable[..., None]]:
    """A progress bar of rows done and failed on stderr; yields ``update(done, failed, total=None)``
    (figures so far; ``total`` once known). Disabled, or with nothing to do (``total`` 0): a no-op."""
    if not enabled or total == 0:
        yield lambda done, failed, total=None: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task(description, total=total, failed=0)
        yield lambda done, failed, total=None: progress.update(
            bar, completed=done, failed=failed, total=total
        )


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
