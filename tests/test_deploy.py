"""The deployment files: docker-compose.yml, .env.example, the Dockerfiles, Prometheus' config, the
worker image's GPU claim, and the health checks the containers run.

No Docker engine here, so images are not built; what can be checked without one is: the compose file
(parsed, and rendered by `docker compose config` when the compose v2 client is installed), the
Dockerfiles' pins and entry points, the worker entry point script (with stand-ins for nvidia-smi and
imageqa), and `imageqa healthcheck` against a real worker and collector.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from packaging.requirements import Requirement

from producer.broker import redis_client
from producer.constants import COLLECTOR_GROUP, RESULTS_STREAM
from producer.settings import ProducerSettings
from tests.conftest import Cluster
from tests.helpers import ROOT, CollectorThread
from workers.health import check_collector
from workers.settings import CollectorSettings, WorkerSettings, env_names

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKER = ROOT / "ops" / "docker"
ENTRYPOINT = DOCKER / "worker-entrypoint.sh"
PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "ops" / "grafana"
SERVICES = {"redis", "worker", "collector", "flower", "prometheus", "grafana", "rabbitmq"}
PROFILES = {"prometheus": ["monitoring"], "grafana": ["monitoring"], "rabbitmq": ["rabbitmq"]}
LOOPBACK = "127.0.0.1"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; $$ escapes a dollar.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def variables() -> dict[str, set[str]]:
    """Every variable the compose file interpolates -> the operators it is used with."""
    found: dict[str, set[str]] = {}
    for name, op, _ in VARIABLE.findall(COMPOSE.read_text()):
        found.setdefault(name, set()).add(op)
    return found


def env_example() -> dict[str, str | None]:
    """Variables of .env.example -> value; None for the optional ones left commented out."""
    found: dict[str, str | None] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if m := re.fullmatch(r"(#\s*)?([A-Z_][A-Z0-9_]*)=(.*)", line.strip()):
            found.setdefault(m.group(2), None if m.group(1) else m.group(3))
    return found


def dockerignore() -> list[str]:
    lines = ROOT.joinpath(".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def minutes(duration: str) -> float:
    units = {"h": 60.0, "m": 1.0, "s": 1 / 60}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", duration))


# --- docker-compose.yml -----------------------------------------------------------------------------


def test_compose_has_the_services_each_with_a_health_check_restart_policy_and_log_rotation(services):
    assert set(services) == SERVICES
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL") and not service["healthcheck"].get("disable"), name
        assert service.get("restart") == "unless-stopped", name
        assert service["logging"]["options"]["max-size"], name


def test_prometheus_and_rabbitmq_are_optional_profiles_and_the_rest_start_by_default(services):
    assert {name: s["profiles"] for name, s in services.items() if "profiles" in s} == PROFILES


def test_external_images_are_pinned_to_exact_versions(services):
    for name in ("redis", "prometheus", "grafana", "rabbitmq"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+[\w.-]*", image), f"{name}: {image} is not pinned"
    for name in ("worker", "collector", "flower"):
        assert "image" not in services[name], f"{name} is built here, never pulled"


def test_redis_persists_with_a_required_password_and_never_evicts(services):
    redis = services["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"  # the image's entry point drops root only for redis-server
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert env_of(redis)["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")  # for the health check


def test_every_service_reaches_redis_with_the_password(services):
    redis_url = r"redis://:\$\{REDIS_PASSWORD:\?[^}]+\}@\$\{REDIS_HOST:-redis\}:6379/0"
    for name in ("worker", "collector"):
        assert re.fullmatch(redis_url, env_of(services[name])["IMAGEQA_REDIS_URL"]), name
    # The broker: BROKER_URL (RabbitMQ) if set, else the same Redis; Flower watches the broker.
    brokers = [
        env_of(services["worker"])["IMAGEQA_BROKER_URL"],
        env_of(services["collector"])["IMAGEQA_BROKER_URL"],
        env_of(services["flower"])["CELERY_BROKER_URL"],
    ]
    for url in brokers:
        assert re.fullmatch(r"\$\{BROKER_URL:-" + redis_url + r"\}", url), url


def test_rabbitmq_has_a_password_from_env_durable_data_and_a_long_consumer_timeout(services):
    rabbitmq = services["rabbitmq"]
    env = env_of(rabbitmq)
    assert env["RABBITMQ_DEFAULT_USER"] != "guest"
    assert env["RABBITMQ_DEFAULT_PASS"] == "${RABBITMQ_PASSWORD:-}"
    # Compose interpolates every service, profile or not: the check for a password is the service's own.
    assert '[ -n "$$RABBITMQ_DEFAULT_PASS" ] || ' in rabbitmq["command"][-1]
    assert rabbitmq["command"][-1].endswith("exec docker-entrypoint.sh rabbitmq-server")
    assert any(v.endswith(":/var/lib/rabbitmq") for v in rabbitmq["volumes"])
    conf_mount = next(v for v in rabbitmq["volumes"] if v.startswith("./ops/rabbitmq/"))
    conf = dict(
        line.split(" = ", 1)
        for line in ROOT.joinpath(conf_mount.split(":")[0]).read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert int(conf["consumer_timeout"]) / 1000 > WorkerSettings().task_time_limit_s
    example = env_example()
    assert "RABBITMQ_PASSWORD" in example and example["RABBITMQ_PASSWORD"] is None  # optional, unset


def test_worker_reserves_gpus_scales_and_stops_gracefully(services):
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "ops/docker/worker.Dockerfile"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # Docker hands every replica the same first `count` GPUs; the replicas split them among
    # themselves through locks on a shared volume instead (see the entry point tests below).
    assert device["count"] == "all"
    assert worker["deploy"]["replicas"] == "${WORKER_REPLICAS:-1}"  # one per GPU, kept across `up`
    # GPUS_PER_WORKER sets both the engine's tensor-parallel size and the GPUs the entry point claims.
    assert env_of(worker)["IMAGEQA_TENSOR_PARALLEL_SIZE"] == "${GPUS_PER_WORKER:-1}"
    assert env_example()["GPUS_PER_WORKER"] == "1"
    assert "/gpu-locks" in {v.split(":")[1] for v in worker["volumes"] if isinstance(v, str)}
    # --scale needs no fixed name and no host port.
    assert "container_name" not in worker and "ports" not in worker
    assert minutes(worker["stop_grace_period"]) >= WorkerSettings().task_time_limit_s / 60
    assert worker["init"] is True
    assert worker["healthcheck"]["test"] == ["CMD", "imageqa", "healthcheck", "worker"]


def test_media_is_mounted_read_only_where_the_workers_look(services):
    for name in ("worker", "collector"):
        (media,) = [v for v in services[name]["volumes"] if isinstance(v, dict) and v["target"] == "/data"]
        assert media["type"] == "bind" and media["read_only"] is True, name
        assert media["source"].startswith("${MEDIA_DIR:?"), name
    assert env_of(services["worker"])["IMAGEQA_MEDIA_ROOTS"] == "/data"


def test_collector_writes_to_the_output_volume_as_the_operator(services):
    collector = services["collector"]
    assert collector["build"]["dockerfile"] == "ops/docker/service.Dockerfile"
    env = env_of(collector)
    (output,) = [v for v in collector["volumes"] if isinstance(v, dict) and v["target"] == "/output"]
    assert output["type"] == "bind" and not output.get("read_only")
    assert env["IMAGEQA_OUTPUT_DIR"] == "/output"
    assert env["IMAGEQA_CONSUMER"]  # fixed, so that a recreated container resumes its pending entries
    assert collector["user"] == "${OUTPUT_UID:-1000}:${OUTPUT_GID:-1000}"


def test_flower_has_basic_auth_from_required_variables(services):
    flower = services["flower"]
    assert flower["build"]["dockerfile"] == "ops/docker/service.Dockerfile"
    assert flower["command"][:2] == ["celery", "flower"]
    assert "--port=5555" in flower["command"]
    user, password = env_of(flower)["FLOWER_BASIC_AUTH"].split("}:${")
    assert user.startswith("${FLOWER_USER:?") and password.startswith("FLOWER_PASSWORD:?")


def test_published_ports_bind_to_loopback_only(services):
    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            # As compose renders it with nothing set in .env: every variable at its default.
            spec = VARIABLE.sub(lambda m: m.group(3) if m.group(2) in ("-", ":-") else "", str(port))
            assert spec.count(":") == 2, f"{name}: {port!r} names no host address, so it binds to all"
            assert spec.split(":")[0] == LOOPBACK, f"{name}: {port} is not on loopback"
            published[name] = port
    # Redis has its password; Flower its basic auth; Prometheus and Grafana's viewer are read-only.
    assert set(published) == {"redis", "flower", "prometheus", "grafana", "rabbitmq"}


def test_settings_in_the_compose_file_are_real_settings(services):
    """A misspelt or renamed IMAGEQA_* variable would be ignored silently by pydantic-settings."""
    known = {
        "worker": env_names(WorkerSettings),
        # The collector's image also runs `imageqa enqueue` and `imageqa status`.
        "collector": env_names(CollectorSettings) | env_names(ProducerSettings),
    }
    for name, names in known.items():
        for key in env_of(services[name]):
            if key.startswith("IMAGEQA_"):
                assert key in names, f"{name}: {key} is no setting"


def test_env_example_documents_every_variable_and_requires_what_compose_requires():
    used = variables()
    example = env_example()
    assert set(used) <= set(example), f"not in .env.example: {sorted(set(used) - set(example))}"
    required = {name for name, ops in used.items() if ":?" in ops}
    assert required == {"REDIS_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD", "MEDIA_DIR"}
    # No password ships in the example: compose refuses to start until the operator sets them.
    assert example["REDIS_PASSWORD"] == "" and example["FLOWER_PASSWORD"] == ""
    assert example["REDIS_BIND"] == LOOPBACK


def test_git_and_docker_keep_the_env_file_out():
    assert ".env" in ROOT.joinpath(".gitignore").read_text().split()
    ignore = dockerignore()
    assert ignore[0] == "*"  # an allow list: only what is named below goes into the build context
    assert not any(p.startswith("!.env") for p in ignore)


# --- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_scrapes_every_worker_replica_the_collector_and_flower(services):
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker_port = int(env_of(services["worker"])["IMAGEQA_METRICS_PORT"])
    collector_port = int(env_of(services["collector"])["IMAGEQA_METRICS_PORT"])
    # DNS discovery: the service name resolves to every replica; a static target would reach one.
    (dns,) = jobs["imageqa-worker"]["dns_sd_configs"]
    assert (dns["names"], dns["type"], dns["port"]) == (["worker"], "A", worker_port)
    assert jobs["imageqa-collector"]["static_configs"][0]["targets"] == [f"collector:{collector_port}"]
    assert jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]
    for name in ("worker", "collector"):
        assert env_of(services[name])["IMAGEQA_METRICS_ADDRESS"] == "0.0.0.0", name
        assert str(services[name]["expose"][0]) == env_of(services[name])["IMAGEQA_METRICS_PORT"]
    mount = services["prometheus"]["volumes"][0]
    assert mount == "./ops/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"


def test_grafana_shows_the_dashboard_on_the_profiles_prometheus(services):
    grafana = services["grafana"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in grafana["volumes"]}
    provisioning = Path(mounts["/etc/grafana/provisioning"])
    assert provisioning == Path("./ops/grafana/provisioning")
    (datasource,) = yaml.safe_load((ROOT / provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    prometheus_port = services["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}" and datasource["isDefault"]
    (provider,) = yaml.safe_load((ROOT / provisioning / "dashboards" / "imageqa.yml").read_text())[
        "providers"
    ]
    dashboards = ROOT / mounts[provider["options"]["path"]]
    assert dashboards == GRAFANA / "dashboards"
    dashboard = json.loads((dashboards / "imageqa.json").read_text())
    home = env_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/imageqa.json"
    # Every panel reads the provisioned Prometheus.
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert all(t["datasource"]["uid"] == datasource["uid"] for t in panel["targets"]), panel["title"]
    # No default admin password: the shell guard refuses an empty one.
    assert env_of(grafana)["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_PASSWORD:-}"
    assert '[ -n "$$GF_SECURITY_ADMIN_PASSWORD" ] ||' in grafana["entrypoint"][-1]
    assert env_of(grafana)["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


# --- docker compose config -------------------------------------------------------------------------


def compose_client() -> list[str] | None:
    """The Docker Compose v2 client: the `docker compose` plugin or a standalone `docker-compose`."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        version = subprocess.run([*command, "version", "--short"], capture_output=True, text=True)
        if version.returncode == 0 and version.stdout.strip().lstrip("v").startswith("2."):
            return command
    return None


@pytest.fixture
def render(tmp_path: Path):
    """Runs `docker compose config` on the repository's compose file with a given .env."""
    client = compose_client()
    if client is None:
        pytest.skip(
            "the Docker Compose v2 client is not installed (neither `docker compose` nor docker-compose)"
        )

    def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        env_file = tmp_path / "test.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        return subprocess.run(
            [
                *client,
                "--project-directory",
                str(ROOT),
                "-f",
                str(COMPOSE),
                "--env-file",
                str(env_file),
                *args,
            ],
            capture_output=True,
            text=True,
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
            timeout=60,
        )

    return run


@pytest.fixture
def filled_env(tmp_path: Path) -> dict[str, str]:
    """.env.example with its required values filled in, as an operator would."""
    env = {k: v for k, v in env_example().items() if v is not None}
    (tmp_path / "media").mkdir()
    return {
        **env,
        "REDIS_PASSWORD": "0123456789abcdef",
        "FLOWER_PASSWORD": "flower-password",
        "MEDIA_DIR": str(tmp_path / "media"),
    }


def test_compose_config_renders_with_the_example_env(render, filled_env):
    result = render(
        filled_env, "--profile", "monitoring", "--profile", "rabbitmq", "config", "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    services = config["services"]
    assert set(services) == SERVICES
    ports = [(name, p) for name, s in services.items() for p in s.get("ports", [])]
    assert ports and all(p["host_ip"] == LOOPBACK for _, p in ports), ports
    assert services["worker"]["environment"]["IMAGEQA_REDIS_URL"] == "redis://:0123456789abcdef@redis:6379/0"
    # No BROKER_URL: the tasks queue on the same Redis.
    assert services["worker"]["environment"]["IMAGEQA_BROKER_URL"] == "redis://:0123456789abcdef@redis:6379/0"
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == "redis://:0123456789abcdef@redis:6379/0"
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "admin:flower-password"
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == -1  # all
    assert services["worker"]["volumes"][0]["source"] == filled_env["MEDIA_DIR"]
    # Unset optional values stay unset instead of becoming empty strings (an empty base image breaks
    # the build, an empty token is not "no token").
    assert "args" not in services["worker"]["build"]
    assert services["worker"]["environment"]["HF_TOKEN"] is None
    assert services["worker"]["environment"]["IMAGEQA_ENGINE_ARGS"] is None
    assert services["worker"]["environment"]["IMAGEQA_TENSOR_PARALLEL_SIZE"] == "1"


def test_compose_gives_tensor_parallel_workers_their_gpus_and_engine_arguments(render, filled_env):
    env = {**filled_env, "GPUS_PER_WORKER": "2", "WORKER_REPLICAS": "4"}
    env["IMAGEQA_ENGINE_ARGS"] = '{"max_model_len": 8192}'
    result = render(env, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    worker = json.loads(result.stdout)["services"]["worker"]
    assert worker["environment"]["IMAGEQA_TENSOR_PARALLEL_SIZE"] == "2"
    assert worker["environment"]["IMAGEQA_ENGINE_ARGS"] == '{"max_model_len": 8192}'
    assert worker["deploy"]["replicas"] == 4


@pytest.mark.parametrize("name", ["REDIS_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD", "MEDIA_DIR"])
def test_compose_refuses_to_start_without_a_required_value(render, filled_env, name):
    result = render({**filled_env, name: ""}, "config", "--quiet")
    assert result.returncode != 0
    assert f"required variable {name} is missing a value" in result.stderr


def test_compose_switches_the_broker_to_rabbitmq_with_broker_url(render, filled_env):
    amqp = "amqp://imageqa:rabbit-password@rabbitmq:5672/imageqa"
    env = {**filled_env, "RABBITMQ_PASSWORD": "rabbit-password", "BROKER_URL": amqp}
    result = render(env, "--profile", "rabbitmq", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name in ("worker", "collector"):
        assert services[name]["environment"]["IMAGEQA_BROKER_URL"] == amqp
        assert services[name]["environment"]["IMAGEQA_REDIS_URL"] == "redis://:0123456789abcdef@redis:6379/0"
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == amqp
    assert services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"] == "rabbit-password"


def test_compose_reaches_redis_on_another_host_for_a_second_machine(render, filled_env):
    result = render(
        {**filled_env, "REDIS_HOST": "10.0.0.5", "WORKER_REPLICAS": "4"}, "config", "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    worker = json.loads(result.stdout)["services"]["worker"]
    assert worker["environment"]["IMAGEQA_REDIS_URL"] == "redis://:0123456789abcdef@10.0.0.5:6379/0"
    assert worker["deploy"]["replicas"] == 4


# --- Dockerfiles --------------------------------------------------------------------------------


def dockerfile(name: str) -> tuple[str, list[str]]:
    """The text and the base images (ARG defaults substituted) of ops/docker/<name>.Dockerfile."""
    text = (DOCKER / f"{name}.Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], b) for b in re.findall(r"^FROM (\S+)", text, re.M)
    ]
    return text, bases


def instruction(text: str, name: str) -> list[str]:
    (line,) = re.findall(rf"^{name} (.+)$", text, re.M)
    return json.loads(line)


def instructions(text: str) -> list[tuple[str, str]]:
    """(keyword, arguments) of each instruction, continuation lines joined as Docker joins them."""
    found, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not current and not line.strip()):
            continue  # Docker drops comment lines, also between continuation lines
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, arguments = current.partition(" ")
        found.append((keyword, arguments.strip()))
        current = ""
    assert not current, "the last instruction ends with a line continuation"
    return found


@pytest.mark.parametrize("name", ["worker", "service"])
def test_dockerfiles_parse_and_their_shell_commands_are_valid(name):
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "ENTRYPOINT", "CMD"}
    for keyword, arguments in instructions((DOCKER / f"{name}.Dockerfile").read_text()):
        assert keyword in known, f"{keyword} {arguments[:60]}: not an instruction (a missing backslash?)"
        if keyword == "RUN":
            check = subprocess.run(["bash", "-n", "-c", arguments], capture_output=True, text=True)
            assert check.returncode == 0, f"RUN {arguments}\n{check.stderr}"


def test_worker_image_is_vllms_pinned_image_plus_this_project_as_a_user(services):
    text, bases = dockerfile("worker")
    assert bases == ["vllm/vllm-openai:v0.32.0"]
    assert "'.[service]'" in text and ".[worker]" not in text  # vLLM comes with the base image, as built
    assert re.search(r"^USER imageqa$", text, re.M)
    assert instruction(text, "ENTRYPOINT") == ["imageqa-entrypoint"]
    assert instruction(text, "CMD") == ["worker"]
    assert "COPY --chmod=0755 ops/docker/worker-entrypoint.sh /usr/local/bin/imageqa-entrypoint" in text
    assert "IMAGEQA_GPU_LOCK_DIR=/gpu-locks" in text


def test_service_image_is_pinned_slim_python_without_an_engine():
    text, bases = dockerfile("service")
    assert len(bases) == 1 and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", bases[0]), bases
    assert "'.[service]'" in text and "vllm" not in text.replace("('torch', 'vllm')", "")
    assert re.search(r"^USER imageqa$", text, re.M)


def test_images_install_the_tested_versions_and_they_satisfy_pyproject():
    pins: dict[str, str] = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    assert not {"torch", "vllm"} & set(pins), "the service image must not pull an engine"
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11 or newer reads pyproject.toml")
    project = tomllib.loads(ROOT.joinpath("pyproject.toml").read_text())["project"]
    for text in [*project["dependencies"], *project["optional-dependencies"]["service"]]:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{name} is not pinned: .venv/bin/python ops/docker/freeze_constraints.py"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {text!r}"


def test_everything_the_dockerfiles_copy_is_in_the_build_context():
    allowed = [
        p[1:].rstrip("/") for p in ROOT.joinpath(".dockerignore").read_text().split() if p.startswith("!")
    ]
    for name in ("worker", "service"):
        text, _ = dockerfile(name)
        for source in re.findall(r"^COPY (?:--\S+ )*(\S+) \S+$", text, re.M):
            assert (ROOT / source).exists(), source
            assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is ignored"


# --- The worker entry point: one GPU per replica -----------------------------------------------------


@pytest.fixture
def entrypoint(tmp_path: Path) -> Iterator[Any]:
    """Runs the entry point with stand-ins: nvidia-smi lists GPUs 0 and 1; imageqa reports what it was
    given, and for `worker` keeps running (holding the GPU's lock) until stopped."""
    bin_dir, locks = tmp_path / "bin", tmp_path / "locks"
    bin_dir.mkdir()
    locks.mkdir()
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\n[ -n "$FAKE_GPUS" ] || exit 9\nprintf "$FAKE_GPUS"\n')
    (bin_dir / "imageqa").write_text(
        '#!/bin/sh\necho "gpu=${CUDA_VISIBLE_DEVICES:-none} order=${CUDA_DEVICE_ORDER:-} args=$*"\n'
        '[ "$1" = worker ] && exec sleep 60\nexit 0\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    running: list[subprocess.Popen[str]] = []

    def start(*args: str, **env: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [str(ENTRYPOINT), *args],
            env={
                "PATH": f"{bin_dir}:{os.environ['PATH']}",
                "IMAGEQA_GPU_LOCK_DIR": str(locks),
                "FAKE_GPUS": "0\\n1\\n",
                **env,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        running.append(proc)
        return proc

    def first_line(proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        return proc.stdout.readline().strip()

    start.first_line = first_line  # type: ignore[attr-defined]
    yield start
    for proc in running:
        proc.kill()
        proc.wait()


def test_replicas_started_together_take_one_gpu_each_and_the_extra_ones_exit(entrypoint):
    replicas = [entrypoint("worker") for _ in range(4)]  # four replicas racing for two GPUs
    lines = {p: entrypoint.first_line(p) for p in replicas}
    assert sorted(lines.values()) == ["", "", *(f"gpu={i} order=PCI_BUS_ID args=worker" for i in (0, 1))]
    for extra in (p for p, line in lines.items() if not line):
        _, err = extra.communicate(timeout=10)
        assert extra.returncode == 1
        assert "every GPU of this host (0,1) already has a worker" in err


def test_a_gpu_is_free_again_as_soon_as_its_worker_dies(entrypoint):
    replicas = {entrypoint.first_line(p): p for p in (entrypoint("worker"), entrypoint("worker"))}
    holder = replicas["gpu=1 order=PCI_BUS_ID args=worker"]
    holder.kill()  # however it ends: the kernel drops the lock with the process
    holder.wait()
    assert entrypoint.first_line(entrypoint("worker")) == "gpu=1 order=PCI_BUS_ID args=worker"


def test_other_commands_and_preset_devices_claim_nothing(entrypoint):
    held = [entrypoint("worker"), entrypoint("worker")]
    for proc in held:
        entrypoint.first_line(proc)
    out, _ = entrypoint("status", "job-1").communicate(timeout=10)
    assert out.strip() == "gpu=none order= args=status job-1"
    assert entrypoint.first_line(entrypoint("worker", CUDA_VISIBLE_DEVICES="1")) == "gpu=1 order= args=worker"


def test_tensor_parallel_replicas_claim_disjoint_pairs_of_gpus(entrypoint):
    # Given four GPUs and workers of two GPUs each (GPUS_PER_WORKER=2 -> IMAGEQA_TENSOR_PARALLEL_SIZE)
    four = {"FAKE_GPUS": "0\\n1\\n2\\n3\\n", "IMAGEQA_TENSOR_PARALLEL_SIZE": "2"}
    replicas = [entrypoint("worker", **four) for _ in range(3)]  # three racing for two pairs
    lines = {p: entrypoint.first_line(p) for p in replicas}
    assert sorted(lines.values()) == [
        "",
        *(f"gpu={pair} order=PCI_BUS_ID args=worker" for pair in ("0,1", "2,3")),
    ]
    (extra,) = [p for p, line in lines.items() if not line]
    _, err = extra.communicate(timeout=10)
    assert extra.returncode == 1
    assert "needs 2 GPUs (GPUS_PER_WORKER) but no group of 2 of this host's GPUs (0,1,2,3) is free" in err


def test_a_pair_partly_taken_is_let_go_and_the_next_one_claimed(entrypoint):
    four = "0\\n1\\n2\\n3\\n"
    singles = {entrypoint.first_line(p): p for p in (entrypoint("worker", FAKE_GPUS=four) for _ in range(2))}
    holder_of_0 = singles["gpu=0 order=PCI_BUS_ID args=worker"]
    holder_of_0.kill()
    holder_of_0.wait()
    # GPU 0 is free, GPU 1 is not: a two-GPU worker takes 0, fails on 1, lets 0 go and takes 2-3.
    pair = entrypoint("worker", FAKE_GPUS=four, IMAGEQA_TENSOR_PARALLEL_SIZE="2")
    assert entrypoint.first_line(pair) == "gpu=2,3 order=PCI_BUS_ID args=worker"
    assert entrypoint.first_line(entrypoint("worker", FAKE_GPUS=four)) == "gpu=0 order=PCI_BUS_ID args=worker"


@pytest.mark.parametrize("size", ["0", "two", "-1"])
def test_a_gpu_count_that_is_not_a_whole_number_is_refused(entrypoint, size):
    proc = entrypoint("worker", IMAGEQA_TENSOR_PARALLEL_SIZE=size)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1 and f"must be a whole number of GPUs, not '{size}'" in err


def test_a_host_without_visible_gpus_fails_loudly(entrypoint):
    proc = entrypoint("worker", FAKE_GPUS="")
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1 and "nvidia-smi lists no GPU" in err


# --- imageqa healthcheck ----------------------------------------------------------------------------


def healthcheck(role: str, redis_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "healthcheck", role, *args],
        env={**os.environ, "IMAGEQA_REDIS_URL": redis_url, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_worker_healthcheck_passes_while_this_hosts_worker_answers(fake_cluster: Cluster, redis_url: str):
    healthy = healthcheck("worker", fake_cluster.redis_url)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.startswith("ok: imageqa-")
    nobody = healthcheck("worker", redis_url, "--timeout-s", "1")  # a database no worker listens on
    assert nobody.returncode == 1
    assert "unhealthy: no worker on" in nobody.stdout


def wait_for_consumer(url: str, name: str, timeout_s: float = 10.0) -> None:
    r = redis_client(url)
    deadline = time.monotonic() + timeout_s
    while not any(c["name"] == name.encode() for c in _consumers(r)):
        assert time.monotonic() < deadline, f"{name} never read the stream"
        time.sleep(0.05)
    r.close()


def _consumers(r: redis.Redis) -> list[dict[str, Any]]:
    try:
        return r.xinfo_consumers(RESULTS_STREAM, COLLECTOR_GROUP)
    except redis.ResponseError:  # no stream or group yet
        return []


def test_collector_healthcheck_follows_the_collectors_reads(redis_url: str):
    name = "collector-under-test"
    settings = CollectorSettings(redis_url=redis_url, consumer=name)
    assert not check_collector(settings).ok  # never started
    with CollectorThread(redis_url, consumer=name):
        wait_for_consumer(redis_url, name)
        running = healthcheck("collector", redis_url, IMAGEQA_CONSUMER=name)
        assert running.returncode == 0, running.stdout + running.stderr
        assert running.stdout.startswith(f"ok: {name} read the stream")
        assert not check_collector(settings.model_copy(update={"consumer": "another-collector"})).ok
    time.sleep(1.5)
    stopped = healthcheck("collector", redis_url, "--max-idle-s", "1", IMAGEQA_CONSUMER=name)
    assert stopped.returncode == 1
    assert f"unhealthy: {name} last read the stream" in stopped.stdout


def test_a_quiet_collector_stays_healthy(redis_url: str):
    """Redis 7.2 and later record every read attempt; older ones only reads that returned entries,
    so there a collector with nothing to do looks idle (docker-compose.yml runs Redis 7.4)."""
    r = redis_client(redis_url)
    version = tuple(int(n) for n in r.info("server")["redis_version"].split(".")[:2])
    if version < (7, 2):
        pytest.skip(f"Redis {version} records only reads that returned entries")
    name = "quiet-collector"
    with CollectorThread(redis_url, consumer=name):
        wait_for_consumer(redis_url, name)
        time.sleep(2.5)  # nothing arrives
        assert check_collector(CollectorSettings(redis_url=redis_url, consumer=name), max_idle_s=1).ok
