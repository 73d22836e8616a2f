"""The ``sluice`` command (also ``python -m workers``).

    sluice run --config FILE            the worker
    sluice demo [--duration S]          the main job on an embedded devbroker
    sluice produce ...                  synthetic security telemetry to a topic
    sluice bench ...                    worker vs. pass-through ceiling, one run
    sluice check-config --config FILE   validate and print the effective config
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

    from workers.metrics import Metrics, MetricsServer
    from workers.pipeline import Pipeline

    settings = load_settings(args.config)
    logs.setup(settings.logging.level, settings.logging.format)
    metrics = Metrics()
    server = MetricsServer(metrics, settings.metrics.host, settings.metrics.port).start()
    log.info("metrics server listening", extra={"host": settings.metrics.host, "port": server.port})
    pipeline = Pipeline(settings, metrics)
    for _ in signals:  # arrived before the pipeline existed
        pipeline.request_stop()
    try:
        try:
            pipeline.start()
        except (OSError, ValueError, RuntimeError) as exc:
            # Bad model folder, missing backend or topic, broker unreachable, fenced at init:
            # say what is wrong and exit non-zero instead of a traceback.
            log.error("cannot start", extra={"error": f"{type(exc).__name__}: {exc}"})
            print(f"sluice: cannot start: {exc}", file=sys.stderr)
            return 2
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
    pr.add_argument("--kind", default="flow")
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
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--json", type=Path, default=None, help="also write the results here")
    b.set_defaults(func=_cmd_bench)

    da = sub.add_parser("drift-aggregator", help="merge drift deltas of all replicas into windowed PSI reports (faust)")
    da.add_argument("--config", type=Path, help="TOML config file with [drift] (SLUICE_<SECTION>__<KEY> overrides)")
    da.set_defaults(func=_cmd_drift_aggregator)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
