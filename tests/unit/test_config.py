"""Config: file + env precedence, and bad configuration failing at start with the key named."""

import pytest

from workers.config import ConfigError, load_settings, reference

BASE = {"SLUICE_KAFKA__INPUT_TOPICS": '["flows"]'}


def write(tmp_path, text):
    p = tmp_path / "sluice.toml"
    p.write_text(text)
    return p


def test_file_then_env_precedence(tmp_path):
    path = write(tmp_path, '[kafka]\ninput_topics = ["a"]\ngroup_id = "g1"\n[batching]\nmax_batch_size = 64\n')
    s = load_settings(path, environ={"SLUICE_BATCHING__MAX_BATCH_SIZE": "128"})
    assert s.kafka.group_id == "g1"
    assert s.batching.max_batch_size == 128  # env beats file
    assert s.kafka.input_topics == ["a"]


def test_derived_ids_are_stable_per_replica():
    s = load_settings(None, environ={**BASE, "SLUICE_KAFKA__GROUP_ID": "scoring", "SLUICE_KAFKA__REPLICA_ID": "r7"})
    assert s.kafka.transactional_id == "scoring-r7"
    assert s.kafka.group_instance_id == "scoring-r7"


@pytest.mark.parametrize(
    "text,needle",
    [
        ('[kafka]\ninput_topics=["a"]\nbogus=1\n', "kafka.bogus: unknown key"),
        ('[kafka]\ninput_topics=["a"]\n[nosuch]\nx=1\n', "nosuch: unknown key"),
        ('[kafka]\ninput_topics=["a"]\n[batching]\nmax_batch_size=0\n', "batching.max_batch_size"),
        ('[kafka]\ninput_topics=["a"]\n[batching]\nmax_batch_size="many"\n', "batching.max_batch_size"),
        ("[kafka]\n", "kafka.input_topics"),
        ('[kafka]\ninput_topics=["scores"]\n', "feedback loop"),
        ('[kafka]\ninput_topics=["a"]\nclient={"enable.auto.commit"=true}\n', "enable.auto.commit"),
        ("[kafka\n", "not valid TOML"),
    ],
)
def test_bad_file_names_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text), environ={})
    assert needle in str(exc.value)


def test_unknown_env_key_is_refused():
    with pytest.raises(ConfigError, match="SLUICE_BATCHING__MAX_BATCH: unknown key batching.max_batch"):
        load_settings(None, environ={**BASE, "SLUICE_BATCHING__MAX_BATCH": "5"})
    with pytest.raises(ConfigError, match="unknown section 'batchng'"):
        load_settings(None, environ={**BASE, "SLUICE_BATCHNG__MAX_BATCH_SIZE": "5"})


def test_unrelated_env_vars_are_ignored():
    s = load_settings(None, environ={**BASE, "SLUICE_TEST_BROKER": "devbroker", "PATH": "/bin"})
    assert s.kafka.input_topics == ["flows"]


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_reference_lists_every_key_with_env_name():
    ref = reference()
    for env in ("SLUICE_KAFKA__BOOTSTRAP_SERVERS", "SLUICE_TRANSACTIONS__COMMIT_INTERVAL_MS", "SLUICE_METRICS__PORT"):
        assert env in ref
