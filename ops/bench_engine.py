"""Engine parity: vLLM's offline ``LLM.chat`` over N images vs the worker path (enqueue -> collected).

Both use the same model, engine settings, prompt, JSON schema, sampling and image preprocessing; engine
start-up is excluded from both timings. Runs alternate (offline, worker, offline, worker, ...) so that
machine noise hits both. Prints a table and ``BENCH name=value target=value`` lines.

    python ops/bench_engine.py --model .cache/tiny-qwen2.5-vl --n 128 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import collect_job, wait_ready  # noqa: E402

from producer.broker import redis_client  # noqa: E402
from producer.contract import GenerationParams  # noqa: E402
from tests.helpers import EXAMPLES, make_images, write_jsonl  # noqa: E402


def prepare_images(folder: Path, n: int) -> list[Path]:
    """Real photos and generated images of several sizes, mixed."""
    real = sorted(EXAMPLES.glob("*.jpg"))
    generated = []
    for i, size in enumerate([(96, 64), (320, 240), (640, 480)]):
        generated += make_images(folder, n // 3 + 1, prefix=f"gen{i}-", size=size)
    images = []
    for i in range(n):
        images.append(real[i % len(real)] if i % 4 == 0 else generated[i % len(generated)])
    return images


def offline_run(
    args: argparse.Namespace, images: list[Path], params: GenerationParams, mode: str = "--offline-child"
) -> float:
    """Runs offline LLM.chat (or, with ``--async-child``, AsyncLLM fed from threads without Celery) in a
    subprocess with its own engine and returns images/s."""
    spec = {
        "model": args.model,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "params": params.model_dump(mode="json"),
        "images": [str(p) for p in images],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    done = subprocess.run([sys.executable, __file__, mode, f.name], capture_output=True, text=True, cwd=ROOT)
    os.unlink(f.name)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            return result["n"] / result["elapsed_s"]
    raise SystemExit(f"offline run failed:\n{done.stderr[-4000:]}")


def _child_setup(spec_path: str):  # type: ignore[no-untyped-def]
    """The child side of a bench path: its image list, the engine config a worker derives from the same
    settings, and a function making the worker's first request for one image (`prompts.prompt_spec`)."""
    from workers.engines import vllm_config
    from workers.engines.base import EngineRequest, SamplingSettings
    from workers.images import load_image
    from workers.prompts import prompt_spec
    from workers.settings import EngineSettings, ImageSettings

    spec = json.loads(Path(spec_path).read_text())
    params = GenerationParams.model_validate(spec["params"])
    config = vllm_config(
        EngineSettings(
            model=spec["model"],
            vllm={"max_model_len": spec["max_model_len"], "max_num_seqs": spec["max_num_seqs"]},
        )
    )
    prompt = prompt_spec(params, 1)
    sampling = SamplingSettings(
        temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens
    )
    image_settings = ImageSettings(media_roots=[Path("/")])

    def request(request_id: str, path: str) -> EngineRequest:
        return EngineRequest(
            request_id=request_id,
            images=[load_image(path, image_settings)],
            prompt=prompt.text,
            system_prompt=prompt.system_prompt,
            json_schema=prompt.json_schema,
            sampling=sampling,
        )

    return spec["images"], config, request


def async_child(spec_path: str, threads: int = 128) -> None:
    """The control: the worker's engine runtime (AsyncLLM on a background loop) fed from a thread pool
    directly, without Celery, Redis or the collector, so the bench can tell which side a gap is on."""
    from concurrent.futures import ThreadPoolExecutor

    from workers.engines.vllm import VLLMEngine
    from workers.runtime import EngineRuntime

    images, config, request = _child_setup(spec_path)
    runtime = EngineRuntime(VLLMEngine(config))
    runtime.start()

    def one(item: tuple[int, str]) -> str:
        return runtime.run(runtime.engine.generate(request(f"{item[0]}-{time.monotonic_ns()}", item[1])))

    items = list(enumerate(images))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, items[:8]))  # warm-up, as for the worker
        started = time.perf_counter()
        outputs = list(pool.map(one, items))
        elapsed = time.perf_counter() - started
    runtime.stop()
    print("RESULT", json.dumps({"n": len(outputs), "elapsed_s": elapsed}))


def offline_child(spec_path: str) -> None:
    """The offline side: load the images as a worker does, then one ``LLM.chat`` batch over all."""
    from workers.engines.vllm import offline_chat

    images, config, request = _child_setup(spec_path)
    # Timed: loading the images and the batch; not timed: the engine start (as for the worker).
    started = time.perf_counter()
    batch = [request(str(i), path) for i, path in enumerate(images)]
    load_s = time.perf_counter() - started
    stats: dict[str, float] = {}
    outputs = offline_chat(config, batch, stats=stats)
    print("RESULT", json.dumps({"n": len(outputs), "elapsed_s": load_s + stats["generate_s"]}))


def worker_run(redis_url: str, folder: Path, images: list[Path], params: GenerationParams, tag: str) -> float:
    rows = [{"image": str(p), "bench": tag, "i": i} for i, p in enumerate(images)]
    source = write_jsonl(folder / f"in-{tag}.jsonl", rows)
    elapsed, st = collect_job(redis_url, source, folder, tag, params)
    if st.failed:
        print(f"  note: {st.failed} of {st.total} rows failed validation in worker round {tag}")
    return len(images) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model")
    parser.add_argument("--offline-child", help=argparse.SUPPRESS)
    parser.add_argument("--async-child", help=argparse.SUPPRESS)
    parser.add_argument("--no-control", action="store_true", help="skip the AsyncLLM-without-Celery control")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--redis-url", default=os.environ.get("IMAGEQA_BENCH_REDIS", "redis://127.0.0.1:6379/12")
    )
    args = parser.parse_args()
    if args.offline_child:
        offline_child(args.offline_child)
        return
    if args.async_child:
        async_child(args.async_child)
        return
    if not args.model:
        parser.error("--model is required")
    # Greedy decoding: both paths then decode the same tokens for the same image, so the comparison
    # measures the serving path, not how long random-weight sampling happened to ramble. One request
    # per image on both sides: the worker's regeneration of rejected answers is switched off.
    params = GenerationParams(
        max_question_chars=40,
        max_answer_chars=40,
        max_tokens=1024,
        temperature=args.temperature,
        generation_tries=1,
    )

    r = redis_client(args.redis_url)
    r.flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = prepare_images(folder, args.n)
        env = {
            **os.environ,
            "IMAGEQA_REDIS_URL": args.redis_url,
            "IMAGEQA_MODEL": args.model,
            "IMAGEQA_ENGINE": "vllm",
            "IMAGEQA_MEDIA_ROOTS": os.pathsep.join([tmp, str(EXAMPLES)]),
            "IMAGEQA_CONCURRENCY": str(args.concurrency),
            "IMAGEQA_MAX_NUM_SEQS": str(args.max_num_seqs),
            "IMAGEQA_MAX_MODEL_LEN": str(args.max_model_len),
        }
        offline: list[float] = []
        worker: list[float] = []
        control: list[float] = []
        paths = ["offline", "worker"] + ([] if args.no_control else ["asyncllm"])
        for round_no in range(args.rounds):
            # Rotate which path goes first, so drift in the machine's speed hits each of them.
            shift = round_no % len(paths)
            for path in paths[shift:] + paths[:shift]:
                if path == "offline":
                    offline.append(offline_run(args, images, params))
                    figure = offline[-1]
                elif path == "worker":
                    worker.append(_worker_round(args, env, folder, images, params, round_no))
                    figure = worker[-1]
                else:
                    control.append(offline_run(args, images, params, mode="--async-child"))
                    figure = control[-1]
                print(f"round {round_no + 1}: {LABELS[path]:<40} {figure:6.1f} images/s", flush=True)
    ratios = [w / o for w, o in zip(worker, offline, strict=True)]
    print()
    print(f"{args.n} images per path and round; engine start excluded; greedy decoding (temperature 0).")
    print()
    header = "| round | offline LLM.chat | worker path | worker/offline |"
    print(header + (" AsyncLLM, no Celery | AsyncLLM/offline | worker/AsyncLLM |" if control else ""))
    print("|---" * (4 + (3 if control else 0)) + "|")
    for i, (o, w, q) in enumerate(zip(offline, worker, ratios, strict=True)):
        extra = f" {control[i]:.1f} | {control[i] / o:.2f} | {w / control[i]:.2f} |" if control else ""
        print(f"| {i + 1} | {o:.1f} | {w:.1f} | {q:.2f} |" + extra)
    print(f"BENCH engine_offline_images_per_s={statistics.median(offline):.1f} target=-")
    print(f"BENCH worker_images_per_s={statistics.median(worker):.1f} target=-")
    if control:
        control_ratio = statistics.median([c / o for c, o in zip(control, offline, strict=True)])
        print(f"BENCH asyncllm_over_offline={control_ratio:.2f} target=-")
        cluster_ratio = statistics.median([w / c for w, c in zip(worker, control, strict=True)])
        print(f"BENCH worker_over_asyncllm={cluster_ratio:.2f} target=-")
    print(f"BENCH worker_over_offline={statistics.median(ratios):.2f} target=0.95")


LABELS = {
    "offline": "offline LLM.chat",
    "worker": "worker path (enqueue -> collected)",
    "asyncllm": "AsyncLLM from threads, no Celery",
}


def _worker_round(args, env, folder, images, params, round_no) -> float:  # type: ignore[no-untyped-def]
    """Starts a worker (engine start not timed), warms it up, then times N images through it."""
    log_path = folder / f"worker-{round_no}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        wait_ready(log_path, proc)
        worker_run(args.redis_url, folder, images[:8], params, f"warm{round_no}")
        return worker_run(args.redis_url, folder, images, params, f"r{round_no}")
    finally:
        proc.terminate()
        proc.wait(120)


if __name__ == "__main__":
    main()
