"""Image side of a worker, per core: decode + resize rate of a naive PIL loader vs the worker's
`workers.images.load_image`, and Qwen2.5-VL vision tokens per image before and after ``max_pixels``.

The image set is mixed: the real example photos, generated photo-like JPEGs of camera sizes (one of them
portrait via EXIF orientation, as phones store it) and two PNGs. The process is pinned to one CPU and
everything runs in one thread, so the rates are per core. Rounds alternate the two loaders (naive first,
then worker first, ...) so machine noise hits both; figures are medians over rounds. Vision tokens come
from the model's own image processor (``image_grid_thw``), offline. Prints tables and ``BENCH`` lines.

    python ops/bench_images.py --rounds 5 --model .cache/tiny-qwen2.5-vl
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageOps, ImageStat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import EXAMPLES  # noqa: E402
from workers.images import load_image, to_rgb  # noqa: E402
from workers.settings import ImageSettings  # noqa: E402

# The processor config shipped with Qwen/Qwen2.5-VL-*-Instruct: 4 to 16384 vision tokens per image.
# The tiny test checkpoint saves a smaller max (401408) to keep CPU tests fast; it is not what a real
# deployment sees, so the as-is column uses the real default unless --processor-max-pixels says otherwise.
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 16384 * 28 * 28

# (class, width, height, count, format, EXIF orientation)
GENERATED = [
    ("4032x3024", 4032, 3024, 3, "JPEG", 1),
    ("3024x4032 (EXIF 6)", 4032, 3024, 1, "JPEG", 6),
    ("1920x1080", 1920, 1080, 3, "JPEG", 1),
    ("1024x768", 1024, 768, 3, "JPEG", 1),
    ("640x480", 640, 480, 3, "JPEG", 1),
    ("PNG 1600x1200", 1600, 1200, 1, "PNG", 1),
    ("PNG 800x600 RGBA", 800, 600, 1, "PNG", 1),
]


@dataclass
class Sample:
    label: str
    path: Path
    size_bytes: int


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Photo-like content: gradients, textures at three scales, sensor noise and a few sharp shapes, so
    JPEG sizes (about 2 bits per pixel at quality 90) and decode work are those of real photos."""
    rng = np.random.default_rng(seed)
    gx = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    gy = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    tint_x = rng.uniform(0.3, 1, 3).astype(np.float32)
    tint_y = rng.uniform(0.3, 1, 3).astype(np.float32)
    out = 50 + 110 * gx * tint_x + 70 * gy * tint_y
    for cells, amplitude in ((6, 45), (48, 28), (320, 16)):
        small = amplitude * rng.standard_normal((max(2, cells * height // width), cells, 3), dtype=np.float32)
        for c in range(3):
            layer = Image.fromarray(np.ascontiguousarray(small[..., c])).resize(
                (width, height), Image.Resampling.BICUBIC
            )
            out[..., c] += np.asarray(layer)
    out += 5 * rng.standard_normal(out.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        w, h = int(rng.integers(width // 20, width // 4)), int(rng.integers(height // 20, height // 4))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    return image


def build_set(folder: Path) -> list[Sample]:
    """The example photos plus the generated classes, written to ``folder``."""
    samples = []
    for path in sorted(EXAMPLES.glob("*.jpg")):
        target = folder / f"example-{path.name}"
        target.write_bytes(path.read_bytes())
        samples.append(Sample("examples", target, target.stat().st_size))
    for k, (label, width, height, count, fmt, orientation) in enumerate(GENERATED):
        for i in range(count):
            image = photo(width, height, seed=100 * k + i)
            path = folder / f"gen{k}-{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
            if fmt == "JPEG":
                exif = Image.Exif()
                if orientation != 1:
                    exif[0x0112] = orientation
                image.save(path, "JPEG", quality=90, exif=exif.tobytes())
            elif "RGBA" in label:
                alpha = Image.linear_gradient("L").resize(image.size)
                image.putalpha(alpha)
                image.save(path, "PNG")
            else:
                image.save(path, "PNG")
            samples.append(Sample(label, path, path.stat().st_size))
    return samples


def capped_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def naive_load(path: Path, max_pixels: int) -> Image.Image:
    """What a plain loader does: open, full decode, RGB, one bicubic resize to fit ``max_pixels``."""
    image = Image.open(path)
    image.load()
    rgb = image.convert("RGB")
    size = capped_size(*rgb.size, max_pixels)
    return rgb if size == rgb.size else rgb.resize(size, Image.Resampling.BICUBIC)


def upright_full(path: Path) -> Image.Image:
    """Full-resolution decode, upright, RGB."""
    image = Image.open(path)
    image.load()
    return to_rgb(ImageOps.exif_transpose(image) or image)


def reference_load(path: Path, size: tuple[int, int]) -> Image.Image:
    """A full-resolution decode resized as the worker resizes: the quality reference."""
    upright = upright_full(path)
    if upright.size == size:
        return upright
    return upright.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def psnr(a: Image.Image, b: Image.Image) -> float:
    if a.size != b.size:
        return float("nan")
    mse = statistics.fmean(v * v for v in ImageStat.Stat(ImageChops.difference(a, b)).rms)
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def timed_pass(load: Callable[[Path], Image.Image], samples: list[Sample]) -> dict[str, float]:
    """Seconds per class for loading every sample once (decode + resize, output forced)."""
    seconds: dict[str, float] = {}
    for sample in samples:
        started = time.perf_counter()
        image = load(sample.path)
        image.getpixel((0, 0))
        seconds[sample.label] = seconds.get(sample.label, 0.0) + time.perf_counter() - started
    return seconds


def vision_tokens(model: Path, images: list[Image.Image], max_pixels: int) -> list[int]:
    """Image tokens per image from the checkpoint's image processor: t*h*w // merge_size**2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    image_processor = transformers.AutoProcessor.from_pretrained(str(model)).image_processor
    kwargs = {"size": {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": max_pixels}} if max_pixels else {}
    tokens = []
    for image in images:
        t, h, w = (int(v) for v in image_processor(images=[image], **kwargs)["image_grid_thw"][0])
        tokens.append(t * h * w // image_processor.merge_size**2)
    return tokens


def pin_one_cpu(cpu: int | None) -> int:
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[-1] if cpu is None else cpu
    os.sched_setaffinity(0, {chosen})
    return chosen


@dataclass
class Tokens:
    size: tuple[int, int]
    tokens: int


def token_table(
    model: Path, samples: list[Sample], settings: ImageSettings, processor_max_pixels: int
) -> tuple[dict[Path, Tokens], dict[Path, Tokens]]:
    """Per sample: the upright image as-is and the worker's capped output, with their vision tokens.
    Tokens depend on the size only, so the processor runs once per distinct size."""
    as_is = {s.path: upright_full(s.path) for s in samples}
    capped = {s.path: load_image(str(s.path), settings) for s in samples}
    by_size = {im.size: im for im in [*as_is.values(), *capped.values()]}
    keys = list(by_size)
    counts = dict(
        zip(keys, vision_tokens(model, [by_size[k] for k in keys], processor_max_pixels), strict=True)
    )
    return (
        {p: Tokens(im.size, counts[im.size]) for p, im in as_is.items()},
        {p: Tokens(im.size, counts[im.size]) for p, im in capped.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "tiny-qwen2.5-vl")
    parser.add_argument("--max-pixels", type=int, default=ImageSettings.model_fields["max_pixels"].default)
    parser.add_argument(
        "--processor-max-pixels",
        type=int,
        default=QWEN_MAX_PIXELS,
        help="the processor's max_pixels (default: Qwen2.5-VL's shipped 12845056; 0: what the --model "
        "checkpoint saved, 401408 for the tiny one)",
    )
    parser.add_argument("--cpu", type=int, help="the CPU to pin to (default: the last one allowed)")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    cpu = pin_one_cpu(args.cpu)
    if not (args.model / "preprocessor_config.json").exists():
        build = [sys.executable, str(ROOT / "ops" / "build_tiny_model.py"), "--out", str(args.model)]
        subprocess.run(build, check=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        samples = build_set(folder)
        settings = ImageSettings(media_roots=[folder], max_pixels=args.max_pixels)
        loaders: dict[str, Callable[[Path], Image.Image]] = {
            "naive": lambda path: naive_load(path, args.max_pixels),
            "worker": lambda path: load_image(str(path), settings),
        }
        for load in loaders.values():  # warm-up: page cache, codec tables
            timed_pass(load, samples)
        runs: dict[str, list[dict[str, float]]] = {"naive": [], "worker": []}
        for round_no in range(args.rounds):
            order = ["naive", "worker"] if round_no % 2 == 0 else ["worker", "naive"]
            for name in order:
                runs[name].append(timed_pass(loaders[name], samples))
            naive_s, worker_s = sum(runs["naive"][-1].values()), sum(runs["worker"][-1].values())
            print(f"round {round_no + 1}: naive {naive_s:.3f} s, worker {worker_s:.3f} s", flush=True)

        quality: dict[str | None, list[float]] = {None: []}
        for s in samples:
            output = load_image(str(s.path), settings)
            value = psnr(output, reference_load(s.path, output.size))
            quality.setdefault(s.label, []).append(value)
            quality[None].append(value)
        as_is, capped = token_table(args.model, samples, settings, args.processor_max_pixels)

    labels: list[str | None] = [*dict.fromkeys(s.label for s in samples), None]
    count = {label: sum(1 for s in samples if label in (None, s.label)) for label in labels}
    mbytes = {label: sum(s.size_bytes for s in samples if label in (None, s.label)) / 1e6 for label in labels}

    def rate(name: str, label: str | None, per: float) -> float:
        return statistics.median(per / _seconds(run, label) for run in runs[name])

    def speedup(label: str | None) -> float:
        pairs = zip(runs["naive"], runs["worker"], strict=True)
        return statistics.median(_seconds(a, label) / _seconds(b, label) for a, b in pairs)

    print()
    print(
        f"{count[None]} images ({mbytes[None]:.1f} MB), {args.rounds} rounds, loaders alternated; "
        f"pinned to CPU {cpu}, one thread; max_pixels={args.max_pixels}. MB/s: compressed file bytes. "
        "PSNR: worker output vs a full-resolution decode resized to the same size (min over the class)."
    )
    print()
    print(
        "| class | images | MB | naive img/s | worker img/s | naive MB/s | worker MB/s | worker/naive "
        "| PSNR dB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label in labels:
        n, mb = count[label], mbytes[label]
        print(
            f"| {label or '**all (mixed)**'} | {n} | {mb:.2f} | {rate('naive', label, n):.1f} "
            f"| {rate('worker', label, n):.1f} | {rate('naive', label, mb):.1f} "
            f"| {rate('worker', label, mb):.1f} | {speedup(label):.2f} | {min(quality[label]):.1f} |"
        )

    print()
    processor_max = args.processor_max_pixels or "the checkpoint's own"
    print(
        f"Vision tokens per image: {args.model.name}'s Qwen2.5-VL image processor, its max_pixels="
        f"{processor_max}; capped: after the worker's max_pixels={args.max_pixels}."
    )
    print()
    print("| class | size | tokens as-is | capped size | tokens capped | as-is/capped |")
    print("|---|---|---:|---:|---:|---:|")
    shown = set()
    for s in samples:
        big, small = as_is[s.path], capped[s.path]
        if (s.label, big.size) not in shown:
            shown.add((s.label, big.size))
            print(
                f"| {s.label} | {_dims(big.size)} | {big.tokens} | {_dims(small.size)} | {small.tokens} "
                f"| {big.tokens / small.tokens:.2f} |"
            )
    mean_asis = statistics.fmean(t.tokens for t in as_is.values())
    mean_capped = statistics.fmean(t.tokens for t in capped.values())
    print(
        f"| **mean (mixed set)** | | {mean_asis:.0f} | | {mean_capped:.0f} | {mean_asis / mean_capped:.2f} |"
    )
    print()

    big_label = GENERATED[0][0]
    print(f"BENCH images_per_s_per_core={rate('worker', None, count[None]):.1f} target=-")
    print(f"BENCH mb_per_s_per_core={rate('worker', None, mbytes[None]):.1f} target=-")
    print(f"BENCH naive_images_per_s_per_core={rate('naive', None, count[None]):.1f} target=-")
    print(f"BENCH decode_speedup_vs_naive={speedup(None):.2f} target=-")
    print(
        f"BENCH images_per_s_per_core_{big_label}={rate('worker', big_label, count[big_label]):.1f} target=-"
    )
    print(f"BENCH decode_speedup_vs_naive_{big_label}={speedup(big_label):.2f} target=-")
    print(f"BENCH psnr_db_min={min(quality[None]):.1f} target=-")
    for label in ("4032x3024", "1920x1080", "1024x768", "640x480"):
        first = next(s.path for s in samples if s.label == label)
        print(f"BENCH vision_tokens_{label}_asis={as_is[first].tokens} target=-")
        print(f"BENCH vision_tokens_{label}_capped={capped[first].tokens} target=-")
    print(f"BENCH vision_tokens_mean_asis={mean_asis:.0f} target=-")
    print(f"BENCH vision_tokens_mean_capped={mean_capped:.0f} target=-")


def _seconds(run: dict[str, float], label: str | None) -> float:
    return sum(run.values()) if label is None else run[label]


def _dims(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


if __name__ == "__main__":
    main()
