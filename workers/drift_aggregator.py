"""``sluice drift-aggregator --config FILE``: merge the drift deltas of all replicas into
tumbling event-time windows and publish one PSI report per model per closed window.

A faust-streaming application (``pip install 'sluice[faust]'``):

* source: ``[topics] drift`` (keyed by model name, so a model's deltas share a partition),
  plus an internal ``<group_id>-ticks`` topic with as many partitions, to which a timer
  writes a tick per partition every second (faust tables can only change while an event of
  their partition is processed: the ticks close idle windows);
* state, in three changelog-backed faust tables, co-partitioned with the source:
  ``windows`` (model|version|start -> merged state of the open window), ``seen``
  (delta_id -> expiry, for idempotence) and ``meta`` (model|version -> watermark, last
  arrival, the windows closed so far);
* ``processing_guarantee="exactly_once"``: reports, table changelogs and source offsets
  commit in one Kafka transaction, and faust then reads with ``isolation.level=
  read_committed`` (a worker's aborted delta never counts; faust sets read_committed only in
  this mode).

Window semantics (:class:`WindowedMerger`, pure and unit-tested on plain dicts):

* a delta belongs to the window ``[floor(end / window_s) * window_s, + window_s)`` holding
  its ``window.end`` (the newest event time in it), so every delta counts in exactly one
  window and report;
* a model's watermark is the largest ``window.end`` seen; a window closes, and its report is
  published, once the watermark reaches window end + ``grace_s``; when no delta of the
  model arrived for ``idle_s`` seconds (wall clock), its open windows close anyway;
* a delta for an already closed window (late) is merged into the oldest window that can
  still be open and counted in that report's ``late``: it is never dropped, never counted
  twice;
* a ``delta_id`` already merged is ignored (kept ``dedupe_retention_s`` of event time).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import orjson

from workers.drift import (
    DELTA_TYPE, DriftSettings, RefBins, build_report, load_reference, merge_into, empty_state, window_start,
)
from workers.kafka import settings as kafka_settings

log = logging.getLogger("sluice.drift")

#: delta fields the merger relies on (the full contract is schemas/records/drift_delta.json)
#: "no event time yet" (finite: the table codecs are JSON, which has no -inf)
_NEVER = -1e18

_REQUIRED = ("model", "delta_id", "count", "window", "features", "score")


class BadDelta(ValueError):
    pass


def parse_delta(value: bytes | None) -> dict[str, Any]:
    if value is None:
        raise BadDelta("tombstone")
    try:
        d = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise BadDelta(f"not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("type") != DELTA_TYPE:
        raise BadDelta(f"not a {DELTA_TYPE} record")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise BadDelta(f"missing {missing}")
    w = d["window"]
    if not (isinstance(w, dict) and isinstance(w.get("start"), (int, float)) and isinstance(w.get("end"), (int, float))
            and math.isfinite(w["end"])):
        raise BadDelta("window.start/end must be numbers")
    if not isinstance(d["count"], int) or d["count"] < 0:
        raise BadDelta("count must be a non-negative integer")
    return d


class References:
    """Baselines by (model name, version), loaded on first use from ``models_root/<name>``."""

    def __init__(self, models_root: Path, extra: dict[tuple[str, str], RefBins] | None = None):
        self.root = Path(models_root)
        self._refs: dict[tuple[str, str], RefBins | None] = dict(extra or {})

    def get(self, name: str, version: str) -> RefBins:
        key = (name, version)
        if key not in self._refs:
            ref = None
            folder = self.root / name
            try:
                ref = load_reference(folder)
            except (OSError, ValueError) as e:
                log.error("no baseline for model", extra={"model": name, "folder": str(folder), "error": str(e)})
            if ref is not None and ref.version != version:
                log.error("baseline version differs from the deltas'", extra={
                    "model": name, "baseline_version": ref.version, "delta_version": version})
                ref = None
            self._refs[key] = ref
        ref = self._refs[key]
        if ref is None:
            raise BadDelta(f"no baseline for model {name} version {version} under {self.root}")
        return ref


class WindowedMerger:
    """Tumbling event-time windows of merged deltas, over three mutable mappings.

    The mappings are faust tables in the app and plain dicts in tests. Every change is
    written back with ``table[key] = value`` (faust logs assignments to the changelog).
    """

    def __init__(self, settings: DriftSettings, refs: References, windows: MutableMapping, seen: MutableMapping,
                 meta: MutableMapping):
        self.s = settings
        self.refs = refs
        self.windows = windows
        self.seen = seen
        self.meta = meta
        self.duplicates = 0
        self.rejected = 0

    # keys ------------------------------------------------------------------
    @staticmethod
    def _mkey(model: dict[str, str]) -> str:
        return f"{model['name']}|{model.get('version', '')}"

    @staticmethod
    def _wkey(mkey: str, start: float) -> str:
        return f"{mkey}|{start!r}"

    # events ------------------------------------------------------------------
    def on_delta(self, delta: dict[str, Any], partition: int, now: float | None = None) -> list[dict[str, Any]]:
        """Merge one delta; return the reports of the windows it closed (oldest first)."""
        now = time.time() if now is None else now
        model = {"name": str(delta["model"]["name"]), "version": str(delta["model"].get("version", ""))}
        self.refs.get(model["name"], model["version"])  # BadDelta when no baseline: nothing is merged
        did = str(delta["delta_id"])
        if did in self.seen:
            self.duplicates += 1
            log.info("duplicate delta ignored: %s", did, extra={"delta_id": did})
            return []
        mkey = self._mkey(model)
        m = self.meta.get(mkey) or {"model": model, "partition": partition, "watermark": _NEVER,
                                    "closed_upto": _NEVER, "last_arrival": now, "open": [], "parts": {}}
        W = self.s.window_s
        end = float(delta["window"]["end"])
        start = window_start(end, W)
        late = start + W <= m["closed_upto"]
        if late:
            start = m["closed_upto"]
        wkey = self._wkey(mkey, start)
        win = self.windows.get(wkey)
        if win is None:
            win = {"start": start, "end": start + W, "state": empty_state(model)}
            m["open"] = sorted(set(m["open"]) | {start})
        # validate bins against the baseline before anything is written
        probe = merge_into(empty_state(model), delta)
        build_report(probe, self.refs.get(model["name"], model["version"]), window=(start, start + W),
                     psi_alert=self.s.psi_alert)
        merge_into(win["state"], delta, late=late)
        self.windows[wkey] = win
        self.seen[did] = end + self.s.dedupe_retention_s
        m["watermark"] = max(m["watermark"], end)
        m["last_arrival"] = now
        m["partition"] = partition
        reports = self._close(mkey, m, lambda s: s + W + self.s.grace_s <= m["watermark"], now)
        self.meta[mkey] = m
        return reports

    def on_tick(self, partition: int, now: float | None = None) -> list[dict[str, Any]]:
        """Close the open windows of idle models of this partition; expire old delta_ids."""
        now = time.time() if now is None else now
        reports = []
        for mkey in list(self.meta.keys()):
            m = self.meta[mkey]
            if m.get("partition") != partition:
                continue
            changed = False
            if m["open"] and now - m["last_arrival"] >= self.s.idle_s:
                reports += self._close(mkey, m, lambda s: True, now)
                changed = True
            if changed:
                self.meta[mkey] = m
        self._expire(partition)
        return reports

    def _expire(self, partition: int) -> None:
        marks = [m["watermark"] for m in self.meta.values() if m.get("partition") == partition]
        if not marks:
            return
        wm = max(marks)
        for did in [k for k, exp in list(self.seen.items()) if exp < wm]:
            del self.seen[did]

    def _close(self, mkey: str, m: dict[str, Any], due, now: float) -> list[dict[str, Any]]:
        reports = []
        W = self.s.window_s
        for start in sorted(m["open"]):
            if not due(start):
                break
            wkey = self._wkey(mkey, start)
            win = self.windows.get(wkey)
            m["open"].remove(start)
            m["closed_upto"] = max(m["closed_upto"], start + W)
            if win is None:
                continue
            del self.windows[wkey]
            # a window can be reported more than once (more deltas after an idle close): number the parts
            part = int(m["parts"].get(repr(start), 0)) + 1
            m["parts"] = {k: v for k, v in m["parts"].items() if float(k) >= start - 10 * W}
            m["parts"][repr(start)] = part
            ref = self.refs.get(win["state"]["model"]["name"], win["state"]["model"]["version"])
            rid = f"{m['model']['name']}@{m['model']['version']}:{start:.3f}" + (f"#{part}" if part > 1 else "")
            reports.append(build_report(win["state"], ref, window=(start, start + W), psi_alert=self.s.psi_alert,
                                        report_id=rid, emitted_at=now))
        return reports


# ----------------------------------------------------------------------------- config


def load_config(path: str | Path | None):
    """(Settings, DriftSettings) from the worker's config file (+ SLUICE_* env)."""
    from workers.config import load_settings

    s = load_settings(path)
    return s, s.drift


# ----------------------------------------------------------------------------- faust app


def _topic_partitions(admin_conf: dict, topic: str, create_partitions: int, timeout: float = 30.0, *,
                      replication: int = -1, config: dict[str, str] | None = None) -> int:
    """Partition count of ``topic``, creating it (``create_partitions``) when it does not exist.

    Returns once the topic shows in the cluster's metadata with its partitions.
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(admin_conf)
    deadline = time.monotonic() + timeout
    created = False
    while True:
        md = admin.list_topics(timeout=10)
        t = md.topics.get(topic)
        if t is not None and t.error is None and t.partitions:
            return len(t.partitions)
        if not created:
            fs = admin.create_topics([NewTopic(topic, num_partitions=max(create_partitions, 1),
                                               replication_factor=replication, config=dict(config or {}))])
            for f in fs.values():
                try:
                    f.result(15)
                except Exception as e:  # noqa: BLE001 - already exists / created concurrently
                    log.info("create topic", extra={"topic": topic, "result": str(e)})
            created = True
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic} has no partitions after {timeout}s")
        time.sleep(0.5)


def missing_codecs() -> list[str]:
    """Kafka compression codecs aiokafka cannot decode here (gzip always works).

    The worker's producer writes lz4 (workers/kafka/settings.py); another producer of the topic
    may use snappy or zstd. aiokafka decodes those only with cramjam (its codec extras, which
    ``sluice[faust]`` installs); without it the consumer crashes on the first such batch.
    """
    from aiokafka import codec

    return [name for name, has in (("lz4", codec.has_lz4), ("snappy", codec.has_snappy), ("zstd", codec.has_zstd))
            if not has()]


def check_codecs() -> None:
    """Refuse to start (ConfigError, exit 2) when aiokafka cannot decompress what producers write."""
    from workers.exit_codes import ConfigError

    missing = missing_codecs()
    if missing:
        raise ConfigError(
            f"the drift aggregator's Kafka client (aiokafka) cannot decompress {', '.join(missing)} batches, and "
            "the worker compresses its drift deltas with lz4: install the aggregator's extra, "
            "pip install 'sluice[faust]' (it brings aiokafka[lz4,snappy,zstd])")


#: faust tables (windows, seen, meta); each has a changelog topic ``<group_id>-<name>-changelog``
_TABLES = ("drift-windows", "drift-seen", "drift-meta")


def default_data_dir(group_id: str) -> Path:
    """faust's data directory when ``--data-dir`` is not given, never the working directory:
    ``$XDG_STATE_HOME/sluice/drift-aggregator/<group id>``, else the same under the system temp
    dir (``/tmp/sluice-<uid>/...``). The tables live in memory and in their changelog topics, so
    nothing in it must survive a restart."""
    state = os.environ.get("XDG_STATE_HOME")
    base = Path(state) / "sluice" if state else Path(tempfile.gettempdir()) / f"sluice-{os.getuid()}"
    return base / "drift-aggregator" / group_id


def build_app(settings, drift: DriftSettings, *, models_root: Path | None = None, tick_s: float = 1.0,
              data_dir: Path | None = None):
    """The faust app; ``data_dir`` is faust's data directory (default: :func:`default_data_dir`)."""
    import faust

    check_codecs()  # before anything connects: crashing on the first delta is far worse

    bootstrap = settings.kafka.bootstrap_servers
    # [kafka] client (TLS, SASL) applies here too: librdkafka's names for the admin client,
    # translated for faust and aiokafka (a setting they cannot honour fails the start).
    security = kafka_settings.aiokafka_security(settings)
    if security.ignored:
        log.warning("[kafka] client settings without a faust/aiokafka equivalent are ignored by the aggregator",
                    extra={"settings": list(security.ignored)})
    admin_conf = kafka_settings.admin_config(settings)
    source_name = settings.topics.drift
    parts = _topic_partitions(admin_conf, source_name, settings.topics.partitions or 1)
    report_parts = _topic_partitions(admin_conf, drift.reports_topic, parts)
    ticks_name = f"{drift.group_id}-ticks"
    _topic_partitions(admin_conf, ticks_name, parts)
    # faust's internal topics, created here as faust would (changelogs compacted, one partition
    # per source partition; the leader topic with one), and awaited in the metadata. Left to
    # faust, they are created moments before the consumer joins its group: on Apache Kafka the
    # join's metadata can miss a changelog just created, the table then has no changelog
    # partition and the agent crashes on every delta (PartitionsMismatch) until aiokafka next
    # refreshes its metadata, minutes later. faust skips topics that already exist.
    rf = settings.topics.replication_factor
    for table in _TABLES:
        _topic_partitions(admin_conf, f"{drift.group_id}-{table}-changelog", parts, replication=rf,
                          config={"cleanup.policy": "compact"})
    _topic_partitions(admin_conf, f"{drift.group_id}-__assignor-__leader", 1, replication=rf)
    brokers = [f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip()]
    # faust's default data directory is "<app id>-data" in the working directory.
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(drift.group_id)
    app = faust.App(
        drift.group_id,
        datadir=str(data_dir).replace("{", "{{").replace("}", "}}"),  # faust formats it with {conf}
        broker=brokers,
        broker_credentials=security.faust_credentials(),
        store="memory://",
        processing_guarantee="exactly_once",   # transactions + read_committed
        topic_partitions=parts,
        topic_replication_factor=settings.topics.replication_factor if settings.topics.replication_factor > 0 else 1,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        # a SIGKILLed aggregator's partitions move on after the session timeout (faust's default is 60 s)
        broker_session_timeout=settings.kafka.session_timeout_ms / 1000.0,
        broker_heartbeat_interval=max(settings.kafka.session_timeout_ms / 1000.0 / 5, 0.5),
        broker_commit_every=500,
        broker_commit_interval=drift.commit_interval_s,
        key_serializer="json",     # tables; the topics are raw bytes
        value_serializer="json",
    )
    windows, seen, meta = (app.Table(name, default=None, partitions=parts) for name in _TABLES)
    root = models_root or Path(settings.model.path).parent
    merger = WindowedMerger(drift, References(root), _Plain(windows), _Plain(seen), _Plain(meta))

    async def publish(out: list[dict[str, Any]], partition: int) -> None:
        for r in out:
            await _send_in_transaction(app, source_name, partition, drift.reports_topic, partition % report_parts,
                                       key=r["model"]["name"].encode(), value=orjson.dumps(r))
            log.info("drift report %s count=%d max_psi=%.4f alerts=%s", r["report_id"], r["count"], r["max_psi"],
                     [a["name"] for a in r["alerts"]], extra={"report_id": r["report_id"], "count": r["count"], "max_psi": r["max_psi"],
                                            "alerts": [a["name"] for a in r["alerts"]]})

    @app.agent(app.topic(source_name, ticks_name, key_serializer="raw", value_serializer="raw"))
    async def aggregate(stream):
        async for event in stream.events():
            msg = event.message
            if msg.topic == ticks_name:
                await publish(merger.on_tick(msg.partition), msg.partition)
                continue
            try:
                delta = parse_delta(event.value)
                await publish(merger.on_delta(delta, msg.partition), msg.partition)
            except (BadDelta, ValueError, KeyError, TypeError) as e:
                merger.rejected += 1
                log.error("delta rejected at %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, e, extra={"partition": msg.partition, "offset": msg.offset, "error": str(e)})

    tick_producer: list = []

    @app.timer(interval=tick_s)
    async def tick():
        # Not through faust's producer: under exactly_once it would put the tick into the open
        # transaction of partition p, invisible (read_committed) until a delta commits it.
        from aiokafka import AIOKafkaProducer

        if not tick_producer:
            prod = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all",
                                    **security.producer_kwargs())
            await prod.start()
            tick_producer.append(prod)
        for p in range(parts):
            await tick_producer[0].send_and_wait(ticks_name, key=b"tick", value=orjson.dumps({"at": time.time()}), partition=p)

    async def _close_tick_producer(app, **kwargs):
        while tick_producer:
            await tick_producer.pop().stop()

    app.on_before_shutdown.connect(_close_tick_producer)
    app._sluice_parts = parts  # for tests / logs
    return app


async def _send_in_transaction(app, source_topic: str, source_partition: int, topic: str, partition: int, *,
                               key: bytes, value: bytes) -> None:
    """Produce one record in the open transaction of ``source_topic[source_partition]``: it commits
    with that partition's offsets and table changes, or not at all.

    Not through ``app.topic(...).send()``: faust picks the transactional producer from its consumer's
    metadata, which knows only subscribed topics; for any other topic (the reports) it silently
    falls back to its plain producer, and a report published just before a crash is then
    published again by the next owner of the partition (measured: a CI run reported the first
    windows twice, 7400 events counted for 5000).
    """
    try:
        group = app.assignor.group_for_topic(source_topic)
    except KeyError:
        raise RuntimeError(f"{source_topic} is not assigned to this aggregator (no partition group)") from None
    tid = f"{app.conf.id}-{group}-{source_partition}"
    # faust's producer raises ProducerSendError when it has no transaction for this id (the
    # partition was revoked meanwhile): faust then crashes the agent rather than write outside it.
    fut = await app.producer.send(topic, key, value, partition, None, None, transactional_id=tid)
    await fut  # delivered before the event is acked; the commit then covers it


class _Plain(MutableMapping):
    """A faust table seen as a plain mapping (``get`` without faust's default factory)."""

    def __init__(self, table):
        self.t = table

    def __getitem__(self, k):
        if k not in self.t:
            raise KeyError(k)
        return self.t[k]

    def get(self, k, default=None):
        return self.t[k] if k in self.t else default

    def __setitem__(self, k, v):
        self.t[k] = v

    def __delitem__(self, k):
        del self.t[k]

    def __iter__(self):
        return iter(list(self.t.keys()))

    def __len__(self):
        return len(self.t)

    def __contains__(self, k):
        return k in self.t


def main(args: argparse.Namespace) -> int:
    from workers import logs

    settings, drift = load_config(args.config)
    logs.setup(settings.logging.level, settings.logging.format)
    app = build_app(settings, drift, data_dir=getattr(args, "data_dir", None))
    import faust

    log.info("drift aggregator starting", extra={"source": settings.topics.drift, "reports": drift.reports_topic,
                                                 "window_s": drift.window_s, "grace_s": drift.grace_s,
                                                 "partitions": app._sluice_parts, "data_dir": str(app.conf.datadir)})
    worker = faust.Worker(app, loglevel=settings.logging.level.lower(), logfile=None, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as e:  # faust's worker exits through sys.exit
        return int(e.code or 0)
    return 0
