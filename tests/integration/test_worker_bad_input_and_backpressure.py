"""Hostile input becomes dead letters with reasons (no crash); a slow model keeps memory
bounded and the replica in its group."""

from __future__ import annotations

import json
import threading
import time

import jsonschema
import orjson
from confluent_kafka import Producer

from tests.backends import DELAY_ENV
from workers import telemetry
from workers.config import load_settings
from workers.kafka.telemetry_producer import produce_telemetry
from workers.pipeline import Pipeline

from .worker_harness import MODEL, ROOT, WorkerProc, assert_exactly_once, outcome, partition_ends, wait_until, worker_env

SCHEMAS = ROOT / "schemas"


def _valid_events(n: int, seed: int) -> list[dict]:
    return [orjson.loads(v) for _, v, _ in telemetry.generate(kind="flow", count=n, seed=seed)]


def _hostile_corpus() -> list[tuple[str, bytes | None]]:
    base = _valid_events(1, seed=99)[0]

    def variant(**changes) -> bytes:
        doc = dict(base)
        doc["event_id"] = f"hostile-{len(changes)}-{sorted(changes)}"
        doc.update(changes)
        return orjson.dumps(doc)

    without_id = dict(base)
    del without_id["event_id"]
    numeric = next(k for k, v in base.items() if isinstance(v, int) and not isinstance(v, bool) and k != "ts")
    return [
        ("bad_utf8", b'{"event_id": "\xff\xfe", "x": 1}'),
        ("bad_json", b'{"event_id": "x", '),
        ("not_object", b"[1, 2, 3]"),
        ("not_object", b'"just a string"'),
        ("empty", b""),
        ("missing_field", orjson.dumps(without_id)),
        ("wrong_type", variant(**{numeric: "lots"})),
        ("wrong_type", variant(event_id=12345)),
        ("nan", variant(**{numeric: 0}).replace(f'"{numeric}":0'.encode(), f'"{numeric}":NaN'.encode())),
        ("huge", variant(**{numeric: 0}).replace(f'"{numeric}":0'.encode(), f'"{numeric}":1e400'.encode())),
        ("huge_int", variant(**{numeric: 0}).replace(f'"{numeric}":0'.encode(), f'"{numeric}":{10**30}'.encode())),
        ("deep", b'{"event_id": "deep", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("multi_mb", b'{"event_id": "big", "pad": "' + b"A" * (3 * 1024 * 1024) + b'"}'),
        ("tombstone", None),
    ]


def test_hostile_corpus_becomes_dead_letters_with_reasons(bootstrap, new_topic, tmp_path):
    # The operator raised the input topic's limit so multi-MB records reach the worker (Kafka's
    # default max.message.bytes would refuse them at the producer); the DLQ stays at the default:
    # the worker truncates oversized dead letters to [topics] dlq_max_value_bytes.
    topic = new_topic(partitions=1, prefix="hostile", config={"max.message.bytes": str(10 * 1024 * 1024)})
    corpus = _hostile_corpus()
    valid = _valid_events(50, seed=5)
    p = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 10 * 1024 * 1024, "enable.idempotence": True})
    for i, ev in enumerate(valid[:25]):
        p.produce(topic, orjson.dumps(ev), f"k{i}".encode())
    for name, value in corpus:
        p.produce(topic, value, name.encode(), headers=[("origin", b"hostile-test")])
    for i, ev in enumerate(valid[25:]):
        p.produce(topic, orjson.dumps(ev), f"k{i}".encode())
    assert p.flush(30) == 0
    total = len(valid) + len(corpus)

    w = WorkerProc(worker_env(bootstrap, topic, replica="r0", group=f"g-{topic}"), tmp_path / "w.log").start()
    out = None
    try:
        wait_until(lambda: len(outcome(bootstrap, topic, 0, timeout=3).scores) >= len(valid), timeout=90,
                   what="scores of the valid events")
        assert w.alive(), w.log()[-3000:]
    finally:
        code = w.terminate()
    assert code == 0, w.log()[-3000:]
    out = outcome(bootstrap, topic, total)
    assert_exactly_once(out, topic, partition_ends(bootstrap, topic, 1))
    assert len(out.scores) == len(valid)
    assert len(out.dead_letters) == len(corpus)

    schema = json.loads((SCHEMAS / "records" / "dead_letter.json").read_text())
    by_key = {}
    for m in out.dead_letters:
        headers = {k: v.decode("utf-8", "replace") for k, v in m.headers()}
        jsonschema.validate(headers, schema)
        assert headers["origin"] == "hostile-test"  # original headers kept
        assert headers["sluice.error.detail"]
        by_key[m.key().decode()] = (headers["sluice.error.reason"], m.value(), headers)
    expected_reason = {
        "bad_utf8": {"bad_utf8"}, "bad_json": {"bad_json"}, "not_object": {"not_object"}, "empty": {"bad_json"},
        "missing_field": {"missing_field"}, "wrong_type": {"wrong_type"}, "nan": {"bad_json", "non_finite"},
        "huge": {"bad_json", "non_finite", "out_of_range"}, "huge_int": {"out_of_range", "wrong_type"},
        "deep": {"too_deep", "bad_json"}, "multi_mb": {"too_large"}, "tombstone": {"tombstone"},
    }
    for key, (reason, value, headers) in by_key.items():
        assert reason in expected_reason[key], f"{key}: reason {reason!r}"
    # The original bytes travel with the dead letter (truncated, and said so, when over the DLQ limit).
    originals = dict(corpus)
    for key in ("bad_utf8", "bad_json", "deep"):
        assert by_key[key][1] == originals[key]
    assert by_key["tombstone"][1] is None
    big = by_key["multi_mb"]
    assert big[2]["sluice.error.truncated"] == str(len(originals["multi_mb"]))
    assert originals["multi_mb"].startswith(big[1])

    score_schema = json.loads((SCHEMAS / "records" / "score.json").read_text())
    flow_schema = json.loads((SCHEMAS / "events" / "flow.json").read_text())
    for ev in valid:
        jsonschema.validate(ev, flow_schema)
    for m in out.scores:
        jsonschema.validate(orjson.loads(m.value()), score_schema)


def test_slow_backend_keeps_memory_bounded_and_the_member_in_its_group(bootstrap, new_topic, monkeypatch):
    topic = new_topic(partitions=2, prefix="slow")
    produce_telemetry(bootstrap, topic, count=20_000, seed=21)
    max_batch, max_inflight = 100, 2
    settings = load_settings(
        None, environ={},
        kafka={"bootstrap_servers": bootstrap, "group_id": f"g-{topic}", "input_topics": [topic], "replica_id": "slow",
               "session_timeout_ms": 6000, "max_poll_interval_ms": 7000},
        topics={"scores": f"{topic}-scores", "dlq": f"{topic}-dlq", "drift": f"{topic}-drift"},
        # 0.4 s per batch of 100 in one scoring process: at most 250 events/s
        model={"path": str(MODEL), "backend": "tests.backends:SlowOnnxRuntime"},
        batching={"max_batch_size": max_batch, "max_inflight_batches": max_inflight, "adaptive": False},
        transactions={"commit_interval_ms": 200, "revoke_timeout_ms": 2000},
    )
    monkeypatch.setenv(DELAY_ENV, "0.4")  # the scoring process inherits it at start
    pipeline = Pipeline(settings)
    pipeline.start()
    held, paused = [], []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            snap = pipeline.snapshot()
            held.append(snap.held_events)
            paused.append(snap.paused)
            time.sleep(0.02)

    before_stop = {}

    def stop_later():
        time.sleep(15.0)  # > 2 × max.poll.interval.ms: an orchestrator that stopped polling would be evicted
        for event in ("lost", "revoked"):
            before_stop[event] = pipeline.metrics.rebalances.labels(event)._value.get()
        pipeline.request_stop()

    threading.Thread(target=sample, daemon=True).start()
    threading.Thread(target=stop_later, daemon=True).start()
    code = pipeline.run()
    stop.set()
    assert code == 0
    # (close() at shutdown revokes too; count only what happened while running)
    assert before_stop == {"lost": 0, "revoked": 0}, "the slow model got the replica evicted from its group"
    assert any(paused), "backpressure never paused the partitions"
    assert max(held) <= max_batch * (max_inflight + 1), f"held up to {max(held)} events"
    assert 0 < pipeline.stats.scored < 20_000  # throttled by the model, not by dropping
    assert pipeline.stats.scored + pipeline.stats.dead_letters == pipeline.stats.consumed
