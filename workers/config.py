"""Typed settings: a TOML file plus ``SLUICE_<SECTION>__<KEY>`` environment overrides.

Every setting is declared once below, with its type, default and a docstring
(the ``description``) that ``sluice check-config --reference`` prints as the
reference. Precedence, highest first: environment, TOML file, default.

Lists and tables in the environment are JSON, e.g.
``SLUICE_KAFKA__INPUT_TOPICS='["flows"]'`` or
``SLUICE_KAFKA__CLIENT='{"security.protocol": "SASL_SSL"}'``.

Bad configuration fails at start: an unknown section or key, a value of the
wrong type or out of range, and an unknown ``SLUICE_*__*`` variable all raise
:class:`ConfigError` naming the key and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli (pyproject's fallback)
    import tomli as tomllib

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from workers.exit_codes import ConfigError

ENV_PREFIX = "SLUICE_"
ENV_DELIMITER = "__"

# librdkafka settings the worker owns: letting [kafka.client] override them
# would silently break exactly-once, so they are refused with this reason.
_RESERVED_CLIENT_KEYS = {
    "enable.auto.commit": "offsets are committed inside transactions",
    "enable.auto.offset.store": "offsets are committed inside transactions",
    "isolation.level": "the worker reads read_committed to stay exactly-once",
    "transactional.id": "derived from group_id and replica_id",
    "group.instance.id": "derived from group_id and replica_id",
    "group.id": "set [kafka] group_id",
    "bootstrap.servers": "set [kafka] bootstrap_servers",
    "enable.idempotence": "transactions require idempotence",
    "partition.assignment.strategy": "revocation handling is written for cooperative-sticky",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port].")
    group_id: str = Field("sluice", min_length=1, description="Consumer group shared by all replicas.")
    input_topics: list[str] = Field(
        default_factory=list, description="Topics to consume events from (at least one)."
    )
    replica_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        description=(
            "Stable identity of this replica (default: host name). transactional.id and the static "
            "group.instance.id derive from group_id and replica_id, so a restarted replica fences "
            "its zombie and takes its partitions back without a rebalance."
        ),
    )
    session_timeout_ms: int = Field(
        10_000, ge=1000, description="Group session timeout; a dead static member keeps its partitions this long."
    )
    max_poll_interval_ms: int = Field(
        60_000, ge=5000, description="Max time between polls before the group evicts the member."
    )
    transaction_timeout_ms: int = Field(
        60_000, ge=1000, description="Broker aborts a transaction left open longer than this (a crashed replica's)."
    )
    fetch_max_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Upper bound of one fetch response (bounds prefetch memory)."
    )
    queued_max_messages_kbytes: int = Field(
        32 * 1024, ge=1024, description="Upper bound of librdkafka's prefetch queue per consumer, in KiB."
    )
    client: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description=(
            "Pass-through librdkafka settings (security.protocol, sasl.*, ssl.*, client.rack, ...) applied "
            "to consumer, producer and admin client alike."
        ),
    )

    @field_validator("input_topics")
    @classmethod
    def _topics_nonempty(cls, v: list[str]) -> list[str]:
        if any(not t for t in v):
            raise ValueError("topic names must be non-empty")
        return v

    @field_validator("client")
    @classmethod
    def _client_not_reserved(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key in _RESERVED_CLIENT_KEYS:
                raise ValueError(f"'{key}' cannot be set here: {_RESERVED_CLIENT_KEYS[key]}")
        return v

    @property
    def transactional_id(self) -> str:
        return f"{self.group_id}-{self.replica_id}"

    @property
    def group_instance_id(self) -> str:
        return f"{self.group_id}-{self.replica_id}"


class TopicsSettings(_Section):
    scores: str = Field("scores", min_length=1, description="Output topic: one score record per valid event.")
    dlq: str = Field("dead-letters", min_length=1, description="Output topic: one dead letter per invalid record.")
    drift: str = Field("drift-deltas", min_length=1, description="Output topic: drift deltas, one per model per transaction.")
    dlq_max_value_bytes: int = Field(
        900_000,
        ge=1024,
        description=(
            "Dead letters carry the original value up to this size; a larger one is truncated and the header "
            "sluice.error.truncated holds its original length (the source headers point at the full record). "
            "Keep it below the DLQ topic's max.message.bytes, or one poison record would abort every transaction."
        ),
    )
    create: bool = Field(True, description="Create missing output topics at start (needs admin rights).")
    partitions: int = Field(
        0, ge=0, description="Partition count for created output topics; 0 = as many as the first input topic."
    )
    replication_factor: int = Field(-1, description="Replication factor for created topics; -1 = broker default.")
    control: str = Field(
        "sluice-control", min_length=1,
        description="Compacted topic of live deployments (`sluice models deploy|rollback`), one record per group and route; "
        "every replica follows it.",
    )
    shadow: str = Field(
        "shadow-scores", min_length=1,
        description="Output topic: score records of shadow models (role \"shadow\"), in the same transaction as the primary's.",
    )
    audit: str = Field(
        "sluice-audit", min_length=1,
        description="Output topic: one audit record whenever a replica applies, refuses or rolls back a deployment.",
    )


class ModelSettings(_Section):
    path: Path = Field(Path("models/flow_classifier"), description="A models/<name> folder holding manifest.toml.")
    backend: str = Field(
        "onnxruntime",
        description="Inference backend: onnxruntime | onnxruntime-tensorrt | tensorrt | torch (GPU ones need the gpu extra).",
    )
    device: str = Field("cpu", description="cpu or cuda[:N]; a device that is not present fails at start.")


class GuardSettings(_Section):
    """Limits on a route's canary; past one, every replica rolls the canary back (an audit record says why)."""

    max_dlq_rate: float = Field(
        0.0, ge=0, le=1,
        description="Roll the canary back when its share of dead letters over the window exceeds this; 0 = no limit.",
    )
    max_psi: float = Field(
        0.0, ge=0,
        description="... when the PSI between the canary's and the primary's score distributions exceeds this; 0 = no limit.",
    )
    max_p99_ms: float = Field(
        0.0, ge=0,
        description="... when the canary's p99 inference time per batch (ms) exceeds this; 0 = no limit.",
    )
    window_s: float = Field(60.0, gt=0, le=86_400, description="The limits are judged over the last window_s seconds.")
    min_events: int = Field(
        200, ge=1, description="No verdict before the canary scored this many events in the window (PSI needs a sample)."
    )

    @property
    def enabled(self) -> bool:
        return bool(self.max_dlq_rate or self.max_psi or self.max_p99_ms)


class DegradeSettings(_Section):
    """Graceful degradation: under sustained pressure a route switches to a cheaper fallback model."""

    fallback: Path | None = Field(
        None, description="A cheaper model folder (a quantized variant, a smaller model); unset = never degrade.",
    )
    fallback_backend: str = Field("", description="Backend of the fallback; empty = the route's [model] backend.")
    max_lag: int = Field(
        0, ge=0, description="Pressure: consumer lag (records, this replica's partitions) above this; 0 = not judged.",
    )
    max_p99_ms: float = Field(
        0.0, ge=0, description="Pressure: end-to-end p99 of recent batches (event time to emit) above this; 0 = not judged.",
    )
    after_s: float = Field(10.0, gt=0, description="Switch to the fallback once pressure has lasted this long.")
    recover_after_s: float = Field(
        30.0, gt=0,
        description="Switch back once there has been no pressure for this long (hysteresis: longer than after_s).",
    )

    @property
    def enabled(self) -> bool:
        return self.fallback is not None and bool(self.max_lag or self.max_p99_ms)

    @model_validator(mode="after")
    def _check(self) -> "DegradeSettings":
        if self.fallback is not None and not (self.max_lag or self.max_p99_ms):
            raise ValueError("degrade.fallback needs a pressure limit: set max_lag or max_p99_ms")
        if self.recover_after_s < self.after_s:
            raise ValueError("degrade.recover_after_s must be at least after_s, or the route would flap")
        return self


_ROUTE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class RouteSettings(_Section):
    """One kind of event: input topics -> a model -> a scores topic (``[[routes]]``)."""

    name: str = Field(..., description="Route name (letters, digits, . _ -): `sluice models deploy --route NAME`.")
    input_topics: list[str] = Field(..., min_length=1, description="Input topics of this route.")
    model: "ModelSettings" = Field(
        default_factory=lambda: ModelSettings(),
        description="The route's model until a deployment on the control topic says otherwise.",
    )
    scores: str = Field("", description="Scores topic of this route; empty = [topics] scores.")
    dlq: str = Field("", description="Dead-letter topic of this route; empty = [topics] dlq.")
    guard: GuardSettings = Field(default_factory=lambda: GuardSettings(), description="Limits on this route's canary.")
    degrade: DegradeSettings = Field(
        default_factory=lambda: DegradeSettings(), description="This route's fallback under pressure."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _ROUTE_NAME.match(v):
            raise ValueError(f"route name {v!r}: use 1-100 letters, digits, '.', '_' or '-'")
        return v


class BatchingSettings(_Section):
    max_batch_size: int = Field(1024, ge=1, le=65536, description="A batch closes at this many events ...")
    max_batch_delay_ms: float = Field(
        20.0, ge=0, le=10_000, description="... or this long after its first event, whichever comes first."
    )
    max_inflight_batches: int = Field(
        4, ge=1, le=1024, description="Batches submitted to inference but not yet emitted; above it partitions pause."
    )
    adaptive: bool = Field(
        True, description="Send a partial batch at once when the inference pool is idle (small batches at low load)."
    )


class InferenceSettings(_Section):
    processes: int = Field(
        1, ge=0, le=256,
        description="Scoring processes (each featurizes, infers and encodes whole batches beside the orchestrator's "
        "GIL, with its own copy of the model); 0 = score on `threads` threads inside the worker process.",
    )
    threads: int = Field(
        1, ge=1, le=256, description="Scoring threads when processes = 0 (each runs whole batches; the GIL is shared)."
    )
    intra_op_threads: int = Field(1, ge=1, le=256, description="Backend threads used inside one batch.")


class TransactionsSettings(_Section):
    commit_interval_ms: int = Field(
        100, ge=1, le=600_000, description="Commit outputs and offsets this often (the latency floor for read_committed readers)."
    )
    revoke_timeout_ms: int = Field(
        10_000,
        ge=100,
        description="Budget for finishing in-flight work when partitions are revoked; past it the work is aborted and redone elsewhere.",
    )
    shutdown_timeout_ms: int = Field(
        30_000, ge=100,
        description="Budget for draining and committing on SIGTERM, counted from the signal. Past it the open "
                    "transaction is aborted (given 2 s) and the worker exits 1; a commit still running then is "
                    "given up instead, its transaction left to transaction_timeout_ms or the next owner's init.",
    )


class MetricsSettings(_Section):
    port: int = Field(9100, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz; 0 = ephemeral (logged at start).")
    host: str = Field("0.0.0.0", description="Address the metrics server binds.")


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level, in any case (debug, INFO, Warning, ...)."
    )
    format: Literal["auto", "json", "text"] = Field("auto", description="auto = JSON unless stderr is a terminal.")

    @field_validator("level", "format", mode="before")
    @classmethod
    def _any_case(cls, v: Any, info: Any) -> Any:
        # Operators write `level = "info"` as often as "INFO"; both mean the same.
        if isinstance(v, str):
            return v.upper() if info.field_name == "level" else v.lower()
        return v


class DriftSettings(_Section):
    enabled: bool = Field(True, description="Worker: add a drift delta per model to every transaction (to [topics] drift).")
    recent_s: float = Field(
        60.0, gt=0, le=86_400,
        description="Worker: the sluice_drift_psi gauges and the status line cover this replica's deltas of the last recent_s seconds.",
    )
    window_s: float = Field(60.0, gt=0, le=86_400, description="Aggregator: length of the tumbling event-time windows.")
    grace_s: float = Field(
        10.0, ge=0, le=86_400,
        description="Aggregator: a window closes (and its report is published) once event time passes its end + grace_s.",
    )
    idle_s: float = Field(
        15.0, gt=0, le=86_400,
        description="Aggregator: when no delta of a model arrived for idle_s seconds (wall clock), its open windows close anyway.",
    )
    reports_topic: str = Field("drift-reports", min_length=1, description="Aggregator: output topic, one report per model per closed window.")
    psi_alert: float = Field(0.2, gt=0, description="Aggregator: a feature or the score whose PSI reaches this is listed in the report's alerts.")
    group_id: str = Field("sluice-drift-aggregator", min_length=1, description="Aggregator: consumer group (and faust app id).")
    dedupe_retention_s: float = Field(
        3600.0, gt=0, description="Aggregator: delta_ids are remembered this long (event time) to drop duplicates."
    )
    commit_interval_s: float = Field(
        1.0, gt=0, le=3600,
        description="Aggregator: how often its transaction (reports, table changes, source offsets) commits; "
                    "a report becomes readable (read_committed) at most this long after its window closes.",
    )

    @model_validator(mode="after")
    def _check(self) -> "DriftSettings":
        if self.grace_s >= 100 * self.window_s:
            raise ValueError("drift.grace_s must stay below 100 windows (window_s)")
        return self


class Settings(BaseSettings):
    """The worker's whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        case_sensitive=False,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicsSettings = Field(default_factory=TopicsSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    transactions: TransactionsSettings = Field(default_factory=TransactionsSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    guard: GuardSettings = Field(default_factory=GuardSettings)
    degrade: DegradeSettings = Field(default_factory=DegradeSettings)
    routes: list[RouteSettings] = Field(
        default_factory=list,
        description="[[routes]]: several event kinds in one worker; empty = one route from [kafka] input_topics, "
        "[model], [topics] scores/dlq and [guard], named after the model's folder.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what load_settings passes in: it reads the TOML file and the environ mapping it
        # was given itself, so loading never reads (or temporarily rewrites) os.environ or any
        # class attribute, and two threads may load two configurations at once.
        return (init_settings,)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Settings":
        if self.routes:
            names = [r.name for r in self.routes]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"routes: route name {sorted(dup)[0]!r} appears twice")
            seen: dict[str, str] = {}
            for r in self.routes:
                for t in r.input_topics:
                    if t in seen:
                        raise ValueError(f"routes: input topic {t!r} is in routes {seen[t]!r} and {r.name!r}; "
                                         "an event goes to exactly one route")
                    seen[t] = r.name
            union = list(seen)
            if self.kafka.input_topics and sorted(self.kafka.input_topics) != sorted(union):
                raise ValueError("kafka.input_topics must be empty or list exactly the routes' input topics "
                                 f"({union}) when [[routes]] are given")
            self.kafka.input_topics = union
        if not self.kafka.input_topics:
            raise ValueError("kafka.input_topics: at least one input topic is required")
        outputs = {self.topics.scores, self.topics.dlq, self.topics.drift, self.drift.reports_topic,
                   self.topics.shadow, self.topics.audit, self.topics.control}
        outputs |= {r.scores for r in self.routes if r.scores} | {r.dlq for r in self.routes if r.dlq}
        loops = outputs & set(self.kafka.input_topics)
        if loops:
            raise ValueError(f"topics: output topic {sorted(loops)[0]!r} is also an input topic (a feedback loop)")
        if self.transactions.revoke_timeout_ms >= self.kafka.max_poll_interval_ms:
            raise ValueError("transactions.revoke_timeout_ms must stay below kafka.max_poll_interval_ms")
        return self

    def effective_routes(self) -> list[RouteSettings]:
        """The routes this worker serves, with empty topics filled in ([[routes]] or the one implied)."""
        if not self.routes:
            return [RouteSettings(name=_route_name(self.model.path), input_topics=list(self.kafka.input_topics),
                                  model=self.model, scores=self.topics.scores, dlq=self.topics.dlq, guard=self.guard,
                                  degrade=self.degrade)]
        # A route without limits of its own takes the top-level [guard] and [degrade].
        return [r.model_copy(update={"scores": r.scores or self.topics.scores, "dlq": r.dlq or self.topics.dlq,
                                     "guard": r.guard if r.guard.enabled else self.guard,
                                     "degrade": r.degrade if r.degrade.fallback is not None else self.degrade})
                for r in self.routes]

    def config_sha256(self) -> str:
        """SHA-256 of the effective configuration, credentials excluded (score records' lineage)."""
        doc = self.model_dump(mode="json")
        doc["kafka"]["client"] = {k: ("***" if is_secret_key(k) else v)
                                  for k, v in sorted(doc["kafka"].get("client", {}).items())}
        doc["kafka"].pop("replica_id", None)  # the same config on every replica
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _route_name(model_path: Path) -> str:
    """The implied route's name: the model folder's name, made a valid route name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(model_path).name)[:100]
    return name or "main"


def _env_key(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}{ENV_DELIMITER}{key.upper()}"


# Name parts that mark a value as a credential: never echoed in errors or check-config.
_SECRET_WORDS = ("password", "passwd", "secret", "token", "pem", "credential", "passphrase", "apikey")
# Settings whose value embeds credentials although no part of their name says so.
_SECRET_NAMES = {"sasl.jaas.config", "sasl.oauthbearer.config"}
# How much of a bad value an error message quotes: enough to recognise it, not a whole blob.
SAMPLE_CHARS = 60


def is_secret_key(name: str) -> bool:
    """Whether a setting or variable named ``name`` holds a credential (password, secret, key, token ...).

    ``ssl.key.location`` (a path) is not a secret; ``ssl.key.password``, ``ssl.key.pem`` and
    ``api_key`` are.
    """
    lowered = name.lower()
    if lowered in _SECRET_NAMES:
        return True
    parts = [p for p in re.split(r"[._\-]+", lowered) if p]
    return bool(parts) and (parts[-1] == "key" or any(w in p for p in parts for w in _SECRET_WORDS))


# "key": "value" or "key": bare-token inside JSON (valid or not), so credentials can be masked in a sample.
_JSON_PAIR = re.compile(r'"(?P<key>[^"\\]*)"(?P<sep>\s*:\s*)(?P<value>"(?:[^"\\]|\\.)*"?|[^,}\]\s]+)')


def sample(value: str, name: str = "") -> str:
    """A short, quoted sample of ``value`` for an error message, with credentials masked.

    The whole value is masked when ``name`` is secret-ish; inside JSON (even malformed), the
    value of every secret-ish key (``sasl.password`` ...) is.
    """
    if is_secret_key(name):
        return "'***'"

    def mask(m: re.Match) -> str:
        if is_secret_key(m.group("key")):
            return f'"{m.group("key")}"{m.group("sep")}"***"'
        return m.group(0)

    masked = _JSON_PAIR.sub(mask, value)
    if len(masked) > SAMPLE_CHARS:
        masked = masked[:SAMPLE_CHARS] + "..."
    return repr(masked)


def _is_complex(annotation: Any) -> bool:
    """Whether a field's environment value is JSON (lists, tables), as pydantic-settings decides it."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_complex(a) for a in typing.get_args(annotation) if a is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return (origin or annotation) in (list, dict, set, tuple, frozenset)


def _expected(annotation: Any) -> str:
    """What a JSON environment value for ``annotation`` must look like, with an example."""
    origin = typing.get_origin(annotation) or annotation
    if origin in (list, set, tuple, frozenset):
        return 'a JSON array, e.g. \'["flows"]\''
    if origin is dict:
        return 'a JSON object, e.g. \'{"security.protocol": "SASL_SSL"}\''
    return "a JSON object of the section's keys"


def _json_env(name: str, raw: str, annotation: Any) -> Any:
    """Decode a JSON environment value, or raise ConfigError naming the variable and the fix."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(
            f"{name}: expected {_expected(annotation)}; got {sample(raw, name)} (not valid JSON: {exc})"
        ) from None
    origin = typing.get_origin(annotation) or annotation
    want = list if origin in (list, set, tuple, frozenset) else dict
    if not isinstance(value, want):
        raise ConfigError(f"{name}: expected {_expected(annotation)}; got {sample(raw, name)} "
                          f"(a JSON {type(value).__name__})")
    return value


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], tuple[str, str]]]:
    """``SLUICE_<SECTION>__<KEY>[__<SUBKEY>]`` variables as nested settings, and where each came from.

    Refuses variables that name no setting (a typo would be ignored) and JSON values that
    do not decode. The second result maps a setting's location to (variable, raw value).
    """
    sections = Settings.model_fields
    out: dict[str, Any] = {}
    origins: dict[tuple[str, ...], tuple[str, str]] = {}
    for name in sorted(environ):
        raw = environ[name]
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        rest = upper[len(ENV_PREFIX):]
        if ENV_DELIMITER not in rest:
            # SLUICE_<SECTION>='{...}' sets a whole section; any other SLUICE_X (SLUICE_TEST_BROKER,
            # SLUICE_TENSORRT_CACHE_DIR, ...) belongs to someone else.
            if rest.lower() in sections:
                section = rest.lower()
                _deep_merge(out, {section: _json_env(name, raw, sections[section].annotation)})
                origins[(section,)] = (name, raw)
            continue
        section, _, key = rest.partition(ENV_DELIMITER)
        field = sections.get(section.lower())
        if field is None:
            raise ConfigError(f"{name}: unknown section {section.lower()!r}; known: {', '.join(sections)}")
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigError(f"{name}: {section.lower()} is a list; set all of it as JSON in {ENV_PREFIX}{section.upper()}")
        path = [section.lower(), *(p.lower() for p in key.split(ENV_DELIMITER))]
        sub = model.model_fields.get(path[1]) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if sub is None:
            raise ConfigError(f"{name}: unknown key {path[0]}.{path[1]}; known: {', '.join(model.model_fields)}")
        value: Any = raw
        if len(path) == 2 and _is_complex(sub.annotation):
            value = _json_env(name, raw, sub.annotation)
        elif len(path) > 2 and (typing.get_origin(sub.annotation) or sub.annotation) is not dict:
            raise ConfigError(f"{name}: {path[0]}.{path[1]} is not a table; set {_env_key(path[0], path[1])}")
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        _deep_merge(out, nested)
        origins[tuple(path)] = (name, raw)
    return out, origins


def _deep_merge(into: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into ``into``, tables key by key (a later source wins per key)."""
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = dict(v) if isinstance(v, Mapping) else v
    return into


def _format_error(err: dict[str, Any], path: Path | None,
                  origins: Mapping[tuple[str, ...], tuple[str, str]] | None = None) -> str:
    loc = [str(p) for p in err.get("loc", ())]
    key = ".".join(loc) if loc else "(root)"
    origin = None
    for n in range(len(loc), 0, -1):  # the most specific variable that set this value
        origin = (origins or {}).get(tuple(loc[:n]))
        if origin:
            break
    if origin:
        src = f" (from {origin[0]}={sample(origin[1], origin[0])})"
    else:
        src = f" in {path}" if path else ""
    if err.get("type") == "extra_forbidden":
        return f"{key}: unknown key{src}; remove it or check its spelling (see `sluice check-config --reference`)"
    hint = src
    if not origin and len(loc) >= 2:
        hint = f" (set [{loc[0]}] {loc[1]}{src} or {_env_key(loc[0], loc[1])})"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if key == "(root)":
        return f"{msg}{src}"
    return f"{key}: {msg}{hint}"


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Load and validate settings from ``path`` (TOML), ``environ`` and ``overrides``.

    Precedence, highest first: ``overrides`` (keyword arguments, one per section), ``environ``
    (default: a snapshot of ``os.environ``), the file, the defaults. Nothing process-wide is
    read after the snapshot or written, so concurrent calls do not interfere.

    Raises :class:`ConfigError` with one line per problem, each naming the key (and the
    environment variable that set it, with a sample of its value, credentials masked).
    """
    environ = dict(os.environ) if environ is None else environ
    toml_path = Path(path) if path is not None else None
    merged: dict[str, Any] = {}
    if toml_path is not None:
        if not toml_path.is_file():
            raise ConfigError(f"config file {toml_path} does not exist")
        try:
            merged = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{toml_path}: not valid TOML: {exc}") from exc
    from_env, origins = _env_overrides(environ)
    _deep_merge(merged, from_env)
    _deep_merge(merged, overrides)
    try:
        return Settings(**merged)
    except ValidationError as exc:
        lines = [_format_error(e, toml_path, origins) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def reference() -> str:
    """The settings reference: one line per key with type, default and env variable."""
    out = []
    sections = [(name, f.annotation, f"[{name}]") for name, f in Settings.model_fields.items() if name != "routes"]
    sections.append(("routes", RouteSettings, "[[routes]]  (a list; env SLUICE_ROUTES as JSON)"))
    for section, model, title in sections:
        out.append(title)
        for key, f in model.model_fields.items():  # type: ignore[union-attr]
            default = "<host name>" if key == "replica_id" else (
                f.default_factory() if f.default_factory else f.default
            )
            if isinstance(default, BaseModel):
                default = "{...}"
            shown = "required" if f.is_required() else f"default {default!r}"
            env = "in SLUICE_ROUTES" if section == "routes" else _env_key(section, key)
            typ = getattr(f.annotation, "__name__", str(f.annotation)).replace("typing.", "")
            out.append(f"  {key} ({typ}, {shown}, env {env})")
            out.append(f"      {f.description}")
    return "\n".join(out)
