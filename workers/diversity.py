"""The job-wide template-share gate (``max_template_share``): a pair whose question template already
has that share of the job's kept pairs is dropped as ``template_overused``.

A question's template is `producer.templates.question_template` (content words masked). Templates
that are near-duplicates count as one group: each template gets a MinHash (datasketch, `NUM_PERM`
permutations over its set of words), cut into `BANDS` bands; a template that shares a band with an
earlier one joins that one's group (locality-sensitive hashing: templates whose word sets have a
Jaccard similarity of about 0.8 or more almost always meet in some band, below 0.5 almost never), so
``what colour is the *`` and ``what is the colour of the *`` count together, ``how many * are there``
apart.

The state is one Redis hash per job, shared by every worker: pairs kept in all, pairs per group, and
band -> group. One Lua script per generation try reads and updates it atomically, so concurrent
workers see exact counts. The rule applies once the job has `WARMUP_PAIRS` kept pairs (before that a
few pairs would make any template a large share). The hash expires `GATE_TTL_S` after its last use and
goes with ``JobRecord.reset``. It counts pairs when a worker keeps them, so pairs of rows that fail
later still count (the job status counts written pairs only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import redis
from datasketch import MinHash

from producer.broker import with_redis_retry
from producer.constants import job_template_gate_key
from producer.contract import QAPair
from producer.templates import question_template
from workers.qa import Rejection

NUM_PERM = 64
"""MinHash permutations per template."""
BANDS = 8
"""LSH bands (of ``NUM_PERM / BANDS`` rows each): two templates meet when one band matches."""
WARMUP_PAIRS = 20
"""The share rule applies once the job has kept this many pairs."""
GATE_TTL_S = 7 * 24 * 3600
"""The gate's hash expires this long after its last use."""
REDIS_RETRY_S = 60.0
"""How long a try waits for Redis to come back before the row fails."""

_ADMIT = """
local key = KEYS[1]
local share, warmup, bands, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local verdicts = {}
local i = 5
while i <= #ARGV do
  local group = nil
  for j = 1, bands do
    group = redis.call('HGET', key, 'b:' .. ARGV[i + j])
    if group then break end
  end
  group = group or ARGV[i]
  local total = tonumber(redis.call('HGET', key, 'total') or '0')
  local count = tonumber(redis.call('HGET', key, 'n:' .. group) or '0')
  if total >= warmup and count + 1 > share * (total + 1) then
    verdicts[#verdicts + 1] = 0
  else
    redis.call('HINCRBY', key, 'n:' .. group, 1)
    redis.call('HINCRBY', key, 'total', 1)
    for j = 1, bands do redis.call('HSETNX', key, 'b:' .. ARGV[i + j], group) end
    verdicts[#verdicts + 1] = 1
  end
  i = i + 1 + bands
end
redis.call('EXPIRE', key, ttl)
return verdicts
"""
"""KEYS: the gate hash. ARGV: share, warm-up, bands, TTL, then per pair its template and band keys.
Returns 1 (kept, counted) or 0 (over the share) per pair."""


def template_bands(template: str) -> list[str]:
    """The LSH band keys of a template's MinHash."""
    words = template.split()
    minhash = MinHash(num_perm=NUM_PERM, seed=1)
    for token in set(words):
        minhash.update(token.encode())
    rows = NUM_PERM // BANDS
    values = minhash.hashvalues
    keys = []
    for band in range(BANDS):
        digest = hashlib.blake2b(values[band * rows : (band + 1) * rows].tobytes(), digest_size=8)
        keys.append(f"{band}:{digest.hexdigest()}")
    return keys


class TemplateGate:
    """Admits pairs to a job under its ``max_template_share`` (see the module docstring)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._script = r.register_script(_ADMIT)

    def admit(
        self, job_id: str, pairs: Sequence[QAPair], max_share: float
    ) -> tuple[list[QAPair], list[Rejection]]:
        """The pairs within the share (now counted), and the others as ``template_overused``."""
        if not pairs:
            return [], []
        args: list[str | float | int] = [max_share, WARMUP_PAIRS, BANDS, GATE_TTL_S]
        for pair in pairs:
            template = question_template(pair.question)
            args += [template, *template_bands(template)]
        key = job_template_gate_key(job_id)
        verdicts = with_redis_retry(lambda: self._script(keys=[key], args=args), REDIS_RETRY_S)
        kept = [pair for pair, ok in zip(pairs, verdicts, strict=True) if ok]
        dropped = [
            Rejection("template_overused", pair.question, pair.answer)
            for pair, ok in zip(pairs, verdicts, strict=True)
            if not ok
        ]
        return kept, dropped
