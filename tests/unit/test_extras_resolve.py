"""The extras install from PyPI as they stand, and no environment gets both onnxruntime wheels.

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the same ``onnxruntime`` package folder; when
both land in one environment the last one wins and the CUDA/TensorRT providers silently vanish.
``scripts/check-extras`` resolves each extra with ``pip install --dry-run --report`` and checks the
result; the slow test here runs it against PyPI (about a minute: set SLUICE_SKIP_EXTRAS_RESOLVE=1
on a machine without PyPI), the fast ones check its rules and pyproject.toml without a network.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_check_extras():
    loader = importlib.machinery.SourceFileLoader("sluice_check_extras", str(ROOT / "scripts" / "check-extras"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


ce = _load_check_extras()


def test_pyproject_keeps_onnxruntime_out_of_the_base_and_tensorrt_out_of_gpu_extras():
    assert ce.static_problems() == []


def test_static_rules_catch_the_old_layout(tmp_path):
    # the layout before this check existed: CPU onnxruntime in the base, TensorRT in `gpu`
    old = tmp_path / "pyproject.toml"
    old.write_text('[project]\nname = "sluice"\ndependencies = ["numpy", "onnxruntime>=1.18,<2"]\n'
                   '[project.optional-dependencies]\n'
                   'gpu = ["onnxruntime-gpu>=1.18,<2", "tensorrt>=10,<11", "cuda-python>=12,<14"]\n'
                   'gpu-cu99 = ["sluice[gpu]"]\n')
    found = "\n".join(ce.static_problems(old))
    assert "onnxruntime is a base dependency" in found
    assert "extra `gpu` lists TensorRT" in found and "extra `gpu-cu99` lists TensorRT" in found


def test_resolution_rules_flag_both_runtimes_and_missing_cuda_libraries():
    both = ce.problems("gpu-cu13", {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1", "cuda-python": "13.4.4",
                                    "nvidia-cudnn-cu13": "9", "nvidia-cuda-runtime": "13"})
    assert len(both) == 1 and "both onnxruntime" in both[0]
    bare = ce.problems("gpu-cu12", {"onnxruntime-gpu": "1.26.0"})
    assert any("cuDNN" in p for p in bare) and any("cuda-python" in p for p in bare)
    mixed = ce.problems("gpu-cu12", {"onnxruntime-gpu": "1.26.0", "cuda-python": "12.9", "nvidia-cudnn-cu12": "9",
                                     "nvidia-cuda-runtime-cu12": "12", "nvidia-cublas-cu13": "13"})
    assert any("cu13 libraries" in p for p in mixed)
    assert ce.problems("cpu", {"onnxruntime": "1.32.0", "numpy": "2"}) == []


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SLUICE_SKIP_EXTRAS_RESOLVE") == "1", reason="SLUICE_SKIP_EXTRAS_RESOLVE=1")
def test_extras_resolve_from_pypi_with_one_onnxruntime_each():
    """pip --dry-run --report of cpu, gpu-cu12 and the GPU test environment (dev,train,gpu-cu13)."""
    results = ce.check(list(ce.DEFAULT_ENVS))
    report = {r["env"]: r["problems"] for r in results}
    assert all(not p for p in report.values()), report
    got = {r["env"]: r["packages"] for r in results}
    assert "onnxruntime" in got["cpu"] and "onnxruntime-gpu" not in got["cpu"]
    for env in ("gpu-cu12", "dev,train,gpu-cu13"):
        assert "onnxruntime-gpu" in got[env] and "onnxruntime" not in got[env], env
    # the CUDA major of each extra: onnxruntime-gpu 1.27+ is the CUDA 13 build
    major = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    assert major(got["dev,train,gpu-cu13"]["onnxruntime-gpu"]) >= (1, 27) > major(got["gpu-cu12"]["onnxruntime-gpu"])
