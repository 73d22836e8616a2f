"""Metrics: the batch histogram exports exact Prometheus buckets; probes answer."""

import urllib.error
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from workers.metrics import ABORT_REASONS, BatchHistogram, Metrics, MetricsServer


def test_batch_histogram_matches_per_value_counting():
    h = BatchHistogram("x_seconds", "doc", [0.1, 1.0])
    h.observe_many(np.array([0.05, 0.1, 0.5, 2.0, 3.0]))
    fam = next(iter(h.collect()))
    got = {s.labels.get("le"): s.value for s in fam.samples if s.name == "x_seconds_bucket"}
    assert got == {"0.1": 2, "1.0": 3, "+Inf": 5}  # le is inclusive
    assert [s.value for s in fam.samples if s.name == "x_seconds_sum"] == [5.65]


def test_server_serves_metrics_and_probes():
    m = Metrics()
    m.scored.labels("flow").inc(3)
    srv = MetricsServer(m, "127.0.0.1", 0).start()
    try:
        base = f"http://127.0.0.1:{srv.port}"
        body = urllib.request.urlopen(base + "/metrics").read().decode()
        names = {f.name for f in text_string_to_metric_families(body)}
        assert {"sluice_events_scored", "sluice_end_to_end_latency_seconds", "sluice_consumer_lag"} <= names
        assert urllib.request.urlopen(base + "/healthz").status == 200
        try:
            urllib.request.urlopen(base + "/readyz")
            raise AssertionError("not ready yet, must be 503")
        except urllib.error.HTTPError as e:
            assert e.code == 503
        m.ready = True
        assert urllib.request.urlopen(base + "/readyz").status == 200
    finally:
        srv.stop()


def test_abort_reasons_exist_at_zero_before_the_first_abort():
    body = Metrics().render().decode()
    fam = next(f for f in text_string_to_metric_families(body) if f.name == "sluice_transactions_aborted")
    got = {s.labels["reason"]: s.value for s in fam.samples if s.name == "sluice_transactions_aborted_total"}
    assert got == {r: 0.0 for r in ABORT_REASONS}


def test_the_pipeline_aborts_only_for_listed_reasons():
    """A reason the pipeline uses but ABORT_REASONS lacks would have no series until it happens."""
    import re
    from pathlib import Path

    src = (Path(__file__).resolve().parents[2] / "workers" / "pipeline.py").read_text()
    used = set(re.findall(r'_abort_and_rewind\(\s*"([a-z_]+)"', src)) | set(re.findall(r'txn_aborted\.labels\("([a-z_]+)"\)', src))
    assert used and used <= set(ABORT_REASONS), used - set(ABORT_REASONS)


def test_no_created_series():
    m = Metrics()
    m.scored.labels("flow").inc()
    m.batch_size.observe(3)
    assert "_created" not in m.render().decode()
