"""Worker settings: flat IMAGEQA_* variables fill the nested engine settings, command-line options go
over them, and a process hands its settings to a child through the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from producer.constants import TASK_GENERATE
from workers.settings import WorkerSettings, env_names, environ


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("IMAGEQA_") and name != "IMAGEQA_TEST_REDIS":
            monkeypatch.delenv(name)


def test_flat_variables_fill_the_nested_engine_settings(monkeypatch):
    for name, value in {
        "IMAGEQA_ENGINE": "openai",
        "IMAGEQA_MODEL": "served",
        "IMAGEQA_MAX_NUM_SEQS": "8",
        "IMAGEQA_BASE_URL": "http://h:8000/v1",
        "IMAGEQA_OPENAI_MAX_CONCURRENCY": "3",
        "IMAGEQA_FAKE_FAULTS": '{"13x17": "crash"}',
        "IMAGEQA_CONCURRENCY": "16",
    }.items():
        monkeypatch.setenv(name, value)

    settings = WorkerSettings()

    engine = settings.engine
    assert (engine.kind, engine.model, engine.vllm.max_num_seqs) == ("openai", "served", 8)
    assert (engine.openai.base_url, engine.openai.max_concurrency) == ("http://h:8000/v1", 3)
    assert engine.fake.faults == {"13x17": "crash"}
    assert settings.concurrency == 16


def test_values_given_for_nested_settings_keep_the_environment_for_the_rest(monkeypatch):
    monkeypatch.setenv("IMAGEQA_MAX_NUM_SEQS", "8")
    monkeypatch.setenv("IMAGEQA_ENGINE", "fake")

    settings = WorkerSettings(engine={"model": "m", "vllm": {"max_model_len": 4096}})

    assert settings.engine.kind == "fake"
    assert (settings.engine.model, settings.engine.vllm.max_model_len) == ("m", 4096)
    assert settings.engine.vllm.max_num_seqs == 8


def test_command_line_options_go_over_the_environment(monkeypatch):
    from workers.cli import worker_settings

    monkeypatch.setenv("IMAGEQA_MODEL", "from-env")
    monkeypatch.setenv("IMAGEQA_CONCURRENCY", "16")

    settings = worker_settings(model=None, engine="fake", concurrency=4)

    assert (settings.engine.kind, settings.engine.model, settings.concurrency) == ("fake", "from-env", 4)


def test_a_child_reads_back_the_settings_it_is_handed(monkeypatch, tmp_path):
    given = WorkerSettings(
        media_roots=[tmp_path, Path("/data")],
        concurrency=7,
        task_events=True,
        engine={"kind": "fake", "model": "m", "fake": {"delay_s": 0.5, "faults": {"1x1": "hang"}}},
    )
    env = environ(given)
    assert set(env) <= env_names(WorkerSettings)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    assert WorkerSettings() == given


def test_create_app_registers_the_task_and_keeps_the_settings():
    from workers.app import create_app, worker_settings

    settings = WorkerSettings(concurrency=5, engine={"kind": "fake"})

    app = create_app(settings)

    assert TASK_GENERATE in app.tasks
    assert app.conf.worker_concurrency == 5
    assert worker_settings() is settings
    app.close()
