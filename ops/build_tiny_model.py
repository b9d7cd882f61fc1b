"""Build a tiny random-weight Qwen2.5-VL checkpoint, fully offline, for tests and smoke runs.

The checkpoint is architecturally a real ``Qwen2_5_VLForConditionalGeneration`` (same config keys,
processor, chat template and special tokens as ``Qwen/Qwen2.5-VL-*-Instruct``), only tiny: a
byte-level BPE vocabulary of ~600 tokens trained on a few dozen sentences, a 2-layer text model
(hidden 64, 2 query heads / 1 KV head, head_dim 32) and a 2-block vision tower (hidden 64). So vLLM
runs its real multimodal path -- processor, chat template, image tokens, M-RoPE, grammar -- on a
CPU in milliseconds per request. Random weights write nonsense; constrained decoding makes it valid.

Usage::

    python ops/build_tiny_model.py [--out DIR]     # prints DIR; a no-op if DIR is already complete

From code: ``build_tiny_model(Path(...)) -> Path``. Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

# Never reach for a model hub: everything below is built from local objects.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_OUT = Path(".cache/tiny-qwen2.5-vl")
SEED = 1234
VOCAB_SIZE_BPE = 600  # trained vocabulary incl. the 256 byte symbols; special tokens come after
# Bumped whenever the recipe changes, so an old build in the same directory is rebuilt.
RECIPE_VERSION = "1"
MARKER = ".tiny-model-complete"

# Qwen2.5-VL's special tokens, in the real order (ids follow the trained vocabulary here).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
# Added but not "special" in the real tokenizer (they survive skip_special_tokens).
PLAIN_ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip

# The chat template shipped with Qwen/Qwen2.5-VL-*-Instruct (chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text: English about images plus JSON punctuation, so prompts and outputs tokenize into
# real merges rather than single bytes.
CORPUS = [
    "A photo of a red car parked on a quiet street.",
    "The image shows a dog running across a green field.",
    "Two people are sitting at a wooden table in a cafe.",
    "What color is the sky in this picture? The sky is blue.",
    "How many birds are in the photo? There are three birds.",
    "A close-up picture of a yellow flower with green leaves.",
    "The photograph was taken at night under bright street lights.",
    "A cat is sleeping on a soft white blanket near the window.",
    "The picture shows a mountain covered with snow.",
    "Children are playing with a ball in the park.",
    "What is the man holding? He is holding a camera.",
    "Where was this image taken? It was taken at the beach.",
    "The building in the background is tall and made of glass.",
    "A bowl of fresh fruit sits on the kitchen counter.",
    "Is there a person in the image? Yes, a woman is walking.",
    "The train is crossing a bridge over a wide river.",
    "Describe the scene: a busy market with many colorful stalls.",
    "The old portrait shows a woman in a dark dress.",
    "Question: what animal is shown? Answer: a brown horse.",
    "The boat floats on calm water at sunset.",
    "An aerial view of a city with roads and small houses.",
    "The table has a laptop, a cup of coffee and a notebook.",
    "Snow covers the trees and the path through the forest.",
    "The sign on the wall says open in large letters.",
    "A group of friends smiling for a photo at a party.",
    "What time of day is it? It looks like early morning.",
    "The photo is blurry, but a bicycle can be seen.",
    "Generate question and answer pairs about the image.",
    "Return JSON with a list of questions and answers.",
    'Output: {"qa_pairs": [{"question": "What is shown?", "answer": "A chair."}]}',
    '{"question": "How many cars?", "answer": "Two cars."}',
    "The left side of the image is darker than the right side.",
    "A plate of pasta with tomato sauce and cheese.",
    "The airplane is flying above white clouds.",
    "There is a clock on the tower showing ten o'clock.",
    "Is the weather sunny or rainy? It is raining.",
    "Patterns of light and shadow fall across the floor.",
    "The painting uses bright red, orange and purple colors.",
    "A small boy wears a blue hat and a striped shirt.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 appear on the screen.",
]


def _train_tokenizer():  # -> transformers.Qwen2TokenizerFast
    """Train a byte-level BPE with Qwen2's pre-tokenizer and wrap it as ``Qwen2TokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Train with exactly the pre-tokenization Qwen2TokenizerFast applies, so the merges fit it.
    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE_BPE,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    # Give the added tokens fixed ids right after the BPE vocabulary, in Qwen's order (as in the
    # real tokenizer.json); otherwise the constructor would number eos/pad first.
    vocab = dict(model["vocab"])
    for token in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS:
        vocab[token] = len(vocab)

    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",  # as in the Instruct checkpoints
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS,
        model_max_length=32768,
        errors="replace",
        split_special_tokens=False,
    )
    # Mark them as added tokens, so they are never split by the BPE and special ones are skipped
    # on decode (the ids come from the vocabulary above).
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _is_complete(out: Path) -> bool:
    marker = out / MARKER
    return marker.is_file() and marker.read_text().strip() == RECIPE_VERSION


def build_tiny_model(out: Path = DEFAULT_OUT) -> Path:
    """Build the tiny checkpoint into ``out`` (absolute path returned); skip if already complete.

    Deterministic (fixed seed, deterministic BPE training). Writes into a temporary sibling directory
    and renames it into place, so a crash never leaves a half-built model that looks complete.
    """
    out = Path(out).resolve()
    if _is_complete(out):
        return out

    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(SEED)
    tokenizer = _train_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = ((len(tokenizer) + 63) // 64) * 64  # padded like real checkpoints
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,  # head_dim 32: a size the CPU attention kernels accept
        "num_key_value_heads": 1,
        "max_position_embeddings": 32768,
        "max_window_layers": 2,
        "rms_norm_eps": 1e-6,
        # mrope_section (temporal, height, width) must sum to head_dim / 2 = 16.
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "dtype": "bfloat16",
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 64,  # = text hidden size: the merger projects into the LM
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    # Real checkpoints carry these flat at the top level too; some loaders read them there.
    config.vision_token_id = ids["<|vision_pad|>"]
    config.bos_token_id = text_config["bos_token_id"]
    config.eos_token_id = text_config["eos_token_id"]
    config.pad_token_id = text_config["pad_token_id"]

    model = Qwen2_5_VLForConditionalGeneration(config).bfloat16().eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        do_sample=True,
    )
    # Smaller than the real max (1280 merged tokens) so CPU tests stay fast; a 448x448 image is 256
    # vision tokens. Callers that want the real limit can pass mm_processor_kwargs.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=512 * 28 * 28)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),  # required by the processor; videos are unused
        chat_template=CHAT_TEMPLATE,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)  # processor_config.json, tokenizer, chat_template.jinja
        # The file layout of the real checkpoints, for loaders that predate processor_config.json.
        image_processor.save_pretrained(tmp)  # preprocessor_config.json
        (tmp / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
        (tmp / MARKER).write_text(RECIPE_VERSION + "\n")
        # mkdtemp makes a private 0700 directory; a model is read by other users and containers.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out))


if __name__ == "__main__":
    main()
