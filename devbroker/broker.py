"""The broker's state in one process: topics and their partition logs, the
metadata journal, producer-id allocation, and the two coordinators."""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .log import PartitionLog
from .state import Journal
from .topic_configs import validate as validate_configs

LEGAL_TOPIC = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
PID_BLOCK = 1000
NODE_ID = 0


@dataclass
class Config:
    data_dir: str
    host: str = "127.0.0.1"
    port: int = 0
    default_partitions: int = 1
    auto_create_topics: bool = True
    initial_rebalance_delay_ms: int = 50
    # Kafka's defaults (group.min/max.session.timeout.ms): a client that joins with a session
    # timeout outside them gets INVALID_SESSION_TIMEOUT here as it would there.
    min_session_timeout_ms: int = 6_000
    max_session_timeout_ms: int = 1_800_000
    max_transaction_timeout_ms: int = 900_000
    message_max_bytes: int = 1_048_588  # Kafka's message.max.bytes default (per record batch)
    timer_interval_ms: int = 50


@dataclass
class Topic:
    name: str
    id: uuid.UUID
    partitions: list[PartitionLog]
    configs: dict[str, str] = field(default_factory=dict)
    max_message_bytes: int = 0  # max.message.bytes: the topic's, else the broker's message.max.bytes
    # message.timestamp.after.max.ms (Kafka 4's default: 1 hour): how far in the future a
    # CreateTime record may be stamped
    timestamp_after_max_ms: int = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


class Broker:
    def __init__(self, config: Config):
        from .groups import GroupCoordinator
        from .txn import TxnCoordinator

        self.config = config
        self.cluster_id = "devbroker-" + uuid.uuid5(uuid.NAMESPACE_URL, os.path.abspath(config.data_dir)).hex[:12]
        os.makedirs(config.data_dir, exist_ok=True)
        self.logs_dir = os.path.join(config.data_dir, "logs")
        os.makedirs(self.logs_dir, exist_ok=True)
        self.topics: dict[str, Topic] = {}
        self.journal = Journal(config.data_dir)
        self.next_pid = 1000
        self.pid_limit = 1000
        self.advertised_host = config.host
        self.advertised_port = config.port
        self.groups = GroupCoordinator(self)
        self.txns = TxnCoordinator(self)
        self._load()

    # ---- persistence ------------------------------------------------------------------------
    def _load(self) -> None:
        topics: dict[str, dict[str, Any]] = {}
        txn_records: dict[str, dict[str, Any]] = {}
        group_records: dict[str, dict[str, Any]] = {}
        for r in self.journal.replay():
            k = r.get("k")
            if k == "topic":
                topics[r["name"]] = r
            elif k == "deltopic":
                topics.pop(r["name"], None)
                self.groups.drop_topic(r["name"])
            elif k == "pids":
                self.next_pid = self.pid_limit = max(self.pid_limit, r["next"])
            elif k == "offsets":
                self.groups.load_offsets(r["group"], r["o"])
            elif k == "delgroup":
                self.groups.offsets.pop(r["group"], None)
                group_records.pop(r["group"], None)
            elif k == "group":
                group_records[r["id"]] = r
            elif k == "txn":
                txn_records[r["id"]] = r
        for name, r in topics.items():
            self._open_topic(name, r["partitions"], uuid.UUID(r["uuid"]), r.get("configs") or {})
        # logs of topics the journal does not know (deleted before a crash) are removed
        known = {self._dirname(t, p) for t, top in self.topics.items() for p in range(len(top.partitions))}
        for d in os.listdir(self.logs_dir):
            if d not in known:
                shutil.rmtree(os.path.join(self.logs_dir, d), ignore_errors=True)
        self.txns.load(txn_records.values())
        for r in group_records.values():
            self.groups.load_group(r)
        self._compact()
        self.txns.recover()

    def _compact(self) -> None:
        recs: list[dict[str, Any]] = [{"k": "pids", "next": self.pid_limit}]
        for t in self.topics.values():
            recs.append(self._topic_record(t))
        for g, offs in self.groups.offsets.items():
            recs.append({"k": "offsets", "group": g, "o": self.groups.dump_offsets(offs)})
        recs.extend(self.txns.dump())
        recs.extend(self.groups.dump_groups())
        self.journal.rewrite(recs)

    @staticmethod
    def _topic_record(t: Topic) -> dict[str, Any]:
        return {"k": "topic", "name": t.name, "partitions": len(t.partitions), "uuid": str(t.id),
                "configs": t.configs}

    @staticmethod
    def _dirname(topic: str, partition: int) -> str:
        return f"{topic}-{partition}"

    def _open_topic(self, name: str, partitions: int, tid: uuid.UUID, configs: dict[str, str]) -> Topic:
        logs = [PartitionLog(os.path.join(self.logs_dir, self._dirname(name, p)), name, p)
                for p in range(partitions)]
        t = self.topics[name] = Topic(name, tid, logs, dict(configs))
        try:
            t.max_message_bytes = int(configs.get("max.message.bytes", self.config.message_max_bytes))
        except ValueError:
            t.max_message_bytes = self.config.message_max_bytes
        try:
            t.timestamp_after_max_ms = int(configs.get("message.timestamp.after.max.ms", 3_600_000))
        except ValueError:
            pass
        return t

    # ---- topics -----------------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int, configs: dict[str, str] | None = None,
                     validate_only: bool = False) -> tuple[str, str | None]:
        """Returns (kio error code name, message)."""
        if not LEGAL_TOPIC.match(name) or name in (".", ".."):
            return "invalid_topic_exception", f"illegal topic name {name!r}"
        if name in self.topics:
            return "topic_already_exists", f"topic {name!r} already exists"
        if partitions == -1:
            partitions = self.config.default_partitions
        if partitions <= 0:
            return "invalid_partitions", "number of partitions must be positive"
        invalid = validate_configs(configs or {})
        if invalid:
            return "invalid_config", invalid
        if validate_only:
            return "none", None
        t = self._open_topic(name, partitions, uuid.uuid4(), configs or {})
        self.journal.append(self._topic_record(t))
        return "none", None

    def delete_topic(self, name: str) -> str:
        t = self.topics.pop(name, None)
        if t is None:
            return "unknown_topic_or_partition"
        self.journal.append({"k": "deltopic", "name": name})
        # Kafka drops the committed offsets of deleted partitions (onPartitionsDeleted), so a
        # topic re-created under the same name starts with no committed offsets
        self.groups.drop_topic(name)
        for log in t.partitions:
            log.close()
            log._wake()
            shutil.rmtree(log.dir, ignore_errors=True)
        return "none"

    def topic(self, name: str, auto_create: bool = False) -> Topic | None:
        t = self.topics.get(name)
        if t is None and auto_create and self.config.auto_create_topics:
            err, _ = self.create_topic(name, -1)
            if err == "none":
                t = self.topics[name]
        return t

    def log(self, topic: str, partition: int) -> PartitionLog | None:
        t = self.topics.get(topic)
        if t is None or not 0 <= partition < len(t.partitions):
            return None
        return t.partitions[partition]

    # ---- producer ids -----------------------------------------------------------------------
    def allocate_pid(self) -> int:
        if self.next_pid >= self.pid_limit:
            self.pid_limit = self.next_pid + PID_BLOCK
            self.journal.append({"k": "pids", "next": self.pid_limit})
        pid = self.next_pid
        self.next_pid += 1
        return pid

    def close(self) -> None:
        for t in self.topics.values():
            for log in t.partitions:
                log.close()
        self.journal.close()
