"""What the GPU backends share: engine-cache location, FP16 switch, batch-size profile.

Settings that are not (yet) in ``[model]`` come from the environment:

- ``SLUICE_TENSORRT_CACHE_DIR``: where TensorRT engines are cached
  (default ``$XDG_CACHE_HOME/sluice/tensorrt``, else ``~/.cache/sluice/tensorrt``);
- ``SLUICE_TENSORRT_FP16=1``: let TensorRT use FP16 kernels (scores move by
  ~1e-3; off by default so every backend gives the same numbers within 1e-5).
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

GPU_HINT = ("pip install 'sluice[gpu]' (onnxruntime-gpu, tensorrt 10, cuda-python for CUDA 12) "
            "on a machine with an NVIDIA GPU and driver")

#: profile used when infer() runs before warmup() told the backend the batch sizes in use
DEFAULT_BATCH_SIZES = (1, 1024, 4096)


def cache_dir() -> pathlib.Path:
    d = os.environ.get("SLUICE_TENSORRT_CACHE_DIR")
    if d:
        return pathlib.Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "sluice" / "tensorrt"


def fp16_enabled() -> bool:
    return os.environ.get("SLUICE_TENSORRT_FP16", "").strip().lower() in ("1", "true", "yes", "on")


def profile(batch_sizes: Sequence[int]) -> tuple[int, int, int]:
    """(min, opt, max) batch rows of an optimization profile covering ``batch_sizes``.

    opt is the largest size: under load the worker sends full batches.
    """
    sizes = sorted({int(b) for b in batch_sizes if int(b) > 0}) or list(DEFAULT_BATCH_SIZES)
    return sizes[0], sizes[-1], sizes[-1]
