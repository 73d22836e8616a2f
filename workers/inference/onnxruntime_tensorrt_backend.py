"""ONNX Runtime with the TensorRT execution provider (``backend = "onnxruntime-tensorrt"``).

The session is created in ``warmup(batch_sizes)``, once the batch sizes in use
are known, with an explicit optimization profile covering them
(``trt_profile_min/opt/max_shapes``), the engine cache on
(``trt_engine_cache_enable``, ``trt_engine_cache_path``: a restart does not
rebuild) and FP16 when ``SLUICE_TENSORRT_FP16=1``. The CUDA EP is registered
after TensorRT so that nodes TensorRT cannot take still run on the GPU; the
session must have the TensorRT EP in use or start fails (never a silent
fallback). Batches larger than the profile's max are split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from workers.inference.base import BackendUnavailable
from workers.inference.gpu_common import DEFAULT_BATCH_SIZES, GPU_HINT, cache_dir, fp16_enabled, profile
from workers.inference.onnxruntime_backend import OnnxRuntimeBackend

if TYPE_CHECKING:  # pragma: no cover
    from workers.features import ModelSpec

TRT_EP = "TensorrtExecutionProvider"


class OnnxRuntimeTensorRTBackend(OnnxRuntimeBackend):
    name = "onnxruntime-tensorrt"

    def __init__(self, spec: "ModelSpec", device: str = "cuda", threads: int = 1):
        super().__init__(spec, device=device, threads=threads)
        self.fp16 = fp16_enabled()
        self.cache = cache_dir() / "onnxruntime"
        self._profile: tuple[int, int, int] | None = None

    def load(self) -> None:
        if self.device == "cpu":
            raise BackendUnavailable(
                "backend 'onnxruntime-tensorrt' runs on a GPU: set [model] device = \"cuda\" "
                "(or use backend 'onnxruntime' on cpu)")
        ort = self._ort()
        available = ort.get_available_providers()
        if TRT_EP not in available or "CUDAExecutionProvider" not in available:
            raise BackendUnavailable(
                f"backend 'onnxruntime-tensorrt' needs onnxruntime's {TRT_EP} and CUDAExecutionProvider, but this "
                f"onnxruntime only has {available}: {GPU_HINT}")
        try:
            import tensorrt  # noqa: F401  - the EP dlopens libnvinfer; fail here with the hint, not at first batch
        except ImportError as e:
            raise BackendUnavailable(f"the TensorRT execution provider needs TensorRT 10 ({e}): {GPU_HINT}") from e

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        self._ensure(batch_sizes)
        super().warmup(batch_sizes)

    def _ensure(self, batch_sizes: Sequence[int]) -> None:
        prof = profile(batch_sizes)
        if self._session is not None and self._profile is not None and prof[2] <= self._profile[2]:
            return
        lo, opt, hi = prof
        f = self.spec.n_columns
        name = self.spec.input_name
        self.cache.mkdir(parents=True, exist_ok=True)
        trt_opts = {
            "device_id": self._device_id(),
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(self.cache),
            "trt_timing_cache_enable": True,
            "trt_fp16_enable": self.fp16,
            "trt_profile_min_shapes": f"{name}:{lo}x{f}",
            "trt_profile_opt_shapes": f"{name}:{opt}x{f}",
            "trt_profile_max_shapes": f"{name}:{hi}x{f}",
        }
        self._open([(TRT_EP, trt_opts), ("CUDAExecutionProvider", {"device_id": self._device_id()})], required=TRT_EP)
        self._profile = prof

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            self._ensure(DEFAULT_BATCH_SIZES)
        hi = self._profile[2]  # type: ignore[index]
        if len(batch) <= hi:
            return super().infer(batch)
        return np.concatenate([super().infer(batch[i : i + hi]) for i in range(0, len(batch), hi)])

    def describe(self) -> dict:
        d = super().describe()
        d.update(fp16=self.fp16, engine_cache=str(self.cache), profile=list(self._profile or ()))
        return d
