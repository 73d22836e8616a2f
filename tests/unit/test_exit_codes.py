"""The exit-code table: README.md documents exactly the codes of ExitCode, and start-up errors
map to codes in one place. (tests/integration/test_exit_codes.py makes a real `sluice` process
end with each code.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workers import exit_codes
from workers.exit_codes import STARTUP_ERRORS, ExitCode, StartupError, exit_code_for

ROOT = Path(__file__).resolve().parents[2]


def _readme_table() -> dict[int, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    return {int(code): name for code, name in re.findall(r"^\| (\d+) \| `([A-Z_]+)` \|", section, re.M)}


def test_readme_documents_every_exit_code_and_no_other():
    assert _readme_table() == {int(c): c.name for c in ExitCode}


def test_codes_follow_the_conventions_supervisors_rely_on():
    assert (ExitCode.OK, ExitCode.CONFIG, ExitCode.SOFTWARE, ExitCode.TEMPFAIL) == (0, 2, 70, 75)  # sysexits
    assert ExitCode.INTERRUPTED == 128 + 2 and ExitCode.FORCED_STOP == 128 + 15  # shell: 128 + signal


def test_every_startup_error_has_a_code():
    declared = {obj for obj in vars(exit_codes).values()
                if isinstance(obj, type) and issubclass(obj, StartupError) and obj is not StartupError}
    assert declared == set(STARTUP_ERRORS)


@pytest.mark.parametrize("error, code", [
    (exit_codes.ConfigError("x"), ExitCode.CONFIG),
    (exit_codes.ModelLoadError("x"), ExitCode.CONFIG),
    (exit_codes.MetricsPortError("x"), ExitCode.CONFIG),
    (exit_codes.BrokerUnavailable("x"), ExitCode.TEMPFAIL),
    (exit_codes.TopicMissing("x"), ExitCode.TEMPFAIL),
    (exit_codes.ScoringStartFailed("x"), ExitCode.SOFTWARE),
    (RuntimeError("unexpected"), ExitCode.SOFTWARE),
])
def test_exit_code_for(error, code):
    assert exit_code_for(error) is code


def test_config_error_is_still_a_value_error_and_the_same_class_config_raises():
    from workers.config import ConfigError

    assert ConfigError is exit_codes.ConfigError and issubclass(ConfigError, ValueError)


def test_scoring_start_failures_are_split_into_hang_or_crash_and_bad_model():
    from workers.cli import _as_startup_error
    from workers.inference.pool import ModelLoadFailed, ScoringProcessDied, ScoringStartHung

    hang = _as_startup_error(ScoringStartHung("the model was not loaded and warm within 600s"), "k:9092")
    died = _as_startup_error(ScoringProcessDied("a scoring executor failed to start: exit -9; see its log above"), "k")
    bad = _as_startup_error(ModelLoadFailed("BackendUnavailable: no CUDA device"), "k:9092")
    assert exit_code_for(hang) is exit_code_for(died) is ExitCode.SOFTWARE
    assert exit_code_for(bad) is ExitCode.CONFIG
    worded = _as_startup_error(ModelLoadFailed("ValueError: output.threshold: must be within [0, 1], got 2"), "k")
    assert exit_code_for(worded) is ExitCode.CONFIG


def test_cluster_errors_name_the_bootstrap_servers():
    from confluent_kafka import KafkaError, KafkaException

    from workers.cli import _as_startup_error
    from workers.kafka.admin import TopicError

    err = _as_startup_error(KafkaException(KafkaError(KafkaError._TRANSPORT, "down")), "a:9092,b:9092")
    assert exit_code_for(err) is ExitCode.TEMPFAIL and "a:9092,b:9092" in str(err)
    err = _as_startup_error(TopicError("input topic(s) ['x'] do not exist"), "a:9092")
    assert exit_code_for(err) is ExitCode.TEMPFAIL and "a:9092" in str(err)
