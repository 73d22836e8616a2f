"""Offline scoring (``sluice score``) and backend-only benchmarks (``sluice bench-inference``).

Offline scoring runs the worker's own pieces on JSON lines: the same
``Featurizer`` (decode, validate, featurize from the manifest), the same
backend and the same ``ScoreEncoder``, so a record is byte-identical to the one
the worker publishes on the score topic except ``scored_at`` and ``source``
(here ``{"topic": <file name or "stdin">, "partition": 0, "offset": <line number, from 1>}``).
A line that the worker would dead-letter is reported as a JSON line
``{"line", "reason", "detail", "source"}`` on stderr (or ``--dead-letters FILE``);
nothing is skipped silently, and the counts close the run on stderr.
"""

from __future__ import annotations

import json
import time
from typing import IO, BinaryIO, Iterable, Iterator, Sequence

import numpy as np

from workers.features import Featurizer, ModelSpec
from workers.records import ScoreEncoder

CHUNK = 2048


def _lines(stream: BinaryIO) -> Iterator[bytes]:
    for raw in stream:
        if raw.endswith(b"\n"):
            raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
        yield raw


def _chunks(it: Iterable[bytes], n: int) -> Iterator[list[bytes]]:
    buf: list[bytes] = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def score_lines(spec: ModelSpec, backend, stream: BinaryIO, source: str, out: BinaryIO, dead: IO[str],
                batch_size: int = CHUNK) -> dict:
    """Score JSON lines from ``stream`` to ``out``; returns counts."""
    fz = Featurizer(spec)
    enc = ScoreEncoder(spec.name, spec.version, spec.threshold)
    counts = {"lines": 0, "scored": 0, "dead_letters": 0, "by_reason": {}}
    line_no = 0
    for chunk in _chunks(_lines(stream), batch_size):
        first = line_no + 1
        line_no += len(chunk)
        counts["lines"] += len(chunk)
        fb = fz.featurize(chunk)
        if len(fb):
            scores = backend.infer(fb.matrix)
            bad = ~np.isfinite(scores)
            offsets = (fb.positions + first).tolist()
            recs = enc.encode(fb.event_ids, scores, [source] * len(fb), [0] * len(fb), offsets, fb.event_ts, time.time())
            if bad.any():  # a backend NaN is a dead letter in the worker too (inference_error)
                for j in np.nonzero(bad)[0].tolist():
                    _dead(dead, counts, offsets[j], "inference_error", "the model returned a non-finite score", source)
                recs = [r for r, b in zip(recs, bad.tolist()) if not b]
            out.write(b"\n".join(recs) + b"\n")
            counts["scored"] += len(recs)
        for r in fb.rejects:
            _dead(dead, counts, first + r.position, r.reason, r.detail, source)
    out.flush()
    return counts


def _dead(dead: IO[str], counts: dict, line: int, reason: str, detail: str, source: str) -> None:
    dead.write(json.dumps({"line": line, "reason": reason, "detail": detail, "source": source}) + "\n")
    counts["dead_letters"] += 1
    counts["by_reason"][reason] = counts["by_reason"].get(reason, 0) + 1


# ----------------------------------------------------------------------------- bench

DEFAULT_BENCH_SIZES = (1, 8, 64, 256, 1024, 4096)


def bench_inference(spec: ModelSpec, backend, batch_sizes: Sequence[int] = DEFAULT_BENCH_SIZES,
                    seconds: float = 1.0, seed: int = 7) -> list[dict]:
    """rows/s and per-call latency per batch size, for the backend alone (features precomputed).

    Rows are real featurized events of the model's kind (generated telemetry), so
    the numbers include no decoding or Kafka. Each size runs for ``seconds``
    (at least 5 calls) after one warm-up call.
    """
    from workers import telemetry

    top = max(batch_sizes)
    if spec.event_kind in telemetry.KINDS:
        fb = Featurizer(spec).featurize([v for _, v, _ in telemetry.generate(spec.event_kind, top, seed=seed, start_ts=1.79e9)])
        pool = fb.matrix
    else:  # no generator for this kind: random rows of the right width
        pool = np.random.default_rng(seed).standard_normal((top, spec.n_columns)).astype(np.float32)
    backend.warmup(sorted(set(batch_sizes)))
    rows = []
    for n in batch_sizes:
        x = np.ascontiguousarray(pool[:n])
        backend.infer(x)
        lat = []
        t_end = time.perf_counter() + seconds
        while len(lat) < 5 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            backend.infer(x)
            lat.append(time.perf_counter() - t0)
        a = np.array(lat)
        rows.append({
            "batch_size": int(n), "calls": int(len(a)), "rows_per_s": round(float(n * len(a) / a.sum()), 1),
            "latency_ms_p50": round(float(np.percentile(a, 50) * 1e3), 4),
            "latency_ms_p99": round(float(np.percentile(a, 99) * 1e3), 4),
            "latency_us_per_row": round(float(np.median(a) / n * 1e6), 4),
        })
    return rows
