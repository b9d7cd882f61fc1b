"""Feeding a GPU: how many images/s one worker's CPU work delivers per core, and how it scales with cores.

On a GPU the model is fast and the worker's CPU work per image limits it: reading and decoding the image,
downscaling it, vLLM's multimodal input processing (the Qwen2.5-VL image processor, in the worker's
process), Celery, Redis and the checks. This bench runs the real worker (``imageqa worker``, Celery
threads pool) with the ``simgpu`` engine (`workers.engines.simgpu`): vLLM's real renderer and input
processing for the model, then a simulated GPU that holds each request ``--service-s`` with ``--slots``
at once and costs no CPU. Rows go through the real producer, Redis and collector.

The model is the tiny Qwen2.5-VL checkpoint with its processor set to the pixel bounds of the released
Qwen2.5-VL models (4 to 16384 vision tokens per image), so the processor does a 3B deployment's work.
Images are generated here: 12 MP phone JPEGs (4032x3024, some portrait through EXIF), 1080p JPEGs and
1600x1200 PNGs, every one distinct (vLLM caches processed images by content). The worker is pinned to
1, then 2 CPUs (the rest of the bench to the other CPU when there is one); its CPU time is summed over
its process and all its children. Prints a table and ``BENCH name=value target=value`` lines:

- ``gpu_feed_<set>_images_per_s_per_core``: images per CPU-second of the worker (images/s / cores busy);
- ``gpu_feed_scaling_2_over_1_cores``: images/s on 2 CPUs over images/s on 1 (12 MP set);
- ``gpu_feed_<set>_share_of_gpu``: images/s on the most CPUs over the simulated GPU's capacity.

    python ops/bench_gpufeed.py --model .cache/tiny-qwen2.5-vl
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import psutil
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "ops"))

from bench_images import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, photo  # noqa: E402
from benchlib import collect_job, private_redis, stop_children, wait_ready  # noqa: E402

from producer.contract import GenerationParams  # noqa: E402
from tests.helpers import write_jsonl  # noqa: E402

# (name, width, height, format): the classes of generated images.
PHONE = ("12mp", 4032, 3024, "JPEG")
HD = ("1080p", 1920, 1080, "JPEG")
PNG = ("png", 1600, 1200, "PNG")
SETS = {"12mp": [PHONE], "mixed": [PHONE, HD, PNG]}


@dataclass
class Run:
    cores: int
    set_name: str
    images: int
    elapsed_s: float
    cpu_s: float
    main_cpu_s: float
    failed: int
    variant: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s

    @property
    def per_core(self) -> float:
        return self.images / self.cpu_s

    @property
    def main_ms(self) -> float:
        """CPU milliseconds per image in the worker's own process (the rest is in its children)."""
        return 1000 * self.main_cpu_s / self.images

    @property
    def cores_busy(self) -> float:
        return self.cpu_s / self.elapsed_s


def model_with_released_processor(tiny: Path, folder: Path) -> Path:
    """A copy of the tiny checkpoint whose image processor has the released Qwen2.5-VL pixel bounds
    (the tiny one caps images at 401,408 pixels to keep CPU tests fast)."""
    target = folder / "model"
    shutil.copytree(tiny, target)
    size = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = target / name
        if path.exists():
            config = json.loads(path.read_text())
            (config if key is None else config[key])["size"] = size
            path.write_text(json.dumps(config, indent=2))
    return target


_bases: dict[str, list[Image.Image]] = {}
_made = itertools.count()


def make_images(folder: Path, kind: tuple[str, int, int, str], n: int, tag: str) -> list[Path]:
    """``n`` distinct photo-like images of one class: three generated photos, each copy marked with a
    patch of its own, so no two files decode to the same pixels. Every fourth phone photo is stored
    landscape with EXIF orientation 6 (portrait), as phones do."""
    name, width, height, fmt = kind
    if name not in _bases:
        _bases[name] = [photo(width, height, seed=zlib.crc32(f"{name}{k}".encode())) for k in range(3)]
    bases = _bases[name]
    paths = []
    for i in range(n):
        image = bases[i % len(bases)].copy()
        draw = ImageDraw.Draw(image)
        k = next(_made)
        x, y = (97 * k) % (width - 64), (53 * k) % (height - 64)
        draw.rectangle((x, y, x + 63, y + 63), fill=((37 * k) % 256, (91 * k) % 256, (13 * k) % 256))
        path = folder / f"{tag}-{name}-{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        if fmt == "JPEG":
            exif = Image.Exif()
            if name == "12mp" and i % 4 == 3:
                exif[0x0112] = 6
            image.save(path, "JPEG", quality=90, exif=exif.tobytes())
        else:
            image.save(path, "PNG")
        paths.append(path)
    return paths


def image_set(folder: Path, set_name: str, n: int, tag: str) -> list[Path]:
    kinds = SETS[set_name]
    per_kind = [make_images(folder, kind, -(-n // len(kinds)), f"{tag}-{set_name}") for kind in kinds]
    mixed = [path for group in zip(*per_kind, strict=True) for path in group]
    return mixed[:n]


def images_in(folder: Path, n: int) -> tuple[dict[str, list[Path]], list[Path]]:
    """The image sets (all distinct: vLLM answers a repeated image from its cache; every run has a new
    worker) and the warm-up images, generated into ``folder`` unless an earlier run left them there."""
    listing = folder / f"images-{n}.json"
    if listing.exists():
        saved = json.loads(listing.read_text())
        return {k: [Path(p) for p in v] for k, v in saved["sets"].items()}, [Path(p) for p in saved["warm"]]
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sets = {name: image_set(folder, name, n, name) for name in SETS}
    warm = image_set(folder, "mixed", 9, "warm")
    print(f"generated {2 * n + len(warm)} images in {time.perf_counter() - started:.0f} s", flush=True)
    saved = {"sets": {k: [str(p) for p in v] for k, v in sets.items()}, "warm": [str(p) for p in warm]}
    listing.write_text(json.dumps(saved))
    return sets, warm


def tree_cpu_s(proc: psutil.Process) -> tuple[float, float]:
    """User + system CPU seconds of ``proc`` and every live child (threads included), and of ``proc``."""
    main = total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
        if p is proc:
            main = times.user + times.system
    return total, main


def feed(
    redis_url: str, folder: Path, images: list[Path], params: GenerationParams, tag: str
) -> tuple[float, int]:
    """Enqueues one row per image and waits until all are collected; returns (seconds, failed rows)."""
    rows = [{"image": str(p), "i": i} for i, p in enumerate(images)]
    source = write_jsonl(folder / f"in-{tag}.jsonl", rows)
    elapsed, status = collect_job(redis_url, source, folder, tag, params)
    if status.failed:
        errors = folder / f"out-{tag}.errors.jsonl"
        codes = collections.Counter(json.loads(line)["error"]["code"] for line in errors.open())
        print(f"  failed rows in {tag}: {dict(codes)}", flush=True)
    return elapsed, status.failed


def _pinned_child(cpus: list[int]) -> None:
    """In the worker before it runs: pinned to ``cpus``, and it stops when this bench dies."""
    os.sched_setaffinity(0, set(cpus))
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def run_cores(
    args: argparse.Namespace,
    env: dict[str, str],
    folder: Path,
    cpus: list[int],
    others: list[int],
    sets: dict[str, list[Path]],
    warm: list[Path],
    params: GenerationParams,
    round_no: int,
    variant: str,
) -> list[Run]:
    """One worker pinned to ``cpus`` (this process to ``others``): warm-up, then each image set."""
    tag = f"{variant}-{len(cpus)}-{round_no}"
    if env.get("IMAGEQA_PREPROCESS_WORKERS") == "cpus":  # a pool as large as the CPUs of this run
        env = {**env, "IMAGEQA_PREPROCESS_WORKERS": str(len(cpus))}
    log_path = folder / f"worker-{tag}.log"
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(others or cpus))
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=lambda: _pinned_child(cpus),
        )
    runs = []
    try:
        wait_ready(log_path, proc)
        worker = psutil.Process(proc.pid)
        feed(args.redis_url, folder, warm, params, f"warm-{tag}")
        for set_name, images in sets.items():
            total_before, main_before = tree_cpu_s(worker)
            elapsed, failed = feed(args.redis_url, folder, images, params, f"{set_name}-{tag}")
            total, main = tree_cpu_s(worker)
            cpu_s, main_s = total - total_before, main - main_before
            runs.append(Run(len(cpus), set_name, len(images), elapsed, cpu_s, main_s, failed, variant))
            run = runs[-1]
            print(
                f"round {round_no + 1}, {variant}, {len(cpus)} CPU(s), {set_name:>5}:"
                f" {run.images_per_s:6.1f} images/s,"
                f" {run.cores_busy:4.2f} cores busy, {run.per_core:6.1f} images/s per core,"
                f" {run.main_ms:5.1f} ms CPU per image in the worker process"
                + (f" ({failed} failed rows)" if failed else ""),
                flush=True,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.sched_setaffinity(0, mine)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the tiny Qwen2.5-VL checkpoint")
    parser.add_argument("--n", type=int, default=128, help="images per set and run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--service-s", type=float, default=0.64, help="simulated GPU time per request")
    parser.add_argument("--slots", type=int, default=64, help="requests the simulated GPU holds at once")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--cores", default="1,2", help="CPU counts to pin the worker to")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra worker setting (repeatable); IMAGEQA_PREPROCESS_WORKERS=cpus: a pool of the run's CPUs",
    )
    parser.add_argument(
        "--baseline-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="also run a baseline worker with these settings, alternating with the other (repeatable)",
    )
    parser.add_argument("--redis-url", help="default: a private redis-server for the bench")
    parser.add_argument("--images-dir", type=Path, help="keep the generated images here, for later runs")
    args = parser.parse_args()
    allowed = sorted(os.sched_getaffinity(0))
    counts = [int(c) for c in args.cores.split(",")]
    if max(counts) > len(allowed):
        raise SystemExit(f"--cores {args.cores}: only {len(allowed)} CPUs available")
    capacity = args.slots / args.service_s
    params = GenerationParams(max_question_chars=64, max_answer_chars=64, generation_tries=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            model = model_with_released_processor(Path(args.model), folder)
            sets, warm = images_in(args.images_dir or folder, args.n)
            if args.redis_url:
                results = measure(args, folder, model, counts, allowed, sets, warm, params)
            else:
                with private_redis(folder) as url:
                    args.redis_url = url
                    results = measure(args, folder, model, counts, allowed, sets, warm, params)
    finally:
        stop_children()
    report(args, results, counts, capacity)


def measure(args, folder, model, counts, allowed, sets, warm, params) -> list[Run]:  # type: ignore[no-untyped-def]
    env = {
        **os.environ,
        "IMAGEQA_REDIS_URL": args.redis_url,
        "IMAGEQA_ENGINE": "simgpu",
        "IMAGEQA_MODEL": str(model),
        "IMAGEQA_MEDIA_ROOTS": os.pathsep.join([str(folder), str((args.images_dir or folder).resolve())]),
        "IMAGEQA_CONCURRENCY": str(args.concurrency),
        "IMAGEQA_MAX_MODEL_LEN": "32768",
        "IMAGEQA_SIMGPU_SERVICE_S": str(args.service_s),
        "IMAGEQA_SIMGPU_SLOTS": str(args.slots),
        "IMAGEQA_METRICS_PORT": "0",
        "PYTHONPATH": str(ROOT),
    }
    env |= dict(item.partition("=")[::2] for item in args.env)
    variants = {"main": env}
    if args.baseline_env:
        variants["baseline"] = env | dict(item.partition("=")[::2] for item in args.baseline_env)
    results: list[Run] = []
    for round_no in range(args.rounds):
        # Alternate which CPU count and variant go first, so drift in the machine's speed hits all.
        order = counts if round_no % 2 == 0 else counts[::-1]
        for count in order:
            cpus = allowed[-count:]
            others = [c for c in allowed if c not in cpus]
            names = list(variants) if round_no % 2 == 0 else list(variants)[::-1]
            for name in names:
                results += run_cores(
                    args, variants[name], folder, cpus, others, sets, warm, params, round_no, name
                )
    return results


def report(args: argparse.Namespace, runs: list[Run], counts: list[int], capacity: float) -> None:
    for variant in dict.fromkeys(r.variant for r in runs):
        results = [r for r in runs if r.variant == variant]
        suffix = "" if variant == "main" else f"_{variant}"
        settings = " ".join(args.env + (args.baseline_env if variant == "baseline" else []))
        report_variant(args, results, counts, capacity, suffix, f"{variant}: {settings or 'defaults'}")


def report_variant(
    args: argparse.Namespace, results: list[Run], counts: list[int], capacity: float, suffix: str, label: str
) -> None:
    def median(set_name: str, cores: int, attr: str) -> float:
        return statistics.median(
            getattr(r, attr) for r in results if r.set_name == set_name and r.cores == cores
        )

    print()
    print(
        f"Simulated GPU: {args.slots} slots x {args.service_s} s = {capacity:.0f} images/s;"
        f" {args.n} images per set and run; medians of {args.rounds} rounds. Worker {label}."
    )
    print()
    print(
        "| set | CPUs | images/s | cores busy | images/s per core | worker process ms/image | share of GPU |"
    )
    print("|---|---|---|---|---|---|---|")
    for set_name in SETS:
        for cores in counts:
            rate = median(set_name, cores, "images_per_s")
            print(
                f"| {set_name} | {cores} | {rate:.1f} | {median(set_name, cores, 'cores_busy'):.2f} |"
                f" {median(set_name, cores, 'per_core'):.1f} | {median(set_name, cores, 'main_ms'):.1f} |"
                f" {rate / capacity:.0%} |"
            )
    failed = sum(r.failed for r in results)
    if failed:
        print(f"note: {failed} rows failed")
    top = max(counts)
    for set_name in SETS:
        per_core = median(set_name, top, "per_core")
        print(f"BENCH gpu_feed_{set_name}_images_per_s_per_core{suffix}={per_core:.1f} target=-")
    if 1 in counts and 2 in counts:
        scaling = median("12mp", 2, "images_per_s") / median("12mp", 1, "images_per_s")
        target = "-" if suffix else "1.8"
        print(f"BENCH gpu_feed_scaling_2_over_1_cores{suffix}={scaling:.2f} target={target}")
    for set_name in SETS:
        share = median(set_name, top, "images_per_s") / capacity
        print(f"BENCH gpu_feed_{set_name}_share_of_gpu{suffix}={share:.2f} target=-")


if __name__ == "__main__":
    main()
