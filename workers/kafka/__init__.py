"""Kafka plumbing: client settings, the consumer, the transactional producer, topic admin.

Everything here is a thin, explicit layer over confluent-kafka (librdkafka);
the exactly-once protocol that strings these calls together lives in
``workers/pipeline.py``.
"""
