"""Output record encoding: score records and dead letters.

Score record (topic ``[topics] scores``, key = the input record's key), JSON,
schema ``schemas/records/score.json``::

    {"event_id": "...", "score": 0.93, "label": true,
     "model": {"name": "...", "version": "..."},
     "source": {"topic": "...", "partition": 0, "offset": 42},
     "event_ts": 1763800000.123, "scored_at": 1763800000.180}

Dead letter (topic ``[topics] dlq``): the original key, value and headers,
plus the headers in :data:`DLQ_HEADERS` (schema ``schemas/records/dead_letter.json``).

Encoding runs once per event on the hot path, so the score record is built by
byte formatting around pre-encoded constant parts (about half the cost of
``orjson.dumps`` of a dict); strings from the event go through orjson so they
are always escaped correctly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import orjson

H_REASON = "sluice.error.reason"
H_DETAIL = "sluice.error.detail"
H_TOPIC = "sluice.source.topic"
H_PARTITION = "sluice.source.partition"
H_OFFSET = "sluice.source.offset"
H_WORKER = "sluice.worker"
H_TRUNCATED = "sluice.error.truncated"
DLQ_HEADERS = (H_REASON, H_DETAIL, H_TOPIC, H_PARTITION, H_OFFSET, H_WORKER)

# Dead-letter details are for humans; a multi-MB offending value must not be copied into a header.
MAX_DETAIL_BYTES = 1024


class ScoreEncoder:
    """Encodes the score records of one model."""

    def __init__(self, model_name: str, model_version: str, threshold: float):
        self.threshold = float(threshold)
        model = orjson.dumps({"name": model_name, "version": model_version})
        self._middle = b',"model":' + model + b',"source":{"topic":'

    def encode(
        self,
        event_ids: Sequence[str],
        scores: np.ndarray,
        topics: Sequence[str],
        partitions: Sequence[int],
        offsets: Sequence[int],
        event_ts: np.ndarray,
        scored_at: float,
    ) -> list[bytes]:
        """One JSON record per event; all sequences have the same length."""
        labels = (scores >= self.threshold).tolist()
        score_list = scores.astype(np.float64).tolist()
        ts_list = [b"null" if math.isnan(t) else repr(t).encode() for t in event_ts.tolist()]
        middle = self._middle
        tail = b',"scored_at":' + repr(float(scored_at)).encode() + b"}"
        topic_cache: dict[str, bytes] = {}
        out = []
        for eid, score, label, topic, part, off, ts in zip(
            event_ids, score_list, labels, topics, partitions, offsets, ts_list
        ):
            tb = topic_cache.get(topic)
            if tb is None:
                tb = topic_cache[topic] = orjson.dumps(topic)
            out.append(
                b'{"event_id":%b,"score":%r,"label":%b%b%b,"partition":%d,"offset":%d},"event_ts":%b%b'
                % (orjson.dumps(eid), score, b"true" if label else b"false", middle, tb, part, off, ts, tail)
            )
        return out


def dead_letter(
    value: bytes | None,
    original_headers: list[tuple[str, bytes]] | None,
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
    worker: str,
    max_value_bytes: int,
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The dead letter's value and headers for one rejected input record."""
    headers = dead_letter_headers(original_headers, reason, detail, topic, partition, offset, worker)
    # The whole record must fit the DLQ topic, or the transaction holding it aborts for ever:
    # the budget covers headers (and the caller takes the key off max_value_bytes).
    budget = max(0, max_value_bytes - sum(len(k) + len(v or b"") for k, v in headers) - 64)
    if value is not None and len(value) > budget:
        headers.append((H_TRUNCATED, str(len(value)).encode()))
        value = value[:budget]
    return value, headers


def dead_letter_headers(
    original: list[tuple[str, bytes]] | None,
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
    worker: str,
) -> list[tuple[str, bytes]]:
    """The original headers followed by the ones that say why and where from."""
    detail_b = detail.encode("utf-8", "replace")
    if len(detail_b) > MAX_DETAIL_BYTES:
        detail_b = detail_b[: MAX_DETAIL_BYTES - 3].decode("utf-8", "ignore").encode() + b"..."
    headers = list(original) if original else []
    headers += [
        (H_REASON, reason.encode()),
        (H_DETAIL, detail_b),
        (H_TOPIC, topic.encode()),
        (H_PARTITION, str(partition).encode()),
        (H_OFFSET, str(offset).encode()),
        (H_WORKER, worker.encode()),
    ]
    return headers
