"""sluice plan: the planner's arithmetic against hand-made measurement files, worked out by hand here."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from workers import plan as planner

ROOT = pathlib.Path(__file__).resolve().parents[2]

# A hand-made `sluice bench --json` file: one replica (1 scoring process + the orchestrator on an
# 8-CPU machine) does 100,000 events/s at most; at 50,000 offered its p99 was 150 ms.
WORKER_BENCH = {
    "machine": {"platform": "test", "cpus": 8, "python": "3.11"},
    "broker": "devbroker",
    "worker": {"eps": 100_000.0, "events": 200_000, "seconds": 2.0},
    "latency": {"offered_eps": 50_000.0, "visible_p50_ms": 90.0, "visible_p99_ms": 150.0},
    "settings": {"processes": 1, "threads": 1, "max_batch_size": 2048, "partitions": 4},
}

# A hand-made sweep: onnxruntime on the CPU (1 thread) and on a GPU, per batch size.
SWEEP = {
    "model": "flow_classifier", "version": "1.0.0", "threads": 1, "batch_sizes": [256, 1024, 4096],
    "rows": [
        {"backend": "onnxruntime", "device": "cpu", "precision": "fp32", "batch_size": 256,
         "rows_per_s": 1_000_000.0, "p50_ms": 0.2, "p99_ms": 0.5},
        {"backend": "onnxruntime", "device": "cpu", "precision": "fp32", "batch_size": 4096,
         "rows_per_s": 1_200_000.0, "p50_ms": 3.0, "p99_ms": 8.0},
        {"backend": "onnxruntime", "device": "cuda", "precision": "fp32", "batch_size": 1024,
         "rows_per_s": 20_000_000.0, "p50_ms": 0.5, "p99_ms": 1.2},
        {"backend": "onnxruntime", "device": "cuda", "precision": "fp32", "batch_size": 4096,
         "rows_per_s": 40_000_000.0, "p50_ms": 2.0, "p99_ms": 9.0},
        {"backend": "onnxruntime", "device": "cpu", "precision": "int8", "batch_size": 256,
         "rows_per_s": 3_000_000.0, "p50_ms": 0.1, "p99_ms": 0.3},
    ],
}

UNIT_PRICES = """
currency = "USD"
hours_per_month = 730
[unit]
per_core_hour = 0.05
per_gpu_hour = 1.0
"""

SHAPE_PRICES = """
currency = "EUR"
[[shapes]]
name = "c8"
cores = 8
gpus = 0
per_hour = 0.36
"""


def write(tmp_path: pathlib.Path, name: str, content) -> pathlib.Path:
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


def sluice(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers", "plan", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def only(plan: dict, kind: str) -> dict:
    [p] = [p for p in plan["plans"] if p["kind"] == kind]
    return p


def test_worker_bench_replicas_partitions_cores_and_unit_cost(tmp_path):
    bench = write(tmp_path, "bench.json", WORKER_BENCH)
    plan = planner.make_plan(420_000, 500, [bench], write(tmp_path, "prices.toml", UNIT_PRICES))
    cpu = only(plan, "cpu")
    assert cpu["feasible"] and plan["feasible"]
    # p99 was measured at 50,000 / 100,000 = 50% load, below the 70% headroom target: plan at 50%,
    # so 50,000 events/s per replica; 420,000 / 50,000 = 8.4 -> 9 replicas
    assert cpu["utilisation"]["value"] == pytest.approx(0.5)
    assert cpu["replicas"]["value"] == 9
    assert cpu["partitions"]["value"] == 18          # 2 per replica
    assert cpu["cores_per_replica"]["value"] == 2    # 1 scoring process + the orchestrator
    assert cpu["cores"]["value"] == 18
    assert cpu["gpus"]["value"] == 0
    # 18 cores x 0.05 per core-hour x 730 h
    assert cpu["monthly_cost"]["value"] == pytest.approx(657.00)
    # every figure names its measurement
    assert f"{bench}: worker.eps" in cpu["per_replica_eps"]["from"]
    assert "latency.visible_p99_ms" in cpu["p99_ms"]["from"]
    assert "settings.processes=1" in cpu["cores_per_replica"]["from"]
    assert "unit.per_core_hour" in cpu["monthly_cost"]["from"]
    assert plan["break_even"]["rate"] is None and "needs a GPU replica" in plan["break_even"]["reason"]


def test_instance_shapes_pack_whole_replicas(tmp_path):
    plan = planner.make_plan(420_000, 500, [write(tmp_path, "bench.json", WORKER_BENCH)],
                             write(tmp_path, "prices.toml", SHAPE_PRICES))
    cpu = only(plan, "cpu")
    # 8-core instances hold 4 two-core replicas: 9 replicas -> 3 instances x 0.36/h x 730 h (the default month)
    assert cpu["monthly_cost"]["value"] == pytest.approx(788.40)
    assert cpu["currency"] == "EUR" and "shapes[0] c8" in cpu["monthly_cost"]["from"]


def test_headroom_applies_when_p99_was_measured_at_a_higher_load(tmp_path):
    doc = json.loads(json.dumps(WORKER_BENCH))
    doc["latency"]["offered_eps"] = 90_000.0  # p99 known up to 90% load: the 70% headroom rules
    plan = planner.make_plan(420_000, 500, [write(tmp_path, "bench.json", doc)])
    cpu = only(plan, "cpu")
    assert cpu["utilisation"]["value"] == pytest.approx(planner.TARGET_UTILISATION) == pytest.approx(0.7)
    assert cpu["replicas"]["value"] == 6  # 420,000 / 70,000 = 6 exactly
    assert "monthly_cost" not in cpu      # no --prices, no cost


def test_gpu_break_even_from_a_sweep(tmp_path):
    sweep = write(tmp_path, "sweep.json", SWEEP)
    plan = planner.make_plan(10_000_000, 5, [sweep], write(tmp_path, "prices.toml", UNIT_PRICES))
    cpu, gpu = only(plan, "cpu"), only(plan, "gpu")
    # the fastest batch within 5 ms: CPU batch 256 (1M rows/s; batch 4096 has p99 8 ms), GPU batch 1024 (20M)
    assert cpu["per_replica_eps"]["value"] == 1_000_000 and "rows[0].rows_per_s" in cpu["per_replica_eps"]["from"]
    assert gpu["per_replica_eps"]["value"] == 20_000_000 and "rows[2].rows_per_s" in gpu["per_replica_eps"]["from"]
    # planned at 70%: CPU 700k per replica -> ceil(10M / 700k) = 15 replicas, 2 cores each (1 thread + orchestrator)
    assert cpu["replicas"]["value"] == 15 and cpu["cores"]["value"] == 30
    assert cpu["monthly_cost"]["value"] == pytest.approx(15 * 2 * 0.05 * 730)       # 1095.00
    # GPU: 14M per replica -> 1 replica, 2 host cores + 1 GPU = 1.10/h
    assert gpu["replicas"]["value"] == 1 and gpu["gpus"]["value"] == 1
    assert gpu["monthly_cost"]["value"] == pytest.approx((2 * 0.05 + 1.0) * 730)    # 803.00
    # Break-even by hand: a CPU replica costs 73/month for 700k, a GPU replica 803 for 14M.
    # k GPU replicas (803k) beat n CPU replicas (73n) when n >= 11k. Just above (k-1) x 14M the
    # CPU fleet has 20(k-1)+1 replicas: enough for k >= 3, not for k = 2, where the GPU fleet is
    # dearer until the CPU fleet reaches 22 replicas, i.e. up to 21 x 700k = 14.7M events/s.
    be = plan["break_even"]
    assert be["rate"] == 14_700_000 and be["exact"]
    assert be["monthly_per_1k_eps"] == {"cpu": pytest.approx(73 / 700), "gpu": pytest.approx(803 / 14_000)}
    # int8 rows are not used unless asked for
    assert all("int8" not in p["label"] for p in plan["plans"])


def test_gpu_replica_bounded_by_the_worker_is_never_cheaper(tmp_path):
    plan = planner.make_plan(1_000_000, 500, [write(tmp_path, "bench.json", WORKER_BENCH),
                                              write(tmp_path, "sweep.json", SWEEP)],
                             write(tmp_path, "prices.toml", UNIT_PRICES))
    gpu = only(plan, "gpu")
    # the GPU engine does 40M rows/s alone, but the replica still decodes and featurizes on the CPU:
    # bounded by the whole worker's 100,000 events/s, it only adds the GPU's price
    assert gpu["per_replica_eps"]["value"] == 100_000 and "worker.eps" in gpu["per_replica_eps"]["from"]
    assert plan["chosen"]["cpu"] == "whole worker (sluice bench)"
    assert plan["break_even"]["rate"] is None and plan["break_even"]["reason"].startswith("never")


def test_p99_below_the_measurement_cannot_be_met(tmp_path):
    p = sluice("--rate", "100000", "--p99-ms", "100", "--bench", str(write(tmp_path, "bench.json", WORKER_BENCH)))
    assert p.returncode == 1, p.stderr
    assert "CANNOT MEET" in p.stdout and "150 ms" in p.stdout and "commit_interval_ms" in p.stdout
    assert "cannot be met" in p.stderr


def test_sweep_p99_below_every_batch_is_refused(tmp_path):
    plan = planner.make_plan(1000, 0.1, [write(tmp_path, "sweep.json", SWEEP)])
    assert not plan["feasible"]
    assert any("lowest per-call p99 is 0.5 ms" in r for r in plan["cannot_meet"])


def test_json_output(tmp_path):
    p = sluice("--rate", "420000", "--p99-ms", "500", "--bench", str(write(tmp_path, "b.json", WORKER_BENCH)),
               "--prices", str(write(tmp_path, "p.toml", UNIT_PRICES)), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["plans"][0]["replicas"]["value"] == 9 and doc["plans"][0]["monthly_cost"]["value"] == 657.0


@pytest.mark.parametrize("content, flag, message", [
    (None, "--bench", "no such file"),
    ("{not json", "--bench", "not valid JSON"),
    ({"worker": {"events": 1}, "latency": {"visible_p99_ms": 1, "offered_eps": 1}}, "--bench", "'worker.eps'"),
    ({"runs": []}, "--bench", "without --sweep"),
    ({"something": 1}, "--bench", "neither"),
    ("[unit]\nper_core_hour = -1\n", "--prices", "'unit.per_core_hour'"),
    ("currency = 'USD'\n", "--prices", "needs [unit] per_core_hour"),
    ("[[shapes]]\nname = 'x'\ngpus = 0\nper_hour = 1\n", "--prices", "'shapes[0].cores'"),
])
def test_bad_input_is_one_clear_line(tmp_path, content, flag, message):
    path = tmp_path / "input"
    if content is not None:
        write(tmp_path, "input", content)
    bench = path if flag == "--bench" else write(tmp_path, "bench.json", WORKER_BENCH)
    args = ["--rate", "1000", "--p99-ms", "500", "--bench", str(bench)]
    if flag == "--prices":
        args += ["--prices", str(path)]
    p = sluice(*args)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("sluice plan: ") and message in p.stderr, p.stderr


def test_no_measurement_says_how_to_make_one():
    p = sluice("--rate", "1000", "--p99-ms", "500")
    assert p.returncode == 2 and "sluice bench --json" in p.stderr


def test_example_prices_parse_and_are_marked_as_examples():
    text = (ROOT / "deploy" / "prices.example.toml").read_text()
    assert text.startswith("# EXAMPLE PRICES - NOT A QUOTE")
    prices = planner.load_prices(ROOT / "deploy" / "prices.example.toml")
    assert prices.per_core_hour and prices.per_gpu_hour and len(prices.shapes) >= 2
