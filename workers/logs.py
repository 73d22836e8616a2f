"""Structured logging: JSON lines when stderr is not a terminal, readable text when it is.

Fields passed with ``extra={...}`` become JSON keys, so log pipelines can
filter on them (``partition``, ``error``, ``exit_code`` ...).

librdkafka's own lines (``%3|...|FAIL|...`` on stderr by default) come through
the same logger: every confluent-kafka client gets :func:`kafka_logger` as its
``logger`` setting, which logs them on ``sluice.kafka`` with the client's name
and librdkafka's facility, and lets a repeated line through once per
:data:`KAFKA_REPEAT_WINDOW_S` with the count of the ones it held back.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time

import orjson

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, then every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    """A readable line for terminals: time, level, message, then ``key=value`` extras."""

    def format(self, record: logging.LogRecord) -> str:
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} {record.getMessage()}"
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "INFO", fmt: str = "auto") -> None:
    """Send every logger's records to stderr: JSON lines, or text on a terminal (``fmt="auto"``)."""
    fmt = fmt.lower()
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# ------------------------------------------------------------------ librdkafka's logs

#: A line a client repeats (a broker down is retried every few hundred ms, and every attempt
#: logs) is let through once per this many seconds; the next one carries ``repeated``: how
#: many were held back. Long enough to keep a dead broker to a few lines a minute, short
#: enough that an operator tailing the log sees the problem is still there.
KAFKA_REPEAT_WINDOW_S = 30.0
#: Distinct lines remembered for the rate limit; older ones are forgotten past this (a
#: client cycling through many broker addresses must not grow memory without bound).
KAFKA_REPEAT_MAX_KEYS = 1024
KAFKA_LOGGER_NAME = "sluice.kafka"

# librdkafka prefixes a line with the thread it came from: noise in a structured record.
_THREAD_PREFIX = re.compile(r"^\[thrd:[^\]]*\]: ")
# Numbers change between repeats of one problem ("after 3ms", a port, a count).
_NUMBERS = re.compile(r"\d+")


class KafkaClientLog:
    """The ``logger`` of every confluent-kafka client (consumer, producer, admin).

    confluent-kafka calls ``log(level, "%s [%s] %s", facility, client_name, message)``
    from the client's poll; this logs a record on :data:`KAFKA_LOGGER_NAME` with
    ``client`` and ``facility`` fields, rate-limited per (client, facility, message
    with its numbers blanked). Thread-safe: the clients are polled from several threads.
    """

    def __init__(self, name: str = KAFKA_LOGGER_NAME, window_s: float = KAFKA_REPEAT_WINDOW_S,
                 clock=time.monotonic) -> None:
        self.logger = logging.getLogger(name)
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str, str], list] = {}  # key -> [last let through at, held back since]

    def log(self, level: int, fmt: str, *args) -> None:
        """Called by confluent-kafka for each librdkafka log line."""
        if not self.logger.isEnabledFor(level):
            return
        if len(args) == 3:
            facility, client, message = (str(a) for a in args)
        else:  # not the shape confluent-kafka uses today: keep the line whole
            facility, client, message = "", "", (fmt % args if args else fmt)
        message = _THREAD_PREFIX.sub("", message)
        key = (client, facility, _NUMBERS.sub("#", message))
        now = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.window_s:
                entry[1] += 1
                return
            held_back = entry[1] if entry is not None else 0
            self._seen[key] = [now, 0]
            if len(self._seen) > KAFKA_REPEAT_MAX_KEYS:
                for old in sorted(self._seen, key=lambda k: self._seen[k][0])[: len(self._seen) // 2]:
                    del self._seen[old]
        extra = {"client": client, "facility": facility}
        if held_back:
            extra["repeated"] = held_back
        self.logger.log(level, message, extra=extra)

    # confluent-kafka only calls log(); these keep the object usable where a Logger is expected.
    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 (logging's naming)
        return self.logger.isEnabledFor(level)


_KAFKA_LOG = KafkaClientLog()


def kafka_logger() -> KafkaClientLog:
    """The process's librdkafka log adapter: pass it as ``"logger"`` in every client's config."""
    return _KAFKA_LOG
