"""Lenient parsing of a model's raw output into question-answer pairs, whatever its shape.

Engines with constrained decoding return the JSON of `workers.prompts.qa_schema`; others (a hosted API
without schema support, a text-format prompt) return what the model wrote. `parse_qa_output` tries,
in order, and keeps the first that yields pairs:

1. the whole text as JSON (``json``);
2. JSON inside Markdown code fences (``json_fenced``);
3. JSON values embedded in other text, e.g. followed by a remark, or one object per line
   (``json_embedded``);
4. complete pairs out of truncated JSON, or Python-style lists of tuples (``json_partial``);
5. tag-delimited pairs: ``<question>...</question><answer>...</answer>`` (also ``<q>``/``<a>``),
   inside any wrapping tags (``tagged``);
6. a Markdown table with a question and an answer column (``table``);
7. labelled text: ``Question: ... Answer: ...`` (on one line or several), ``Q1:``/``A1:``,
   ``**Question 1:**``, numbered or bulleted, and conversation turns ``User:``/``Assistant:``,
   ``Human:``/``GPT:`` (``labelled``);
8. lines: ``1. What is shown? A cat.``, or a question line followed by its answer line (``lines``).

In JSON a pair is an object with ``question``/``answer`` keys (also ``q``/``a``, any case, or
``instruction``/``output``), a two-item list, or a ``{"question?": "answer"}`` mapping; the list of
pairs may be the top value or sit under any key. A list of conversation turns pairs each user turn
with the assistant turn after it: ``{"from": "human"|"gpt", "value": ...}`` (LLaVA/ShareGPT) or
``{"role": "user"|"assistant", "content": ...}`` (OpenAI-style, the content a string or a list of
parts), also under a ``conversations`` or ``messages`` key; image tokens (``<image>``) are removed.
`parse_qa_output` never raises; what it cannot read counts as ``malformed``. Reasoning blocks
(``<think>...</think>``) are ignored. Nothing here judges the pairs: `workers.qa` does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

QUESTION_MARKS = "?\uff1f\u061f"
"""Characters that end a question: ASCII, full-width (CJK) and Arabic."""
MAX_PARSE_CHARS = 200_000
"""Only this much of an output is read (a longer one is a runaway generation)."""
MAX_JSON_STARTS = 64
"""Positions at most where embedded JSON is tried (bounds the work on brace-heavy text)."""
MAX_DEPTH = 6
"""Nesting levels of JSON searched for the list of pairs."""

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*(?:json5?|jsonc|javascript|js)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL | re.I)
_JSON_START = re.compile(r"[\[{]")
_PARTIAL = re.compile(  # "question": "...", "answer": "..." with double or single quotes
    r"""(?P<k>["'])(?:question|q)(?P=k)\s*:\s*(?P<qq>["'])(?P<q>(?:(?!(?P=qq))[^\\\n]|\\.)*)(?P=qq)\s*,\s*"""
    r"""(?P<l>["'])(?:answer|a)(?P=l)\s*:\s*(?P<aq>["'])(?P<a>(?:(?!(?P=aq))[^\\\n]|\\.)*)(?P=aq)""",
    re.IGNORECASE,
)
_LABEL = re.compile(
    r"(?<![^\s,;|>(\[*_#~])"  # at the start, or after a space, punctuation or markup
    r"[*_]{0,3}(?P<kind>question|answer|q|a|user|human|assistant|gpt)"
    r"[ \t]*(?P<num>\d{1,3})?[ \t]*[*_]{0,3}[ \t]*"
    r"(?P<sep>[:\uff1a]|[.)\-\u2013\u2014](?=[ \t])|(?=[ \t]*\n))[*_]{0,3}",
    re.IGNORECASE,
)
_LIST_MARK = re.compile(r"^\s*(?:[-*•+]\s+|\d{1,3}[.)]\s+|#{1,6}\s+|>\s*)+")
_MARKUP_ONLY = re.compile(r"^[\s\-*•+#>_]*(?:\d{1,3}[.)][\s*_]*)?$")
_BOLD = re.compile(r"\*\*|__")
_INLINE_PAIR = re.compile(
    rf"^(?P<q>[^{QUESTION_MARKS}]*\S[{QUESTION_MARKS}])\s*(?:[-\u2013\u2014:|→=>]+\s*)?(?P<a>\S.*)$"
)
_QUESTION_ENDS = tuple(QUESTION_MARKS)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_ANSWER_PREFIX = re.compile(r"^(?:answer|a)[ \t]*\d{0,3}[ \t]*[:\uff1a]\s*", re.IGNORECASE)
_QUESTION_KEYS = ("question", "q", "query")
_ANSWER_KEYS = ("answer", "a", "ans", "reply")
_TYPE_KEYS = ("type", "question_type", "category", "kind")
_INSTRUCTION_KEYS = ("instruction", "prompt")  # instruction-tuning rows: a pair only with both keys
_OUTPUT_KEYS = ("output", "response", "completion")
_LIST_KEYS = (
    "qa_pairs", "pairs", "qa", "questions", "qas", "items", "data", "results", "output", "conversations",
    "messages",
)  # fmt: skip
_TUPLE = re.compile(  # ("question", "answer") or ['question', 'answer'] in Python-style text
    r"""[(\[]\s*(?P<qq>["'])(?P<q>(?:(?!(?P=qq))[^\\\n]|\\.)*)(?P=qq)\s*,\s*"""
    r"""(?P<aq>["'])(?P<a>(?:(?!(?P=aq))[^\\\n]|\\.)*)(?P=aq)\s*[)\]]"""
)
_TAG = re.compile(
    r"<(?P<tag>question|answer|q|a)(?:\s[^<>]*)?>(?P<content>.*?)(?:</(?P=tag)\s*>|(?=<(?:question|q)\b)|\Z)",
    re.IGNORECASE | re.DOTALL,
)
_TABLE_ROW = re.compile(r"^\s*\|(.*)\|\s*$")
_TABLE_RULE = re.compile(r"^[\s|:\-]+$")
_IMAGE_TOKEN = re.compile(r"<\|?(?:image|img)(?:_\d+)?\|?>|<\|vision_start\|>.*?<\|vision_end\|>", re.I)
_TRAILING_ARROW = re.compile(r"\s*(?:->|=>|\u2192|[-\u2013\u2014|])+$")
_USER_ROLES = frozenset({"user", "human"})
_ASSISTANT_ROLES = frozenset({"assistant", "gpt", "model", "bot"})
_ROLE_LABELS = frozenset({"user", "human", "assistant", "gpt"})


@dataclass(frozen=True)
class ParsedOutput:
    """The pairs found in one output, in order; ``malformed`` counts entries that were not pairs."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    malformed: int = 0
    shape: str = "none"
    types: list[str | None] = field(default_factory=list)
    """The question type each JSON pair names (``type``, ``question_type``, ``category``, ``kind``),
    by position; shorter than ``pairs`` (or empty) where none is named. `pair_types` pads it."""

    def pair_types(self) -> list[str | None]:
        return (self.types + [None] * len(self.pairs))[: len(self.pairs)]


def parse_qa_output(text: str) -> ParsedOutput:
    """The question-answer pairs in ``text`` (see the module docstring). Never raises."""
    return _parse_text(text, 0)


def parse_answer(text: str) -> str:
    """A single answer (verification pass): ``{"answer": ...}``, a JSON string, ``Answer: ...`` or the
    text itself. Never raises; may return an empty string."""
    text = _clean(text)
    value = _loads(text)
    if value is _NOTHING:
        fenced = _FENCE.search(text)
        value = _loads(fenced.group(1).strip()) if fenced else _NOTHING
    if isinstance(value, dict):
        for key, item in value.items():
            if str(key).strip().lower() in _ANSWER_KEYS and _scalar(item) is not None:
                return _scalar(item) or ""
        return ""
    if value is not _NOTHING and _scalar(value) is not None:
        return _scalar(value) or ""
    label = next(
        (m for m in _LABEL.finditer(text) if m.group("kind").lower().startswith("a") and _is_label(text, m)),
        None,
    )
    if label is not None:
        text = text[label.end() :]
    return _tidy(_BLANK_LINE.split(text.strip(), 1)[0])


class _Nothing:
    pass


_NOTHING: Any = _Nothing()


def _parse_text(text: str, depth: int) -> ParsedOutput:
    text = _clean(text)
    if not text:
        return ParsedOutput()
    value = _loads(text)
    found = _from_json(value, depth)
    if found.pairs or isinstance(value, (dict, list)):  # valid JSON: no guessing at its text
        return _shaped(found, "json")
    for block in _FENCE.findall(text):
        found = _from_json(_loads(block.strip()), depth)
        if not found.pairs:
            found = _embedded(block, depth)
        if found.pairs:
            return _shaped(found, "json_fenced")
    found = _embedded(text, depth)
    if found.pairs:
        return _shaped(found, "json_embedded")
    partial = [(_unescape(m, "q"), _unescape(m, "a")) for m in _PARTIAL.finditer(text)]
    if not partial:
        partial = [(_unescape(m, "q"), _unescape(m, "a")) for m in _TUPLE.finditer(text)]
    if partial:
        return ParsedOutput(partial, 0, "json_partial")
    found = _tagged(text)
    if found.pairs:
        return _shaped(found, "tagged")
    found = _table(text)
    if found.pairs:
        return _shaped(found, "table")
    found = _labelled(text)
    if found.pairs:
        return _shaped(found, "labelled")
    found = _lines(text)
    if found.pairs:
        return _shaped(found, "lines")
    return ParsedOutput([], found.malformed, "none")


def _clean(text: str) -> str:
    if not isinstance(text, str):
        return ""
    text = text[:MAX_PARSE_CHARS].replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    return _THINK.sub("", text).strip()


def _shaped(found: ParsedOutput, shape: str) -> ParsedOutput:
    return ParsedOutput(found.pairs, found.malformed, shape, found.types)


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except (orjson.JSONDecodeError, RecursionError):
        return _NOTHING


def _embedded(text: str, depth: int) -> ParsedOutput:
    """Every JSON value that starts at a brace or bracket, outside earlier values."""
    decoder = json.JSONDecoder()
    pairs: list[tuple[str, str]] = []
    types: list[str | None] = []
    malformed = 0
    position, tries = 0, 0
    while tries < MAX_JSON_STARTS:
        match = _JSON_START.search(text, position)
        if match is None:
            break
        tries += 1
        try:
            value, end = decoder.raw_decode(text, match.start())
        except (ValueError, RecursionError):
            position = match.start() + 1
            continue
        found = _from_json(value, depth)
        types += found.pair_types()
        pairs += found.pairs
        malformed += found.malformed
        position = max(end, match.start() + 1)
    return ParsedOutput(pairs, malformed, types=types)


def _from_json(value: Any, depth: int) -> ParsedOutput:
    """Pairs in a decoded JSON value; empty when the value does not look like a list of pairs."""
    if depth > MAX_DEPTH or value is _NOTHING:
        return ParsedOutput()
    if isinstance(value, str):
        return _parse_text(value, depth + 1) if depth < 2 else ParsedOutput()
    if isinstance(value, list):
        return _from_list(value)
    if not isinstance(value, dict):
        return ParsedOutput()
    single = _pair_from_dict(value)
    if isinstance(single, tuple):
        return ParsedOutput([single], types=[_type_of(value)])
    if single is False:
        return ParsedOutput([], 1)
    keyed = {str(key).strip().lower(): item for key, item in value.items()}
    parallel = _parallel(keyed.get("questions"), keyed.get("answers"))
    if parallel.pairs:
        return parallel
    for key in _LIST_KEYS:
        found = _from_json(keyed.get(key, _NOTHING), depth + 1)
        if found.pairs or found.malformed:
            return found
    for item in value.values():
        if isinstance(item, (list, dict)):
            found = _from_json(item, depth + 1)
            if found.pairs or found.malformed:
                return found
    mapping = [(str(k).strip(), _scalar(v)) for k, v in value.items()]
    questions = [(q, a) for q, a in mapping if q.endswith(_QUESTION_ENDS) and a is not None]
    return ParsedOutput(questions) if questions else ParsedOutput()


def _parallel(questions: Any, answers: Any) -> ParsedOutput:
    """``{"questions": [...], "answers": [...]}``: two lists of the same length."""
    if not (isinstance(questions, list) and isinstance(answers, list)) or len(questions) != len(answers):
        return ParsedOutput()
    texts = [(_scalar(q), _scalar(a)) for q, a in zip(questions, answers, strict=True)]
    pairs = [(q, a) for q, a in texts if q is not None and a is not None]
    return ParsedOutput(pairs, len(texts) - len(pairs))


def _from_list(items: list[Any]) -> ParsedOutput:
    """Pairs in a list; empty unless some item is about pairs (an object with a question or answer
    key, or a two-item list), and then the other items are malformed."""
    turns = _turns(items)
    if turns is not None:
        return turns
    pairs: list[tuple[str, str]] = []
    types: list[str | None] = []
    malformed = 0
    about_pairs = False
    for item in items:
        pair: tuple[str, str] | bool | None = None
        if isinstance(item, dict):
            pair = _pair_from_dict(item)
            if isinstance(pair, tuple):
                types.append(_type_of(item))
        elif isinstance(item, list) and len(item) == 2:
            q, a = _scalar(item[0]), _scalar(item[1])
            pair = (q, a) if q is not None and a is not None else None
            if pair is not None:
                types.append(None)
        about_pairs = about_pairs or pair is not None
        if isinstance(pair, tuple):
            pairs.append(pair)
        else:
            malformed += 1
    return ParsedOutput(pairs, malformed, types=types) if about_pairs else ParsedOutput()


def _turns(items: list[Any]) -> ParsedOutput | None:
    """A conversation: each user turn's text paired with the assistant turn after it. None when the
    list is not one (no item names a role)."""
    roles = [_role(item) for item in items]
    if not any(roles):
        return None
    pairs: list[tuple[str, str]] = []
    malformed = 0
    pending: str | None = None
    for item, role in zip(items, roles, strict=True):
        text = _turn_text(item) if role else None
        if role == "user" and text is not None:
            malformed += pending is not None
            pending = text
        elif role == "assistant" and text is not None and pending is not None:
            pairs.append((pending, text))
            pending = None
        elif role != "system":
            malformed += 1
    return ParsedOutput(pairs, malformed + (pending is not None))


def _role(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    keyed = {str(key).strip().lower(): value for key, value in item.items()}
    role = keyed.get("from", keyed.get("role"))
    if not isinstance(role, str):
        return None
    role = role.strip().lower()
    if role in _USER_ROLES:
        return "user"
    if role in _ASSISTANT_ROLES:
        return "assistant"
    return "system" if role in ("system", "developer") else None


def _turn_text(item: dict[Any, Any]) -> str | None:
    keyed = {str(key).strip().lower(): value for key, value in item.items()}
    content = keyed.get("value", keyed.get("content"))
    if isinstance(content, list):  # OpenAI-style parts: keep the text ones
        parts = [part.get("text") for part in content if isinstance(part, dict)]
        content = "\n".join(p for p in parts if isinstance(p, str)) if any(parts) else None
    text = _scalar(content)
    return None if text is None else _IMAGE_TOKEN.sub("", text).strip()


def _pair_from_dict(item: dict[Any, Any]) -> tuple[str, str] | bool | None:
    """(question, answer); False when the object names a question or answer but is not a pair; None
    when it is not about pairs at all."""
    question = answer = _NOTHING
    for key, value in item.items():
        name = str(key).strip().lower()
        if name in _QUESTION_KEYS and question is _NOTHING:
            question = value
        elif name in _ANSWER_KEYS and answer is _NOTHING:
            answer = value
    if question is _NOTHING and answer is _NOTHING:
        keyed = {str(key).strip().lower(): value for key, value in item.items()}
        instruction = next((keyed[k] for k in _INSTRUCTION_KEYS if k in keyed), None)
        output = next((keyed[k] for k in _OUTPUT_KEYS if k in keyed), None)
        q, a = _scalar(instruction), _scalar(output)
        return (q, a) if q is not None and a is not None else None
    q, a = _scalar(question), _scalar(answer)
    if q is None or a is None:
        return False
    return (q, a)


def _type_of(item: dict[Any, Any]) -> str | None:
    for key, value in item.items():
        if str(key).strip().lower() in _TYPE_KEYS and isinstance(value, str):
            return value
    return None


def _scalar(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _unescape(match: re.Match[str], name: str) -> str:
    text = match.group(name)
    if match.group(f"{name}q") == "'":
        text = text.replace("\\'", "'").replace('"', '\\"')
    try:
        value = orjson.loads(f'"{text}"')
    except orjson.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text


def _tagged(text: str) -> ParsedOutput:
    """``<question>...</question><answer>...</answer>``, wherever the tags are."""
    segments: list[tuple[str, str | None, str]] = []
    for match in _TAG.finditer(text):
        kind = "q" if match.group("tag").lower().startswith("q") else "a"
        segments.append((kind, None, _tidy(_IMAGE_TOKEN.sub("", match.group("content")))))
    return _pair_in_order(segments) if segments else ParsedOutput()


def _table(text: str) -> ParsedOutput:
    """A Markdown table whose header names a question column and an answer column."""
    columns: tuple[int, int] | None = None
    pairs: list[tuple[str, str]] = []
    malformed = 0
    for line in text.split("\n"):
        row = _TABLE_ROW.match(line)
        if row is None:
            columns = None if pairs else columns
            continue
        cells = [_tidy(cell) for cell in row.group(1).split("|")]
        if _TABLE_RULE.match(row.group(1)):
            continue
        names = [cell.lower().rstrip(":") for cell in cells]
        q_col = next((i for i, n in enumerate(names) if n in ("question", "questions", "q")), None)
        a_col = next((i for i, n in enumerate(names) if n in ("answer", "answers", "a")), None)
        if q_col is not None and a_col is not None:
            columns = (q_col, a_col)
        elif columns is not None:
            if max(columns) < len(cells) and cells[columns[0]] and cells[columns[1]]:
                pairs.append((cells[columns[0]], cells[columns[1]]))
            else:
                malformed += 1
    return ParsedOutput(pairs, malformed)


def _labelled(text: str) -> ParsedOutput:
    segments: list[tuple[str, str | None, str]] = []  # (kind, number, content)
    matches = [m for m in _LABEL.finditer(text) if _is_label(text, m)]
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        kind = "q" if match.group("kind").lower() in ("q", "question", "user", "human") else "a"
        segments.append((kind, match.group("num"), _segment(text[match.end() : end])))
    if not segments:
        return ParsedOutput()
    numbered = _pair_by_number(segments)
    return numbered if numbered is not None else _pair_in_order(segments)


def _is_label(text: str, match: re.Match[str]) -> bool:
    kind, number, sep = match.group("kind"), match.group("num"), match.group("sep")
    before = text[max(0, match.start() - 64) : match.start()].rstrip(" \t*_#>-")  # a bounded look back
    before = re.sub(r"\d{1,3}[.)]$", "", before).rstrip(" \t")
    line_start = not before or before[-1] == "\n"
    if kind.lower() in _ROLE_LABELS:  # a conversation turn: "User:" opens a line or follows a sentence
        opens = line_start or before[-1] in f"{QUESTION_MARKS}.!"
        return sep in (":", "\uff1a") and number is None and opens
    if not sep:  # "Question 1" alone on its line, as a heading
        return line_start
    if len(kind) > 1:
        return True
    if number is None and sep not in (":", "\uff1a"):
        return False
    # A lone "A:" inside prose ("plan A: ...") is no label: it must open a line, follow the end of
    # a question or sentence, or carry a number.
    return number is not None or line_start or before[-1] in f"{QUESTION_MARKS}.!,;|)"


def _segment(content: str) -> str:
    content = _BLANK_LINE.split(_IMAGE_TOKEN.sub("", content).strip(), 1)[0]
    lines = [line for line in content.split("\n") if not _MARKUP_ONLY.match(line)]
    return _TRAILING_ARROW.sub("", _tidy(" ".join(lines)).rstrip(",;")).strip()


def _tidy(text: str) -> str:
    text = _BOLD.sub("", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1]
    return text.strip()


def _pair_by_number(segments: list[tuple[str, str | None, str]]) -> ParsedOutput | None:
    """Q1..Qn then A1..An (or interleaved): pair by number when every label has a distinct one."""
    if any(number is None for _, number, _ in segments):
        return None
    questions = {int(n): c for kind, n, c in segments if kind == "q" and n is not None}
    answers = {int(n): c for kind, n, c in segments if kind == "a" and n is not None}
    if len(questions) + len(answers) != len(segments) or not questions:
        return None
    pairs = [(questions[n], answers[n]) for n in questions if n in answers]
    malformed = len(questions) + len(answers) - 2 * len(pairs)
    return ParsedOutput(pairs, malformed)


def _pair_in_order(segments: list[tuple[str, str | None, str]]) -> ParsedOutput:
    pairs: list[tuple[str, str]] = []
    malformed = 0
    pending: str | None = None
    for kind, _, content in segments:
        if kind == "q":
            if pending is not None:
                malformed += 1
            pending = content
        elif pending is not None:
            pairs.append((pending, content))
            pending = None
        else:
            malformed += 1
    return ParsedOutput(pairs, malformed + (pending is not None))


def _lines(text: str) -> ParsedOutput:
    pairs: list[tuple[str, str]] = []
    malformed = 0
    pending: str | None = None
    for raw in text.split("\n"):
        line = _tidy(_LIST_MARK.sub("", raw))
        if not line or line[0] in "{[":  # broken JSON is no question
            continue
        inline = _INLINE_PAIR.match(line)
        if inline is not None and not inline.group("a").endswith(_QUESTION_ENDS):
            malformed += pending is not None
            pending = None
            pairs.append((_tidy(inline.group("q")), _tidy(_ANSWER_PREFIX.sub("", inline.group("a")))))
        elif line.endswith(_QUESTION_ENDS):
            malformed += pending is not None
            pending = line
        elif pending is not None:
            pairs.append((pending, _tidy(_ANSWER_PREFIX.sub("", line))))
            pending = None
    return ParsedOutput(pairs, malformed + (pending is not None))
