"""``sluice bench``: the worker against its ceiling, measured in one run.

1. Preload an input topic with N synthetic flow events (a separate process,
   so its memory is not counted).
2. Ceiling: a bare consume → produce-in-a-transaction loop (no decoding, no
   model) over the same topic; events/s from first fetch to last commit.
3. Worker: the real pipeline (exactly once, model, dead letters, drift deltas)
   over the same topic under another group; events/s from first fetch to last
   commit, and peak RSS of this phase (the worker process plus its scoring
   processes). Run with drift on and off, for the cost of drift statistics.
   With ``--shadow PATH`` (repeatable) a third worker run per round scores the same events
   with those models in shadow too (issue 12: the cost of a shadow model): before that
   worker starts, a deployment is written to its control topic whose primary is the
   configured model and whose shadows are the given models, so the worker applies it before
   it scores anything. The runs with and without shadows swap order every round, and their
   ratio is the median of the rounds' own ratios.

Steps 2 and 3 run in ``--repeat`` rounds (ceiling, drift on, [shadow,] drift off). On a
shared machine a single run of either side can land on a busy moment, so no
ratio comes from one run of each: the headline ratio is the median of the
rounds' own ratios (each round's worker over the ceiling measured seconds
before it), and the ratio of the best runs is reported beside it. Absolute
events/s are the best run of each.
4. Latency: a fresh topic fed at half the worker's measured rate while the
   worker runs; p50/p99 from the event's timestamp to the moment its score is
   readable with read_committed (what a SIEM sees; measured on one partition
   of the scores topic, a sample of every transaction), and to emit (the
   worker's own part), both over the whole run after its first second.

Figures are ratios of one run on one machine; absolute numbers only with the
machine named.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from workers import logs
from workers.config import load_settings
from workers.control import Deployment, ModelRef, initial_deployment
from workers.exit_codes import ExitCode
from workers.kafka.admin import ensure_topics
from workers.logs import kafka_logger
from workers.pipeline import Pipeline
from workers.profiling import profiled

MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "flow_classifier"
PHASE_TIMEOUT_S = 600.0
# Writing the shadow deployment to the control topic (local or named cluster): acknowledged
# in milliseconds when the cluster is up; past this the bench fails instead of hanging.
CONTROL_WRITE_TIMEOUT_S = 30.0


def _rss_reset() -> None:
    try:  # Linux: "5" resets the peak-RSS watermark of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_peak_mb(pid: int | str = "self") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _preload(bootstrap: str, topic: str, count: int, seed: int) -> None:
    cmd = [sys.executable, "-m", "workers", "produce", "--bootstrap-servers", bootstrap, "--topic", topic,
           "--count", str(count), "--seed", str(seed), "--bad-fraction", "0.001"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def passthrough(bootstrap: str, topic: str, out_topic: str, count: int, commit_interval_s: float = 0.1,
                run: int = 0) -> dict:
    """The ceiling: consume → produce in a transaction → commit offsets, no work per event."""
    c = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-pt-{topic}-{run}", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "isolation.level": "read_committed",
        "fetch.max.bytes": 16 * 1024 * 1024, "queued.max.messages.kbytes": 32 * 1024,
        "fetch.queue.backoff.ms": 20,  # as the worker: no 1 s fetch pauses in either measurement
    })
    p = Producer({
        "bootstrap.servers": bootstrap, "transactional.id": f"bench-pt-{topic}-{os.getpid()}-{run}",
        "linger.ms": 5, "batch.num.messages": 10_000, "compression.type": "lz4",
        "queue.buffering.max.messages": 200_000,
    })
    p.init_transactions(30)
    c.subscribe([topic])
    n = 0
    first = None
    offsets: dict[tuple[str, int], int] = {}
    txn_at = None
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    produce = p.produce
    while n < count and time.monotonic() < deadline:
        msgs = c.consume(2048, 0.05)
        if msgs and first is None:
            first = time.monotonic()
        if msgs and txn_at is None:
            p.begin_transaction()
            txn_at = time.monotonic()
        for m in msgs:
            if m.error():
                continue
            try:
                produce(out_topic, m.value(), m.key())
            except BufferError:
                p.poll(0.05)
                produce(out_topic, m.value(), m.key())
            offsets[(m.topic(), m.partition())] = m.offset() + 1
            n += 1
        if txn_at is not None and (time.monotonic() - txn_at >= commit_interval_s or n >= count):
            p.send_offsets_to_transaction(
                [TopicPartition(t, part, o) for (t, part), o in offsets.items()], c.consumer_group_metadata(), 30
            )
            p.commit_transaction(30)
            txn_at = None
    last = time.monotonic()
    c.close()
    return {"events": n, "seconds": last - (first or last), "eps": n / max(1e-9, last - (first or last))}


def _worker_settings(bootstrap: str, topic: str, group: str, args, drift: bool = True) -> object:
    return load_settings(
        None, environ={},
        kafka={"bootstrap_servers": bootstrap, "group_id": group, "input_topics": [topic], "replica_id": "bench-0"},
        # Every output of the bench's worker runs beside its input topic, none in the defaults.
        topics={"scores": f"{topic}-scores", "dlq": f"{topic}-dlq", "drift": f"{topic}-drift",
                "shadow": f"{topic}-shadow", "control": f"{topic}-control", "audit": f"{topic}-audit"},
        model={"path": str(MODEL_PATH)},
        batching={"max_batch_size": args.max_batch_size, "max_batch_delay_ms": 20, "max_inflight_batches": 4},
        inference={"processes": args.processes, "threads": args.threads},
        transactions={"commit_interval_ms": 100},
        drift={"enabled": drift},
    )


def _run_worker_until(pipeline: Pipeline, stop_when) -> float:
    """Run the pipeline until ``stop_when()``; the scoring processes' summed peak RSS (MiB)."""
    scoring_peak = [0.0]

    def watch():
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while time.monotonic() < deadline and not stop_when():
            time.sleep(0.01)
        # Read before the stop: the scoring processes end with the pipeline.
        scoring_peak[0] = sum(_rss_peak_mb(pid) for pid in pipeline.pool.pids)
        pipeline.request_stop()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    pipeline.run()
    t.join()
    return scoring_peak[0]


def shadow_refs(paths) -> tuple[ModelRef, ...]:
    """``--shadow`` folders as deployment models (name, version, digest); ValueError naming the bad one."""
    refs = []
    for p in paths or ():
        try:
            refs.append(ModelRef.from_folder(p))
        except (ValueError, OSError) as exc:
            raise ValueError(f"--shadow {p}: not a model folder ({exc}); give a folder with manifest.toml, "
                             "e.g. models/flow_classifier") from None
    return tuple(refs)


def deploy_shadow(settings, shadow: tuple[ModelRef, ...]) -> Deployment:
    """Write the route's deployment with ``shadow`` beside its configured primary to the control topic.

    The worker reads the control topic to its end at start and applies the deployment before
    it scores anything, so every event of the measured run is also scored by the shadows.
    """
    from workers.models_cli import ensure_control_topic, publish

    route = settings.effective_routes()[0]
    base = initial_deployment(settings.kafka.group_id, route.name, route.model.path, route.model.backend,
                              route.model.device)
    dep = base.succeeded_by(primary=base.primary, shadow=shadow, reason="sluice bench --shadow",
                            requested_by={"tool": "sluice bench"})
    ensure_control_topic(settings, CONTROL_WRITE_TIMEOUT_S)
    publish(settings, dep, CONTROL_WRITE_TIMEOUT_S)
    return dep


def _shadow_records(pipeline: Pipeline) -> int:
    """Shadow score records the worker emitted (all its routes; its metrics count them per route and role)."""
    return int(sum(s.value for m in pipeline.metrics.registry.collect() if m.name == "sluice_route_events_scored"
                   for s in m.samples if s.name.endswith("_total") and s.labels.get("role") == "shadow"))


def worker_throughput(bootstrap: str, topic: str, count: int, args, drift: bool = True, run: int = 0,
                      shadow: tuple[ModelRef, ...] = ()) -> dict:
    """The worker over the preloaded ``topic`` under a fresh group; ``shadow`` models deployed before it starts."""
    group = f"bench-worker-{topic}-{'drift' if drift else 'nodrift'}{'-shadow' if shadow else ''}-{run}"
    settings = _worker_settings(bootstrap, topic, group, args, drift=drift)
    deployment = deploy_shadow(settings, shadow) if shadow else None
    pipeline = Pipeline(settings)
    pipeline.start()
    _rss_reset()
    committed = {"n": 0}
    # Stop once everything consumed has been emitted and committed.
    scoring_peak = _run_worker_until(
        pipeline,
        lambda: pipeline.stats.consumed >= count and not pipeline._inflight
        and not pipeline.producer.in_transaction and pipeline.stats.commits > 0,
    )
    st = pipeline.stats
    # The scoring processes have their own copy of the model: their peak counts too.
    peak = _rss_peak_mb() + scoring_peak
    committed["n"] = st.scored + st.dead_letters
    secs = (st.last_commit_at or 0) - (st.first_fetch_at or 0)
    result = {
        "events": committed["n"], "scored": st.scored, "dead_letters": st.dead_letters, "seconds": secs,
        "eps": committed["n"] / max(1e-9, secs), "mean_batch": st.batch_events / max(1, st.batches),
        "commits": st.commits, "peak_rss_mb": peak,
    }
    if deployment is not None:
        result.update(deployment=deployment.id, shadow_records=_shadow_records(pipeline))
    return result


# Where the feeder writes each event's send time, in values pre-generated with this start_ts.
_TS_FIELD = b'"ts":'
_EVENT_TS_FIELD = b'"event_ts":'
# The feeder reads the clock once per this many events (well under a millisecond at the rates
# measured; a stamp a little early can only overstate the latency) and checks its schedule as
# often; the reader measures every this-many-th score record it reads. Both share the CPU
# with what they measure.
FEED_STAMP_EVERY = 64
READ_SAMPLE_EVERY = 8
# The reader reads this one partition of the scores topic. A transaction's records become
# visible on all its partitions at the same commit, so one partition's records (those whose
# keys hash there) are a fair sample; reading all of them cost a reader 0.12 vCPU at 120k
# events/s, taken from the worker it measures.
READ_PARTITION = 0
# Latency samples from the first second are dropped: group join and warm-up, not steady state.
WARMUP_S = 1.0


def _feed(bootstrap: str, topic: str, count: int, rate: float, seed: int, reader_ready=None) -> None:
    """In its own process: offer ``count`` flow events at ``rate`` events/s, each stamped when sent.

    Generating telemetry costs about 6 us per event, more than the worker spends on it:
    generated while sending, at half the worker's rate the feeder itself fell behind and the
    latency measured the feeder. So the events are generated first, and sending only writes
    the send time into each one's ``ts``. Sending starts once the producer is connected
    and the reader has its partition: a backlog built while either connects would be
    measured as the worker's latency.
    """
    from workers import telemetry

    values = []
    for key, value, _ in telemetry.generate(kind="flow", count=count, seed=seed, start_ts=1e9):
        a = value.index(_TS_FIELD) + len(_TS_FIELD)
        values.append((key, value[:a], value[value.index(b",", a):]))  # around the ts value
    # A full collection over the pre-generated events would stall sending and make it burst after.
    gc.freeze()
    gc.disable()
    p = Producer({
        "bootstrap.servers": bootstrap, "linger.ms": 5,
        # Not idempotent: librdkafka's idempotent producer starts without a producer id and
        # retries on a 500 ms timer, so the first ~0.5 s of events queued up and reached the
        # worker late and together. A retry duplicate would only add one latency sample.
        "enable.idempotence": False,
        "batch.num.messages": 10_000, "compression.type": "lz4", "queue.buffering.max.messages": 500_000,
    })
    p.list_topics(topic, timeout=30)  # connected
    if reader_ready is not None:
        reader_ready.wait(60)
    time.sleep(0.2)
    produce, poll = p.produce, p.poll
    start = time.monotonic()
    for first in range(0, len(values), FEED_STAMP_EVERY):
        stamp = repr(time.time()).encode()
        for key, head, tail in values[first:first + FEED_STAMP_EVERY]:
            value = head + stamp + tail
            while True:
                try:
                    produce(topic, value, key)
                    break
                except BufferError:
                    poll(0.01)
        ahead = (first + FEED_STAMP_EVERY) / rate - (time.monotonic() - start)
        if ahead > 0.002:
            poll(ahead)
    if p.flush(60):
        raise SystemExit(f"feeder: {len(p)} events not acknowledged")


def _read_scores(bootstrap: str, topic: str, conn, ready, stop) -> None:
    """In its own process: time from each event's ts to its score being readable (read_committed).

    Reads partition :data:`READ_PARTITION` until ``stop`` is set and nothing more comes;
    sends ``(records read, [(read at, latency s), ...])``.
    """
    c = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-reader-{topic}",
        "isolation.level": "read_committed", "enable.auto.commit": False,
    })
    c.list_topics(f"{topic}-scores", timeout=30)  # connected
    c.assign([TopicPartition(f"{topic}-scores", READ_PARTITION, OFFSET_BEGINNING)])
    ready.set()
    seen: list[tuple[float, float]] = []
    received = 0
    while True:
        # Take what is there now, else wake on the first record: consume(n, timeout) would
        # wait for n records and add its own delay to every measurement.
        msgs = c.consume(5000, 0)
        if not msgs:
            first = c.poll(0.1)
            if first is None:
                if stop.is_set():
                    break
                continue
            msgs = [first]
        now = time.time()
        for m in msgs:
            if m.error() is None:
                received += 1
                if received % READ_SAMPLE_EVERY:
                    continue
                # event_ts is a number or null; slicing it out costs far less than a JSON parse
                v = m.value()
                a = v.rindex(_EVENT_TS_FIELD) + len(_EVENT_TS_FIELD)
                try:
                    seen.append((now, now - float(v[a:v.index(b",", a)])))
                except ValueError:  # null: no timestamp to measure from
                    pass
    c.close()
    conn.send((received, seen))


def latency_at_rate(bootstrap: str, topic: str, rate: float, seconds: float, args) -> dict:
    """Offer `rate` events/s from another process; measure what a read_committed reader sees."""
    pipeline = Pipeline(_worker_settings(bootstrap, topic, f"bench-lat-{topic}", args))
    pipeline.start()
    pipeline.stats.latency_log = []
    count = int(rate * seconds)
    # Feeder and reader are separate processes, as in production: in this process they
    # would compete with the orchestrator thread for the GIL and measure themselves.
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    reader_ready, reader_stop = ctx.Event(), ctx.Event()
    reader = ctx.Process(target=_read_scores, args=(bootstrap, topic, child, reader_ready, reader_stop), daemon=True)
    reader.start()
    feeder = ctx.Process(target=_feed, args=(bootstrap, topic, count, rate, 99, reader_ready), daemon=True)
    feeder.start()
    st = pipeline.stats
    _run_worker_until(
        pipeline, lambda: not feeder.is_alive() and st.scored + st.dead_letters >= count
        and not pipeline._inflight and not pipeline.producer.in_transaction,
    )
    reader_stop.set()
    # The reader's result is larger than a pipe buffer: take it before joining the reader.
    received, seen = parent.recv() if parent.poll(60) else (0, [])
    reader.join(5)
    # Drop the first second of either measurement: group join and warm-up are not steady state.
    t0 = seen[0][0] if seen else 0.0
    lat = np.array([v for t, v in seen if t >= t0 + WARMUP_S] or [v for _, v in seen] or [np.nan])
    log = st.latency_log
    e0 = log[0][0] if log else 0.0
    emit = np.concatenate([a for t, a in log if t >= e0 + WARMUP_S] or [a for _, a in log] or [np.array([np.nan])])
    return {
        "offered_eps": rate, "events": count, "read": received, "samples": len(lat),
        "visible_p50_ms": float(np.quantile(lat, 0.5) * 1000), "visible_p99_ms": float(np.quantile(lat, 0.99) * 1000),
        "emit_p50_ms": float(np.quantile(emit, 0.5) * 1000), "emit_p99_ms": float(np.quantile(emit, 0.99) * 1000),
    }


def _check_shadow_run(result: dict, n_models: int) -> None:
    """A shadow run must have scored every event with every shadow model, or its figure means nothing."""
    want = result["scored"] * n_models
    # At least: an aborted transaction's shadow records are counted too (and redone).
    if result.get("shadow_records", 0) < want:
        raise RuntimeError(f"bench: the worker with shadows emitted {result.get('shadow_records')} shadow records, "
                           f"expected {want} ({n_models} per scored event): deployment {result.get('deployment')} "
                           "was not applied before scoring; see the worker's log above")


def run_bench(args) -> int:
    """``sluice bench``: preload, rounds of ceiling and worker runs, latency at half load; 0 when done."""
    logs.setup("WARNING", "text")
    try:
        shadow = shadow_refs(getattr(args, "shadow", None))
    except ValueError as exc:
        print(f"sluice bench: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    with ExitStack() as stack:
        # --profile: this process (ceiling loop and orchestrator) as DIR/orchestrator.*, each
        # worker phase's scoring process as DIR/scoring-<pid>.* (workers/profiling.py).
        stack.enter_context(profiled(getattr(args, "profile", None)))
        bootstrap = args.bootstrap_servers
        broker = getattr(args, "broker", "devbroker")
        if bootstrap is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sluice-bench-"))
            if broker == "kafka":
                from workers.kafka.apache import ApacheKafka

                print("bench: starting Apache Kafka (scripts/kafka, 1 node) ...", flush=True)
                bootstrap = stack.enter_context(ApacheKafka(Path(tmp) / "kafka")).bootstrap
            else:
                from devbroker import DevBroker

                bootstrap = stack.enter_context(DevBroker(data_dir=Path(tmp) / "broker",
                                                          partitions=args.partitions)).bootstrap
        else:
            broker = f"external {bootstrap}"
        admin = AdminClient({"bootstrap.servers": bootstrap, "logger": kafka_logger()})
        run_id = f"{int(time.time())}"
        topic = f"bench-in-{run_id}"
        ensure_topics(admin, [topic, f"{topic}-lat"], args.partitions)
        del admin  # gone before the broker the bench started stops (else it logs the disconnect raw)
        print(f"bench: preloading {args.events} events into {topic} ({args.partitions} partitions) ...", flush=True)
        _preload(bootstrap, topic, args.events, seed=1)
        if shadow:
            print("bench: shadow models (a third worker run per round): "
                  + ", ".join(f"{m.name}@{m.version} ({m.sha256[:12]}) from {m.path}" for m in shadow), flush=True)
        # Rounds of ceiling, worker (drift on, the default), [worker with shadows] and worker (drift
        # off); the best of `repeat` runs of each, so no comparison is decided by what else the
        # machine did during one run, and each shadow run is paired with its round's run without.
        pts, on, sh, off = [], [], [], []
        for run in range(args.repeat):
            pts.append(passthrough(bootstrap, topic, f"{topic}-pt-out", args.events, run=run))
            # With shadows, the pair (without, with) runs in turn one way, then the other way round,
            # so a machine that speeds up or slows down during the bench favours neither side.
            pair = [False, True] if shadow else [False]
            for with_shadow in (pair if run % 2 == 0 else pair[::-1]):
                if with_shadow:
                    sh.append(worker_throughput(bootstrap, topic, args.events, args, drift=True, run=run,
                                                shadow=shadow))
                    _check_shadow_run(sh[-1], len(shadow))
                else:
                    on.append(worker_throughput(bootstrap, topic, args.events, args, drift=True, run=run))
            off.append(worker_throughput(bootstrap, topic, args.events, args, drift=False, run=run))
            print(f"bench: round {run + 1}/{args.repeat}: ceiling {pts[-1]['eps']:.0f}, worker {on[-1]['eps']:.0f} "
                  + (f"(with shadow {sh[-1]['eps']:.0f}, " if shadow else "(")
                  + f"drift off {off[-1]['eps']:.0f}) events/s", flush=True)
        pt = max(pts, key=lambda r: r["eps"])
        print(f"bench: pass-through ceiling  {pt['eps']:10.0f} events/s ({pt['events']} in {pt['seconds']:.2f}s)", flush=True)
        wk = max(on, key=lambda r: r["eps"])
        wk_off = max(off, key=lambda r: r["eps"])
        wk["peak_rss_mb"] = max(r["peak_rss_mb"] for r in on)
        print(f"bench: worker (exactly once) {wk['eps']:10.0f} events/s ({wk['events']} in {wk['seconds']:.2f}s, "
              f"mean batch {wk['mean_batch']:.0f}, peak RSS {wk['peak_rss_mb']:.0f} MiB)", flush=True)
        drift_rounds = [a["eps"] / b["eps"] for a, b in zip(on, off)]
        drift_ratio = float(np.median(drift_rounds))
        print(f"bench: worker, drift off     {wk_off['eps']:10.0f} events/s; drift on / off = {drift_ratio:.3f} "
              f"(median of {args.repeat} rounds)", flush=True)
        rounds = [w["eps"] / c["eps"] for w, c in zip(on, pts)]
        ratio = float(np.median(rounds))
        ratio_best = wk["eps"] / pt["eps"]
        print(f"bench: ratio worker/ceiling  {ratio:10.2f} (median of rounds "
              f"{' '.join(f'{r:.2f}' for r in rounds)}; best run over best run {ratio_best:.2f})", flush=True)
        shadow_result = None
        if shadow:
            best_sh = max(sh, key=lambda r: r["eps"])
            shadow_rounds = [a["eps"] / b["eps"] for a, b in zip(sh, on)]
            shadow_ratio = float(np.median(shadow_rounds))
            print(f"bench: worker, with shadow   {best_sh['eps']:10.0f} events/s ({best_sh['shadow_records']} shadow "
                  f"records); with / without shadow = {shadow_ratio:.3f} (median of {args.repeat} rounds: "
                  f"{' '.join(f'{r:.3f}' for r in shadow_rounds)})", flush=True)
            shadow_result = {"models": [m.to_dict() for m in shadow], "worker": best_sh,
                             "with_without_ratio": shadow_ratio, "with_without_rounds": shadow_rounds}
        lat = latency_at_rate(bootstrap, f"{topic}-lat", wk["eps"] / 2, args.latency_seconds, args)
        print(f"bench: at {lat['offered_eps']:.0f} events/s (half the worker's max): read_committed-visible "
              f"p50={lat['visible_p50_ms']:.1f}ms p99={lat['visible_p99_ms']:.1f}ms; "
              f"emit p50={lat['emit_p50_ms']:.1f}ms p99={lat['emit_p99_ms']:.1f}ms", flush=True)
        result = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "broker": broker,
            "passthrough": pt, "worker": wk, "worker_no_drift": wk_off, "drift_on_off_ratio": drift_ratio,
            "drift_on_off_rounds": drift_rounds, "ratio_rounds": rounds, "ratio_best_over_best": ratio_best,
            "runs": {"passthrough": pts, "drift_on": on, "drift_off": off, "shadow": sh}, "ratio": ratio,
            "latency": lat, "shadow": shadow_result,
            "settings": {"processes": args.processes, "threads": args.threads, "max_batch_size": args.max_batch_size,
                         "partitions": args.partitions, "events": args.events, "repeat": args.repeat},
        }
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        summary = {"broker": broker, "ratio": round(ratio, 3), "drift_on_off": round(drift_ratio, 3),
                   "worker_eps": round(wk["eps"]), "ceiling_eps": round(pt["eps"]),
                   "p99_ms": round(lat["visible_p99_ms"], 1), "peak_rss_mb": round(wk["peak_rss_mb"])}
        if shadow_result is not None:
            summary.update(shadow=[f"{m.name}@{m.version}" for m in shadow],
                           shadow_eps=round(shadow_result["worker"]["eps"]),
                           shadow_with_without=round(shadow_result["with_without_ratio"], 3))
        print("bench: " + json.dumps(summary))
    return 0
