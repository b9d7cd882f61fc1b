"""Question templates: what is left of a question when its content words are masked.

``"What colour is the bus?"`` and ``"What colour is the red car?"`` share the template
``what colour is the *``; ``"How many people are at the stop?"`` is ``how many * are at the *``. The
question is lowercased, compatibility-normalised and stripped of punctuation; numbers become ``#``;
every word outside `FRAME_WORDS` (question words, auxiliaries, determiners, pronouns, prepositions
and the nouns and verbs that frame a question: ``colour``, ``kind``, ``doing``, ``say`` ...) becomes
``*``, runs of ``*`` become one, and at most `MAX_TEMPLATE_WORDS` words are kept. The collector counts
written pairs by template for the job status; `workers.diversity` also merges near-duplicate
templates (MinHash) for ``max_template_share``.
"""

from __future__ import annotations

import re
import unicodedata

MAX_TEMPLATE_WORDS = 8
"""Words of a template at most (the frame of a question is at its start)."""
_FRAME_LINES = (
    "what which who whom whose where when why how",
    "is are was were be been being am do does did can could will would should shall may might must",
    "has have had",
    "the a an this that these those there here it its they them their he him his she her you your i",
    "we our one any some each every all both either no not",
    "in on at of to from by with for near behind above below under over between next beside left right",
    "front back top bottom inside outside into onto around across along against through up down off",
    "and or than as",
    "many much colour color kind type shape size number name brand time weather material",
    "written write say says said read doing wearing holding visible shown made look looks happening",
)
FRAME_WORDS = frozenset(word for line in _FRAME_LINES for word in line.split())
"""Words a template keeps; every other word is content, masked as ``*``."""
_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]|_")
_NUMBER = re.compile(r"^\d+(?:[.,]\d+)?$")


def normal_question(question: str) -> str:
    """Lowercase, compatibility-normalised, without punctuation, single-spaced."""
    text = unicodedata.normalize("NFKC", question).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def question_template(question: str) -> str:
    """The question with its content words masked (see the module docstring)."""
    words: list[str] = []
    for word in normal_question(question).split():
        token = "#" if _NUMBER.match(word) else word if word in FRAME_WORDS else "*"
        if token == "*" and words and words[-1] == "*":
            continue
        words.append(token)
    return " ".join(words[:MAX_TEMPLATE_WORDS])
