"""Smoke test of the vLLM engine on the tiny offline Qwen2.5-VL: real processor, template, grammar.

Builds the tiny model (if needed), starts ``VLLMEngine``, sends concurrent requests with generated
images (one with two images) asking for question-answer pairs under a JSON schema, checks every
output with strict ``json.loads`` and the 3-5 pair count, prints timings, runs the batch again with a
``"pattern": "\\\\S"`` schema (no blank strings), shuts down and checks that no child process is left.
Then runs the same requests through ``offline_chat`` and prints images/s for both paths.

    .venv/bin/python ops/smoke_engine.py [--model-dir DIR] [--requests 8] [--skip-offline]

Exit status 0 only if every output was valid. CPU-only and offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Runnable as a plain script from a checkout: make `workers` and the sibling builder importable.
for _path in (ROOT, ROOT / "ops"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "qa_pairs": {
            "type": "array",
            "minItems": 3,
            "maxItems": 5,
            "items": {
                "type": "object",
                "properties": {
                    "question": {"type": "string", "minLength": 1, "maxLength": 80},
                    "answer": {"type": "string", "minLength": 1, "maxLength": 80},
                },
                "required": ["question", "answer"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["qa_pairs"],
    "additionalProperties": False,
}
PROMPT = (
    "Look at the image and write 3 to 5 question-answer pairs about what it shows. "
    'Reply with JSON only: {"qa_pairs": [{"question": "...", "answer": "..."}]}'
)
SYSTEM = "You are a careful annotator who writes short visual questions and answers."


def _schema_with_pattern(pattern: str) -> dict[str, Any]:
    schema = copy.deepcopy(SCHEMA)
    for prop in schema["properties"]["qa_pairs"]["items"]["properties"].values():
        prop["pattern"] = pattern
    return schema


def make_image(i: int):  # -> PIL.Image.Image
    """A deterministic synthetic picture: gradient background, a few shapes, varying size."""
    from PIL import Image, ImageDraw

    sizes = [(224, 224), (320, 240), (640, 480), (256, 384), (500, 300)]
    w, h = sizes[i % len(sizes)]
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    draw = ImageDraw.Draw(img)
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    for k in range(3):
        x, y = (37 * (i + k) * 7) % (w - 60), (53 * (i + 2 * k)) % (h - 60)
        box = (x, y, x + 40 + 10 * k, y + 40 + 5 * k)
        shape = draw.ellipse if (i + k) % 2 else draw.rectangle
        shape(box, fill=colors[(i + k) % len(colors)])
    draw.text((5, 5), f"image {i}", fill="white")
    return img


def make_requests(n: int, schema: dict[str, Any], tag: str) -> list:
    from workers.engines.base import EngineRequest, SamplingSettings

    sampling = SamplingSettings(temperature=0.7, top_p=0.9, max_tokens=1024)
    reqs = [
        EngineRequest(
            request_id=f"{tag}-{i}",
            images=[make_image(i)],
            prompt=PROMPT,
            system_prompt=SYSTEM if i % 2 else None,
            json_schema=schema,
            sampling=sampling,
        )
        for i in range(n)
    ]
    reqs.append(
        EngineRequest(
            request_id=f"{tag}-two-images",
            images=[make_image(n), make_image(n + 1)],
            prompt="Compare the two images. " + PROMPT,
            json_schema=schema,
            sampling=sampling,
        )
    )
    return reqs


def check_output(text: str) -> tuple[bool, int, str]:
    """(valid, blank strings, reason): strict JSON (no raw control chars), 3-5 pairs, strings."""
    try:
        data = json.loads(text)  # strict=True: control characters inside strings are rejected
    except json.JSONDecodeError as exc:
        return False, 0, f"json: {exc}"
    pairs = data.get("qa_pairs") if isinstance(data, dict) else None
    if not isinstance(pairs, list) or not 3 <= len(pairs) <= 5:
        return False, 0, f"pair count {len(pairs) if isinstance(pairs, list) else None}"
    blank = 0
    for pair in pairs:
        if set(pair) != {"question", "answer"}:
            return False, blank, f"keys {sorted(pair)}"
        for value in pair.values():
            if not isinstance(value, str) or not value:
                return False, blank, "empty or non-string value"
            blank += not value.strip()
    return True, blank, "ok"


def child_processes() -> list:
    """Our live descendants, minus multiprocessing's resource tracker (it exits with us)."""
    import psutil

    children = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if "resource_tracker" in " ".join(proc.cmdline()):
                continue
            children.append(proc)
        except psutil.NoSuchProcess:
            continue
    return children


def wait_no_children(timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while (left := child_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


async def run_batch(engine, requests: list, label: str) -> tuple[int, int, float]:
    """Send all requests concurrently; print one line each. Returns (valid, blank, wall seconds)."""

    async def one(req):
        t = time.perf_counter()
        text = await engine.generate(req)
        return req, text, time.perf_counter() - t

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in requests))
    wall = time.perf_counter() - t0
    valid = blank = 0
    for req, text, dt in results:
        ok, n_blank, why = check_output(text)
        valid += ok
        blank += n_blank
        print(f"[smoke] {label} {req.request_id:>16} {dt:6.2f}s images={len(req.images)} "
              f"valid={ok} ({why}) blank={n_blank} {text[:70]!r}")  # fmt: skip
    lat = sorted(dt for _, _, dt in results)
    print(f"[smoke] {label}: {valid}/{len(results)} strictly valid, {blank} blank strings, "
          f"latency min/median/max {lat[0]:.2f}/{lat[len(lat) // 2]:.2f}/{lat[-1]:.2f}s, "
          f"wall {wall:.2f}s")  # fmt: skip
    return valid, blank, wall


async def run_async(config, n: int) -> tuple[bool, float]:
    from workers.engines.vllm import VLLMEngine

    engine = VLLMEngine(config)
    t0 = time.perf_counter()
    await engine.start()
    print(f"[smoke] engine start: {time.perf_counter() - t0:.1f}s")
    try:
        # One warm-up request: the first one pays the processor and grammar-compiler warm-up.
        t = time.perf_counter()
        await engine.generate(make_requests(1, SCHEMA, "warmup")[0])
        print(f"[smoke] warm-up request: {time.perf_counter() - t:.2f}s")

        requests = make_requests(n, SCHEMA, "req")
        valid, _, wall = await run_batch(engine, requests, "schema")
        images = sum(len(r.images) for r in requests)
        ips = images / wall

        pattern_reqs = make_requests(n, _schema_with_pattern("\\S"), "pat")
        p_valid, p_blank, _ = await run_batch(engine, pattern_reqs, "pattern")
        all_ok = valid == len(requests) and p_valid == len(pattern_reqs) and p_blank == 0
    finally:
        t = time.perf_counter()
        await engine.shutdown()
        print(f"[smoke] engine shutdown: {time.perf_counter() - t:.1f}s")
    print(f"[smoke] AsyncLLM path: {images} images in {wall:.2f}s = {ips:.1f} images/s")
    return all_ok, ips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".cache" / "tiny-qwen2.5-vl")
    parser.add_argument("--requests", type=int, default=8, help="single-image requests (+1 pair)")
    parser.add_argument("--skip-offline", action="store_true", help="skip the LLM.chat comparison")
    args = parser.parse_args(argv)

    from build_tiny_model import build_tiny_model

    from workers.engines.vllm import VLLMEngineConfig, offline_chat

    t = time.perf_counter()
    model = build_tiny_model(args.model_dir)
    print(f"[smoke] tiny model at {model} ({time.perf_counter() - t:.1f}s)")
    config = VLLMEngineConfig(
        model=str(model),
        max_model_len=4096,
        max_num_seqs=16,
        enforce_eager=True,  # torch.compile of a tiny model on CPU: ~40 s more start, no gain
        # On CPU gpu_memory_utilization means a fraction of host RAM; a fixed small KV cache instead.
        extra_engine_args={"kv_cache_memory_bytes": 512 * 2**20},
    )

    ok, async_ips = asyncio.run(run_async(config, args.requests))
    left = wait_no_children()
    print(f"[smoke] child processes after shutdown: {[(p.pid, p.name()) for p in left]}")
    ok = ok and not left

    if not args.skip_offline:
        requests = make_requests(args.requests, SCHEMA, "offline")
        stats: dict[str, float] = {}
        texts = offline_chat(config, requests, stats=stats)
        valid = sum(check_output(t)[0] for t in texts)
        images = sum(len(r.images) for r in requests)
        offline_ips = images / stats["generate_s"]
        print(f"[smoke] offline LLM.chat: start {stats['start_s']:.1f}s, {valid}/{len(texts)} valid, "
              f"{images} images in {stats['generate_s']:.2f}s = {offline_ips:.1f} images/s "
              f"(AsyncLLM path {async_ips:.1f} images/s)")  # fmt: skip
        left = wait_no_children()
        print(f"[smoke] child processes after offline run: {[(p.pid, p.name()) for p in left]}")
        ok = ok and valid == len(texts) and not left

    print(f"[smoke] {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":  # required: vLLM spawns EngineCore, which re-imports __main__
    sys.exit(main())
