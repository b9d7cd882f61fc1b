# syntax=docker/dockerfile:1
# The GPU worker: this project on top of the official vLLM image, whose CUDA, torch and vLLM builds are
# kept exactly as they are.
#   docker build -f ops/docker/worker.Dockerfile -t imageqa-worker .
# vLLM's default build of a release needs a driver for CUDA 13 (580 or newer); for a CUDA 12 driver,
# build on the same release's -cu129 variant: --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.32.0-cu129
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    IMAGEQA_GPU_LOCK_DIR=/gpu-locks

# /cache (model downloads, compile caches) and /gpu-locks become volumes; Docker copies this ownership
# into a new named volume, so the unprivileged user can write there.
RUN groupadd --gid 10001 imageqa \
    && useradd --uid 10001 --gid imageqa --create-home --shell /usr/sbin/nologin imageqa \
    && mkdir -p /cache/huggingface /cache/vllm /gpu-locks \
    && chown -R imageqa:imageqa /cache /gpu-locks

WORKDIR /opt/imageqa

# Every package the base image has is pinned to its installed version (the CUDA/torch/vLLM stack must
# not move); the tested pins cover the rest. Empty packages stand in for the source until the next
# step, so that a code change reuses this layer.
COPY pyproject.toml README.md LICENSE ./
COPY ops/docker/constraints.txt ./constraints.txt
RUN mkdir producer workers \
    && touch producer/__init__.py workers/__init__.py \
    && python3 -m pip list --format=freeze > base-image.txt \
    && awk -F'==' '{ n = tolower($1); gsub(/[-_.]+/, "-", n) }; NR == FNR { seen[n] = 1; print; next }; !(n in seen)' \
        base-image.txt constraints.txt > all-constraints.txt \
    && python3 -m pip install --constraint all-constraints.txt '.[service]'

COPY producer ./producer
COPY workers ./workers
COPY --chmod=0755 ops/docker/worker-entrypoint.sh /usr/local/bin/imageqa-entrypoint
RUN python3 -m pip install --no-deps . && imageqa --help > /dev/null

USER imageqa
WORKDIR /home/imageqa
# `imageqa ARGS...`; for `worker` it first claims a free GPU of the host (see the script).
ENTRYPOINT ["imageqa-entrypoint"]
CMD ["worker"]
