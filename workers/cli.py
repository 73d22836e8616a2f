"""The ``sluice`` command (also ``python -m workers``).

    sluice run --config FILE            the worker
    sluice demo [--duration S]          the main job on an embedded devbroker
    sluice produce ...                  synthetic security telemetry to a topic
    sluice bench ...                    worker vs. pass-through ceiling, one run
    sluice check-config --config FILE   validate and print the effective config
    sluice models list|check            the models and their consistency (artifacts, schema, ONNX vs torch)
    sluice models quantize --model M    an FP16 / INT8 variant of a model with its quality report
    sluice models deploy|rollback|status|compare --config FILE
                                        live deployments per route (primary, canary, shadow) and their agreement
    sluice score --model M --input F    offline scoring of JSON lines (backtests, replays)
    sluice bench-inference --model M    rows/s and latency per batch size of one backend (--sweep: all, with quality)
    sluice plan --rate EPS --p99-ms MS  replicas, partitions, cores/GPUs and cost from measurements
"""

from __future__ import annotations

# Only light standard-library modules and workers' own small ones at import: main() installs
# the SIGTERM/SIGINT handlers before pydantic, numpy, onnxruntime and librdkafka load (1-2 s).
# With them imported up here, a SIGTERM during that time killed the worker with the default
# action (exit status -15) instead of stopping it cleanly. Heavy imports live in the commands.
import argparse
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

from workers import __version__
from workers.exit_codes import (
    BrokerUnavailable,
    ConfigError,
    ExitCode,
    MetricsPortError,
    ModelLoadError,
    ScoringStartFailed,
    StartupError,
    TopicMissing,
    exit_code_for,
)

log = logging.getLogger("sluice")

# Exit codes: workers/exit_codes.py (ExitCode) is the table; README.md "Exit codes" documents it.

# Signals received before a command took over signal handling (while modules import).
_EARLY_SIGNALS: list[int] = []
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _early_signal(signum: int, _frame) -> None:
    _EARLY_SIGNALS.append(signum)


def _install_early_handlers() -> dict[int, object]:
    """Record SIGTERM/SIGINT from now on; return the handlers they replace.

    Outside the main thread (main() called from a test's thread) signals cannot be
    handled, so nothing is installed.
    """
    previous: dict[int, object] = {}
    try:
        for sig in _STOP_SIGNALS:
            previous[sig] = signal.signal(sig, _early_signal)
    except ValueError:  # not the main thread
        pass
    return previous


def _restore_handlers(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _signal_exit_code(signals: list[int]) -> ExitCode:
    """How a command that does not drain ends when stopped by ``signals``."""
    return ExitCode.INTERRUPTED if signal.SIGINT in signals else ExitCode.FORCED_STOP


def _as_startup_error(exc: BaseException, bootstrap: str) -> StartupError | None:
    """The typed start-up error for an exception from Pipeline.start(), or None if unexpected.

    Which failures are worth a restart is decided by type here and mapped to exit codes in
    workers/exit_codes.py, not by broad exception families (a scoring process that hangs
    is not bad configuration).
    """
    from confluent_kafka import KafkaException

    from workers.inference import BackendUnavailable
    from workers.inference.pool import ModelLoadFailed, ScoringStartError
    from workers.kafka.admin import TopicError
    from workers.kafka.producer import FatalProducerError, TransactionStuck

    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, TopicError):
        return TopicMissing(f"{exc} (bootstrap servers: {bootstrap})")
    if isinstance(exc, TransactionStuck):
        return BrokerUnavailable(f"the cluster at bootstrap servers {bootstrap} left a transactional call "
                                 f"hanging: {exc}")
    if isinstance(exc, (KafkaException, FatalProducerError)):
        detail = exc.args[0].str() if isinstance(exc, KafkaException) else str(exc)
        return BrokerUnavailable(f"the cluster at bootstrap servers {bootstrap} did not answer: {detail}")
    if isinstance(exc, ModelLoadFailed):
        return ModelLoadError(str(exc))  # the model, backend or device cannot be used: config
    if isinstance(exc, ScoringStartError):
        # ScoringStartHung / ScoringProcessDied: a hang or a crash, not the configuration's fault.
        return ScoringStartFailed(str(exc))
    if isinstance(exc, (ValueError, BackendUnavailable)):
        return ModelLoadError(str(exc))
    return None


def _cmd_run(args: argparse.Namespace) -> int:
    if getattr(args, "profile", None) is None:
        code = _run_worker(args)
    else:
        from workers.profiling import profiled

        # Around the whole run, model loading included; the scoring processes profile themselves
        # (SLUICE_PROFILE_DIR, set by profiled() before the pool spawns them). README "Profiling".
        with profiled(args.profile):
            code = _run_worker(args)
    _leave_now_if_stuck(code)  # (after the profile is written)
    return code


def _run_worker(args: argparse.Namespace) -> int:
    # main() installed handlers that record signals while the modules below load; from here on
    # a signal also stops the pipeline once it exists.
    signals: list[int] = _EARLY_SIGNALS
    pipeline = None

    def on_signal(signum, _frame):
        signals.append(signum)
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        if pipeline is not None:
            pipeline.request_stop()

    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_signal)

    from workers import logs
    from workers.config import load_settings

    settings = load_settings(args.config)
    logs.setup(settings.logging.level, settings.logging.format)
    if settings.inference.processes == 0:  # scoring threads run in this process: NVTX ranges here on CUDA
        from workers.profiling import enable_nvtx

        for device in [settings.model.device, *(r.model.device for r in settings.routes)]:
            enable_nvtx(device)
    if signals:
        log.info("stopped before starting", extra={"signal": signal.Signals(signals[0]).name,
                                                   "exit_code": int(ExitCode.OK)})
        return ExitCode.OK

    from workers.metrics import Metrics, MetricsServer
    from workers.pipeline import Pipeline

    metrics = Metrics()
    try:
        server = MetricsServer(metrics, settings.metrics.host, settings.metrics.port).start()
    except OSError as exc:
        err = MetricsPortError(f"cannot serve metrics on {settings.metrics.host}:{settings.metrics.port}: {exc}; "
                               "set [metrics] port (0 = any free port)")
        print(f"sluice: {err}", file=sys.stderr)
        return exit_code_for(err)
    log.info("metrics server listening", extra={"host": settings.metrics.host, "port": server.port})
    # `kill -USR2 PID` prints every thread's Python stack to stderr: where a worker that makes
    # no progress is waiting, without stopping it (the tests use it when a wait times out).
    import faulthandler

    faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)
    # Hand signals over to the pipeline with signals blocked, so one arriving in between is
    # neither lost nor replayed twice (two stops would force an abort).
    blocked = set(_STOP_SIGNALS)
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    p = Pipeline(settings, metrics)
    for _ in signals[:2]:  # arrived before the pipeline existed
        p.request_stop()
    pipeline = p
    signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
    try:
        try:
            pipeline.start()
        except Exception as exc:  # noqa: BLE001 - typed below; an unknown one exits 70 with its traceback
            err = _as_startup_error(exc, settings.kafka.bootstrap_servers)
            code = exit_code_for(err if err is not None else exc)
            fields = {"error": f"{type(exc).__name__}: {exc}", "exit_code": int(code),
                      "bootstrap_servers": settings.kafka.bootstrap_servers}
            if err is None:
                log.exception("cannot start: unexpected error", extra=fields)
            else:
                log.error("cannot start", extra={**fields, "error": f"{type(err).__name__}: {err}"})
            print(f"sluice: cannot start: {err if err is not None else exc}", file=sys.stderr)
            return code
        log.info(
            "worker started",
            extra={"group": settings.kafka.group_id, "replica": settings.kafka.replica_id,
                   "inputs": settings.kafka.input_topics, "model": pipeline.spec.name},
        )
        return pipeline.run()
    finally:
        server.stop()


def _leave_now_if_stuck(code: int) -> None:
    """``os._exit(code)`` when a producer given up (stuck, or at the stop deadline) is still inside
    its librdkafka call: the interpreter's exit would destroy that client under the call, and
    could wait on it."""
    from workers.kafka.producer import stuck_producers

    if stuck_producers():
        log.info("leaving with a transactional call still stuck", extra={"exit_code": int(code)})
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))


def _cmd_check_config(args: argparse.Namespace) -> int:
    from workers.config import is_secret_key, load_settings, reference

    if args.reference:
        print(reference())
        return ExitCode.OK
    settings = load_settings(args.config)
    doc = settings.model_dump(mode="json")
    # The effective config ends up in terminals and CI logs: never print credentials.
    doc["kafka"]["client"] = {k: ("***" if is_secret_key(k) else v) for k, v in doc["kafka"]["client"].items()}
    doc["kafka"]["transactional_id (derived)"] = settings.kafka.transactional_id
    doc["kafka"]["group_instance_id (derived)"] = settings.kafka.group_instance_id
    print(json.dumps(doc, indent=2))
    return ExitCode.OK


def _cmd_produce(args: argparse.Namespace) -> int:
    from workers import logs
    from workers.kafka.telemetry_producer import ProduceFailed, produce_telemetry

    logs.setup("INFO", "auto")
    extra = {}
    if args.drift:
        extra["drift"] = args.drift
    bootstrap, client = args.bootstrap_servers, None
    if args.config is not None:
        from workers.config import load_settings

        # The worker's [kafka] client settings (TLS, SASL) with their SLUICE_* overrides: the
        # producer connects the way the worker does.
        settings = load_settings(args.config)
        client = dict(settings.kafka.client)
        bootstrap = bootstrap or settings.kafka.bootstrap_servers
    if not bootstrap:
        raise ConfigError("produce needs --bootstrap-servers or --config FILE with [kafka] bootstrap_servers")
    # Ctrl-C stops producing and waits for what was sent, instead of raising
    # KeyboardInterrupt wherever it lands: inside a librdkafka callback that became a
    # SystemError ("returned NULL without setting an exception") and exit 1.
    import threading

    stop = threading.Event()
    interrupted: list[int] = []

    def on_signal(signum, _frame):
        interrupted.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    try:
        n = produce_telemetry(
            bootstrap, args.topic, kind=args.kind, count=args.count, rate=args.rate,
            seed=args.seed, bad_fraction=args.bad_fraction, client=client, stop=stop, **extra,
        )
    except ProduceFailed as exc:
        print(f"produce: {exc} (bootstrap servers: {bootstrap})", file=sys.stderr)
        return ExitCode.FAILURE
    print(f"produce: acknowledged={n} topic={args.topic}")
    if interrupted:
        print("produce: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def _cmd_demo(args: argparse.Namespace) -> int:
    # Like `run`, the demo handles SIGINT/SIGTERM itself (stop, check what was produced so far,
    # exit 130); signals that arrived while it was importing are handed over.
    from workers.demo import run_demo

    return run_demo(duration=args.duration, rate=args.rate, partitions=args.partitions,
                    early_signals=_EARLY_SIGNALS)


def _cmd_bench(args: argparse.Namespace) -> int:
    from workers.bench import run_bench

    return run_bench(args)


def _cmd_drift_aggregator(args: argparse.Namespace) -> int:
    from workers.drift_aggregator import main as drift_aggregator_main

    return drift_aggregator_main(args)


def _cmd_models(args: argparse.Namespace) -> int:
    from workers.models import check_model, describe_model, discover

    if args.models_command == "quantize":
        return _cmd_models_quantize(args)
    if args.models_command == "list":
        try:
            models = [describe_model(p) for p in discover(args.root)]
        except ValueError as exc:
            print(f"sluice models list: {exc}", file=sys.stderr)
            return ExitCode.CONFIG
        if args.json:
            print(json.dumps(models, indent=1))
        else:
            for m in models:
                v = m.get("variant")
                print(f"{m['name']:<20} {m['version']:<10} kind={m['event_kind']:<6} {m['path']:<28} "
                      f"backends={','.join(f'{b}:{d}' for b, ds in m['devices'].items() for d in ds)}"
                      + (f" variant={v['precision']} ({v['method']}) of {v['parent']}" if v else ""))
        return ExitCode.OK
    report = check_model(args.path, events=args.events)
    if args.json:
        print(json.dumps({"path": str(args.path), "ok": report.ok, "checks": report.items}, indent=1))
    else:
        for i in report.items:
            print(f"{i['status']:<4}  {i['check']}: {i['detail']}")
        print(f"models check: {'ok' if report.ok else 'FAILED'} ({args.path})")
    return ExitCode.OK if report.ok else ExitCode.FAILURE


def _cmd_models_quantize(args: argparse.Namespace) -> int:
    from workers.variants import VariantError, quantize  # workers/variants.py

    try:
        tolerance = {}
        for item in args.tolerance or []:
            key, sep, value = item.partition("=")
            try:
                tolerance[key.strip()] = float(value)
            except ValueError:
                raise VariantError(f"--tolerance {item!r}: expected KEY=NUMBER, e.g. flip_rate=0.01") from None
        res = quantize(args.model, args.precision, args.out, method=args.method,
                       calibration_events=args.calibration_events, calibration_seed=args.calibration_seed,
                       heldout_events=args.heldout_events, heldout_seed=args.heldout_seed,
                       per_channel=not args.per_tensor, exclude=args.exclude or (), tolerance=tolerance,
                       force=args.force, keep_failing=args.keep_failing)
    except VariantError as exc:
        print(f"sluice models quantize: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    q = res.quality
    if args.json:
        print(json.dumps(dict(q, path=str(res.path), written=res.written, violations=res.violations), indent=1))
    else:
        print(f"{q['model']} {q['variant']['version']} ({q['variant']['method']}): AUC {q['auc']['parent']:.5f} -> "
              f"{q['auc']['variant']:.5f}, flip_rate {q['flip_rate']:.4%}, max |diff| {q['max_abs_diff']:.3g}, "
              f"p99 |diff| {q['p99_abs_diff']:.3g} on {q['events']} held-out events (seed {q['heldout']['seed']})")
        for kind, r in q["recall_by_attack"].items():
            print(f"  recall {kind:<20} {r['parent']} -> {r['variant']} ({r['events']} events)")
    if res.violations:
        print(f"sluice models quantize: outside the tolerance: {'; '.join(res.violations)}; "
              + (f"kept in {res.path} (--keep-failing)" if res.written else
                 "nothing written (loosen with --tolerance KEY=VALUE, or --keep-failing to inspect it)"),
              file=sys.stderr)
        return ExitCode.FAILURE
    if not args.json:
        print(f"wrote {res.path}: {', '.join(sorted(p.name for p in res.path.iterdir()))}; "
              f"check it with: sluice models check {res.path}")
    return ExitCode.OK


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
        return ExitCode.CONFIG
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
                return ExitCode.CONFIG
            source = path.name
            with fh:
                counts = score_lines(spec, backend, fh, source, sys.stdout.buffer, dead, args.batch_size)
    except BrokenPipeError:  # e.g. | head
        return ExitCode.OK
    finally:
        if dead is not sys.stderr:
            dead.close()
    reasons = " ".join(f"{k}={v}" for k, v in sorted(counts["by_reason"].items()))
    print(f"score: model={spec.name} {spec.version} source={source} lines={counts['lines']} scored={counts['scored']} "
          f"dead_letters={counts['dead_letters']}" + (f" ({reasons})" if reasons else ""), file=sys.stderr)
    return ExitCode.OK


def _cmd_bench_inference(args: argparse.Namespace) -> int:
    from workers.inference.bench import run_cli, run_sweep_cli  # workers/inference/bench.py

    if not args.sweep:
        for flag, given in (("--variants", args.variants), ("--plot", args.plot)):
            if given:
                print(f"sluice bench-inference: {flag} belongs to the sweep; add --sweep", file=sys.stderr)
                return ExitCode.CONFIG
        return run_cli(args)
    return run_sweep_cli(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from workers.plan import run_cli as run_plan  # the capacity and cost planner: workers/plan.py

    return run_plan(args)

# Choices, spelled out here so that `sluice --help` and argument checking import nothing heavy;
# tests/unit/test_cli_parser.py checks them against workers.telemetry.KINDS and the backend registry.
TELEMETRY_KINDS = ("auth", "flow")
BACKENDS = ("onnxruntime", "onnxruntime-tensorrt", "tensorrt", "torch")
DEVICES = ("cpu", "cuda", "cuda:N")
_PLUGIN_BACKEND = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _backend(value: str) -> str:
    if value in BACKENDS or _PLUGIN_BACKEND.fullmatch(value):
        return value
    raise argparse.ArgumentTypeError(
        f"invalid choice: {value!r} (choose from {', '.join(BACKENDS)}, or package.module:factory)")


def _device(value: str) -> str:
    if _DEVICE.fullmatch(value):
        return value
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from cpu, cuda, cuda:N)")


def _fraction(value: str) -> float:
    f = float(value)
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not within 0..1")
    return f


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return n


def _positive_float(value: str) -> float:
    f = float(value)
    if not f > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return f


def build_parser() -> argparse.ArgumentParser:
    """The ``sluice`` argument parser: every option has help text, closed sets have choices."""
    p = argparse.ArgumentParser(
        prog="sluice", description="Exactly-once streaming inference from Kafka to Kafka.",
        epilog="Exit codes: 0 ok, 1 failed (aborted), 2 bad configuration or usage, 3 fenced, 70 internal error, "
               "75 temporary (cluster unreachable), 130 interrupted, 143 forced stop. See README.md.",
    )
    p.add_argument("--version", action="version", version=f"sluice {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the worker")
    r.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML config file (SLUICE_<SECTION>__<KEY> overrides; default: environment and defaults only)")
    r.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="write sampling profiles of the worker and of each scoring process (and a torch trace with "
                        "backend torch) into DIR when it stops (needs the profile extra; README 'Profiling')")
    r.set_defaults(func=_cmd_run, takes_signals=True)

    c = sub.add_parser("check-config", help="validate and print the effective config")
    c.add_argument("--config", type=Path, metavar="FILE", help="TOML config file to validate (with the environment)")
    c.add_argument("--reference", action="store_true", help="print every setting with its default and env variable")
    c.set_defaults(func=_cmd_check_config)

    pr = sub.add_parser("produce", help="produce synthetic security telemetry")
    pr.add_argument("--bootstrap-servers", default=None, metavar="HOST:PORT[,...]",
                    help="Kafka bootstrap servers (default: [kafka] bootstrap_servers of --config)")
    pr.add_argument("--config", type=Path, default=None, metavar="FILE",
                    help="take [kafka] client (security, SASL, TLS) and bootstrap_servers from this "
                         "config file and its SLUICE_* overrides")
    pr.add_argument("--topic", required=True, help="topic to produce to (must exist or be auto-created)")
    pr.add_argument("--kind", default="flow", choices=TELEMETRY_KINDS, help="event kind (default flow)")
    pr.add_argument("--count", type=_positive_int, required=True, help="number of events")
    pr.add_argument("--rate", type=_positive_float, default=None,
                    help="events per second (default: as fast as possible)")
    pr.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same events")
    pr.add_argument("--bad-fraction", type=_fraction, default=0.0, help="share of malformed records, 0..1")
    pr.add_argument("--drift", type=float, default=0.0, help="shift distributions by this magnitude (0 = training)")
    pr.set_defaults(func=_cmd_produce)

    d = sub.add_parser("demo", help="run the worker on an embedded devbroker with synthetic traffic")
    d.add_argument("--duration", type=_positive_float, default=30.0,
                   help="seconds of traffic, at most 60 (the demo stops by itself)")
    d.add_argument("--rate", type=_positive_float, default=5000.0,
                   help="events per second offered: 80%% network flows, 20%% authentication events")
    d.add_argument("--partitions", type=_positive_int, default=4, help="partitions of each input topic")
    d.set_defaults(func=_cmd_demo, takes_signals=True)

    b = sub.add_parser("bench", help="worker events/s vs. a pass-through transactional loop, latency, RSS")
    b.add_argument("--bootstrap-servers", default=None, metavar="HOST:PORT[,...]",
                   help="a running cluster (default: a broker the bench starts, see --broker)")
    b.add_argument("--broker", choices=("devbroker", "kafka"), default="devbroker",
                   help="the broker the bench starts when no --bootstrap-servers is given: the embedded "
                        "devbroker, or Apache Kafka through scripts/kafka (fetched once from Maven Central)")
    b.add_argument("--events", type=_positive_int, default=200_000, help="events preloaded and measured per round")
    b.add_argument("--partitions", type=_positive_int, default=4, help="partitions of the preloaded topic")
    b.add_argument("--latency-seconds", type=float, default=10.0, help="length of the latency phase at half load")
    b.add_argument("--max-batch-size", type=_positive_int, default=2048, help="[batching] max_batch_size of the worker")
    b.add_argument("--processes", type=int, default=1, help="[inference] processes (0 = score on threads)")
    b.add_argument("--threads", type=_positive_int, default=1, help="[inference] threads (with --processes 0)")
    b.add_argument("--repeat", type=_positive_int, default=2,
                   help="rounds of ceiling, worker with drift on, [worker with --shadow,] worker with drift off; "
                        "best of each")
    b.add_argument("--shadow", type=Path, action="append", default=None, metavar="PATH",
                   help="a model folder to run in shadow beside the configured model (repeat for several): each "
                        "round adds a worker run with them deployed, and the report gives with/without shadow")
    b.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results here")
    b.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="profile the bench process and every scoring process into DIR, as `sluice run --profile`")
    b.set_defaults(func=_cmd_bench)

    da = sub.add_parser("drift-aggregator", help="merge drift deltas of all replicas into windowed PSI reports (faust)")
    da.add_argument("--config", type=Path, metavar="FILE",
                    help="TOML config file with [drift] (SLUICE_<SECTION>__<KEY> overrides)")
    da.add_argument("--data-dir", type=Path, metavar="DIR", default=None,
                    help="faust's local data directory (default: $XDG_STATE_HOME/sluice/drift-aggregator/<group id>, "
                         "else the same under the system temp dir); nothing in it must survive a restart")
    da.set_defaults(func=_cmd_drift_aggregator)

    m = sub.add_parser("models", help="list the models, check one (artifacts, schema, ONNX vs torch), quantize one; "
                                      "deploy, roll back, compare them live (status)")
    msub = m.add_subparsers(dest="models_command", required=True,
                            metavar="list|check|quantize|deploy|rollback|status|compare")
    ml = msub.add_parser("list", help="the models under models/, with the backends usable here")
    ml.add_argument("--json", action="store_true", help="a JSON array, one object per model")
    ml.add_argument("--root", type=Path, default=None, help="a folder of model folders (default: the repository's models/)")
    ml.set_defaults(func=_cmd_models)
    mc = msub.add_parser("check", help="artifacts match the manifest, schema and features agree, ONNX equals torch")
    mc.add_argument("path", type=Path, help="a models/<name> folder")
    mc.add_argument("--events", type=_positive_int, default=4000, help="generated events to check with")
    mc.add_argument("--json", action="store_true", help="the checks as one JSON object")
    mc.set_defaults(func=_cmd_models)
    mq = msub.add_parser("quantize", help="an FP16 or INT8 variant of a model, with its quality against the parent")
    mq.add_argument("--model", type=Path, required=True, help="the FP32 parent: a models/<name> folder")
    mq.add_argument("--precision", choices=("fp16", "int8"), required=True,
                    help="fp16: graph converted to float16; int8: ONNX Runtime quantization")
    mq.add_argument("--out", type=Path, required=True, metavar="DIR", help="the variant's folder (new, or --force)")
    mq.add_argument("--method", choices=("auto", "static", "dynamic"), default="auto",
                    help="int8 only: static (calibrated on telemetry), dynamic (no calibration; scores depend on "
                         "the batch); auto = static where telemetry generates the model's event kind")
    # defaults as workers/variants.py (CALIBRATION_*, HELDOUT_*; test_quantize checks), not imported: --help stays light
    mq.add_argument("--calibration-events", type=_positive_int, default=4000, help="int8 static: calibration events")
    mq.add_argument("--calibration-seed", type=int, default=90001, help="telemetry seed of the calibration sample")
    mq.add_argument("--heldout-events", type=_positive_int, default=20000,
                    help="labelled events the quality report is measured on")
    mq.add_argument("--heldout-seed", type=int, default=90002, help="telemetry seed of the held-out set")
    mq.add_argument("--per-tensor", action="store_true", help="int8: one weight scale per tensor (default per channel)")
    mq.add_argument("--exclude", action="append", default=None, metavar="NODE",
                    help="int8: keep this graph node in float (repeat); e.g. the first and last layers")
    mq.add_argument("--tolerance", action="append", default=None, metavar="KEY=VALUE",
                    help="override a default tolerance against the parent: max_abs_diff, p99_abs_diff, flip_rate, "
                         "auc_drop (repeat)")
    mq.add_argument("--force", action="store_true", help="replace a variant already in --out")
    mq.add_argument("--keep-failing", action="store_true",
                    help="write the variant even when it is outside its tolerance (exit status 1 all the same)")
    mq.add_argument("--json", action="store_true", help="the quality report as one JSON object")
    mq.set_defaults(func=_cmd_models)
    # The live model lifecycle (workers/models_cli.py; light at import, like this module).
    from workers.models_cli import add_parsers as add_lifecycle_parsers

    add_lifecycle_parsers(msub, backend_type=_backend, device_type=_device)

    def backend_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", type=Path, required=True, help="a models/<name> folder")
        q.add_argument("--backend", type=_backend, default="onnxruntime", metavar="{" + ",".join(BACKENDS) + "}",
                       help="inference backend, or package.module:factory (default onnxruntime)")
        q.add_argument("--device", type=_device, default="cpu", metavar="{" + ",".join(DEVICES) + "}",
                       help="where the backend runs (default cpu)")
        q.add_argument("--threads", type=_positive_int, default=1, help="intra-op threads of the backend")

    sc = sub.add_parser("score", help="score JSON lines offline: score records (as on the score topic) to stdout")
    backend_args(sc)
    sc.add_argument("--input", default=None, metavar="FILE", help="a JSON-lines file (default or '-': stdin)")
    sc.add_argument("--dead-letters", type=Path, default=None, metavar="FILE",
                    help="write invalid lines here as JSON lines (default: stderr)")
    sc.add_argument("--batch-size", type=_positive_int, default=2048, help="lines scored per backend call")
    sc.set_defaults(func=_cmd_score)

    bi = sub.add_parser("bench-inference", help="rows/s and latency per batch size for a backend alone")
    backend_args(bi)
    bi.add_argument("--batch-sizes", default="1,8,64,256,1024,4096", metavar="N,N,...",
                    help="comma-separated batch sizes to measure")
    bi.add_argument("--seconds", type=_positive_float, default=1.0, help="measuring time per batch size")
    bi.add_argument("--json", action="store_true", help="the results as one JSON object")
    bi.add_argument("--backends", default=None, metavar="B,B,...", help="several backends, comma-separated (instead of --backend)")
    bi.add_argument("--precision", default="fp32", metavar="P,P,...", help="fp32, fp16 (TensorRT), tf32 (GPU); comma-separated")
    bi.add_argument("--sweep", action="store_true",
                    help="every usable backend x precision (the model, its variants, GPU engine switches) x batch "
                         "size, with each precision's quality delta")
    bi.add_argument("--variants", nargs="+", type=Path, default=None, metavar="DIR",
                    help="with --sweep: variant folders (sluice models quantize --out), or folders holding them; "
                         "variants naming --model as parent under models/ and beside --model are found anyway")
    bi.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                    help="with --sweep: write throughput against quality delta, p99 as marker size "
                         "(pip install 'sluice[plot]')")
    bi.add_argument("--plot-quality", choices=("auc_delta", "flip_rate"), default="auc_delta",
                    help="the plot's quality axis (default auc_delta: parent AUC - variant AUC)")
    bi.set_defaults(func=_cmd_bench_inference)

    pl = sub.add_parser("plan", help="replicas, partitions, cores/GPUs and monthly cost for a rate and a p99 target")
    pl.add_argument("--rate", type=_positive_float, required=True, metavar="EPS", help="events per second to serve")
    pl.add_argument("--p99-ms", type=_positive_float, required=True, metavar="MS",
                    help="p99 latency target in milliseconds")
    pl.add_argument("--bench", type=Path, action="append", default=None, metavar="FILE",
                    help="a measurement: `sluice bench --json FILE` (the whole worker) or `sluice bench-inference "
                         "--sweep --json > FILE` (engines alone, CPU and GPU); repeat to combine")
    pl.add_argument("--prices", type=Path, default=None, metavar="FILE",
                    help="price table (TOML; see deploy/prices.example.toml); without it no cost is computed")
    pl.add_argument("--precision", default="fp32", metavar="P",
                    help="plan from sweep rows of this precision only (default fp32: no quality traded)")
    pl.add_argument("--json", action="store_true", help="the plan as one JSON object")
    pl.set_defaults(func=_cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sluice`` and ``python -m workers``; returns the exit code (workers/exit_codes.py)."""
    # First of all, before anything heavy is imported (see the imports above).
    previous = _install_early_handlers()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # --help, --version, a usage error (exit 2)
        _restore_handlers(previous)
        raise
    if not getattr(args, "takes_signals", False):
        # Commands that do not drain: Ctrl-C is a KeyboardInterrupt (exit 130) as usual.
        _restore_handlers(previous)
        if _EARLY_SIGNALS:
            return _signal_exit_code(_EARLY_SIGNALS)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
