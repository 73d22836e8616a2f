"""[kafka] client security settings, translated for the drift aggregator's faust/aiokafka clients."""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme

from workers.config import ConfigError, load_settings
from workers.kafka.settings import admin_config, aiokafka_security, buffer_sizes, consumer_config, producer_config


def _settings(client: dict):
    return load_settings(None, environ={}, kafka={"bootstrap_servers": "k:9093", "group_id": "g",
                                                  "input_topics": ["in"], "client": client})


def test_plaintext_by_default():
    sec = aiokafka_security(_settings({}))
    assert sec.producer_kwargs() == {"security_protocol": "PLAINTEXT"}
    assert sec.faust_credentials() is None


def test_sasl_ssl_scram_with_a_client_certificate_becomes_faust_and_aiokafka_credentials(tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    leaf = ca.issue_cert("sluice-aggregator")
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "client.pem")
    leaf.private_key_pem.write_to_path(tmp_path / "client.key")
    client = {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "agg", "sasl.password": "s3cret", "ssl.ca.location": str(tmp_path / "ca.pem"),
        "ssl.certificate.location": str(tmp_path / "client.pem"), "ssl.key.location": str(tmp_path / "client.key"),
        "client.rack": "eu-1a",
    }
    s = _settings(client)
    sec = aiokafka_security(s)
    assert sec.ignored == ("client.rack",)
    kw = sec.producer_kwargs()
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("agg", "s3cret")
    ctx = kw["ssl_context"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    creds = sec.faust_credentials()
    assert (creds.protocol.value, creds.mechanism.value) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (creds.username, creds.password, creds.ssl_context) == ("agg", "s3cret", ctx)

    async def construct():  # aiokafka checks the combination when a producer is built
        from aiokafka import AIOKafkaProducer

        AIOKafkaProducer(bootstrap_servers="k:9093", **kw)

    asyncio.run(construct())
    # librdkafka's clients get the same settings unchanged.
    assert admin_config(s)["sasl.username"] == "agg"


def test_ssl_without_hostname_check_when_librdkafka_would_not_check_it(tmp_path):
    trustme.CA().cert_pem.write_to_path(tmp_path / "ca.pem")
    sec = aiokafka_security(_settings({"security.protocol": "ssl", "ssl.ca.location": str(tmp_path / "ca.pem"),
                                       "ssl.endpoint.identification.algorithm": "none"}))
    assert sec.protocol == "SSL" and sec.mechanism is None and not sec.ssl_context.check_hostname
    assert sec.faust_credentials().protocol.value == "SSL"


@pytest.mark.parametrize("client, named", [
    ({"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER",
      "sasl.oauthbearer.config": "scope=x"}, "sasl.oauthbearer.config"),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.kerberos.service.name": "kafka"}, "sasl.kerberos.service.name"),
    ({"security.protocol": "SASL_PLAINTEXT"}, "'GSSAPI'"),
    ({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": "u"}, "sasl.password"),
    ({"security.protocol": "TLS"}, "'TLS'"),
    ({"security.protocol": "SSL", "ssl.ca.location": "/nonexistent/ca.pem"}, "TLS context"),
])
def test_what_the_aggregator_cannot_honour_fails_naming_it(client, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        aiokafka_security(_settings(client))


# ------------------------------------------------------------------ buffer sizes (memory bound)

def _sized(batching: dict | None = None, topics: dict | None = None, **kafka):
    return load_settings(None, environ={}, kafka={"bootstrap_servers": "k:9093", "input_topics": ["in"], **kafka},
                         batching=batching or {}, topics=topics or {})


def test_every_librdkafka_buffer_follows_the_batch_settings():
    small, large = buffer_sizes(_sized({"max_batch_size": 256})), buffer_sizes(_sized({"max_batch_size": 4096}))
    assert small.prefetch_messages == 512 and large.prefetch_messages == 8192
    assert small.partition_fetch_bytes < large.partition_fetch_bytes
    assert small.fetch_max_bytes < large.fetch_max_bytes
    assert small.producer_queue_messages < large.producer_queue_messages
    c, p = consumer_config(_sized({"max_batch_size": 256})), producer_config(_sized({"max_batch_size": 256}))
    assert (c["queued.min.messages"], c["max.partition.fetch.bytes"], c["fetch.max.bytes"]) == (512, 512 * 1024, 1024 * 1024)
    assert (p["queue.buffering.max.messages"], p["queue.buffering.max.kbytes"]) == (10_000, 32 * 1024)


def test_the_operators_byte_bounds_cap_the_derived_sizes():
    sizes = buffer_sizes(_sized({"max_batch_size": 65536, "max_inflight_batches": 64},
                                fetch_max_bytes=2 * 1024 * 1024, queued_max_messages_kbytes=4096))
    assert sizes.fetch_max_bytes == sizes.partition_fetch_bytes == 2 * 1024 * 1024
    assert sizes.prefetch_kbytes == 4096 and sizes.producer_queue_kbytes == 4096


def test_the_largest_record_always_fits_the_producer():
    sizes = buffer_sizes(_sized(topics={"dlq_max_value_bytes": 5_000_000},
                                fetch_max_bytes=1024 * 1024, queued_max_messages_kbytes=1024))
    # a dead letter of dlq_max_value_bytes plus its headers
    assert sizes.message_max_bytes >= 5_000_000 + 64 * 1024
    assert sizes.producer_queue_kbytes * 1024 >= sizes.message_max_bytes


def test_a_small_fetch_bound_is_accepted_by_librdkafka():
    from confluent_kafka import Consumer

    conf = consumer_config(_sized(fetch_max_bytes=4096))
    conf.pop("logger")
    assert conf["fetch.max.bytes"] == 4096
    Consumer(conf).close()  # librdkafka refuses fetch.max.bytes < message.max.bytes
