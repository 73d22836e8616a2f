"""PyTorch backend (``backend = "torch"``, CPU or CUDA), from the model's own definition.

The module comes from the model folder's ``model.py`` (``[artifacts] torch_module``,
the same file ``train.py`` trains) and its trained ``state_dict``
(``[artifacts] torch_weights``, ``model.pt``, loaded with ``weights_only=True``).
It is not rebuilt from the ONNX graph, so comparing this backend with
onnxruntime checks the exported artifact against the trained model.

torch is imported lazily: the worker's runtime does not need it. Inference runs
under ``torch.inference_mode()``; a module in eval mode is safe to call from
several threads. On CUDA each inference thread has its own CUDA stream and
pinned host buffers (grown on demand), so threads overlap copies and kernels.
On CUDA, FP32 means FP32: TF32 matmuls and convolutions are switched off (process-wide, as
torch only offers) unless ``SLUICE_GPU_ALLOW_TF32=1``.

With profiling on (``sluice run --profile DIR``), the first torch backend of a process records
a bounded window of batches with ``torch.profiler`` into ``DIR/torch-<pid>.json``
(:class:`workers.profiling.TorchTrace`), and on CUDA the scoring stages become NVTX ranges
through ``torch.cuda.nvtx`` when the ``nvtx`` package is not installed.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Sequence

import numpy as np

from workers import profiling
from workers.inference.base import BackendUnavailable
from workers.inference.gpu_common import GPU_HINT, precision_tag, tf32_allowed

if TYPE_CHECKING:  # pragma: no cover
    from workers.features import ModelSpec

TRAIN_HINT = "pip install 'sluice[train]' (for the CPU build: pip install torch==2.13.0 first)"


class TorchBackend:
    name = "torch"

    def __init__(self, spec: "ModelSpec", device: str = "cpu", threads: int = 1):
        self.spec = spec
        self.device = device
        self.threads = threads
        self._model = None
        self._torch = None
        self._local = threading.local()
        self._trace: profiling.TorchTrace | None = None

    def load(self) -> None:
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable(f"backend 'torch' needs PyTorch, which is not installed: {TRAIN_HINT} ({e})") from e
        if self.device != "cpu":
            if not torch.cuda.is_available():
                raise BackendUnavailable(
                    f"device {self.device!r}: this torch ({torch.__version__}) sees no CUDA GPU "
                    f"(a CPU build, or no driver/GPU): install a CUDA build of torch, {GPU_HINT}")
            idx = int(self.device.split(":", 1)[1]) if ":" in self.device else 0
            if idx >= torch.cuda.device_count():
                raise BackendUnavailable(f"device {self.device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
            # torch's defaults differ by version and op (cuDNN convolutions allow TF32): say it outright
            torch.backends.cuda.matmul.allow_tf32 = tf32_allowed()
            torch.backends.cudnn.allow_tf32 = tf32_allowed()
        spec = self.spec
        if spec.torch_weights_path is None:
            raise ValueError(f"{spec.manifest_path}: no [artifacts] torch_module/torch_weights; backend 'torch' "
                             f"needs the model's torch definition")
        if not spec.torch_weights_path.is_file():
            raise ValueError(f"{spec.torch_weights_path} not found ([artifacts] torch_weights in {spec.manifest_path}); "
                             f"train it with python {spec.path}/train.py")
        from workers.models import load_definition

        model = load_definition(spec).build(spec.n_columns)
        state = torch.load(str(spec.torch_weights_path), map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{spec.torch_weights_path} does not fit {spec.torch_module_path}: {e}") from None
        model.eval()
        if self.device == "cpu":
            torch.set_num_threads(self.threads)  # process-wide; the worker passes intra_op_threads
        self._dev = torch.device(self.device)
        self._model = model.to(self._dev)
        self._torch = torch
        if self.device != "cpu":
            profiling.enable_nvtx(self.device)  # torch is loaded now: its NVTX is a fallback

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        for n in sorted(set(int(b) for b in batch_sizes if int(b) > 0)):
            self.infer(np.zeros((n, self.spec.n_columns), dtype=np.float32))
        if self._trace is None:  # after warm-up: the trace shows scoring, not the first calls
            self._trace = profiling.TorchTrace.start_if_profiling(self._torch, self.device)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._model is None:
            raise RuntimeError("backend not loaded: call load() first")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.spec.n_columns:
            raise ValueError(f"expected a float32 [n, {self.spec.n_columns}] batch, got shape {x.shape}")
        n = x.shape[0]
        if n == 0:
            return np.empty(0, dtype=np.float32)
        torch = self._torch
        if self.device == "cpu":
            with torch.inference_mode():
                out = self._model(torch.from_numpy(x)).numpy().astype(np.float32, copy=True).reshape(n)
        else:
            out = self._infer_cuda(x)
        if self._trace is not None:
            self._trace.step()
        return out

    def _infer_cuda(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        loc = self._local
        n = x.shape[0]
        if getattr(loc, "stream", None) is None:
            loc.stream = torch.cuda.Stream(device=self._dev)
            loc.cap = 0
        if loc.cap < n:  # pinned host buffers per thread, grown to the largest batch seen
            cap = max(n, 2 * loc.cap)
            loc.h_in = torch.empty((cap, self.spec.n_columns), dtype=torch.float32).pin_memory()
            loc.h_out = torch.empty((cap,), dtype=torch.float32).pin_memory()
            loc.cap = cap
        h_in = loc.h_in[:n]
        h_in.numpy()[:] = x
        with torch.inference_mode(), torch.cuda.stream(loc.stream):
            d_in = h_in.to(self._dev, non_blocking=True)
            y = self._model(d_in).reshape(n)
            loc.h_out[:n].copy_(y, non_blocking=True)
        loc.stream.synchronize()
        return loc.h_out[:n].numpy().copy()

    def close(self) -> None:
        """End the profiler trace, if this backend records one (writes what it recorded)."""
        trace, self._trace = self._trace, None
        if trace is not None:
            trace.stop()

    def describe(self) -> dict:
        torch = self._torch
        return {
            "name": self.name,
            "device": self.device,
            "torch": getattr(torch, "__version__", None),
            "intra_op_threads": self.threads,
            "precision": "fp32" if self.device == "cpu" else precision_tag(False, tf32_allowed()),
            "model": self.spec.name,
            "model_version": self.spec.version,
            "module": str(self.spec.torch_module_path),
            "weights": str(self.spec.torch_weights_path),
            "n_features": self.spec.n_columns,
        }
