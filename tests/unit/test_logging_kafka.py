"""librdkafka's log lines through the structured logger: JSON with the client's name, repeats
rate-limited. The adapter is fed the way confluent-kafka calls it (no broker is involved);
tests/integration/test_logging_librdkafka.py runs it against real clients."""

from __future__ import annotations

import io
import logging

import orjson
import pytest

from workers.logs import JsonFormatter, KafkaClientLog, setup


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def captured():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.kafka")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    def lines() -> list[dict]:
        return [orjson.loads(line) for line in stream.getvalue().splitlines()]

    yield lines
    logger.handlers[:] = []


FAIL = "[thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: " \
       "Connection refused (after {}ms in state CONNECT)"


def test_a_line_becomes_a_json_record_with_client_and_facility(captured):
    kl = KafkaClientLog("test.kafka", clock=Clock())
    kl.log(logging.ERROR, "%s [%s] %s", "FAIL", "sluice-r1#consumer-2", FAIL.format(0))
    (rec,) = captured()
    assert rec["level"] == "error" and rec["logger"] == "test.kafka"
    assert rec["client"] == "sluice-r1#consumer-2" and rec["facility"] == "FAIL"
    assert rec["msg"].startswith("127.0.0.1:1/bootstrap: Connect to")  # librdkafka's thread prefix dropped


def test_repeats_are_held_back_for_the_window_then_counted(captured):
    clock = Clock()
    kl = KafkaClientLog("test.kafka", window_s=30.0, clock=clock)
    for i in range(290):  # what an unreachable broker produced in 15 s
        clock.t += 15.0 / 290
        kl.log(logging.ERROR, "%s [%s] %s", "FAIL", "c#producer-1", FAIL.format(i % 7))  # numbers vary
    assert len(captured()) == 1
    clock.t += 30.0
    kl.log(logging.ERROR, "%s [%s] %s", "FAIL", "c#producer-1", FAIL.format(1))
    recs = captured()
    assert len(recs) == 2 and recs[1]["repeated"] == 289


def test_distinct_clients_and_messages_are_not_merged(captured):
    kl = KafkaClientLog("test.kafka", clock=Clock())
    kl.log(logging.ERROR, "%s [%s] %s", "FAIL", "a#producer-1", FAIL.format(0))
    kl.log(logging.ERROR, "%s [%s] %s", "FAIL", "b#consumer-2", FAIL.format(0))
    kl.log(logging.WARNING, "%s [%s] %s", "REQTMOUT", "a#producer-1", "Timed out 1 in-flight request")
    assert [(r["client"], r["facility"]) for r in captured()] == [
        ("a#producer-1", "FAIL"), ("b#consumer-2", "FAIL"), ("a#producer-1", "REQTMOUT")]


def test_levels_below_the_loggers_are_dropped_before_counting(captured):
    logging.getLogger("test.kafka").setLevel(logging.WARNING)
    kl = KafkaClientLog("test.kafka", clock=Clock())
    kl.log(logging.DEBUG, "%s [%s] %s", "BROKER", "c#producer-1", "debug noise")
    kl.log(logging.WARNING, "%s [%s] %s", "BROKER", "c#producer-1", "warning")
    assert [r["msg"] for r in captured()] == ["warning"]


def test_setup_accepts_any_case():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup("debug", "JSON")
        assert root.level == logging.DEBUG and isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
