"""Topic configs CreateTopics accepts, validated as Kafka's LogConfig does (the names of
Kafka 4.1's TopicConfig plus the replication throttles; types, ranges and choices): an
unknown name, a null or an invalid value is INVALID_CONFIG there, so it is here too.
devbroker itself acts only on max.message.bytes; the others are kept and described."""

from __future__ import annotations

INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
LONG_MIN, LONG_MAX = -(1 << 63), (1 << 63) - 1

# name -> (type, lower bound or None, upper bound or None, choices or None)
_SPECS: dict[str, tuple[str, float | None, float | None, tuple[str, ...] | None]] = {
    "cleanup.policy": ("list", None, None, ("compact", "delete")),
    "compression.type": ("string", None, None, ("uncompressed", "zstd", "lz4", "snappy", "gzip", "producer")),
    "compression.gzip.level": ("int", -1, 9, None),
    "compression.lz4.level": ("int", 1, 17, None),
    "compression.zstd.level": ("int", -131072, 22, None),
    "delete.retention.ms": ("long", 0, None, None),
    "file.delete.delay.ms": ("long", 0, None, None),
    "flush.messages": ("long", 1, None, None),
    "flush.ms": ("long", 0, None, None),
    "index.interval.bytes": ("int", 0, None, None),
    "local.retention.bytes": ("long", -2, None, None),
    "local.retention.ms": ("long", -2, None, None),
    "max.compaction.lag.ms": ("long", 1, None, None),
    "max.message.bytes": ("int", 0, None, None),
    "message.timestamp.after.max.ms": ("long", 0, None, None),
    "message.timestamp.before.max.ms": ("long", 0, None, None),
    "message.timestamp.type": ("string", None, None, ("CreateTime", "LogAppendTime")),
    "min.cleanable.dirty.ratio": ("double", 0, 1, None),
    "min.compaction.lag.ms": ("long", 0, None, None),
    "min.insync.replicas": ("int", 1, None, None),
    "preallocate": ("boolean", None, None, None),
    "remote.log.copy.disable": ("boolean", None, None, None),
    "remote.log.delete.on.disable": ("boolean", None, None, None),
    "remote.storage.enable": ("boolean", None, None, None),
    "retention.bytes": ("long", None, None, None),
    "retention.ms": ("long", -1, None, None),
    "segment.bytes": ("int", 1024 * 1024, None, None),
    "segment.index.bytes": ("int", 4, None, None),
    "segment.jitter.ms": ("long", 0, None, None),
    "segment.ms": ("long", 1, None, None),
    "unclean.leader.election.enable": ("boolean", None, None, None),
    "leader.replication.throttled.replicas": ("list", None, None, None),
    "follower.replication.throttled.replicas": ("list", None, None, None),
}


def validate(configs: dict[str, str | None]) -> str | None:
    """None when Kafka would accept every config, else its INVALID_CONFIG message."""
    for name, value in configs.items():
        spec = _SPECS.get(name)
        if spec is None:
            return f"Unknown topic config name: {name}"
        if value is None:
            return f"Null value not supported for topic configs: {name}"
        kind, lo, hi, choices = spec
        bad = f"Invalid value {value} for configuration {name}"
        v = value.strip()
        if kind in ("int", "long"):
            try:
                n: float = int(v)
            except ValueError:
                return f"{bad}: Not a number of type {kind.upper()}"
            top, bottom = (INT_MAX, INT_MIN) if kind == "int" else (LONG_MAX, LONG_MIN)
            if not bottom <= n <= top:
                return f"{bad}: Not a number of type {kind.upper()}"
        elif kind == "double":
            try:
                n = float(v)
            except ValueError:
                return f"{bad}: Not a number of type DOUBLE"
        elif kind == "boolean":
            if v.lower() not in ("true", "false"):
                return f"{bad}: Expected value to be either true or false"
            continue
        elif kind == "list":
            items = [x.strip() for x in v.split(",") if x.strip()]
            if choices and any(x not in choices for x in items):
                return f"{bad}: String must be one of: {', '.join(choices)}"
            continue
        else:
            if choices and v not in choices:
                return f"{bad}: String must be one of: {', '.join(choices)}"
            continue
        if lo is not None and n < lo:
            return f"{bad}: Value must be at least {lo}"
        if hi is not None and n > hi:
            return f"{bad}: Value must be no more than {hi}"
    return None
