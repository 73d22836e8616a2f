"""Security on Apache Kafka: SASL_SSL (SCRAM-SHA-512 over TLS) and the standard authorizer.

The certificates are made here with trustme; the broker runs with ACLs and a super user that
only the test's set-up uses (over a loopback plaintext listener). The worker, `sluice produce`
and the drift aggregator connect with the credentials of `[kafka] client`, the worker's user
holding only the ACLs the README lists. Each misconfiguration an operator is likely to make
(a wrong password, a missing ACL on the scores topic, a plaintext client on the TLS listener)
must end the worker with a message naming the cause and a code from the README's exit-code
table, with nothing committed lost; and no secret may reach a log line or `check-config`.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from workers.exit_codes import ExitCode
from workers.kafka.apache import ApacheKafka
from workers.kafka.telemetry_producer import produce_telemetry

from .worker_harness import (
    ROOT,
    WorkerProc,
    assert_exactly_once,
    committed_offsets,
    outcome,
    partition_ends,
    wait_until,
    worker_env,
)

pytestmark = pytest.mark.kafka_only

PARTITIONS = 2
WORKER_USER = "sluice-worker"


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """A 1-node Kafka with a SASL_SSL listener, ACLs on, and certificates made by trustme."""
    import trustme
    from cryptography.hazmat.primitives import serialization

    certs = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    (certs / "broker.pem").write_bytes(pkcs8 + b"".join(p.bytes() for p in leaf.cert_chain_pems))
    (certs / "ca.pem").write_bytes(ca.cert_pem.bytes())
    cluster = ApacheKafka(tmp_path_factory.mktemp("kafka-secure"), brokers=1, sasl_ssl=certs).start()
    try:
        yield cluster
    finally:
        cluster.close()


_ADMINS: dict[str, AdminClient] = {}


def _admin(secure) -> AdminClient:
    """The loopback plaintext listener: its anonymous principal is a super user (set-up only).
    One client per cluster, kept: a client dropped before its futures resolve fails them."""
    bootstrap = secure.info["plaintext.bootstrap.servers"]
    if bootstrap not in _ADMINS:
        _ADMINS[bootstrap] = AdminClient({"bootstrap.servers": bootstrap})
    return _ADMINS[bootstrap]


def _add_user(secure, user: str, password: str) -> None:
    admin = _admin(secure)
    admin.alter_user_scram_credentials([UserScramCredentialUpsertion(
        user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192), password.encode())])[user].result(15)


def _client(secure, user: str, password: str) -> dict[str, str]:
    return {"security.protocol": "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512",
            "sasl.username": user, "sasl.password": password, "ssl.ca.location": secure.info["ssl.ca.location"]}


def worker_acls(user: str, topic: str, group: str, transactional_id: str) -> list[AclBinding]:
    """The minimal ACL set of one worker replica (README: "Running on a secured cluster")."""
    principal = f"User:{user}"

    def allow(rtype, name, op):
        return AclBinding(rtype, name, ResourcePatternType.LITERAL, principal, "*", op, AclPermissionType.ALLOW)

    acls = [allow(ResourceType.TOPIC, topic, AclOperation.READ),
            allow(ResourceType.TOPIC, topic, AclOperation.DESCRIBE),
            allow(ResourceType.GROUP, group, AclOperation.READ),
            allow(ResourceType.TRANSACTIONAL_ID, transactional_id, AclOperation.WRITE),
            allow(ResourceType.TRANSACTIONAL_ID, transactional_id, AclOperation.DESCRIBE),
            allow(ResourceType.BROKER, "kafka-cluster", AclOperation.IDEMPOTENT_WRITE)]
    for out in (f"{topic}-scores", f"{topic}-dlq", f"{topic}-drift", f"{topic}-shadow", f"{topic}-audit"):
        acls += [allow(ResourceType.TOPIC, out, AclOperation.WRITE),
                 allow(ResourceType.TOPIC, out, AclOperation.DESCRIBE)]
    # The control topic: followed by every replica, written by the canary guard's rollback.
    acls += [allow(ResourceType.TOPIC, f"{topic}-control", op)
             for op in (AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE)]
    return acls


def _setup(secure, *, skip_scores_write: bool = False) -> tuple[str, str, str]:
    """Topics made by the super user, a worker user with the minimal ACLs: (topic, group, password)."""
    topic = f"sec-{secrets.token_hex(4)}"
    group = f"g-{topic}"
    password = secrets.token_urlsafe(16)
    admin = _admin(secure)
    names = [topic, f"{topic}-scores", f"{topic}-dlq", f"{topic}-drift", f"{topic}-shadow", f"{topic}-audit"]
    new = [NewTopic(n, PARTITIONS if n == topic else 1) for n in names]
    new.append(NewTopic(f"{topic}-control", 1, config={"cleanup.policy": "compact"}))
    for name, fut in admin.create_topics(new).items():
        fut.result(15)
    _add_user(secure, f"{WORKER_USER}-{topic}", password)
    acls = worker_acls(f"{WORKER_USER}-{topic}", topic, group, f"{group}-r0")
    if skip_scores_write:
        acls = [a for a in acls if not (a.name == f"{topic}-scores" and a.operation == AclOperation.WRITE)]
    for fut in admin.create_acls(acls).values():
        fut.result(15)
    return topic, group, password


def _committed_total(bootstrap: str, group: str, topic: str) -> int:
    """The group's committed offsets summed, or -1 while its coordinator is still loading."""
    try:
        return sum(committed_offsets(bootstrap, group, topic, PARTITIONS).values())
    except KafkaException:
        return -1


def _secure_env(secure, topic: str, group: str, user: str, password: str, **extra: str) -> dict[str, str]:
    env = worker_env(secure.bootstrap, topic, replica="r0", group=group, **extra)
    env["SLUICE_KAFKA__CLIENT"] = json.dumps(_client(secure, user, password))
    # The topics exist already and the worker's user may not create topics (no CREATE ACL).
    return env


def test_worker_and_produce_work_over_sasl_ssl_with_the_minimal_acls(secure, tmp_path):
    topic, group, password = _setup(secure)
    user = f"{WORKER_USER}-{topic}"
    # The producer of the events: its own user, allowed to write the input topic only.
    prod_pw = secrets.token_urlsafe(16)
    _add_user(secure, f"producer-{topic}", prod_pw)
    admin = _admin(secure)
    acls = [AclBinding(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, f"User:producer-{topic}", "*", op,
                       AclPermissionType.ALLOW) for op in (AclOperation.WRITE, AclOperation.DESCRIBE)]
    for fut in admin.create_acls(acls).values():
        fut.result(15)
    cfg = tmp_path / "produce.toml"  # the worker's own config file serves `sluice produce --config` too
    cfg.write_text(f'[kafka]\nbootstrap_servers = "{secure.bootstrap}"\ninput_topics = ["{topic}"]\n')
    total = 3000
    env = dict(os.environ, SLUICE_KAFKA__CLIENT=json.dumps(_client(secure, f"producer-{topic}", prod_pw)))
    prod = subprocess.run([sys.executable, "-m", "workers", "produce", "--config", str(cfg), "--topic", topic,
                           "--count", str(total), "--seed", "3", "--bad-fraction", "0.02"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert prod.returncode == 0, prod.stderr[-2000:]
    assert f"acknowledged={total}" in prod.stdout

    w = WorkerProc(_secure_env(secure, topic, group, user, password), tmp_path / "worker.log").start()
    w.wait_started()
    admin_bootstrap = secure.info["plaintext.bootstrap.servers"]
    wait_until(lambda: _committed_total(admin_bootstrap, group, topic) == total,
               timeout=90, what="the worker to commit every input offset over SASL_SSL")
    assert w.terminate() == 0, w.log()[-3000:]
    ends = partition_ends(admin_bootstrap, topic, PARTITIONS)
    assert_exactly_once(outcome(admin_bootstrap, topic, total), topic, ends)
    log = w.log()
    assert password not in log and prod_pw not in prod.stderr + prod.stdout


def test_wrong_password_fails_the_start_naming_authentication(secure, tmp_path):
    topic, group, password = _setup(secure)
    w = WorkerProc(_secure_env(secure, topic, group, f"{WORKER_USER}-{topic}", "not-" + password),
                   tmp_path / "worker.log").start()
    code = w.proc.wait(90)
    log = w.log()
    assert code == ExitCode.CONFIG, log[-3000:]
    assert "authentication" in log.lower() and "sasl" in log.lower(), log[-3000:]
    assert password not in log


def test_plaintext_client_on_the_tls_listener_fails_naming_the_protocol(secure, tmp_path):
    topic, group, _ = _setup(secure)
    env = worker_env(secure.bootstrap, topic, replica="r0", group=group)  # no [kafka] client: PLAINTEXT
    w = WorkerProc(env, tmp_path / "worker.log").start()
    code = w.proc.wait(90)
    log = w.log()
    assert code == ExitCode.TEMPFAIL, log[-3000:]
    assert "security.protocol" in log, log[-3000:]


def test_missing_write_acl_on_scores_ends_the_worker_and_loses_nothing(secure, tmp_path):
    topic, group, password = _setup(secure, skip_scores_write=True)
    admin_bootstrap = secure.info["plaintext.bootstrap.servers"]
    produce_telemetry(admin_bootstrap, topic, count=500, seed=9)
    w = WorkerProc(_secure_env(secure, topic, group, f"{WORKER_USER}-{topic}", password),
                   tmp_path / "worker.log").start()
    code = w.proc.wait(120)
    log = w.log()
    assert code == ExitCode.CONFIG, log[-3000:]
    assert "not authorized" in log.lower() and f"{topic}-scores" in log, log[-3000:]
    # Nothing was committed: a fixed deployment starts from the first event.
    committed = committed_offsets(admin_bootstrap, group, topic, PARTITIONS)
    assert all(o < 0 for o in committed.values()), committed
    assert password not in log


def test_check_config_and_logs_never_show_the_password(secure, tmp_path):
    cfg = tmp_path / "sluice.toml"
    pw = "s3cret-" + secrets.token_hex(6)
    cfg.write_text(f'[kafka]\nbootstrap_servers = "{secure.bootstrap}"\ninput_topics = ["flows"]\n'
                   f'[kafka.client]\n"security.protocol" = "SASL_SSL"\n"sasl.mechanisms" = "SCRAM-SHA-512"\n'
                   f'"sasl.username" = "nobody"\n"sasl.password" = "{pw}"\n'
                   f'"ssl.ca.location" = "{secure.info["ssl.ca.location"]}"\n')
    out = subprocess.run([sys.executable, "-m", "workers", "check-config", "--config", str(cfg)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert pw not in out.stdout + out.stderr and "sasl.password" in out.stdout


def test_drift_aggregator_reads_the_workers_deltas_over_sasl_ssl(secure, tmp_path):
    """The worker writes drift deltas as its own user; the aggregator (faust and aiokafka, not
    librdkafka: [kafka] client is translated) reads them over SCRAM-SHA-512 + TLS and publishes
    reports. It runs as the super user: its own ACL set (group, changelog topics) is faust's."""
    topic, group, password = _setup(secure)
    admin_bootstrap = secure.info["plaintext.bootstrap.servers"]
    total = 2000
    produce_telemetry(admin_bootstrap, topic, count=total, seed=13, rate=2000)
    w = WorkerProc(_secure_env(secure, topic, group, f"{WORKER_USER}-{topic}", password),
                   tmp_path / "worker.log").start()
    w.wait_started()
    wait_until(lambda: _committed_total(admin_bootstrap, group, topic) == total, timeout=90,
               what="the worker to commit every input offset")
    assert w.terminate() == 0, w.log()[-3000:]
    scored = len(outcome(admin_bootstrap, topic, total).scores)

    reports = f"{topic}-reports"
    client = _client(secure, secure.info["sasl.username"], secure.info["sasl.password"])
    cfg = tmp_path / "drift.toml"
    cfg.write_text(f"""
[kafka]
bootstrap_servers = "{secure.bootstrap}"
input_topics = ["{topic}"]
session_timeout_ms = 6000
client = {{ {", ".join(f'"{k}" = "{v}"' for k, v in client.items())} }}
[topics]
drift = "{topic}-drift"
[model]
path = "{ROOT / 'models' / 'flow_classifier'}"
[logging]
format = "json"
[drift]
window_s = 10
grace_s = 2
idle_s = 3
reports_topic = "{reports}"
group_id = "agg-{topic}"
""")
    log_path = tmp_path / "aggregator.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    agg = subprocess.Popen([sys.executable, "-m", "workers", "drift-aggregator", "--config", str(cfg),
                            "--data-dir", str(tmp_path / "aggregator-data")],
                           cwd=ROOT, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    try:
        from .worker_harness import read_all

        def reported() -> int:
            assert agg.poll() is None, log_path.read_text()[-3000:]
            return sum(json.loads(m.value())["count"] for m in read_all(admin_bootstrap, reports, timeout=5, idle=1.0))

        wait_until(lambda: reported() >= scored, 120, interval=1.0, what="drift reports covering every scored event")
        assert reported() == scored
    finally:
        agg.terminate()
        agg.wait(30)
    text = log_path.read_text()
    assert secure.info["sasl.password"] not in text and password not in w.log()
