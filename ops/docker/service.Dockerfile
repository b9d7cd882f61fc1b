# syntax=docker/dockerfile:1
# The light image: producer (`imageqa enqueue`, `status`, ...), collector (`imageqa collect`) and
# Flower (`celery flower`). No engine: it must never pull torch or vLLM.
#   docker build -f ops/docker/service.Dockerfile -t imageqa-service .
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --gid 10001 imageqa \
    && useradd --uid 10001 --gid imageqa --create-home --shell /usr/sbin/nologin imageqa

WORKDIR /opt/imageqa

# Dependencies first, from pyproject.toml and the tested pins alone, so that a code change reuses
# this layer: empty packages stand in for the source until the next step.
COPY pyproject.toml README.md LICENSE ./
COPY ops/docker/constraints.txt ./constraints.txt
RUN mkdir producer workers \
    && touch producer/__init__.py workers/__init__.py \
    && pip install --constraint constraints.txt '.[service]' \
    && python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'vllm')))"

COPY producer ./producer
COPY workers ./workers
RUN pip install --no-deps . && imageqa --help > /dev/null

USER imageqa
WORKDIR /home/imageqa
CMD ["imageqa", "collect"]
