"""Score records and dead-letter headers: valid JSON, schema-conformant, escapes handled."""

import json
import math
from pathlib import Path

import jsonschema
import numpy as np
import orjson

from workers.records import DLQ_HEADERS, MAX_DETAIL_BYTES, ScoreEncoder, dead_letter_headers

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas" / "records"


def test_score_records_parse_and_match_schema():
    enc = ScoreEncoder("flow_classifier", "1.0.0", threshold=0.5)
    # the second id carries the record boundary the batch encoder splits on
    ids = ['plain', 'quote"},{"event_id":"and\\backslash', "unicode-é-\u2028"]
    recs = enc.encode(ids, np.array([0.1, 0.5, 0.99], np.float32), ["t1", 't"2', "t1"], [0, 1, 2], [5, 6, 7],
                      np.array([1.5, math.nan, 2.0]), scored_at=3.25)
    assert len(recs) == 3
    schema = json.loads((SCHEMAS / "score.json").read_text())
    docs = [orjson.loads(r) for r in recs]
    for doc in docs:
        jsonschema.validate(doc, schema)
    assert [d["event_id"] for d in docs] == ids
    assert [d["label"] for d in docs] == [False, True, True]  # score >= threshold
    assert docs[1]["event_ts"] is None
    assert docs[1]["source"] == {"topic": 't"2', "partition": 1, "offset": 6}
    assert docs[0]["model"] == {"name": "flow_classifier", "version": "1.0.0"}
    assert abs(docs[2]["score"] - 0.99) < 1e-6


def test_dead_letter_headers_keep_originals_and_bound_detail():
    h = dead_letter_headers([("trace", b"1")], "bad_json", "x" * 5000, "flows", 3, 42, "g/r/1")
    assert h[0] == ("trace", b"1")
    names = [k for k, _ in h[1:]]
    assert tuple(names) == DLQ_HEADERS
    d = dict(h)
    assert len(d["sluice.error.detail"]) <= MAX_DETAIL_BYTES
    assert d["sluice.source.offset"] == b"42"
    assert d["sluice.source.partition"] == b"3"
