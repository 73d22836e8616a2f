"""sluice bench-inference --sweep: rows per backend/device/precision/batch size, quality deltas, the PNG."""

from __future__ import annotations

import json
import pathlib
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from workers.models import usable_backends

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "flow_classifier"

# quality.json figures of the test variant, as `sluice models quantize` writes them
QUALITY = {"auc": {"parent": 0.9931, "variant": 0.9917}, "auc_drop": 0.0014, "flip_rate": 0.0025,
           "max_abs_diff": 0.042, "p99_abs_diff": 0.011}


def make_variant(folder: pathlib.Path, parent: pathlib.Path = MODEL, precision: str = "int8") -> pathlib.Path:
    """A variant folder of the shape `sluice models quantize` writes ([variant] table naming the parent,
    quality.json beside it). Its graph is the parent's own: these tests are about the sweep finding
    and reading variants, and the measured columns must then show no difference at all."""
    folder.mkdir(parents=True)
    for name in ("model.onnx", "baseline.json"):
        shutil.copy(parent / name, folder / name)
    manifest = "\n".join(line for line in (parent / "manifest.toml").read_text().splitlines()
                         if not line.startswith("torch_"))
    manifest += (f'\n\n[variant]\nprecision = "{precision}"\nmethod = "{precision}-static"\n\n'
                 f'[variant.parent]\npath = "models/{parent.name}"\nname = "{parent.name}"\nversion = "1.0.0"\n')
    (folder / "manifest.toml").write_text(manifest)
    (folder / "quality.json").write_text(json.dumps(QUALITY))
    return folder


def sweep(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers", "bench-inference", "--model", str(MODEL), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def png_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) of a PNG after checking its signature, chunk CRCs and that it ends with IEND."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks, size = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        chunks.append(kind)
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    return size


def test_sweep_json_rows_quality_and_plot(tmp_path):
    variant = make_variant(tmp_path / "variants" / "flow_classifier_int8")
    plot = tmp_path / "curve.png"
    p = sweep("--sweep", "--backends", "onnxruntime", "--batch-sizes", "1,64", "--seconds", "0.05",
              "--variants", str(variant.parent), "--json", "--plot", str(plot))
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    # variants that sit in models/ are found too: look at the model's and this variant's rows
    rows = [r for r in doc["rows"] if r["variant"] in (str(MODEL), str(variant))]
    cpu = [r for r in rows if r["device"] == "cpu"]
    # one row per precision and batch size on onnxruntime cpu: fp32 (the model) and the int8 variant
    assert sorted((r["precision"], r["batch_size"]) for r in cpu) == [("fp32", 1), ("fp32", 64), ("int8", 1), ("int8", 64)]
    for r in rows:
        assert r["backend"] == "onnxruntime" and r["model"] == "flow_classifier"
        assert r["rows_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] and r["calls"] >= 5
    for r in (r for r in cpu if r["precision"] == "fp32"):
        assert r["auc_delta"] == 0.0 and r["flip_rate"] == 0.0 and r["variant"] == str(MODEL)
    for r in (r for r in cpu if r["precision"] == "int8"):
        # the quality delta is the variant's report: parent AUC - variant AUC, and its flip rate
        assert r["auc_delta"] == pytest.approx(0.9931 - 0.9917)
        assert r["flip_rate"] == 0.0025 and r["max_abs_diff"] == 0.042
        assert r["quality_source"] == str(variant / "quality.json")
        # measured here on held-out events: the same graph as the parent, so nothing differs
        assert r["measured"]["flip_rate"] == 0.0 and r["measured"]["max_abs_diff"] == 0.0
        assert r["measured"]["events"] > 1000 and r["measured"]["auc"] > 0.9
    # GPU engines join when there is a GPU; here, each one not usable is listed with its reason
    if "cuda" not in usable_backends().get("onnxruntime", []):
        skipped = [s for s in doc["skipped"] if s["device"] == "cuda"]
        assert skipped and all(s["reason"] for s in skipped)
    assert doc["plot"] == str(plot)
    width, height = png_size(plot)
    assert width >= 400 and height >= 300


def test_sweep_table(tmp_path):
    p = sweep("--sweep", "--backends", "onnxruntime", "--batch-sizes", "8,16", "--seconds", "0.02")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("bench-inference --sweep: flow_classifier 1.0.0")
    body = [ln.split() for ln in lines if ln.startswith("onnxruntime ") and " cpu " in ln and " fp32 " in ln]
    assert [(b[2], b[3]) for b in body] == [("fp32", "8"), ("fp32", "16")]


def test_sweep_refuses_a_folder_that_is_not_a_variant_of_the_model(tmp_path):
    other = make_variant(tmp_path / "auth_int8", parent=ROOT / "models" / "auth_anomaly")
    p = sweep("--sweep", "--backends", "onnxruntime", "--batch-sizes", "1", "--seconds", "0.01", "--variants", str(other))
    assert p.returncode == 2
    assert "key 'parent'" in p.stderr and "flow_classifier" in p.stderr and p.stderr.count("\n") == 1


def test_sweep_refuses_a_variant_without_its_quality_report(tmp_path):
    v = make_variant(tmp_path / "v")
    (v / "quality.json").unlink()
    p = sweep("--sweep", "--backends", "onnxruntime", "--batch-sizes", "1", "--seconds", "0.01", "--variants", str(v))
    assert p.returncode == 2 and "quality.json" in p.stderr and "quality report missing" in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--plot", "x.png"], "--plot belongs to the sweep; add --sweep"),
    (["--variants", "."], "--variants belongs to the sweep; add --sweep"),
    (["--sweep", "--plot", "x.svg"], "name the file *.png"),
])
def test_sweep_flags_misused(args, message):
    p = sweep(*args, "--batch-sizes", "1", "--seconds", "0.01")
    assert p.returncode == 2 and message in p.stderr
