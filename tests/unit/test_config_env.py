"""Config from the environment: malformed overrides fail with the variable named and secrets
masked; loading leaves process-global state alone and is safe from several threads; the
tomli fallback for Python 3.10 works."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from workers.config import ConfigError, is_secret_key, load_settings, sample

ROOT = Path(__file__).resolve().parents[2]
BASE = {"SLUICE_KAFKA__INPUT_TOPICS": '["flows"]'}


def test_a_list_given_as_a_bare_word_names_the_variable_the_form_and_the_value():
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ={"SLUICE_KAFKA__INPUT_TOPICS": "flows"})
    msg = str(exc.value)
    assert msg.startswith("SLUICE_KAFKA__INPUT_TOPICS: expected a JSON array")
    assert '["flows"]' in msg and "got 'flows'" in msg


def test_invalid_client_json_is_reported_without_the_password():
    env = {**BASE, "SLUICE_KAFKA__CLIENT": '{"sasl.username": "u", "sasl.password": "hunter2", oops}'}
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ=env)
    msg = str(exc.value)
    assert msg.startswith("SLUICE_KAFKA__CLIENT: expected a JSON object")
    assert "not valid JSON" in msg and '"sasl.username": "u"' in msg
    assert "hunter2" not in msg and '"sasl.password": "***"' in msg


def test_client_json_of_the_wrong_shape_is_refused():
    with pytest.raises(ConfigError, match=r"SLUICE_KAFKA__CLIENT: expected a JSON object.*\(a JSON list\)"):
        load_settings(None, environ={**BASE, "SLUICE_KAFKA__CLIENT": '["security.protocol"]'})


def test_a_valid_json_value_that_fails_validation_names_its_variable_masked():
    env = {**BASE, "SLUICE_KAFKA__CLIENT": '{"isolation.level": "read_uncommitted", "sasl.password": "hunter2"}'}
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ=env)
    msg = str(exc.value)
    assert "kafka.client: 'isolation.level' cannot be set here" in msg
    assert "from SLUICE_KAFKA__CLIENT=" in msg and "hunter2" not in msg


def test_a_scalar_of_the_wrong_type_names_its_variable_and_value():
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ={**BASE, "SLUICE_KAFKA__SESSION_TIMEOUT_MS": "soon"})
    assert "kafka.session_timeout_ms: Input should be a valid integer" in str(exc.value)
    assert "(from SLUICE_KAFKA__SESSION_TIMEOUT_MS='soon')" in str(exc.value)


def test_long_values_are_cut_in_the_message():
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ={"SLUICE_KAFKA__INPUT_TOPICS": "x" * 500})
    assert "x" * 60 + "..." in str(exc.value) and "x" * 61 not in str(exc.value)


@pytest.mark.parametrize("name, secret", [
    ("sasl.password", True), ("ssl.key.password", True), ("ssl.key.pem", True), ("SLUICE_X__API_KEY", True),
    ("sasl.oauthbearer.client.secret", True), ("sasl.oauthbearer.config", True), ("access_token", True),
    ("ssl.key.location", False), ("sasl.username", False), ("SLUICE_KAFKA__INPUT_TOPICS", False),
    ("security.protocol", False),
])
def test_secret_names(name, secret):
    assert is_secret_key(name) is secret


def test_sample_masks_whole_secret_variables_and_secret_keys_in_json():
    assert sample("hunter2", "SLUICE_X__SASL_PASSWORD") == "'***'"
    assert "hunter2" not in sample('{"ssl.key.password":hunter2, "a": "b"}')
    assert sample('{"a": "b"}') == repr('{"a": "b"}')


def test_log_level_in_any_case():
    assert load_settings(None, environ={**BASE, "SLUICE_LOGGING__LEVEL": "debug"}).logging.level == "DEBUG"
    assert load_settings(None, environ=BASE, logging={"level": "Warning", "format": "JSON"}).logging.format == "json"


def test_loading_leaves_os_environ_alone(monkeypatch):
    monkeypatch.setenv("SLUICE_KAFKA__INPUT_TOPICS", '["from-os"]')
    before = dict(os.environ)
    s = load_settings(None, environ={**BASE, "SLUICE_KAFKA__GROUP_ID": "given"})
    assert s.kafka.input_topics == ["flows"] and s.kafka.group_id == "given"  # the mapping, not os.environ
    assert dict(os.environ) == before
    assert load_settings(None).kafka.input_topics == ["from-os"]  # environ=None: the process environment
    with pytest.raises(ConfigError):
        load_settings(None, environ={"SLUICE_KAFKA__INPUT_TOPICS": "bad"})
    assert dict(os.environ) == before


def test_two_threads_load_different_configs_at_once(tmp_path):
    files = []
    for i in range(2):
        p = tmp_path / f"c{i}.toml"
        p.write_text(f'[kafka]\ninput_topics = ["in-{i}"]\ngroup_id = "g{i}"\n')
        files.append(p)
    rounds = 150
    start = threading.Barrier(2)
    seen: list[list[tuple]] = [[], []]

    def load(i: int) -> None:
        start.wait()
        for _ in range(rounds):
            s = load_settings(files[i], environ={"SLUICE_BATCHING__MAX_BATCH_SIZE": str(100 + i)})
            seen[i].append((s.kafka.input_topics, s.kafka.group_id, s.batching.max_batch_size))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(2):
        assert len(seen[i]) == rounds
        wrong = [v for v in seen[i] if v != ([f"in-{i}"], f"g{i}", 100 + i)]
        assert not wrong, f"thread {i} got another thread's settings: {wrong[:3]}"


def test_tomli_fallback_when_tomllib_is_missing(tmp_path):
    """Python 3.10 has no tomllib: config.py must import tomli (the same API) instead."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[kafka]\ninput_topics = ["via-tomli"]\n')
    code = f"""
import importlib, sys
real = importlib.import_module("tomllib")
sys.modules["tomllib"] = None          # `import tomllib` now raises ModuleNotFoundError, as on 3.10
try:
    import tomli
except ImportError:                    # tomli is only installed on 3.10: stand in with the same parser
    sys.modules["tomli"] = real
import workers.config as config
assert config.tomllib is sys.modules["tomli"], config.tomllib
s = config.load_settings({str(cfg)!r}, environ={{}})
assert s.kafka.input_topics == ["via-tomli"], s.kafka.input_topics
print("fallback ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "fallback ok" in run.stdout
