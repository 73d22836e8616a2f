"""What the GPU backends share: install hints, precision switches, engine-cache keys and files,
the batch-size profile and how batches are cut to fit it, and the GPU/driver probes.

Settings that are not (yet) in ``[model]`` come from the environment:

- ``SLUICE_TENSORRT_CACHE_DIR``: where TensorRT engines are cached
  (default ``$XDG_CACHE_HOME/sluice/tensorrt``, else ``~/.cache/sluice/tensorrt``);
- ``SLUICE_TENSORRT_FP16=1``: let TensorRT use FP16 kernels (scores move by ~1e-3);
- ``SLUICE_GPU_ALLOW_TF32=1``: let the CUDA EP, TensorRT and torch run FP32 matrix products as
  TF32 (inputs rounded to a 10-bit mantissa: scores move by ~1e-3, far outside the 1e-5 parity
  tolerance). Off by default, so FP32 means FP32 on every backend.

Both precision switches are part of every engine-cache key: an engine built with TF32 or FP16 is
never loaded by a backend that was asked for FP32.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import pathlib
import re
import tempfile
from typing import Iterator, Sequence

#: The extras, named in every error of a GPU backend. `gpu` is gpu-cu13 (the current CUDA major).
GPU_HINT = ("pip install 'sluice[gpu]' (= sluice[gpu-cu13]: onnxruntime-gpu 1.27+ with its CUDA 13 and cuDNN "
            "wheels, and cuda-python; 'sluice[gpu-cu12]' for a driver that only runs CUDA 12), without "
            "'sluice[cpu]' in the same environment, on a machine with an NVIDIA GPU and driver")
#: TensorRT's wheels are on NVIDIA's index only (PyPI has placeholders that fail to build).
TENSORRT_HINT = ("pip install 'sluice[tensorrt]' --extra-index-url https://pypi.nvidia.com "
                 "(or --find-links <folder of TensorRT 10 wheels>; tensorrt-cu12 for CUDA 12), which includes "
                 + GPU_HINT.split(" (", 1)[0].replace("pip install ", ""))

#: TensorRT major version these backends are written for: the Python API (create_network flags,
#: set_tensor_address / execute_async_v3, BuilderFlag) changes between majors.
TENSORRT_MAJOR = 10

#: The smallest batch every optimization profile accepts. Always 1, not the smallest warm-up size:
#: PaddedRows rounds warm-up sizes up to multiples of 16, the worker's batches can be smaller than
#: any warm-up size, and the last chunk of a split batch can be a single row.
PROFILE_MIN_ROWS = 1

#: profile used when infer() runs before warmup() told the backend the batch sizes in use
DEFAULT_BATCH_SIZES = (1, 1024, 4096)

#: Engine files are read by every replica sharing the cache, possibly under other users.
ENGINE_FILE_MODE = 0o644

_TRUE = ("1", "true", "yes", "on")


def cache_dir() -> pathlib.Path:
    """The engine cache root (``SLUICE_TENSORRT_CACHE_DIR`` or the XDG cache)."""
    d = os.environ.get("SLUICE_TENSORRT_CACHE_DIR")
    if d:
        return pathlib.Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "sluice" / "tensorrt"


def fp16_enabled() -> bool:
    """``SLUICE_TENSORRT_FP16=1``: TensorRT may pick FP16 kernels."""
    return os.environ.get("SLUICE_TENSORRT_FP16", "").strip().lower() in _TRUE


def tf32_allowed() -> bool:
    """``SLUICE_GPU_ALLOW_TF32=1``: FP32 matrix products may run as TF32 (off: FP32 means FP32)."""
    return os.environ.get("SLUICE_GPU_ALLOW_TF32", "").strip().lower() in _TRUE


def precision_tag(fp16: bool, tf32: bool) -> str:
    """The precision part of an engine-cache key: fp32, fp32-tf32, fp16 or fp16-tf32."""
    return ("fp16" if fp16 else "fp32") + ("-tf32" if tf32 else "")


def model_digest(onnx_bytes: bytes) -> str:
    """A short hash of the model's bytes: retrained weights with the same layout get another key."""
    return hashlib.sha256(onnx_bytes).hexdigest()[:16]


def slug(text: str) -> str:
    """A file-name-safe form of a GPU name or version."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-").lower()


def profile(batch_sizes: Sequence[int]) -> tuple[int, int, int]:
    """(min, opt, max) batch rows of an optimization profile covering ``batch_sizes``.

    min is :data:`PROFILE_MIN_ROWS`; opt is the largest size (under load the worker sends full
    batches); max is the largest size, and larger batches are cut by :func:`chunks`.
    """
    sizes = sorted({int(b) for b in batch_sizes if int(b) > 0}) or list(DEFAULT_BATCH_SIZES)
    return PROFILE_MIN_ROWS, sizes[-1], sizes[-1]


def chunks(n: int, prof: tuple[int, int, int]) -> list[tuple[int, int]]:
    """[start, stop) row ranges that cut a batch of ``n`` rows into pieces the profile accepts.

    Every piece has between ``prof[0]`` and ``prof[2]`` rows. Pieces are as equal as possible, so
    a last piece never falls below the profile's minimum (a plain ``range(0, n, max)`` leaves one
    of ``n % max`` rows), and each piece stays a multiple of the row multiple PaddedRows padded to
    when ``max`` is one.
    """
    lo, _, hi = prof
    if n <= 0:
        return []
    if n <= hi:
        return [(0, n)]
    k = -(-n // hi)  # fewest pieces of at most hi rows
    # a batch PaddedRows padded (and a max that is a multiple of 16) is cut in whole 16-row blocks,
    # so every piece keeps the row count whose kernels PaddedRows chose for batch invariance
    unit = 16 if n % 16 == 0 and hi % 16 == 0 else 1
    q, r = divmod(n // unit, k)
    sizes = [(q + (1 if i < r else 0)) * unit for i in range(k)]
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    if any(not (lo <= b - a <= hi) for a, b in out):  # pragma: no cover - guarded by the arithmetic above
        raise AssertionError(f"chunking {n} rows for profile {prof} gave {out}")
    return out


# ----------------------------------------------------------------------------- installed runtime


def onnxruntime_distributions() -> dict[str, str]:
    """The onnxruntime distributions installed here: {"onnxruntime": "1.32.0", "onnxruntime-gpu": ...}."""
    from importlib import metadata

    out = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def onnxruntime_conflict() -> str | None:
    """Why this environment's onnxruntime cannot be trusted for a GPU, or None.

    onnxruntime (CPU) and onnxruntime-gpu unpack into the same ``onnxruntime`` folder: with both
    installed, the one installed last decides whether CUDA exists, and uninstalling either breaks
    the other.
    """
    d = onnxruntime_distributions()
    if "onnxruntime" in d and "onnxruntime-gpu" in d:
        return (f"both onnxruntime {d['onnxruntime']} (CPU) and onnxruntime-gpu {d['onnxruntime-gpu']} are "
                f"installed and overwrite each other's files: pip uninstall -y onnxruntime onnxruntime-gpu, "
                f"then {GPU_HINT.split(' (', 1)[0]}")
    return None


def preload_cuda_libraries(ort) -> str | None:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels before a CUDA/TensorRT session.

    onnxruntime-gpu links against libcudart/libcublas/libcudnn but does not find the copies that
    ``onnxruntime-gpu[cuda,cudnn]`` installs under site-packages/nvidia unless
    ``onnxruntime.preload_dlls()`` (ORT 1.21+) loads them first; on a driver-only host the CUDA
    provider then fails to load. Returns why preloading did not happen (None: done).
    """
    fn = getattr(ort, "preload_dlls", None)
    if fn is None:
        return "this onnxruntime has no preload_dlls() (1.21+): the CUDA libraries must be on the loader path"
    try:
        fn(cuda=True, cudnn=True, msvc=False)
    except Exception as e:  # noqa: BLE001 - a partial preload still lets a system CUDA install work
        return f"onnxruntime.preload_dlls() failed: {e}"
    return None


def disable_tf32_for_process() -> None:
    """Stop NVIDIA libraries in this process (cuBLAS, cuDNN, TensorRT's builder) from using TF32.

    ORT's TensorRT EP has no option for TensorRT's TF32 builder flag, which is on by default;
    ``NVIDIA_TF32_OVERRIDE=0`` is NVIDIA's documented switch that overrides it, read by the
    libraries when they build or create handles, so it is set before the session exists.
    """
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"


_CUDA_SUCCESS = 0


def cuda_device_count() -> int:
    """GPUs the CUDA driver sees (0: no driver, no GPU, or the driver refuses), without cuda-python.

    A provider compiled into onnxruntime-gpu is not a usable GPU: this asks the driver
    (``libcuda.so.1``: cuInit, cuDeviceGetCount), which is what every CUDA runtime needs.
    """
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0
    try:
        if lib.cuInit(0) != _CUDA_SUCCESS:
            return 0
        n = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(n)) != _CUDA_SUCCESS:
            return 0
        return int(n.value)
    except (AttributeError, OSError):
        return 0


# ----------------------------------------------------------------------------- cache files


@contextlib.contextmanager
def file_lock(path: pathlib.Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (a ``.lock`` file beside an engine) across processes.

    Replicas and scoring processes sharing a cache would otherwise all build the same engine at
    once (minutes of GPU time each) and race to write it; the first builds, the others wait and
    then load its file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, ENGINE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def write_atomically(path: pathlib.Path, blob: bytes, mode: int = ENGINE_FILE_MODE) -> None:
    """Write ``blob`` to ``path`` via a temporary file and rename, readable by other users.

    mkstemp creates 0600 files: other replicas' users could not read the engine and rebuilt it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
