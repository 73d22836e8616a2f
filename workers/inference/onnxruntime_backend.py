"""ONNX Runtime backend: CPU, or CUDA through the CUDA execution provider.

(The TensorRT execution provider is ``onnxruntime_tensorrt_backend``, a subclass.)

One ``InferenceSession`` is shared by all inference threads: ``session.run``
is thread-safe and releases the GIL. ``threads`` sets intra-op threads per
call; inter-op parallelism is off (the graph is a small MLP).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from workers.inference.base import BackendUnavailable

if TYPE_CHECKING:  # pragma: no cover
    from workers.features import ModelSpec

GPU_HINT = "pip install 'sluice[gpu]' (onnxruntime-gpu with CUDA 12) on a machine with an NVIDIA GPU and driver"


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, spec: "ModelSpec", device: str = "cpu", threads: int = 1):
        self.spec = spec
        self.device = device
        self.threads = threads
        self._session = None
        self._providers: list = []

    def load(self) -> None:
        ort = self._ort()
        available = ort.get_available_providers()
        if self.device == "cpu":
            providers: list = ["CPUExecutionProvider"]
        else:
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailable(
                    f"device {self.device!r} needs onnxruntime's CUDAExecutionProvider, but this onnxruntime "
                    f"only has {available}: {GPU_HINT}")
            providers = [("CUDAExecutionProvider", {"device_id": self._device_id()}), "CPUExecutionProvider"]
        self._open(providers, required="CUDAExecutionProvider" if self.device != "cpu" else None)

    # -- shared with the TensorRT execution provider backend --------------------------------

    def _ort(self):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - a core dependency
            raise BackendUnavailable(f"onnxruntime is not installed: pip install onnxruntime ({e})") from e
        if not self.spec.onnx_path.is_file():
            raise ValueError(
                f"model file {self.spec.onnx_path} not found (artifacts.model in {self.spec.manifest_path}); "
                f"train it with python {self.spec.path}/train.py")
        return ort

    def _device_id(self) -> int:
        return int(self.device.split(":", 1)[1]) if ":" in self.device else 0

    def _open(self, providers: list, required: str | None) -> None:
        """Create the session; ``required``: the provider that must be in use (no silent CPU fallback)."""
        ort = self._ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads == 1:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            sess = ort.InferenceSession(str(self.spec.onnx_path), sess_options=so, providers=providers)
        except Exception as e:
            if self.device != "cpu":
                raise BackendUnavailable(f"could not start onnxruntime on {self.device}: {e}. {GPU_HINT}") from e
            raise ValueError(f"could not load {self.spec.onnx_path}: {e}") from e
        if required is not None and required not in sess.get_providers():
            # ORT falls back to CPU silently when CUDA/TensorRT fail to initialise; we do not.
            raise BackendUnavailable(
                f"onnxruntime could not initialise {required} on {self.device} "
                f"(providers in use: {sess.get_providers()}): {GPU_HINT}")
        inputs = {i.name: i for i in sess.get_inputs()}
        outputs = {o.name for o in sess.get_outputs()}
        if self.spec.input_name not in inputs:
            raise ValueError(f"{self.spec.onnx_path}: no input named {self.spec.input_name!r} (onnx.input in the manifest); "
                             f"the graph has {sorted(inputs)}")
        if self.spec.output_name not in outputs:
            raise ValueError(f"{self.spec.onnx_path}: no output named {self.spec.output_name!r} (onnx.output in the manifest); "
                             f"the graph has {sorted(outputs)}")
        shape = inputs[self.spec.input_name].shape
        width = shape[-1] if shape else None
        if isinstance(width, int) and width != self.spec.n_columns:
            raise ValueError(f"{self.spec.onnx_path}: input width {width} != {self.spec.n_columns} feature columns "
                             f"in {self.spec.manifest_path}; retrain or fix the manifest")
        self._session = sess
        self._providers = sess.get_providers()
        self._run = sess.run
        self._out = [self.spec.output_name]
        self._in = self.spec.input_name

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        for n in sorted(set(int(b) for b in batch_sizes if int(b) > 0)):
            self.infer(np.zeros((n, self.spec.n_columns), dtype=np.float32))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise RuntimeError("backend not loaded: call load() first")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.spec.n_columns:
            raise ValueError(f"expected a float32 [n, {self.spec.n_columns}] batch, got shape {x.shape}")
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        (y,) = self._run(self._out, {self._in: x})
        return np.asarray(y, dtype=np.float32).reshape(x.shape[0])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "device": self.device,
            "providers": list(self._providers),
            "intra_op_threads": self.threads,
            "model": self.spec.name,
            "model_version": self.spec.version,
            "model_path": str(self.spec.onnx_path),
            "input_name": self.spec.input_name,
            "output_name": self.spec.output_name,
            "n_features": self.spec.n_columns,
        }
