"""ONNX Runtime with the TensorRT execution provider (``backend = "onnxruntime-tensorrt"``).

The session is created in ``warmup(batch_sizes)``, once the batch sizes in use are known, with
an explicit optimization profile covering them (``trt_profile_min/opt/max_shapes``, min 1 row)
and FP16 when ``SLUICE_TENSORRT_FP16=1``. The CUDA EP is registered after TensorRT so that nodes
TensorRT cannot take still run on the GPU; the session must have the TensorRT EP in use or start
fails (never a silent fallback). Batches larger than the profile's max are cut by
``gpu_common.chunks`` (no piece below the profile's min).

Engine cache: ORT names a cached engine after the model's file name and graph, not its weights,
so one shared folder would let a retrained model with the same layout score with the old engine.
Each model therefore gets its own folder, keyed like the native backend's engine files: model
name, version and a hash of the ONNX bytes, ORT and TensorRT versions, profile and precision
(FP16, TF32). The timing cache lives in the same folder. Building is serialised across processes
by a file lock beside the folder (replicas sharing a cache build once) and within a process by a
lock (two threads' first batches do not open two sessions).

TF32: ORT's TensorRT EP has no option for TensorRT's TF32 builder flag (on by default), so
unless ``SLUICE_GPU_ALLOW_TF32=1`` the process sets ``NVIDIA_TF32_OVERRIDE=0`` before the
session is built, and the CUDA EP gets ``use_tf32=0``.
"""

from __future__ import annotations

import pathlib
import threading
from typing import TYPE_CHECKING, Sequence

import numpy as np

from workers.inference import gpu_common
from workers.inference.base import BackendUnavailable
from workers.inference.gpu_common import DEFAULT_BATCH_SIZES, TENSORRT_HINT, cache_dir, fp16_enabled, profile
from workers.inference.onnxruntime_backend import CUDA_EP, OnnxRuntimeBackend

if TYPE_CHECKING:  # pragma: no cover
    from workers.features import ModelSpec

TRT_EP = "TensorrtExecutionProvider"


def _tensorrt_version() -> str:
    """The installed TensorRT's version; BackendUnavailable when it is missing or not TensorRT 10."""
    try:
        import tensorrt  # the EP dlopens libnvinfer: fail here with the hint, not at the first batch
    except ImportError as e:
        raise BackendUnavailable(f"the TensorRT execution provider needs TensorRT "
                                 f"{gpu_common.TENSORRT_MAJOR} ({e}): {TENSORRT_HINT}") from e
    from workers.inference.tensorrt_backend import check_tensorrt_version

    check_tensorrt_version(tensorrt.__version__)
    return tensorrt.__version__


class OnnxRuntimeTensorRTBackend(OnnxRuntimeBackend):
    """ORT with the TensorRT EP first and the CUDA EP behind it; see the module docstring."""

    name = "onnxruntime-tensorrt"

    def __init__(self, spec: "ModelSpec", device: str = "cuda", threads: int = 1):
        super().__init__(spec, device=device, threads=threads)
        self.fp16 = fp16_enabled()
        self.root = cache_dir() / "onnxruntime"
        self.cache: pathlib.Path | None = None  # this model's engine folder, known once the profile is
        self._profile: tuple[int, int, int] | None = None
        self._ensure_lock = threading.Lock()
        self._trt_version = "unknown"
        self._ort_version = "unknown"
        self._digest: str | None = None

    def load(self) -> None:
        """Check everything the EP will need; the session is built in warmup()."""
        if self.device == "cpu":
            raise BackendUnavailable(
                "backend 'onnxruntime-tensorrt' runs on a GPU: set [model] device = \"cuda\" "
                "(or use backend 'onnxruntime' on cpu)")
        ort = self._gpu_runtime(TRT_EP, CUDA_EP)
        self._trt_version = _tensorrt_version()
        self._ort_version = getattr(ort, "__version__", "unknown")
        self._digest = gpu_common.model_digest(self.spec.onnx_path.read_bytes())

    def cache_folder(self, prof: tuple[int, int, int]) -> pathlib.Path:
        """This model's engine + timing cache folder for a profile: changes with the weights."""
        lo, opt, hi = prof
        key = (f"{self.spec.name}-{gpu_common.slug(self.spec.version)}-{self._digest}"
               f"-ort{gpu_common.slug(self._ort_version)}-trt{gpu_common.slug(self._trt_version)}"
               f"-b{lo}_{opt}_{hi}-{gpu_common.precision_tag(self.fp16, self.tf32)}")
        return self.root / key

    def trt_options(self, prof: tuple[int, int, int]) -> dict:
        """TensorRT EP options for a profile: keyed engine cache, timing cache beside it, precision."""
        lo, opt, hi = prof
        f = self.spec.n_columns
        name = self.spec.input_name
        folder = self.cache_folder(prof)
        return {
            "device_id": str(self._device_id()),
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(folder),
            "trt_fp16_enable": "True" if self.fp16 else "False",
            "trt_profile_min_shapes": f"{name}:{lo}x{f}",
            "trt_profile_opt_shapes": f"{name}:{opt}x{f}",
            "trt_profile_max_shapes": f"{name}:{hi}x{f}",
        }

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Build (or load from the cache) the engine for these sizes, then run each once."""
        self._ensure(batch_sizes)
        super().warmup(batch_sizes)

    def _ensure(self, batch_sizes: Sequence[int]) -> None:
        prof = profile(batch_sizes)
        with self._ensure_lock:
            if self._session is not None and self._profile is not None and prof[2] <= self._profile[2]:
                return
            folder = self.cache_folder(prof)
            folder.mkdir(parents=True, exist_ok=True)
            with gpu_common.file_lock(folder.with_name(folder.name + ".lock")):
                self._open([(TRT_EP, self.trt_options(prof)), (CUDA_EP, self.cuda_options())], required=TRT_EP)
            self.cache = folder
            self._profile = prof

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Score a batch, cut into pieces the profile accepts."""
        if self._session is None:
            self._ensure(DEFAULT_BATCH_SIZES)
        pieces = gpu_common.chunks(len(batch), self._profile)  # type: ignore[arg-type]
        if len(pieces) <= 1:
            return super().infer(batch)
        return np.concatenate([super(OnnxRuntimeTensorRTBackend, self).infer(batch[a:b]) for a, b in pieces])

    def describe(self) -> dict:
        """OnnxRuntimeBackend's description plus precision, engine folder and profile."""
        d = super().describe()
        d.update(fp16=self.fp16, tf32=self.tf32, precision=gpu_common.precision_tag(self.fp16, self.tf32),
                 tensorrt=self._trt_version, engine_cache=str(self.cache) if self.cache else None,
                 profile=list(self._profile or ()))
        return d
