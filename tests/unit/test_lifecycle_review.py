"""Model lifecycle edge cases found in review: poison control records, records carried over an
abort, and deployment loaders that are replaced or fail at once.

The classes are the real ones (Transaction, Deployment, DeploymentLoader, Pipeline); only the
Kafka producer and the scoring pools under them are small recording objects, because what is
checked is what these classes ask of them (which records are produced, which pools shut down).
"""

from __future__ import annotations

import threading
import zlib
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from workers.config import load_settings
from workers.control import ControlRecordError, Deployment, control_key, initial_deployment
from workers.kafka.producer import AbortableError
from workers.lifecycle import DeploymentLoader, _take
from workers.transaction import Transaction

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "flow_classifier"
GROUP = "g"
ROUTE = "flow_classifier"


class RecordingProducer:
    """Records what a Transaction produces; ``fail_produce_at`` makes the Nth produce raise."""

    def __init__(self, fail_produce_at: int | None = None, fail_begin: bool = False):
        self.produced: list[tuple[str, bytes | None, bytes]] = []
        self.begun = 0
        self.calls = 0
        self.fail_produce_at = fail_produce_at
        self.fail_begin = fail_begin

    def begin(self) -> None:
        if self.fail_begin:
            raise AbortableError("begin_transaction failed (test)")
        self.begun += 1

    def produce(self, topic, value, key=None, headers=None) -> None:
        self.calls += 1
        if self.calls == self.fail_produce_at:
            raise AbortableError("produce failed (test)")
        self.produced.append((topic, key, value))


# ------------------------------------------------------------------ control records


def _deployment_doc() -> dict:
    dep = initial_deployment(GROUP, ROUTE, MODEL, "onnxruntime", "cpu")
    return dep.succeeded_by(primary=dep.primary, reason="test").to_dict()


@pytest.mark.parametrize("field,value", [
    ("requested_by", ["ana"]),      # AttributeError before the fix: the follower thread died,
    ("requested_by", "ana"),        # and the start-up read failed every start of every replica
    ("history", 5),
    ("created_at", "yesterday"),
    ("shadow", {"path": "x"}),
    ("canary", [1]),
    ("primary", None),
])
def test_a_control_record_of_wrong_types_is_a_control_record_error(field, value):
    doc = {**_deployment_doc(), field: value}
    with pytest.raises(ControlRecordError):
        Deployment.decode(orjson.dumps(doc))


class _Msg:
    def __init__(self, key: bytes, value: bytes):
        self._key, self._value = key, value

    def key(self):
        return self._key

    def value(self):
        return self._value

    def offset(self):
        return 7

    def partition(self):
        return 0


def test_a_poison_control_record_is_skipped_and_the_next_one_is_taken():
    key = control_key(GROUP, ROUTE)
    good = Deployment.from_dict(_deployment_doc())
    latest: dict[str, Deployment] = {}
    assert _take(_Msg(key, orjson.dumps({**_deployment_doc(), "requested_by": "ana"})), GROUP, latest) is None
    assert _take(_Msg(key, b"\xff not json"), GROUP, latest) is None
    assert _take(_Msg(key, good.encode()), GROUP, latest) == good
    assert latest == {ROUTE: good}


# ------------------------------------------------------------------ transaction carry-over


def test_applied_audits_are_not_carried_over_an_abort_but_refused_and_control_records_are():
    p = RecordingProducer()
    txn = Transaction(p)
    txn.add_record("audit", b"k", b"applied", redo=False)
    txn.add_record("control", b"k", b"rollback")
    txn.add_record("audit", b"k", b"guard")
    assert [v for _, _, v in p.produced] == [b"applied", b"rollback", b"guard"]
    # An `applied` audit describes the aborted outputs; the replay audits them again, perhaps
    # under another deployment or on another replica: carried, it would claim a wrong lineage.
    nxt = Transaction(p, txn.carry_over())
    assert [v for _, _, v in nxt.carry_over()] == [b"rollback", b"guard"]
    nxt.begin()
    assert [v for _, _, v in p.produced[3:]] == [b"rollback", b"guard"]


def test_carried_records_survive_a_produce_that_fails_while_they_are_redone():
    p = RecordingProducer(fail_produce_at=2)  # the second carried record fails
    txn = Transaction(p, [("control", b"k", b"one"), ("audit", b"k", b"two"), ("audit", b"k", b"three")])
    with pytest.raises(AbortableError):
        txn.begin()
    # Before the fix, "two" and "three" were lost here: the abort carried only "one".
    assert [v for _, _, v in txn.carry_over()] == [b"one", b"two", b"three"]


def test_a_record_whose_begin_or_produce_fails_is_still_carried():
    txn = Transaction(RecordingProducer(fail_begin=True))
    with pytest.raises(AbortableError):
        txn.add_record("audit", b"k", b"refused")
    assert [v for _, _, v in txn.carry_over()] == [b"refused"]
    p = RecordingProducer(fail_produce_at=2)
    txn = Transaction(p)
    txn.add_record("audit", b"k", b"first")
    with pytest.raises(AbortableError):
        txn.add_record("control", b"k", b"second")
    assert [v for _, _, v in txn.carry_over()] == [b"first", b"second"]


# ------------------------------------------------------------------ deployment loaders


class RecordingPool:
    """Stands for a built scoring pool: counts its shutdowns."""

    def __init__(self):
        self.shutdowns = 0

    def shutdown(self, wait=True, cancel=False):
        self.shutdowns += 1


def _dep(tag: str) -> Deployment:
    base = initial_deployment(GROUP, ROUTE, MODEL, "onnxruntime", "cpu")
    return base.succeeded_by(primary=base.primary, reason=tag)


def test_a_loader_whose_build_fails_at_once_reports_it_without_a_thread_error():
    errors = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        for _ in range(50):  # the failure is immediate: the thread used to outrun __init__

            def build(dep):
                raise FileNotFoundError("models/nope: model folder not found")

            loader = DeploymentLoader(_dep("x"), build)
            loader._thread.join(5)
            assert loader.done and loader.error.startswith("FileNotFoundError") and loader.pool is None
    finally:
        threading.excepthook = old_hook
    assert errors == []


@pytest.mark.parametrize("abandon_when", ["loading", "built"])
def test_an_abandoned_loader_shuts_its_pool_down_exactly_once(abandon_when):
    release = threading.Event()
    pool = RecordingPool()

    def build(dep):
        release.wait(5)
        return pool

    loader = DeploymentLoader(_dep("x"), build)
    if abandon_when == "built":
        release.set()
        loader._thread.join(5)
        loader.abandon()
    else:
        loader.abandon()
        release.set()
        loader._thread.join(5)
    assert pool.shutdowns == 1


class _Follower:
    """What Pipeline._lifecycle reads of a ControlFollower: pending, take(), alive, error."""

    alive = True
    error = None

    def __init__(self):
        self.queue: list[dict[str, Deployment]] = []

    @property
    def pending(self) -> bool:
        return bool(self.queue)

    def take(self) -> dict[str, Deployment]:
        return self.queue.pop(0)


def test_a_deployment_superseded_while_loading_does_not_leak_its_pool(monkeypatch):
    """Two deployments in quick succession: the first one's pool (scoring processes) was
    built and then neither used nor shut down."""
    from workers.pipeline import Pipeline, Route

    settings = load_settings(None, environ={"SLUICE_KAFKA__INPUT_TOPICS": '["flows"]',
                                            "SLUICE_MODEL__PATH": str(MODEL), "SLUICE_KAFKA__GROUP_ID": GROUP})
    pipe = Pipeline(settings)
    rs = settings.effective_routes()[0]
    current = initial_deployment(GROUP, rs.name, MODEL, "onnxruntime", "cpu")
    pipe.routes[rs.name] = Route(rs, current, RecordingPool(), {})
    gates = {}
    built = {}

    def build(rs_, dep):
        gates[dep.id].wait(5)
        built[dep.id] = RecordingPool()
        return built[dep.id]

    monkeypatch.setattr(pipe, "_build_deployment", build)
    monkeypatch.setattr(pipe, "_switch", lambda route, dep, pool: setattr(route, "switched_to", (dep, pool)))
    first, second = _dep("first"), _dep("second")
    gates[first.id], gates[second.id] = threading.Event(), threading.Event()
    follower = pipe._follower = _Follower()
    follower.queue = [{rs.name: first}]
    pipe._lifecycle(time.monotonic())
    follower.queue = [{rs.name: second}]
    pipe._lifecycle(time.monotonic())
    gates[first.id].set()
    gates[second.id].set()
    deadline = time.monotonic() + 5
    route = pipe.routes[rs.name]
    while route.loader is not None and not route.loader.done and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # the first loader's thread finishes too
    pipe._lifecycle(time.monotonic())
    assert route.switched_to[0] is second
    assert built[first.id].shutdowns == 1, "the superseded deployment's pool was left running"
    assert built[second.id].shutdowns == 0


# ------------------------------------------------------------------ canary merge (scoring.py)


class _NaNEveryThird:
    """The real backend, except that every third row of a batch scores NaN (a broken canary)."""

    def __init__(self, inner):
        self.inner = inner

    def infer(self, batch):
        out = np.array(self.inner.infer(batch), dtype=np.float32)
        out[::3] = np.nan
        return out


def test_a_canary_batch_keeps_every_position_once_and_each_record_aligned_with_its_row():
    from workers import telemetry
    from workers.scoring import BatchScorer, ScorerConfig, canary_mask

    n = 400
    values = [v for _, v, _ in telemetry.generate(kind="flow", count=n, seed=5, bad_fraction=0.1)]
    canary_cfg = ScorerConfig(MODEL, role="canary", deployment="d", sha256="c" * 64)
    scorer = BatchScorer(ScorerConfig(MODEL, role="primary", deployment="d", sha256="p" * 64,
                                      canary=canary_cfg, fraction=0.4,
                                      shadow=(ScorerConfig(MODEL, role="shadow", deployment="d", drift=False),)))
    scorer.canary.backend = _NaNEveryThird(scorer.canary.backend)
    offsets = list(range(1000, 1000 + n))
    out = scorer.score(values, "flows", [i % 3 for i in range(n)], offsets)

    rejected = [r.position for r in out.rejects]
    assert len(set(rejected)) == len(rejected)
    assert sorted(rejected + out.positions.tolist()) == list(range(n)), "a row lost or scored twice"
    assert {r.reason for r in out.rejects} >= {"non_finite_score"}  # the canary's, mapped back
    assert out.positions.tolist() == sorted(out.positions.tolist())
    limit = int(0.4 * 2**32)
    canary_rows = 0
    for i, (pos, rec) in enumerate(zip(out.positions.tolist(), out.records)):
        doc = orjson.loads(rec)
        assert doc["source"]["offset"] == offsets[pos] and doc["source"]["partition"] == pos % 3
        is_canary = zlib.crc32(doc["event_id"].encode()) < limit
        assert doc["role"] == ("canary" if is_canary else "primary")
        canary_rows += is_canary
        assert doc["score"] == pytest.approx(float(out.scores[i]), rel=1e-6)
        ts = out.event_ts[i]
        assert (doc["event_ts"] is None and np.isnan(ts)) or doc["event_ts"] == pytest.approx(float(ts))
    for r in out.rejects:  # a canary row that scored NaN is a dead letter, never a primary record
        if r.reason == "non_finite_score":
            eid = orjson.loads(values[r.position])["event_id"]
            assert zlib.crc32(eid.encode()) < limit
    assert out.role_stats["canary"][0] == canary_rows > 0
    assert out.role_stats["primary"][0] == len(out.records) - canary_rows
    assert out.drift.count + out.canary_drift.count == len(out.records)
    # Shadow: its own positions into the batch (the key of the input at that position).
    (shadow_records, shadow_pos), = out.shadow
    for pos, rec in zip(shadow_pos.tolist(), shadow_records):
        assert orjson.loads(rec)["source"]["offset"] == offsets[pos]
    assert canary_mask([], 0.5).shape == (0,)


# ------------------------------------------------------------------ degradation per route


def test_one_routes_backlog_does_not_degrade_another_route():
    from workers.pipeline import Pipeline, Route

    auth_model = ROOT / "models" / "auth_anomaly"
    routes = [
        {"name": "flows", "input_topics": ["flows"], "model": {"path": str(MODEL)},
         "degrade": {"fallback": str(MODEL), "max_lag": 1000, "after_s": 1, "recover_after_s": 1}},
        {"name": "auth", "input_topics": ["auth"], "model": {"path": str(auth_model)},
         "degrade": {"fallback": str(auth_model), "max_lag": 1000, "after_s": 1, "recover_after_s": 1}},
    ]
    settings = load_settings(None, environ={"SLUICE_KAFKA__INPUT_TOPICS": '["flows", "auth"]',
                                            "SLUICE_ROUTES": orjson.dumps(routes).decode(),
                                            "SLUICE_KAFKA__GROUP_ID": GROUP})
    pipe = Pipeline(settings)
    for rs in settings.effective_routes():
        dep = initial_deployment(GROUP, rs.name, rs.model.path, "onnxruntime", "cpu")
        route = pipe.routes[rs.name] = Route(rs, dep, RecordingPool(), {})
        route.fallback = (initial_deployment(GROUP, rs.name, rs.degrade.fallback, "onnxruntime", "cpu"), RecordingPool())
    pipe._assigned = {("flows", 0), ("auth", 0)}
    # A backlog of 50 000 on flows, none on auth.
    pipe._on_stats(orjson.dumps({"topics": {
        "flows": {"partitions": {"0": {"ls_offset": 50_000, "app_offset": 0}}},
        "auth": {"partitions": {"0": {"ls_offset": 10, "app_offset": 10}}}}}).decode())
    t0 = time.monotonic()
    for route in pipe.routes.values():
        pipe._judge_pressure(route, t0)
        pipe._judge_pressure(route, t0 + 2.0)
    assert pipe.routes["flows"].saved is not None, "the route under pressure must degrade"
    assert pipe.routes["auth"].saved is None, "auth has no backlog: it must keep its deployment"


def test_a_record_naming_the_running_deployment_abandons_an_older_one_loading(monkeypatch):
    """Records X then R (R: what runs now) handed out in two polls: X must not be switched to."""
    from workers.pipeline import Pipeline, Route

    settings = load_settings(None, environ={"SLUICE_KAFKA__INPUT_TOPICS": '["flows"]',
                                            "SLUICE_MODEL__PATH": str(MODEL), "SLUICE_KAFKA__GROUP_ID": GROUP})
    pipe = Pipeline(settings)
    rs = settings.effective_routes()[0]
    running = _dep("running")
    route = pipe.routes[rs.name] = Route(rs, running, RecordingPool(), {})
    gate, built = threading.Event(), []

    def build(rs_, dep):
        gate.wait(5)
        built.append(RecordingPool())
        return built[-1]

    monkeypatch.setattr(pipe, "_build_deployment", build)
    monkeypatch.setattr(pipe, "_switch", lambda route, dep, pool: setattr(route, "switched_to", (dep, pool)))
    follower = pipe._follower = _Follower()
    follower.queue = [{rs.name: _dep("older")}]
    pipe._lifecycle(time.monotonic())
    loader = route.loader
    assert loader is not None
    follower.queue = [{rs.name: running}]
    pipe._lifecycle(time.monotonic())
    gate.set()
    loader._thread.join(5)
    pipe._lifecycle(time.monotonic())
    assert not hasattr(route, "switched_to") and route.loader is None
    assert built and built[0].shutdowns == 1
