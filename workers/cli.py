"""The ``sluice`` command (also ``python -m workers``).

    sluice run --config FILE            the worker
    sluice demo [--duration S]          the main job on an embedded devbroker
    sluice produce ...                  synthetic security telemetry to a topic
    sluice bench ...                    worker vs. pass-through ceiling, one run
    sluice check-config --config FILE   validate and print the effective config
    sluice models list|check            the models and their consistency (artifacts, schema, ONNX vs torch)
    sluice score --model M --input F    offline scoring of JSON lines (backtests, replays)
    sluice bench-inference --model M    rows/s and latency per batch size of one backend
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from workers import logs
from workers.config import ConfigError, load_settings, reference

log = logging.getLogger("sluice")

# Exit codes (systemd / Kubernetes): 0 drained and committed; 1 drain deadline passed or last
# commit failed (aborted); 2 bad configuration or model (retrying will not help); 3 fenced or
# fatal producer error; 70 unexpected error (a bug; aborted); 75 cannot start for now or the
# cluster failed (unreachable, topic missing, offsets unreadable); 143 forced by a second signal.
EXIT_CONFIG = 2
EXIT_TEMPFAIL = 75


def _cmd_run(args: argparse.Namespace) -> int:
    # Signals first: a SIGTERM while the model loads or transactions initialise must
    # stop the worker cleanly, not kill it with the default action.
    signals: list[int] = []
    pipeline = None

    def on_signal(signum, _frame):
        signals.append(signum)
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        if pipeline is not None:
            pipeline.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from confluent_kafka import KafkaException

    from workers.kafka.admin import TopicError
    from workers.kafka.producer import FatalProducerError
    from workers.metrics import Metrics, MetricsServer
    from workers.pipeline import Pipeline

    settings = load_settings(args.config)
    logs.setup(settings.logging.level, settings.logging.format)
    metrics = Metrics()
    try:
        server = MetricsServer(metrics, settings.metrics.host, settings.metrics.port).start()
    except OSError as exc:
        print(f"sluice: cannot serve metrics on {settings.metrics.host}:{settings.metrics.port}: {exc}; "
              "set [metrics] port (0 = any free port)", file=sys.stderr)
        return EXIT_CONFIG
    log.info("metrics server listening", extra={"host": settings.metrics.host, "port": server.port})
    # Hand signals over to the pipeline with signals blocked, so one arriving in between is
    # neither lost nor replayed twice (two stops would force an abort).
    blocked = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    p = Pipeline(settings, metrics)
    for _ in signals[:2]:  # arrived before the pipeline existed
        p.request_stop()
    pipeline = p
    signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
    try:
        try:
            pipeline.start()
        except (TopicError, FatalProducerError, KafkaException) as exc:
            # The cluster is unreachable, a topic is missing, init_transactions failed:
            # may pass on a retry, so a supervisor should keep restarting (EX_TEMPFAIL).
            log.error("cannot start (temporary)", extra={"error": f"{type(exc).__name__}: {exc}"})
            print(f"sluice: cannot start: {exc}", file=sys.stderr)
            return EXIT_TEMPFAIL
        except (OSError, ValueError, RuntimeError) as exc:
            # Bad model folder, backend or device not installed: retrying will not help.
            log.error("cannot start", extra={"error": f"{type(exc).__name__}: {exc}"})
            print(f"sluice: cannot start: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        log.info(
            "worker started",
            extra={"group": settings.kafka.group_id, "replica": settings.kafka.replica_id,
                   "inputs": settings.kafka.input_topics, "model": pipeline.spec.name},
        )
        return pipeline.run()
    finally:
        server.stop()


def _cmd_check_config(args: argparse.Namespace) -> int:
    if args.reference:
        print(reference())
        return 0
    settings = load_settings(args.config)
    doc = settings.model_dump(mode="json")
    # The effective config ends up in terminals and CI logs: never print credentials.
    doc["kafka"]["client"] = {
        k: ("***" if any(w in k for w in ("password", "secret", "pem", "token")) else v)
        for k, v in doc["kafka"]["client"].items()
    }
    doc["kafka"]["transactional_id (derived)"] = settings.kafka.transactional_id
    doc["kafka"]["group_instance_id (derived)"] = settings.kafka.group_instance_id
    print(json.dumps(doc, indent=2))
    return 0


def _cmd_produce(args: argparse.Namespace) -> int:
    from workers.kafka.telemetry_producer import ProduceFailed, produce_telemetry

    logs.setup("INFO", "auto")
    extra = {}
    if args.drift:
        extra["drift"] = args.drift
    try:
        n = produce_telemetry(
            args.bootstrap_servers, args.topic, kind=args.kind, count=args.count, rate=args.rate,
            seed=args.seed, bad_fraction=args.bad_fraction, **extra,
        )
    except ProduceFailed as exc:
        print(f"produce: {exc}", file=sys.stderr)
        return 1
    print(f"produce: acknowledged={n} topic={args.topic}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from workers.demo import run_demo

    return run_demo(duration=args.duration, rate=args.rate, partitions=args.partitions)


def _cmd_bench(args: argparse.Namespace) -> int:
    from workers.bench import run_bench

    return run_bench(args)


def _cmd_drift_aggregator(args: argparse.Namespace) -> int:
    from workers.drift_aggregator import main as drift_aggregator_main

    return drift_aggregator_main(args)


def _cmd_models(args: argparse.Namespace) -> int:
    from workers.models import check_model, describe_model, discover

    if args.models_command == "list":
        try:
            models = [describe_model(p) for p in discover(args.root)]
        except ValueError as exc:
            print(f"sluice models list: {exc}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(models, indent=1))
        else:
            for m in models:
                print(f"{m['name']:<20} {m['version']:<8} kind={m['event_kind']:<6} {m['path']:<28} "
                      f"backends={','.join(f'{b}:{d}' for b, ds in m['devices'].items() for d in ds)}")
        return 0
    report = check_model(args.path, events=args.events)
    if args.json:
        print(json.dumps({"path": str(args.path), "ok": report.ok, "checks": report.items}, indent=1))
    else:
        for i in report.items:
            print(f"{i['status']:<4}  {i['check']}: {i['detail']}")
        print(f"models check: {'ok' if report.ok else 'FAILED'} ({args.path})")
    return 0 if report.ok else 1


def _load_backend(args: argparse.Namespace):
    from workers.features import ModelSpec
    from workers.inference import BackendUnavailable, create_backend

    try:
        spec = ModelSpec.load(args.model)
        return spec, create_backend(spec, args.backend, args.device, threads=args.threads)
    except (ValueError, BackendUnavailable) as exc:
        print(f"sluice: cannot load the model: {exc}", file=sys.stderr)
        return None, None


def _cmd_score(args: argparse.Namespace) -> int:
    from workers.offline import score_lines

    spec, backend = _load_backend(args)
    if backend is None:
        return 2
    backend.warmup([1, args.batch_size])
    dead = open(args.dead_letters, "w", encoding="utf-8") if args.dead_letters else sys.stderr
    try:
        if args.input in (None, "-"):
            source = "stdin"
            counts = score_lines(spec, backend, sys.stdin.buffer, source, sys.stdout.buffer, dead, args.batch_size)
        else:
            path = Path(args.input)
            try:
                fh = open(path, "rb")
            except OSError as exc:
                print(f"sluice score: cannot read {path}: {exc}", file=sys.stderr)
                return 2
            source = path.name
            with fh:
                counts = score_lines(spec, backend, fh, source, sys.stdout.buffer, dead, args.batch_size)
    except BrokenPipeError:  # e.g. | head
        return 0
    finally:
        if dead is not sys.stderr:
            dead.close()
    reasons = " ".join(f"{k}={v}" for k, v in sorted(counts["by_reason"].items()))
    print(f"score: model={spec.name} {spec.version} source={source} lines={counts['lines']} scored={counts['scored']} "
          f"dead_letters={counts['dead_letters']}" + (f" ({reasons})" if reasons else ""), file=sys.stderr)
    return 0


def _cmd_bench_inference(args: argparse.Namespace) -> int:
    from workers.offline import bench_inference

    spec, backend = _load_backend(args)
    if backend is None:
        return 2
    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    rows = bench_inference(spec, backend, sizes, seconds=args.seconds)
    result = {"model": spec.name, "version": spec.version, "backend": backend.describe(), "results": rows}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        d = backend.describe()
        print(f"bench-inference: {spec.name} {spec.version} on {d['name']}:{d['device']} "
              f"(threads={args.threads}, {spec.n_columns} columns)")
        print(f"{'batch':>7} {'rows/s':>12} {'p50 ms':>9} {'p99 ms':>9} {'us/row':>8}")
        for r in rows:
            print(f"{r['batch_size']:>7} {r['rows_per_s']:>12,.0f} {r['latency_ms_p50']:>9.3f} "
                  f"{r['latency_ms_p99']:>9.3f} {r['latency_us_per_row']:>8.3f}")
    return 0

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice", description="Exactly-once streaming inference from Kafka to Kafka.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the worker")
    r.add_argument("--config", type=Path, help="TOML config file (SLUICE_<SECTION>__<KEY> overrides)")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("check-config", help="validate and print the effective config")
    c.add_argument("--config", type=Path)
    c.add_argument("--reference", action="store_true", help="print every setting with its default and env variable")
    c.set_defaults(func=_cmd_check_config)

    pr = sub.add_parser("produce", help="produce synthetic security telemetry")
    pr.add_argument("--bootstrap-servers", required=True)
    pr.add_argument("--topic", required=True)
    pr.add_argument("--kind", default="flow", help="flow | auth")
    pr.add_argument("--count", type=int, required=True)
    pr.add_argument("--rate", type=float, default=None, help="events per second (default: as fast as possible)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--bad-fraction", type=float, default=0.0, help="share of malformed records, 0..1")
    pr.add_argument("--drift", type=float, default=0.0, help="shift distributions by this magnitude (0 = training)")
    pr.set_defaults(func=_cmd_produce)

    d = sub.add_parser("demo", help="run the worker on an embedded devbroker with synthetic traffic")
    d.add_argument("--duration", type=float, default=30.0, help="seconds of traffic (the demo stops by itself)")
    d.add_argument("--rate", type=float, default=5000.0, help="events per second offered")
    d.add_argument("--partitions", type=int, default=4)
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="worker events/s vs. a pass-through transactional loop, latency, RSS")
    b.add_argument("--bootstrap-servers", default=None, help="a running cluster (default: an embedded devbroker)")
    b.add_argument("--events", type=int, default=200_000)
    b.add_argument("--partitions", type=int, default=4)
    b.add_argument("--latency-seconds", type=float, default=10.0)
    b.add_argument("--max-batch-size", type=int, default=2048)
    b.add_argument("--processes", type=int, default=1, help="[inference] processes (0 = score on threads)")
    b.add_argument("--threads", type=int, default=1, help="[inference] threads (with --processes 0)")
    b.add_argument("--repeat", type=int, default=2,
                   help="rounds of ceiling, worker with drift on, worker with drift off; best of each")
    b.add_argument("--json", type=Path, default=None, help="also write the results here")
    b.set_defaults(func=_cmd_bench)

    da = sub.add_parser("drift-aggregator", help="merge drift deltas of all replicas into windowed PSI reports (faust)")
    da.add_argument("--config", type=Path, help="TOML config file with [drift] (SLUICE_<SECTION>__<KEY> overrides)")
    da.set_defaults(func=_cmd_drift_aggregator)

    m = sub.add_parser("models", help="list the models or check one (artifacts, schema, ONNX vs torch)")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="the models under models/, with the backends usable here")
    ml.add_argument("--json", action="store_true", help="a JSON array, one object per model")
    ml.add_argument("--root", type=Path, default=None, help="a folder of model folders (default: the repository's models/)")
    ml.set_defaults(func=_cmd_models)
    mc = msub.add_parser("check", help="artifacts match the manifest, schema and features agree, ONNX equals torch")
    mc.add_argument("path", type=Path, help="a models/<name> folder")
    mc.add_argument("--events", type=int, default=4000, help="generated events to check with")
    mc.add_argument("--json", action="store_true")
    mc.set_defaults(func=_cmd_models)

    def backend_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", type=Path, required=True, help="a models/<name> folder")
        q.add_argument("--backend", default="onnxruntime",
                       help="onnxruntime | onnxruntime-tensorrt | tensorrt | torch (default onnxruntime)")
        q.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
        q.add_argument("--threads", type=int, default=1, help="intra-op threads of the backend")

    sc = sub.add_parser("score", help="score JSON lines offline: score records (as on the score topic) to stdout")
    backend_args(sc)
    sc.add_argument("--input", default=None, help="a JSON-lines file (default or '-': stdin)")
    sc.add_argument("--dead-letters", type=Path, default=None,
                    help="write invalid lines here as JSON lines (default: stderr)")
    sc.add_argument("--batch-size", type=int, default=2048)
    sc.set_defaults(func=_cmd_score)

    bi = sub.add_parser("bench-inference", help="rows/s and latency per batch size for a backend alone")
    backend_args(bi)
    bi.add_argument("--batch-sizes", default="1,8,64,256,1024,4096")
    bi.add_argument("--seconds", type=float, default=1.0, help="measuring time per batch size")
    bi.add_argument("--json", action="store_true")
    bi.set_defaults(func=_cmd_bench_inference)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
