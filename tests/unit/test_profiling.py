"""Profiling hooks (workers/profiling.py): sampling profiles per process, NVTX stages, torch traces."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from workers import profiling, telemetry
from workers.exit_codes import ConfigError
from workers.inference.pool import ScoringPool
from workers.scoring import ScorerConfig

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "flow_classifier"


def _spin(seconds: float) -> int:
    """Busy Python work the sampler must attribute to this function."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += sum(range(200))
    return n


@pytest.fixture(autouse=True)
def _nvtx_off():
    profiling.disable_nvtx()
    yield
    profiling.disable_nvtx()


# ------------------------------------------------------------ sampling profiles

def test_profiled_writes_the_callers_profile_and_hands_the_folder_to_children(tmp_path, monkeypatch):
    monkeypatch.delenv(profiling.PROFILE_DIR_ENV, raising=False)
    out = tmp_path / "prof" / "nested"  # created on demand
    with profiling.profiled(out) as prof:
        assert prof is not None
        # spawned processes inherit this
        assert os.environ[profiling.PROFILE_DIR_ENV] == str(out.absolute())
        _spin(0.3)
    assert profiling.PROFILE_DIR_ENV not in os.environ  # restored
    html = (out / "orchestrator.html").read_text()
    txt = (out / "orchestrator.txt").read_text()
    speedscope = json.loads((out / "orchestrator.speedscope.json").read_text())
    assert "_spin" in txt and "test_profiling.py" in txt
    assert "Functions by time of their own" in txt
    assert "_spin" in html
    assert any(f["name"] == "_spin" for f in speedscope["shared"]["frames"])


def test_profiled_none_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.delenv(profiling.PROFILE_DIR_ENV, raising=False)
    with profiling.profiled(None) as prof:
        assert prof is None
        assert profiling.PROFILE_DIR_ENV not in os.environ


def test_profile_folder_that_cannot_be_made_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"^--profile .*file/sub: cannot create the folder .*give a writable folder"):
        with profiling.profiled(blocker / "sub"):
            pass


def test_missing_pyinstrument_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyinstrument(name, *args, **kwargs):
        if name == "pyinstrument":
            raise ImportError("No module named 'pyinstrument'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyinstrument)
    with pytest.raises(ConfigError, match=r"--profile needs pyinstrument.*sluice\[profile\]"):
        with profiling.profiled(tmp_path):
            pass
    assert profiling.PROFILE_DIR_ENV not in os.environ or os.environ[profiling.PROFILE_DIR_ENV] != str(tmp_path)


def test_a_profile_that_cannot_be_written_does_not_raise(tmp_path):
    prof = profiling.ProcessProfile(tmp_path / "gone", "x").start()  # the folder does not exist
    _spin(0.05)
    assert prof.stop() == []
    assert prof.stop() == []  # stopping twice is harmless


def test_each_scoring_process_writes_its_own_profile(tmp_path, monkeypatch):
    """A real process pool with SLUICE_PROFILE_DIR set, as `sluice run --profile` sets it."""
    monkeypatch.setenv(profiling.PROFILE_DIR_ENV, str(tmp_path))
    events = [v for _, v, _ in telemetry.generate(kind="flow", count=4 * 2048, seed=3)]
    pool = ScoringPool(ScorerConfig(MODEL, warmup_batch_sizes=(1,)), processes=2)
    try:
        pool.start(timeout=120)
        pids = list(pool.pids)
        futs = [pool.submit(events[i:i + 2048], "flows", [0] * 2048, list(range(2048)))
                for i in range(0, len(events), 2048)]
        for f in futs:
            f.result(timeout=60)
            pool.collected()
    finally:
        pool.shutdown(wait=True)
    assert len(pids) == 2
    for pid in pids:
        txt = tmp_path / f"scoring-{pid}.txt"
        assert txt.is_file(), sorted(p.name for p in tmp_path.iterdir())
        assert (tmp_path / f"scoring-{pid}.html").stat().st_size > 0
        report = txt.read_text()
        assert "serve" in report and "workers/inference/pipes.py" in report  # the process's own loop
        assert "BatchScorer.__init__" in report  # model load and warm-up are profiled too
    # at least one process scored a batch, and its profile shows the scoring
    assert any("score" in (tmp_path / f"scoring-{pid}.txt").read_text().replace("serve", "")
               and "workers/scoring.py" in (tmp_path / f"scoring-{pid}.txt").read_text() for pid in pids)


def test_scoring_process_without_the_variable_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(profiling.PROFILE_DIR_ENV, raising=False)
    assert profiling.start_scoring_process("cpu") is None
    profiling.finish(None)


# ------------------------------------------------------------ NVTX stages

def test_stage_is_a_no_op_until_enabled_and_costs_little():
    calls = []
    with profiling.stage("infer"):
        calls.append("body")
    assert calls == ["body"]
    assert profiling.stage("infer") is profiling.stage("infer")  # one object per name, no allocation
    n = 100_000
    t = time.perf_counter()
    for _ in range(n):
        with profiling.stage("infer"):
            pass
    per_call = (time.perf_counter() - t) / n
    # measured ~0.2 us here; 10 us would still be < 1% of the smallest batch's millisecond
    assert per_call < 10e-6, f"stage() costs {per_call * 1e6:.2f} us when disabled"


def test_enabled_stage_pushes_and_pops_ranges_even_on_errors():
    log = []
    profiling.set_nvtx_binding("fake", lambda name: log.append(("push", name)), lambda: log.append(("pop",)))
    with profiling.stage("featurize"):
        with profiling.stage("infer"):
            pass
    with pytest.raises(ValueError):
        with profiling.stage("encode"):
            raise ValueError("boom")
    assert log == [("push", "featurize"), ("push", "infer"), ("pop",), ("pop",), ("push", "encode"), ("pop",)]


def test_stage_as_a_decorator_follows_the_binding_at_call_time():
    log = []

    @profiling.stage("encode")
    def encode(x):
        return x * 2

    assert encode(2) == 4 and log == []  # disabled at definition and call
    profiling.set_nvtx_binding("fake", lambda name: log.append(name), lambda: log.append("/"))
    assert encode(3) == 6
    assert log == ["encode", "/"]
    assert encode.__name__ == "encode"


def test_enable_nvtx_only_on_cuda_devices():
    assert profiling.enable_nvtx("cpu") is None
    with profiling.stage("infer"):
        pass  # still a no-op
    got = profiling.enable_nvtx("cuda:0")
    try:
        import nvtx  # noqa: F401 - the gpu extras' binding
    except ImportError:
        nvtx = None
    if nvtx is not None:
        assert got == "nvtx"
        with profiling.stage("infer"):  # real NVTX calls; without Nsight attached they do nothing
            pass
    else:
        assert got in (None, "torch.cuda.nvtx")


# ------------------------------------------------------------ torch profiler trace

def test_torch_backend_records_a_bounded_chrome_trace(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    import numpy as np

    from workers.features import ModelSpec
    from workers.inference.torch_backend import TorchBackend

    monkeypatch.setenv(profiling.PROFILE_DIR_ENV, str(tmp_path))
    spec = ModelSpec.load(MODEL)
    backend = TorchBackend(spec)
    backend.load()
    backend.warmup([1, 8])
    x = np.random.default_rng(0).random((64, spec.n_columns), dtype=np.float32)
    for _ in range(profiling.TORCH_TRACE_SKIP_BATCHES + 1 + profiling.TORCH_TRACE_BATCHES + 5):
        backend.infer(x)
    # a second backend in the same process does not start another torch profiler
    other = TorchBackend(spec)
    other.load()
    other.warmup([1])
    assert other._trace is None
    backend.close()
    other.close()
    trace = json.loads((tmp_path / f"torch-{os.getpid()}.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert any(str(n).startswith("aten::") for n in names), sorted(map(str, names))[:20]
    steps = {n for n in names if str(n).startswith("ProfilerStep#")}
    assert len(steps) == profiling.TORCH_TRACE_BATCHES  # the window, not every batch
    assert torch is not None


def test_torch_trace_stopped_early_writes_what_it_recorded(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import numpy as np

    from workers.features import ModelSpec
    from workers.inference.torch_backend import TorchBackend

    monkeypatch.setenv(profiling.PROFILE_DIR_ENV, str(tmp_path))
    spec = ModelSpec.load(MODEL)
    backend = TorchBackend(spec)
    backend.load()
    backend.warmup([1])
    x = np.zeros((16, spec.n_columns), dtype=np.float32)
    for _ in range(profiling.TORCH_TRACE_SKIP_BATCHES + 1 + 3):  # into the recording window, not through it
        backend.infer(x)
    backend.close()
    trace = json.loads((tmp_path / f"torch-{os.getpid()}.json").read_text())
    assert sum(1 for e in trace["traceEvents"] if str(e.get("name")).startswith("ProfilerStep#")) >= 3


@pytest.mark.parametrize("command", ["run", "bench"])
def test_cli_profile_flag_with_an_unusable_folder_exits_2_naming_the_flag(command, tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "file"
    blocker.write_text("x")
    run = subprocess.run([sys.executable, "-m", "workers", command, "--profile", str(blocker / "prof")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (f"sluice: --profile {blocker / 'prof'}: cannot create the folder (Not a directory); "
                                  "give a writable folder")
