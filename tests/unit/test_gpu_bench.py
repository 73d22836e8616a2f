"""``sluice bench-inference`` per backend and precision: table, JSON, quality columns, pairs that cannot run."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys


from workers.features import ModelSpec
from workers.inference import bench

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_unsupported_pairs_say_why():
    assert bench.unsupported("onnxruntime", "cpu", "fp32") is None
    assert bench.unsupported("tensorrt", "cuda", "fp16") is None
    assert bench.unsupported("onnxruntime-tensorrt", "cuda", "tf32") is None
    assert "TensorRT" in bench.unsupported("onnxruntime", "cuda", "fp16")
    assert "GPU" in bench.unsupported("torch", "cpu", "tf32")
    assert "unknown precision" in bench.unsupported("torch", "cpu", "int8")


def test_precision_env_sets_only_its_switches_and_restores(monkeypatch):
    monkeypatch.setenv("SLUICE_TENSORRT_FP16", "1")  # left over from the caller's shell
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    with bench._precision_env("tf32"):
        assert os.environ.get("SLUICE_GPU_ALLOW_TF32") == "1"
        assert "SLUICE_TENSORRT_FP16" not in os.environ and "NVIDIA_TF32_OVERRIDE" not in os.environ
    with bench._precision_env("fp32"):
        assert "SLUICE_GPU_ALLOW_TF32" not in os.environ and "SLUICE_TENSORRT_FP16" not in os.environ
    assert os.environ["SLUICE_TENSORRT_FP16"] == "1" and os.environ["NVIDIA_TF32_OVERRIDE"] == "0"
    assert "SLUICE_GPU_ALLOW_TF32" not in os.environ


def test_bench_engines_reports_each_pair_with_latency_and_quality():
    spec = ModelSpec.load(ROOT / "models" / "flow_classifier")
    res = bench.bench_engines(spec, ["onnxruntime", "tensorrt"], "cpu", ["fp32", "fp16"], [1, 16, 17], seconds=0.02)
    runs = {(r["backend"], r["precision"]): r for r in res["runs"]}
    assert list(runs) == [("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("tensorrt", "fp32"), ("tensorrt", "fp16")]
    ok = runs[("onnxruntime", "fp32")]
    assert [r["batch_size"] for r in ok["results"]] == [1, 16, 17]
    assert all(r["rows_per_s"] > 0 and r["latency_ms_p99"] >= r["latency_ms_p50"] > 0 for r in ok["results"])
    assert ok["quality"]["max_abs_diff"] == 0.0 and ok["quality"]["label_flips"] == 0  # the reference itself
    assert ok["describe"]["precision"] == "fp32"
    assert "TensorRT switch" in runs[("onnxruntime", "fp16")]["error"]
    assert "GPU" in runs[("tensorrt", "fp32")]["error"]
    table = bench.format_table(res)
    assert "rows/s" in table and "p99 ms" in table and "not run" in table and "labels flip" in table
    assert sum(1 for line in table.splitlines() if line.startswith("onnxruntime") and "fp32" in line) == 4


def test_cli_table_and_json():
    run = lambda *a: subprocess.run([sys.executable, "-m", "workers", "bench-inference", "--model",  # noqa: E731
                                     "models/auth_anomaly", "--batch-sizes", "1,64", "--seconds", "0.02", *a],
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
    p = run("--backends", "onnxruntime,tensorrt", "--precision", "fp32", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert [(r["backend"], "error" in r) for r in doc["runs"]] == [("onnxruntime", False), ("tensorrt", True)]
    assert doc["backend"]["name"] == "onnxruntime" and [r["batch_size"] for r in doc["results"]] == [1, 64]
    assert "tensorrt fp32 on cpu" in p.stderr
    p = run("--backend", "tensorrt")  # nothing can run here: exit 2 and the reason
    assert p.returncode == 2 and "NVIDIA GPU" in p.stderr
    p = run()
    assert p.returncode == 0 and p.stdout.splitlines()[1].split()[:3] == ["backend", "prec", "batch"]
