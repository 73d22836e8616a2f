"""Topic administration: check input topics exist, create output topics."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from workers.exit_codes import AuthenticationFailed, NotAuthorized

# Metadata requests at start; a broker that is down is reported, not waited on forever.
METADATA_TIMEOUT_S = 15.0


class TopicError(RuntimeError):
    """An input topic is missing or an output topic could not be created."""


# Client errors that say the credentials were refused, and those that say a connection
# failed in a way that points at the wrong security.protocol (librdkafka's own hint).
_AUTH_CODES = (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED)
_AUTHZ_CODES = (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
                KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED)


def is_authorization_error(err: KafkaError) -> bool:
    """A missing ACL (topic, group, cluster, transactional id)."""
    return err.code() in _AUTHZ_CODES


class StartupErrorLog:
    """The ``error_cb`` and ``logger`` of the client the worker starts with (the admin client):
    keeps what the client reported, so a start that fails can say why (wrong password,
    plaintext on a TLS listener) instead of only "did not answer". Log lines pass on to the
    ``logger`` given."""

    def __init__(self, logger: Any = None) -> None:
        self.logger = logger
        self.auth: KafkaError | None = None
        self.last: KafkaError | None = None
        # A broker that closes the connection during the very first request (ApiVersions)
        # is most often a TLS or SASL listener spoken to in plaintext; librdkafka says so
        # only in a log line.
        self.closed_at_first_request = False

    def __call__(self, err: KafkaError) -> None:
        if err.code() in _AUTH_CODES:
            self.auth = err
        self._saw(err.str())
        self.last = err

    def _saw(self, text: str) -> None:
        if "APIVERSION_QUERY" in text:
            self.closed_at_first_request = True

    def log(self, level: int, fmt: str, *args) -> None:
        self._saw(" ".join(str(a) for a in args) if args else fmt)
        if self.logger is not None:
            self.logger.log(level, fmt, *args)

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 (logging's naming)
        return self.logger is None or self.logger.isEnabledFor(level)

    def hint(self, conf: dict) -> str:
        """What the recorded errors suggest, for the "cannot start" message."""
        protocol = str(conf.get("security.protocol", "plaintext")).upper()
        if self.closed_at_first_request and protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
            return (f"; the brokers closed the connection at the first request, as a TLS listener does to a "
                    f"{protocol} client: check [kafka] client's security.protocol (e.g. SSL or SASL_SSL)")
        return ""

    def raise_for(self, exc: KafkaException, bootstrap: str, conf: dict) -> None:
        """Raise the typed error that explains ``exc`` best, or return to let it stand."""
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if err is not None and is_authorization_error(err):
            raise NotAuthorized(f"not authorized: {err.str()} (principal {conf.get('sasl.username', 'ANONYMOUS')!r} "
                                "needs the ACLs listed in the README, section \"Secured clusters\")") from exc
        if self.auth is not None:
            raise AuthenticationFailed(
                f"the cluster at {bootstrap} refused the credentials of [kafka] client "
                f"(sasl.username={conf.get('sasl.username')!r}, sasl.mechanisms={conf.get('sasl.mechanisms')!r}): "
                f"{self.auth.str()}; check sasl.username, sasl.password and sasl.mechanisms") from exc


def last_client_error(errors: "StartupErrorLog | None", conf: dict | None = None) -> str:
    """`; last client error: ...` and a hint for a message, or nothing."""
    if errors is None:
        return ""
    text = f"; last client error: {errors.last.str()}" if errors.last is not None else ""
    return text + errors.hint(conf or {})


def partition_counts(admin: AdminClient, timeout: float = METADATA_TIMEOUT_S) -> dict[str, int]:
    """Partitions per existing topic; raises KafkaException when the cluster does not answer."""
    try:
        md = admin.list_topics(timeout=timeout)
    finally:
        # An admin client's librdkafka log lines (its `logger`) are only delivered by poll():
        # serve them now, or the lines saying why the metadata request failed would be lost.
        admin.poll(0)
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}


def ensure_topics(
    admin: AdminClient,
    topics: Iterable[str],
    partitions: int,
    replication_factor: int = -1,
    timeout: float = METADATA_TIMEOUT_S,
    config: dict[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet (with topic ``config``); return the names created."""
    existing = partition_counts(admin, timeout)
    missing = [t for t in dict.fromkeys(topics) if t not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=replication_factor, config=dict(config or {}))
         for t in missing],
        operation_timeout=timeout,
    )
    for name, fut in futures.items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            err = exc.args[0]
            if err.name() != "TOPIC_ALREADY_EXISTS":  # another replica won the race
                raise TopicError(f"cannot create topic {name!r}: {err.str()}") from exc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(t in partition_counts(admin, timeout) for t in missing):
            return missing
        time.sleep(0.05)
    raise TopicError(f"topics {missing} were created but never appeared in metadata")
