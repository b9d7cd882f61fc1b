"""The simulated-GPU engine: vLLM's real input processing for the model, then a fixed service time with a
fixed number of requests at once, answering pairs that pass the checks."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from producer.contract import GenerationParams
from workers.engines import build_engine
from workers.engines.base import EngineRequest
from workers.generate import _generate_all
from workers.prompts import prompt_spec, verify_spec
from workers.qa import check_output
from workers.runtime import EngineRuntime
from workers.settings import EngineSettings

pytestmark = pytest.mark.engine

PARAMS = GenerationParams(max_question_chars=30, max_answer_chars=30)


def request(spec, image: Image.Image, i: int) -> EngineRequest:  # type: ignore[no-untyped-def]
    return EngineRequest(
        request_id=f"r{i}-{time.monotonic_ns()}",
        images=[image],
        prompt=spec.text,
        system_prompt=spec.system_prompt,
        json_schema=spec.json_schema,
    )


def test_the_simulated_gpu_holds_requests_in_its_slots_and_answers_valid_pairs(tiny_model):
    settings = EngineSettings(
        kind="simgpu",
        model=str(tiny_model),
        vllm={"max_model_len": 4096},
        simgpu={"service_s": 0.5, "slots": 2},
    )
    runtime = EngineRuntime(build_engine(settings, request_timeout_s=60))
    runtime.start()
    try:
        spec = prompt_spec(PARAMS, 1)
        images = [Image.radial_gradient("L").convert("RGB").resize((320 + 8 * i, 240)) for i in range(4)]
        runtime.run(runtime.engine.generate(request(spec, images[0], 99)))  # first use warms the processor
        started = time.monotonic()
        texts = runtime.run(
            _generate_all(runtime.engine, [request(spec, im, i) for i, im in enumerate(images)])
        )
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 3.0  # four requests, two at a time, 0.5 s each
        for text in texts:
            check = check_output(text, PARAMS)
            assert len(check.pairs) == 3 and not check.rejected
        question = check.pairs[0].question
        answer = runtime.run(runtime.engine.generate(request(verify_spec(PARAMS, question, 1), images[0], 7)))
        assert answer.startswith('{"answer":')
        with pytest.raises(ValueError, match="max_images_per_prompt"):
            too_many = request(prompt_spec(PARAMS, 5), images[0], 8)
            runtime.run(
                runtime.engine.generate(EngineRequest(**{**too_many.__dict__, "images": images + images[:1]}))
            )
    finally:
        runtime.stop()
