"""The demo's final checks: each finds what it is there to find (the demo's own run is in integration)."""

from __future__ import annotations

from collections import Counter

from workers import demo
from workers.control import initial_deployment

FLOWS = demo.ROUTES[0]
AUTH = demo.ROUTES[1]


class _DeadLetter:
    """A dead letter as the read-back sees it: only its headers matter to the checks."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._headers = [("sluice.error.reason", b"bad_json"), ("sluice.source.topic", topic.encode()),
                         ("sluice.source.partition", str(partition).encode()),
                         ("sluice.source.offset", str(offset).encode())]

    def headers(self):
        return self._headers


def _score(topic: str, partition: int, offset: int, **extra) -> dict:
    return {"source": {"topic": topic, "partition": partition, "offset": offset}, **extra}


def test_output_sources_key_by_topic_partition_offset_from_scores_and_dead_letters():
    seen = demo._output_sources([_score("flows", 0, 0), _score("flows", 0, 0)], [_DeadLetter("flows", 1, 4)])
    assert seen == Counter({("flows", 0, 0): 2, ("flows", 1, 4): 1})


def test_every_committed_offset_once_is_exactly_once():
    seen = Counter({("flows", 0, 0): 1, ("flows", 0, 1): 1, ("flows", 1, 0): 1})
    assert demo._exactly_once_problems("flows", seen, {0: 2, 1: 1}) == []


def test_duplicates_gaps_outputs_beyond_the_commit_and_other_topics_are_each_reported():
    seen = Counter({("flows", 0, 0): 2, ("flows", 1, 5): 1, ("auth-events", 0, 1): 1})
    problems = demo._exactly_once_problems("flows", seen, {0: 2, 1: 0})
    assert problems == [
        "flows: 1 outputs in its route's topics come from other input topics",
        "flows: 1 input records have more than one output",
        "flows: 1 committed input records have no output",
        "flows: 1 outputs for input records beyond the committed offsets",
    ]


def test_lineage_must_name_the_routes_deployment_role_and_artifacts():
    dep = initial_deployment(demo.GROUP_ID, AUTH.name, AUTH.model, "onnxruntime", "cpu")
    good = {"deployment": dep.id, "role": "primary", "model": {"name": "auth_anomaly", "sha256": dep.primary.sha256}}
    assert demo._lineage_problems(AUTH, [good, dict(good)], dep) == []
    stale = {**good, "deployment": "auth@config-000000000000"}
    unnamed = {k: v for k, v in good.items() if k != "role"}
    other = {**good, "model": {"name": "auth_anomaly", "sha256": "0" * 64}}
    assert demo._lineage_problems(AUTH, [good, stale, unnamed, other], dep) == [
        f"auth-events: 1 score records lack deployment={dep.id!r}",
        "auth-events: 1 score records lack role='primary'",
        f"auth-events: 1 score records lack sha256={dep.primary.sha256!r}",
    ]


def test_the_demo_config_has_both_routes_with_their_own_topics_and_models():
    routes = {r.name: r for r in demo.demo_settings("127.0.0.1:9").effective_routes()}
    assert set(routes) == {"flows", "auth"}
    for r in demo.ROUTES:
        cfg = routes[r.name]
        assert cfg.input_topics == [r.topic] and cfg.scores == r.scores and cfg.dlq == r.dlq
        assert cfg.model.path.name == r.model.name
    outputs = [t for r in demo.ROUTES for t in (r.scores, r.dlq)]
    assert len(set(outputs)) == len(outputs), "each route has its own scores and dead-letter topics"
    assert sum(r.share for r in demo.ROUTES) == 1.0
