"""Sluice: exactly-once streaming inference from Kafka to Kafka.

The worker consumes security telemetry, scores it in micro-batches on a
dedicated inference thread pool and publishes one score per event (or one dead
letter) plus drift statistics, all inside Kafka transactions.
"""

__version__ = "0.1.0"
