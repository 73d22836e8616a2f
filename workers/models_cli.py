"""The operator's side of the model lifecycle: ``sluice models deploy | rollback | status | compare``.

The records these commands write and read are described in :mod:`workers.control`; what a
replica does with them in :mod:`workers.lifecycle`.

- ``deploy`` checks the route and the model folders, digests them, reads the route's current
  deployment from the control topic (``[topics] control``) and writes its successor there
  (idempotent producer, ``acks=all``), creating the compacted control topic if it is missing.
  The new record carries the old one in its history, so ``rollback`` can return to it.
- ``rollback`` writes the deployment before the current one again, under a new id.
- ``status`` shows, per route, the desired deployment (control topic) and, from the audit
  topic (``[topics] audit``), the deployment each replica last applied and since when.
- ``compare`` joins the scores topic with the shadow topic by ``source`` and reports how the
  shadow models agree with the model that scored each event for real (and canary against
  primary), optionally against the ground truth carried by the input events.

Exit codes (:class:`workers.exit_codes.ExitCode`): 0 done; 2 (``CONFIG``) for anything the
operator must fix (unknown route, bad model folder or one that fails ``models check``, flags
that do not go together, nothing to roll back to, credentials or ACLs refused); 75
(``TEMPFAIL``) when the cluster cannot be reached or does not answer in ``--timeout``.

Every function that talks to Kafka takes the worker's :class:`~workers.config.Settings`, so
the same ``[kafka] client`` settings (TLS, SASL) apply (:func:`workers.kafka.settings.common`).
This module imports only the standard library at import time: ``sluice --help`` builds its
parsers (:func:`add_parsers`) without loading pydantic, numpy or librdkafka.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.exit_codes import ExitCode

# Metadata, reading the control topic and the delivery of one control record: a cluster that
# does not answer within this is reported (exit 75) instead of hanging the operator's shell.
BROKER_TIMEOUT_S = 15.0
# compare reads whole topics (every score of a route): give it longer by default.
COMPARE_TIMEOUT_S = 120.0
# `models check` before a deploy: enough generated events to catch a broken featurization or
# ONNX graph, few enough that a deploy takes seconds (the full check uses 4000).
DEPLOY_CHECK_EVENTS = 500
# Score histograms for PSI: 10 equal bins on [0, 1], as the worker's drift deltas and guard.
SCORE_BINS = 10
# How much of a sha256 a human reads in status / compare output (12 hex digits: no collisions
# among the handful of artifacts one route ever sees).
SHA_SHOWN = 12
# Records read per consume() call while reading a topic to its end.
READ_BATCH = 2000


class CommandError(Exception):
    """A lifecycle command cannot do what it was asked: one line for the operator and an exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.CONFIG):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- small helpers


def _when(ts: float | None) -> str:
    """Epoch seconds as UTC, the form status prints."""
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def _short(sha: str | None) -> str:
    return (sha or "")[:SHA_SHOWN] or "-"


def find_route(settings, name: str):
    """The route called ``name`` among the config's effective routes (CommandError if none)."""
    routes = settings.effective_routes()
    for r in routes:
        if r.name == name:
            return r
    known = ", ".join(r.name for r in routes)
    raise CommandError(f"--route {name!r}: no such route in the configuration (routes: {known}); "
                       "name one of them or add it under [[routes]]")


def validate_deploy_args(canary: Path | None, fraction: float | None) -> float:
    """The canary's share from the flags, or CommandError naming the flag to fix."""
    if fraction is not None and canary is None:
        raise CommandError("--fraction needs --canary PATH (the model that scores that share of the events)")
    if canary is not None and fraction is None:
        raise CommandError("--canary needs --fraction F, the share of events it scores, between 0 and 1 (e.g. 0.1)")
    if canary is None:
        return 0.0
    if not (isinstance(fraction, float) and math.isfinite(fraction) and 0.0 < fraction < 1.0):
        raise CommandError(f"--fraction {fraction}: must lie strictly between 0 and 1 (e.g. 0.1 for 10% of events); "
                           "to give the canary all traffic deploy it as --primary")
    return fraction


def load_model(flag: str, path: Path, backend: str | None, device: str | None):
    """``ModelRef.from_folder`` with the flag named in its error."""
    from workers.control import ModelRef

    try:
        return ModelRef.from_folder(path, backend=backend, device=device)
    except (ValueError, OSError) as exc:
        raise CommandError(f"{flag} {path}: not a usable model folder: {exc}") from None


def check_event_kind(flag: str, ref, route) -> None:
    """A model must read the route's kind of event: a flow model on an auth route would only dead-letter."""
    from workers.features import ModelSpec

    try:
        configured = ModelSpec.load(route.model.path)
    except (ValueError, OSError):
        return  # the configured model is not readable here; the replicas check what they load
    spec = ModelSpec.load(ref.path)
    if spec.event_kind != configured.event_kind:
        raise CommandError(f"{flag} {ref.path}: reads {spec.event_kind!r} events, but route {route.name!r} carries "
                           f"{configured.event_kind!r} events (its configured model {route.model.path}); deploy a "
                           f"{configured.event_kind} model on this route")


def run_model_check(flag: str, ref, events: int) -> None:
    """``sluice models check`` on one model folder; CommandError naming the first failed check."""
    from workers.models import check_model

    try:
        report = check_model(ref.path, events=events)
    except Exception as exc:  # noqa: BLE001 - the check itself choked on the artifacts (e.g. a corrupt ONNX file)
        raise CommandError(f"{flag} {ref.path}: fails `sluice models check` ({type(exc).__name__}: {exc}); see "
                           f"`sluice models check {ref.path}`, or deploy anyway with --no-check") from None
    failed = [i for i in report.items if i["status"] == "FAIL"]
    if failed:
        first = failed[0]
        raise CommandError(f"{flag} {ref.path}: fails `sluice models check` ({first['check']}: {first['detail']}"
                           + (f"; {len(failed) - 1} more" if len(failed) > 1 else "")
                           + f"); see `sluice models check {ref.path}`, or deploy anyway with --no-check")


def predecessor(settings, route, current):
    """What a new deployment replaces: the current control record, else the route's configured model.

    Returns (deployment or None, warning or ''). With the configured model as predecessor a
    later ``rollback`` returns to it; if that folder cannot be read here there is none.
    """
    from workers.control import initial_deployment

    if current is not None:
        return current, ""
    try:
        return initial_deployment(settings.kafka.group_id, route.name, route.model.path, route.model.backend,
                                  route.model.device), ""
    except (ValueError, OSError) as exc:
        return None, (f"the route's configured model {route.model.path} cannot be read here ({exc}): this "
                      "deployment records no predecessor, so `sluice models rollback` cannot return to it")


def plan_deploy(settings, route, current, *, primary, canary=None, fraction: float = 0.0, shadow=(),
                reason: str = "", requested_by: dict[str, str] | None = None):
    """The deployment ``deploy`` writes: it supersedes ``current`` (or the configured model).

    Returns (deployment, warning or '').
    """
    from workers.control import new_deployment

    prev, warning = predecessor(settings, route, current)
    kwargs = dict(primary=primary, canary=canary, fraction=fraction if canary is not None else 0.0,
                  shadow=tuple(shadow), kind="deploy", reason=reason, requested_by=requested_by)
    if prev is None:
        return new_deployment(settings.kafka.group_id, route.name, **kwargs), warning
    return prev.succeeded_by(**kwargs), warning


def plan_rollback(route_name: str, current, *, reason: str = "", requested_by: dict[str, str] | None = None):
    """The deployment ``rollback`` writes: the one before ``current``, under a new id."""
    if current is None:
        raise CommandError(f"route {route_name!r} has no deployment on the control topic (it runs its configured "
                           "model): nothing to roll back to")
    try:
        return current.rolled_back(reason=reason, requested_by=requested_by)
    except ValueError as exc:
        raise CommandError(f"{exc}: nothing to roll back to") from None


# ----------------------------------------------------------------------------- Kafka


def _kafka_error(exc: BaseException, settings, what: str) -> CommandError:
    """The operator's line for a client error: credentials/ACL -> 2, anything else -> 75."""
    from confluent_kafka import KafkaError, KafkaException

    from workers.kafka.admin import is_authorization_error

    bootstrap = settings.kafka.bootstrap_servers
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        err = exc.args[0]
        if is_authorization_error(err):
            return CommandError(f"{what}: not authorized: {err.str()} (the principal of [kafka] client needs the "
                                "ACLs in the README's \"Secured clusters\" section)", ExitCode.CONFIG)
        if err.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
            return CommandError(f"{what}: the cluster at {bootstrap} refused the credentials of [kafka] client: "
                                f"{err.str()}", ExitCode.CONFIG)
        detail = err.str()
    else:
        detail = str(exc)
    return CommandError(f"{what}: the cluster at {bootstrap} did not answer: {detail} (is it up? "
                        "[kafka] bootstrap_servers; or raise --timeout)", ExitCode.TEMPFAIL)


def _reader(settings, tag: str):
    """A read_committed consumer outside any group (assign only; never commits)."""
    from confluent_kafka import Consumer

    from workers.kafka import settings as kafka_settings

    conf = kafka_settings.common(settings)
    conf.update({
        # assign() needs no group, but librdkafka wants an id; it is never joined or committed.
        "group.id": f"{settings.kafka.group_id}.models-cli.{tag}.{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        # Outputs of aborted or still open transactions are not outputs: never count them.
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
    })
    return Consumer(conf)


def read_topic(settings, topic: str, *, timeout: float, start: dict[int, int] | None = None,
               start_default: int | None = None, tag: str = "read") -> Iterator[Any]:
    """Every committed record of ``topic`` up to its end as of the call (read_committed).

    ``start`` gives a first offset per partition, ``start_default`` one for the partitions it
    does not name (default: the beginning; never before the log start). A missing topic
    yields nothing. Raises ``TimeoutError`` when the end is not reached within ``timeout`` s
    (a broker down, or a transaction left open holds the last stable offset back), and
    ``KafkaException`` for client errors. Records written after the call are not read.
    """
    from confluent_kafka import KafkaError, KafkaException, TopicPartition

    consumer = _reader(settings, tag)
    try:
        deadline = time.monotonic() + timeout
        md = consumer.list_topics(topic, timeout=timeout)
        t = md.topics.get(topic)
        if t is None or t.error is not None and t.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return
        if t.error is not None:
            raise KafkaException(t.error)
        first: dict[int, int] = {}
        ends: dict[int, int] = {}
        for p in sorted(t.partitions):
            # read_committed: the high offset a read_committed consumer gets is the last stable one.
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                    timeout=max(0.1, deadline - time.monotonic()))
            begin = max(lo, (start or {}).get(p, lo if start_default is None else start_default))
            if hi > begin:
                first[p], ends[p] = begin, hi
        if not ends:
            return
        consumer.assign([TopicPartition(topic, p, first[p]) for p in ends])
        nxt = dict(first)  # the next offset to read, per partition
        while any(nxt[p] < ends[p] for p in ends):
            if time.monotonic() > deadline:
                left = {p: ends[p] - nxt[p] for p in ends if nxt[p] < ends[p]}
                raise TimeoutError(f"topic {topic!r} was not read to its end within {timeout:g}s "
                                   f"(records left per partition: {left})")
            for m in consumer.consume(READ_BATCH, 0.2):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(m.error())
                p = m.partition()
                if p in ends and m.offset() < ends[p]:
                    yield m
                nxt[p] = max(nxt.get(p, 0), m.offset() + 1)
            # Transaction markers and aborted records are never returned: go by the position.
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= 0:
                    nxt[tp.partition] = max(nxt[tp.partition], tp.offset)
    finally:
        consumer.close()


def read_json_topic(settings, topic: str, *, timeout: float, start: dict[int, int] | None = None,
                    start_default: int | None = None, tag: str = "read") -> Iterator[tuple[int, int, dict]]:
    """(partition, offset, document) for every record of ``topic`` that is a JSON object."""
    import orjson

    for m in read_topic(settings, topic, timeout=timeout, start=start, start_default=start_default, tag=tag):
        value = m.value()
        if value is None:
            continue
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict):
            yield m.partition(), m.offset(), doc


def ensure_control_topic(settings, timeout: float) -> bool:
    """Create the compacted control topic if it is missing (1 partition); True if created."""
    from confluent_kafka.admin import AdminClient

    from workers.kafka import settings as kafka_settings
    from workers.kafka.admin import ensure_topics

    admin = AdminClient(kafka_settings.admin_config(settings))
    # One partition: the deployments of all routes stay in one order; compacted: the latest
    # record per route is kept for ever, so a replica starting in a year still finds it.
    created = ensure_topics(admin, [settings.topics.control], 1, settings.topics.replication_factor,
                            timeout=timeout, config={"cleanup.policy": "compact"})
    return bool(created)


def publish(settings, dep, timeout: float) -> None:
    """Write one deployment to the control topic and wait until every in-sync replica has it."""
    from confluent_kafka import KafkaException, Producer

    from workers.kafka import settings as kafka_settings

    conf = kafka_settings.common(settings)
    conf.update({
        # The record must survive a broker loss, and a retried send must not write it twice.
        "acks": "all",
        "enable.idempotence": True,
        # Give up (and say so) within the operator's --timeout instead of librdkafka's 5 minutes.
        "message.timeout.ms": max(1000, int(timeout * 1000)),
    })
    producer = Producer(conf)
    outcome: list[Any] = []

    def delivered(err, msg) -> None:
        outcome.append(err)

    try:
        producer.produce(settings.topics.control, dep.encode(), dep.key, on_delivery=delivered)
    except (KafkaException, BufferError) as exc:
        raise _kafka_error(exc, settings, f"writing deployment {dep.id}") from None
    # A little past message.timeout.ms, so the delivery report (success or its error) arrives.
    left = producer.flush(timeout + 5.0)
    if left or not outcome:
        raise CommandError(f"writing deployment {dep.id}: not acknowledged by the cluster at "
                           f"{settings.kafka.bootstrap_servers} within {timeout:g}s; nothing was changed "
                           "(raise --timeout or check the cluster)", ExitCode.TEMPFAIL)
    if outcome[0] is not None:
        raise _kafka_error(KafkaException(outcome[0]), settings, f"writing deployment {dep.id}")


def current_deployments(settings, timeout: float) -> dict:
    """{route: Deployment} as on the control topic now (lifecycle.read_deployments)."""
    from workers.lifecycle import read_deployments

    return read_deployments(settings, timeout=timeout)


def _with_broker(settings, what: str, fn, *args, **kwargs):
    """Run a broker call, turning client errors and timeouts into CommandError."""
    from confluent_kafka import KafkaException

    from workers.kafka.admin import TopicError

    try:
        return fn(*args, **kwargs)
    except (KafkaException, TimeoutError) as exc:
        raise _kafka_error(exc, settings, what) from None
    except TopicError as exc:
        raise CommandError(f"{what}: {exc}", ExitCode.TEMPFAIL) from None


# ----------------------------------------------------------------------------- deploy / rollback


def _load_settings(args: argparse.Namespace):
    """The config named by --config; librdkafka's own log lines only with --verbose.

    A broker that is down makes every client log each connection attempt; the command's one
    line (what failed, where, and what to do) says the same, so the repeats stay hidden.
    """
    import logging

    from workers.config import load_settings
    from workers.logs import KAFKA_LOGGER_NAME

    if not getattr(args, "verbose", False):
        logging.getLogger(KAFKA_LOGGER_NAME).setLevel(logging.CRITICAL)
    return load_settings(args.config)


def describe_deployment(dep) -> dict[str, Any]:
    """A deployment as status and deploy print it (JSON-ready)."""
    def model(m, extra=None):
        return {"name": m.name, "version": m.version, "sha256": m.sha256, "path": m.path,
                "backend": m.backend, "device": m.device, **(extra or {})}

    return {
        "deployment": dep.id, "kind": dep.kind, "created_at": dep.created_at or None,
        "primary": model(dep.primary),
        "canary": None if dep.canary is None else model(dep.canary, {"fraction": dep.fraction}),
        "shadow": [model(m) for m in dep.shadow],
        "reason": dep.reason, "requested_by": dict(dep.requested_by), "supersedes": dep.supersedes,
        "history": [h.get("deployment") for h in dep.history],
    }


def _model_line(role: str, m: dict) -> str:
    share = f" x{m['fraction']:g}" if "fraction" in m else ""
    return f"{role:<8} {m['name']} {m['version']} sha256 {_short(m['sha256'])}{share}  {m['path']}"


def _one_line(dep) -> str:
    parts = [dep.id, f"route={dep.route}", f"kind={dep.kind}",
             f"primary={dep.primary.name}@{dep.primary.version}({_short(dep.primary.sha256)})"]
    if dep.canary is not None:
        parts.append(f"canary={dep.canary.name}@{dep.canary.version}({_short(dep.canary.sha256)})x{dep.fraction:g}")
    parts += [f"shadow={m.name}@{m.version}({_short(m.sha256)})" for m in dep.shadow]
    parts.append(f"supersedes={dep.supersedes or '-'}")
    return " ".join(parts)


def cmd_deploy(args: argparse.Namespace) -> int:
    """``sluice models deploy``: validate, digest, check, then write the route's new deployment."""
    from workers.control import requester

    try:
        fraction = validate_deploy_args(args.canary, args.fraction)
        settings = _load_settings(args)
        route = find_route(settings, args.route)
        flagged = [("--primary", args.primary)]
        if args.canary is not None:
            flagged.append(("--canary", args.canary))
        flagged += [("--shadow", p) for p in args.shadow or ()]
        refs = [(flag, load_model(flag, path, args.backend, args.device)) for flag, path in flagged]
        for flag, ref in refs:
            check_event_kind(flag, ref, route)
        if args.check:
            checked: set[str] = set()
            for flag, ref in refs:
                if ref.sha256 not in checked:
                    run_model_check(flag, ref, args.check_events)
                    checked.add(ref.sha256)
        _with_broker(settings, f"creating the control topic {settings.topics.control!r}",
                     ensure_control_topic, settings, args.timeout)
        current = _with_broker(settings, f"reading the control topic {settings.topics.control!r}",
                               current_deployments, settings, args.timeout).get(route.name)
        primary = refs[0][1]
        canary = refs[1][1] if args.canary is not None else None
        shadow = tuple(ref for flag, ref in refs if flag == "--shadow")
        dep, warning = plan_deploy(settings, route, current, primary=primary, canary=canary, fraction=fraction,
                                   shadow=shadow, reason=args.reason or "",
                                   requested_by=requester("sluice models deploy"))
        if warning:
            print(f"sluice models deploy: warning: {warning}", file=sys.stderr)
        publish(settings, dep, args.timeout)
    except CommandError as exc:
        print(f"sluice models deploy: {exc}", file=sys.stderr)
        return exc.code
    _print_written(dep, args.json)
    return ExitCode.OK


def cmd_rollback(args: argparse.Namespace) -> int:
    """``sluice models rollback``: write the route's previous deployment again."""
    from workers.control import requester

    try:
        settings = _load_settings(args)
        route = find_route(settings, args.route)
        current = _with_broker(settings, f"reading the control topic {settings.topics.control!r}",
                               current_deployments, settings, args.timeout).get(route.name)
        dep = plan_rollback(route.name, current, reason=args.reason or "",
                            requested_by=requester("sluice models rollback"))
        publish(settings, dep, args.timeout)
    except CommandError as exc:
        print(f"sluice models rollback: {exc}", file=sys.stderr)
        return exc.code
    _print_written(dep, args.json)
    return ExitCode.OK


def _print_written(dep, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"route": dep.route, "group": dep.group, **describe_deployment(dep)}, indent=1))
    else:
        print(_one_line(dep))


# ----------------------------------------------------------------------------- status


@dataclass
class ReplicaState:
    """What one replica last applied on one route, from the audit topic."""

    replica: str
    deployment: str
    since: float
    last_seen: float
    worker: dict[str, Any] = field(default_factory=dict)


def replica_states(audits: Iterable[dict], group: str) -> dict[str, dict[str, ReplicaState]]:
    """{route: {replica: ReplicaState}} from ``applied`` audit records, in topic order.

    ``since`` is when the replica first applied the deployment it still runs: later ``applied``
    records of the same deployment (partitions assigned to it afterwards) do not move it.
    """
    out: dict[str, dict[str, ReplicaState]] = defaultdict(dict)
    for a in audits:
        if a.get("group") != group or a.get("event") != "applied":
            continue
        route, replica, dep, at = a.get("route"), a.get("replica"), a.get("deployment"), float(a.get("at") or 0.0)
        if not (route and replica and dep):
            continue
        st = out[route].get(replica)
        if st is None or st.deployment != dep:
            out[route][replica] = ReplicaState(replica, dep, at, at, dict(a.get("worker") or {}))
        else:
            st.last_seen = max(st.last_seen, at)
    return out


def status_report(settings, deployments: dict, audits: list[dict]) -> dict[str, Any]:
    """The report ``status`` prints, from the control records and the audit records (pure)."""
    group = settings.kafka.group_id
    states = replica_states(audits, group)
    routes = []
    for route in settings.effective_routes():
        dep = deployments.get(route.name)
        source = "control"
        if dep is None:
            dep, _ = predecessor(settings, route, None)
            source = "config"
        desired = None if dep is None else describe_deployment(dep)
        replicas = []
        for st in sorted(states.get(route.name, {}).values(), key=lambda s: s.replica):
            replicas.append({"replica": st.replica, "deployment": st.deployment, "since": st.since,
                             "last_seen": st.last_seen, "worker": st.worker,
                             "on_desired": dep is not None and st.deployment == dep.id})
        refusals, guards = [], []
        if dep is not None:
            for a in audits:
                if a.get("group") != group or a.get("route") != route.name:
                    continue
                if a.get("event") == "refused" and a.get("deployment") == dep.id:
                    refusals.append({"replica": a.get("replica"), "at": a.get("at"), "error": a.get("error", ""),
                                     "kept": a.get("kept")})
                elif a.get("event") == "guard_rollback" and dep.id in (a.get("deployment"), a.get("rollback")):
                    guards.append({"replica": a.get("replica"), "at": a.get("at"), "deployment": a.get("deployment"),
                                   "reason": a.get("reason", ""), "rollback": a.get("rollback")})
        routes.append({"route": route.name, "input_topics": list(route.input_topics), "scores": route.scores,
                       "source": source, "desired": desired, "replicas": replicas,
                       "refusals": refusals, "guard_rollbacks": guards})
    return {"group": group, "control_topic": settings.topics.control, "audit_topic": settings.topics.audit,
            "routes": routes}


def format_status(report: dict[str, Any]) -> str:
    """The human form of :func:`status_report`."""
    lines = [f"group {report['group']}  (control topic {report['control_topic']}, audit topic {report['audit_topic']})"]
    for r in report["routes"]:
        d = r["desired"]
        lines.append("")
        if d is None:
            lines.append(f"route {r['route']}  (input: {', '.join(r['input_topics'])})  desired: the configured model "
                         "(not readable here)")
        else:
            origin = "configured model, no deployment yet" if r["source"] == "config" else d["kind"]
            lines.append(f"route {r['route']}  (input: {', '.join(r['input_topics'])})  desired: {d['deployment']} "
                         f"({origin}{', ' + _when(d['created_at']) if d['created_at'] else ''})")
            lines.append("  " + _model_line("primary", d["primary"]))
            if d["canary"] is not None:
                lines.append("  " + _model_line("canary", d["canary"]))
            lines += ["  " + _model_line("shadow", m) for m in d["shadow"]]
            if r["source"] == "control":
                who = d["requested_by"]
                asker = f"{who.get('user', who.get('replica', '?'))}@{who.get('host', '?')}" if who else "?"
                lines.append(f"  reason: {d['reason'] or '-'}; requested by {asker} ({who.get('tool', '?')})"
                             + (f"; supersedes {d['supersedes']}" if d["supersedes"] else ""))
        if not r["replicas"]:
            lines.append("  replicas: none has applied a deployment of this route yet (no `applied` audit record)")
        else:
            lines.append("  replicas:")
            for s in r["replicas"]:
                mark = "" if s["on_desired"] else "   <- not on the desired deployment yet"
                w = s["worker"]
                lines.append(f"    {s['replica']:<20} {s['deployment']}  since {_when(s['since'])}  "
                             f"(sluice {w.get('version', '?')}, config {_short(w.get('config_sha256'))}){mark}")
        for f in r["refusals"]:
            lines.append(f"  REFUSED by {f['replica']} at {_when(f['at'])}: {f['error']}"
                         + (f" (kept {f['kept']})" if f.get("kept") else ""))
        for g in r["guard_rollbacks"]:
            lines.append(f"  GUARD ROLLBACK of {g['deployment']} by {g['replica']} at {_when(g['at'])}: {g['reason']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    """``sluice models status``: desired deployments and what each replica runs."""
    try:
        settings = _load_settings(args)
        deployments = _with_broker(settings, f"reading the control topic {settings.topics.control!r}",
                                   current_deployments, settings, args.timeout)
        audits = _with_broker(settings, f"reading the audit topic {settings.topics.audit!r}",
                              lambda: [doc for _, _, doc in read_json_topic(settings, settings.topics.audit,
                                                                            timeout=args.timeout, tag="audit")])
    except CommandError as exc:
        print(f"sluice models status: {exc}", file=sys.stderr)
        return exc.code
    report = status_report(settings, deployments, audits)
    print(json.dumps(report, indent=1) if args.json else format_status(report))
    return ExitCode.OK


# ----------------------------------------------------------------------------- compare


def ground_truth(doc: Any) -> bool | None:
    """An input event's ground truth: its ``label`` field (telemetry: an attack name or "benign")."""
    if not isinstance(doc, dict):
        return None
    v = doc.get("label")
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        return v.strip().lower() not in ("benign", "0", "false", "")
    if isinstance(v, int):
        return v != 0
    return None


def parse_since(values: list[str] | None) -> tuple[int | None, dict[tuple[str, int], int]]:
    """``--since-offset`` values: ``N`` (every input partition) or ``TOPIC:PARTITION:N``."""
    default: int | None = None
    specific: dict[tuple[str, int], int] = {}
    for v in values or ():
        parts = v.rsplit(":", 2)
        try:
            if len(parts) == 1:
                default = int(parts[0])
                if default < 0:
                    raise ValueError
            elif len(parts) == 3 and parts[0]:
                p, o = int(parts[1]), int(parts[2])
                if p < 0 or o < 0:
                    raise ValueError
                specific[(parts[0], p)] = o
            else:
                raise ValueError
        except ValueError:
            raise CommandError(f"--since-offset {v!r}: expected OFFSET or TOPIC:PARTITION:OFFSET with non-negative "
                               "integers (e.g. flows:0:1200, the input offset an `applied` audit record names)"
                               ) from None
    return default, specific


def _model_key(doc: dict) -> tuple[str, str, str]:
    m = doc.get("model") or {}
    return (str(m.get("name", "?")), str(m.get("version", "?")), str(m.get("sha256", "")))


def _model_name(key: tuple[str, str, str]) -> str:
    return f"{key[0]} {key[1]}" + (f" ({_short(key[2])})" if key[2] else "")


def _hist(scores) -> Any:
    import numpy as np

    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    return np.bincount(np.minimum((s * SCORE_BINS).astype(np.int64), SCORE_BINS - 1), minlength=SCORE_BINS)


def score_psi(reference_scores, scores) -> float | None:
    """PSI of ``scores`` against ``reference_scores`` over 10 bins on [0, 1] (None without data)."""
    from workers.features import psi

    ref = _hist(reference_scores)
    obs = _hist(scores)
    if ref.sum() == 0 or obs.sum() == 0:
        return None
    return float(psi(ref / ref.sum(), obs))


def confusion(predicted, truth) -> dict[str, Any]:
    """tp/fp/tn/fn of alert labels against ground truth, with precision and recall."""
    tp = fp = tn = fn = 0
    for p, t in zip(predicted, truth):
        if p and t:
            tp += 1
        elif p:
            fp += 1
        elif t:
            fn += 1
        else:
            tn += 1
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None}


@dataclass(slots=True)
class _Scored:
    model: tuple[str, str, str]
    role: str
    deployment: str
    score: float
    label: bool


def compare_records(scores: Iterable[dict], shadows: Iterable[dict], *, topics: set[str] | None = None,
                    since: tuple[int | None, dict[tuple[str, int], int]] = (None, {}),
                    deployment: str | None = None, truth: dict[tuple[str, int, int], bool] | None = None,
                    ) -> dict[str, Any]:
    """Agreement of shadow models with the model that scored each event, and canary vs primary (pure).

    ``scores``: records of the scores topic (role primary or canary, or none for records
    without lineage); ``shadows``: records of the shadow topic. Both are filtered to source
    topics in ``topics``, offsets from ``since`` on, and ``deployment`` if given, then joined
    by ``source`` (topic, partition, offset). ``truth``: ground truth per source, for the
    confusion matrices.
    """
    import numpy as np

    default_since, specific_since = since

    def keep(doc: dict) -> tuple[str, int, int] | None:
        src = doc.get("source") or {}
        try:
            key = (str(src["topic"]), int(src["partition"]), int(src["offset"]))
        except (KeyError, TypeError, ValueError):
            return None
        if topics is not None and key[0] not in topics:
            return None
        first = specific_since.get(key[:2], default_since)
        if first is not None and key[2] < first:
            return None
        if deployment is not None and doc.get("deployment") != deployment:
            return None
        return key

    ref: dict[tuple[str, int, int], _Scored] = {}
    duplicates = {"scores": 0, "shadow": 0}
    for doc in scores:
        key = keep(doc)
        if key is None or doc.get("role") == "shadow":
            continue
        try:
            rec = _Scored(_model_key(doc), str(doc.get("role") or "primary"), str(doc.get("deployment") or ""),
                          float(doc["score"]), bool(doc["label"]))
        except (KeyError, TypeError, ValueError):
            continue
        if key in ref:
            duplicates["scores"] += 1
        ref[key] = rec

    pairs: dict[tuple, dict[str, list]] = {}
    seen_shadow: set[tuple] = set()
    unmatched_shadow = 0
    matched_sources: set[tuple[str, int, int]] = set()
    for doc in shadows:
        key = keep(doc)
        if key is None:
            continue
        try:
            score, label = float(doc["score"]), bool(doc["label"])
        except (KeyError, TypeError, ValueError):
            continue
        sm = _model_key(doc)
        if (key, sm) in seen_shadow:
            duplicates["shadow"] += 1
            continue
        seen_shadow.add((key, sm))
        r = ref.get(key)
        if r is None:
            unmatched_shadow += 1
            continue
        matched_sources.add(key)
        acc = pairs.setdefault((r.model, sm), {"ref": [], "shadow": [], "ref_label": [], "shadow_label": [],
                                               "roles": set(), "sources": []})
        acc["ref"].append(r.score)
        acc["shadow"].append(score)
        acc["ref_label"].append(r.label)
        acc["shadow_label"].append(label)
        acc["roles"].add(r.role)
        if truth is not None:  # only the confusion matrices need to know which events these were
            acc["sources"].append(key)

    out_pairs = []
    for (rm, sm), acc in sorted(pairs.items()):
        a, b = np.asarray(acc["ref"]), np.asarray(acc["shadow"])
        diff = np.abs(a - b)
        entry: dict[str, Any] = {
            "model": {"name": rm[0], "version": rm[1], "sha256": rm[2], "roles": sorted(acc["roles"])},
            "shadow": {"name": sm[0], "version": sm[1], "sha256": sm[2]},
            "events": len(a),
            "label_agreement": float(np.mean(np.asarray(acc["ref_label"]) == np.asarray(acc["shadow_label"]))),
            "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
            "psi": score_psi(a, b),
            "alert_rate": {"model": float(np.mean(acc["ref_label"])), "shadow": float(np.mean(acc["shadow_label"]))},
        }
        if truth is not None:
            idx = [i for i, s in enumerate(acc["sources"]) if s in truth]
            t = [truth[acc["sources"][i]] for i in idx]
            entry["labelled"] = len(idx)
            entry["confusion"] = {"model": confusion([acc["ref_label"][i] for i in idx], t),
                                  "shadow": confusion([acc["shadow_label"][i] for i in idx], t)}
        out_pairs.append(entry)

    # Canary vs primary: disjoint events of one deployment, so distributions, not pairs.
    by_dep: dict[str, dict[str, list[_Scored]]] = defaultdict(lambda: defaultdict(list))
    for key, r in ref.items():
        by_dep[r.deployment][r.role].append(r)
    canaries = []
    for dep_id, roles in sorted(by_dep.items()):
        if not roles.get("canary") or not roles.get("primary"):
            continue
        entry = {"deployment": dep_id}
        for role in ("primary", "canary"):
            recs = roles[role]
            models = sorted({r.model for r in recs})
            entry[role] = {"models": [_model_name(m) for m in models], "events": len(recs),
                           "mean_score": float(np.mean([r.score for r in recs])),
                           "alert_rate": float(np.mean([r.label for r in recs]))}
        entry["canary_share"] = entry["canary"]["events"] / (entry["canary"]["events"] + entry["primary"]["events"])
        entry["psi"] = score_psi([r.score for r in roles["primary"]], [r.score for r in roles["canary"]])
        if truth is not None:
            for role in ("primary", "canary"):
                items = [(r.label, truth[k]) for k, r in ref.items()
                         if r.deployment == dep_id and r.role == role and k in truth]
                entry[role]["confusion"] = confusion([p for p, _ in items], [t for _, t in items])
        canaries.append(entry)

    return {"scored": len(ref), "shadow_records": len(seen_shadow), "pairs": out_pairs,
            "scores_without_shadow": len(ref) - len(matched_sources), "shadow_without_score": unmatched_shadow,
            "duplicates": duplicates, "canary_vs_primary": canaries}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def format_compare(report: dict[str, Any]) -> str:
    """The human form of the compare report (all routes)."""
    lines = []
    for r in report["routes"]:
        c = r["comparison"]
        lines.append(f"route {r['route']}  (scores {r['scores_topic']}, shadow {r['shadow_topic']}): "
                     f"{c['scored']} scored events, {c['shadow_records']} shadow records")
        if not c["pairs"]:
            lines.append("  no shadow record matches a score record (no shadow model ran on this route?)")
        for p in c["pairs"]:
            m, s = p["model"], p["shadow"]
            lines.append(f"  {_model_name((m['name'], m['version'], m['sha256']))} [{'/'.join(m['roles'])}] vs "
                         f"shadow {_model_name((s['name'], s['version'], s['sha256']))}: {p['events']} events")
            lines.append(f"    label agreement {_pct(p['label_agreement'])}  mean |diff| {_num(p['mean_abs_diff'])}  "
                         f"max |diff| {_num(p['max_abs_diff'])}  PSI {_num(p['psi'])}  alerts "
                         f"{_pct(p['alert_rate']['model'])} vs {_pct(p['alert_rate']['shadow'])}")
            if "confusion" in p:
                for side in ("model", "shadow"):
                    cm = p["confusion"][side]
                    lines.append(f"    vs input labels ({p['labelled']} labelled) {side:<6} tp {cm['tp']} "
                                 f"fp {cm['fp']} "
                                 f"tn {cm['tn']} fn {cm['fn']}  precision {_pct(cm['precision'])} "
                                 f"recall {_pct(cm['recall'])}")
        lines.append(f"  unmatched: {c['scores_without_shadow']} scored events without a shadow record, "
                     f"{c['shadow_without_score']} shadow records without a score record; duplicates: "
                     f"{c['duplicates']['scores']} score, {c['duplicates']['shadow']} shadow")
        for cp in c["canary_vs_primary"]:
            pr, ca = cp["primary"], cp["canary"]
            lines.append(f"  canary vs primary in {cp['deployment']}: primary {', '.join(pr['models'])} "
                         f"{pr['events']} events (mean {pr['mean_score']:.4f}, alerts {_pct(pr['alert_rate'])}); "
                         f"canary {', '.join(ca['models'])} {ca['events']} events (mean {ca['mean_score']:.4f}, "
                         f"alerts {_pct(ca['alert_rate'])}); canary share {_pct(cp['canary_share'])}; "
                         f"PSI {_num(cp['psi'])}")
            for role in ("primary", "canary"):
                cm = cp[role].get("confusion")
                if cm is not None:
                    lines.append(f"    vs input labels {role:<7} tp {cm['tp']} fp {cm['fp']} tn {cm['tn']} "
                                 f"fn {cm['fn']}"
                                 f"  precision {_pct(cm['precision'])} recall {_pct(cm['recall'])}")
    return "\n".join(lines)


def _input_truth(settings, route, since, timeout: float) -> dict[tuple[str, int, int], bool]:
    """Ground truth per input record of the route, from the events' ``label`` field."""
    default_since, specific = since
    truth: dict[tuple[str, int, int], bool] = {}
    for topic in route.input_topics:
        start = {p: o for (t, p), o in specific.items() if t == topic}
        for p, o, doc in read_json_topic(settings, topic, timeout=timeout, start=start, start_default=default_since,
                                         tag="input"):
            t = ground_truth(doc)
            if t is not None:
                truth[(topic, p, o)] = t
    return truth


def cmd_compare(args: argparse.Namespace) -> int:
    """``sluice models compare``: shadow vs served scores, and canary vs primary, per route."""
    try:
        settings = _load_settings(args)
        routes = [find_route(settings, args.route)] if args.route else settings.effective_routes()
        since = parse_since(args.since_offset)
        out = []
        for route in routes:
            topics = set(route.input_topics)
            what = f"route {route.name}"
            truth = None
            if args.labels_from_input:
                truth = _with_broker(settings, f"{what}: reading the input topics {route.input_topics}",
                                     _input_truth, settings, route, since, args.timeout)
            # Streamed: a score record is kept as a few numbers, never as its JSON document.
            scores = (doc for _, _, doc in read_json_topic(settings, route.scores, timeout=args.timeout, tag="scores"))
            shadows = (doc for _, _, doc in read_json_topic(settings, settings.topics.shadow, timeout=args.timeout,
                                                            tag="shadow"))
            comparison = _with_broker(
                settings, f"{what}: reading the scores topic {route.scores!r} and the shadow topic "
                          f"{settings.topics.shadow!r}",
                compare_records, scores, shadows, topics=topics, since=since, deployment=args.deployment, truth=truth)
            out.append({"route": route.name, "scores_topic": route.scores, "shadow_topic": settings.topics.shadow,
                        "input_topics": list(route.input_topics), "comparison": comparison})
    except CommandError as exc:
        print(f"sluice models compare: {exc}", file=sys.stderr)
        return exc.code
    report = {"group": settings.kafka.group_id, "routes": out}
    print(json.dumps(report, indent=1) if args.json else format_compare(report))
    return ExitCode.OK


# ----------------------------------------------------------------------------- parsers


def _fraction_arg(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number (the canary's share, e.g. 0.1)") from None


def _positive_int_arg(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return n


def _timeout_arg(value: str) -> float:
    try:
        t = float(value)
    except ValueError:
        t = -1.0
    if not (math.isfinite(t) and t > 0):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return t


def add_parsers(msub, *, backend_type=str, device_type=str) -> None:
    """Register deploy, rollback, status and compare under ``sluice models``."""
    def common(q: argparse.ArgumentParser, timeout: float = BROKER_TIMEOUT_S) -> None:
        q.add_argument("--config", type=Path, required=True, metavar="FILE",
                       help="the workers' TOML config: [kafka] group and cluster, [[routes]], [topics] control/audit")
        q.add_argument("--timeout", type=_timeout_arg, default=timeout, metavar="S",
                       help=f"seconds to wait for the cluster before exit 75 (default {timeout:g})")
        q.add_argument("--verbose", action="store_true", help="also print the Kafka client's log lines (stderr)")

    d = msub.add_parser("deploy", help="change a route's models live for every replica (primary, canary, shadows)")
    common(d)
    d.add_argument("--route", required=True, help="the route to deploy on (a [[routes]] name, or the model folder's "
                                                  "name for a single-[model] config)")
    d.add_argument("--primary", type=Path, required=True, metavar="PATH",
                   help="the model folder that scores every event not given to the canary (a path the replicas see)")
    d.add_argument("--canary", type=Path, default=None, metavar="PATH", help="a model that scores --fraction of events")
    d.add_argument("--fraction", type=_fraction_arg, default=None, metavar="F",
                   help="the canary's share of events, 0 < F < 1 (chosen by event key, so replays keep their model)")
    d.add_argument("--shadow", type=Path, action="append", default=None, metavar="PATH",
                   help="a model that scores every event into [topics] shadow (repeat for several)")
    d.add_argument("--reason", default="", help="why, for the audit trail (kept in the deployment record)")
    d.add_argument("--backend", type=backend_type, default=None,
                   help="backend for the new models (default: the route's [model] backend)")
    d.add_argument("--device", type=device_type, default=None,
                   help="device for the new models (default: the route's [model] device)")
    d.add_argument("--no-check", dest="check", action="store_false",
                   help="skip `sluice models check` of each model before writing (the replicas still check)")
    d.add_argument("--check-events", type=_positive_int_arg, default=DEPLOY_CHECK_EVENTS, metavar="N",
                   help=f"generated events per model for the check (default {DEPLOY_CHECK_EVENTS})")
    d.add_argument("--json", action="store_true", help="print the written deployment as JSON")
    d.set_defaults(func=cmd_deploy)

    r = msub.add_parser("rollback", help="restore a route's previous deployment (for every replica)")
    common(r)
    r.add_argument("--route", required=True, help="the route to roll back")
    r.add_argument("--reason", default="", help="why, for the audit trail")
    r.add_argument("--json", action="store_true", help="print the written deployment as JSON")
    r.set_defaults(func=cmd_rollback)

    s = msub.add_parser("status", help="per route: the desired deployment and the one each replica runs, since when")
    common(s)
    s.add_argument("--json", action="store_true", help="the status as one JSON object")
    s.set_defaults(func=cmd_status)

    c = msub.add_parser("compare",
                        help="shadow vs served scores (agreement, |diff|, PSI, confusion), canary vs primary")
    common(c, COMPARE_TIMEOUT_S)
    c.add_argument("--route", default=None, help="only this route (default: every route)")
    c.add_argument("--since-offset", action="append", default=None, metavar="[TOPIC:PARTITION:]OFFSET",
                   help="only events from this input offset on (repeat per partition; e.g. the offsets of an "
                        "`applied` audit record)")
    c.add_argument("--deployment", default=None, metavar="ID", help="only records of this deployment")
    c.add_argument("--labels-from-input", action="store_true",
                   help="read the route's input topics too and add confusion matrices against the events' "
                        "ground-truth `label` field")
    c.add_argument("--json", action="store_true", help="the report as one JSON object")
    c.set_defaults(func=cmd_compare)
