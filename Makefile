# Every target sets up what it needs: ops/setup_env.sh builds (once, cached) and links .venv.
VENV := .venv
PY := $(VENV)/bin/python
TINY_MODEL := .cache/tiny-qwen2.5-vl
DEMO_OUT := out/demo.jsonl

.PHONY: setup model demo test test-fast lint bench clean

setup:
	@bash ops/setup_env.sh

model: setup
	@$(PY) ops/build_tiny_model.py --out $(TINY_MODEL)

demo: model
	@rm -f $(DEMO_OUT) out/demo.errors.jsonl
	$(VENV)/bin/imageqa run examples/images -o $(DEMO_OUT) --model $(TINY_MODEL) \
		--max-question-chars 48 --max-answer-chars 48 --max-tokens 2048
	@echo
	@echo "Output: $(DEMO_OUT) ($$(wc -l < $(DEMO_OUT)) rows). The demo model has random weights, so its"
	@echo "questions and answers are nonsense; the whole real path ran (images, prompt, vLLM, JSON schema,"
	@echo "checks, Redis, Celery, collector). Use --model Qwen/Qwen2.5-VL-3B-Instruct on a GPU for real data."

test: setup
	@bash ops/ensure_redis.sh
	@bash ops/ensure_rabbitmq.sh
	@bash ops/ensure_chromium.sh
	$(PY) -m pytest

test-fast: setup
	@bash ops/ensure_redis.sh
	@bash ops/ensure_rabbitmq.sh
	@bash ops/ensure_chromium.sh
	$(PY) -m pytest -m "not engine"

lint: setup
	$(VENV)/bin/ruff check producer workers tests ops
	$(VENV)/bin/ruff format --check producer workers tests ops
	$(VENV)/bin/mypy

# Each script prints its tables and `BENCH name=value target=value` lines; the summary repeats them all.
bench: model
	@mkdir -p out
	@bash ops/ensure_redis.sh
	$(PY) ops/bench_shared.py | tee out/bench-shared.txt
	$(PY) ops/bench_memory.py | tee out/bench-memory.txt
	$(PY) ops/bench_images.py --model $(TINY_MODEL) --rounds 5 | tee out/bench-images.txt
	$(PY) ops/bench_engine.py --model $(TINY_MODEL) --n 256 --rounds 5 | tee out/bench-engine.txt
	$(PY) ops/bench_gpufeed.py --model $(TINY_MODEL) --images-dir .cache/bench-gpufeed \
		--env IMAGEQA_PREPROCESS_WORKERS=cpus --baseline-env IMAGEQA_PREPROCESS_WORKERS=0 | tee out/bench-gpufeed.txt
	@echo; echo "Summary:"; grep -h '^BENCH ' out/bench-shared.txt out/bench-memory.txt out/bench-images.txt out/bench-engine.txt out/bench-gpufeed.txt

clean:
	rm -rf out .pytest_cache .ruff_cache .mypy_cache
