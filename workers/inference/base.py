"""The inference backend protocol and the backend registry.

A backend scores a float32 feature matrix ``[n, f]`` (f = ``spec.n_columns``)
into float32 scores ``[n]`` in [0, 1]. Each scoring process (or thread, with
``inference.processes = 0``) of the worker loads its own backend instance; the
backends release the GIL while they run.

Backends register a factory under a name in ``BACKENDS``; ``create_backend``
picks one, or imports ``package.module:factory`` for a backend of your own. A backend whose runtime or device is missing raises
``BackendUnavailable`` with the install hint (never a silent CPU fallback).

Batch invariance: an event's score must not depend on which other events share
its batch, or the worker (batches cut by load) and ``sluice score`` (batches cut
by file) would disagree in the last bits. Kernels take a different code path for
the rows left over when the row count is not a multiple of their block
(measured: 291 of 6000 auth_anomaly scores differ between batch 1 and one batch
of 6000). ``create_backend`` therefore wraps every backend in :class:`PaddedRows`,
which zero-pads each batch to a multiple of :data:`INVARIANT_ROW_MULTIPLE` rows
and runs it in one call; measured on random batch sizes 1..2100 and on single
rows, with one intra-op thread: 0 of 6000 differ, for both models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from workers.features import ModelSpec

__all__ = [
    "BackendUnavailable", "Backend", "BACKENDS", "register_backend", "create_backend", "known_backends",
    "PaddedRows", "INVARIANT_ROW_MULTIPLE",
]

# Batches are zero-padded to a multiple of this many rows (at most 15 wasted rows, one call:
# chunking into fixed 64-row calls was invariant too, but 32 calls per batch each re-took the
# GIL from the orchestrator thread and halved the worker's throughput).
INVARIANT_ROW_MULTIPLE = 16


class BackendUnavailable(RuntimeError):
    """The configured backend or device cannot run here; the message says what to install or change."""


@runtime_checkable
class Backend(Protocol):
    name: str      # registry name, e.g. "onnxruntime"
    device: str    # "cpu" | "cuda" | "cuda:1"

    def load(self) -> None:
        """Create the session/engine. Raises BackendUnavailable or ValueError (bad model file)."""

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Run each batch size once so the first real batch is not slow."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [n, f] -> float32 [n] scores in [0, 1]. Thread-safe."""

    def describe(self) -> dict:
        """name, device, providers, model name/version, input/output names."""


def _lazy(module: str, cls: str) -> Callable[..., Backend]:
    """A factory that imports its module on first use (optional runtimes stay optional)."""

    def factory(spec: "ModelSpec", device: str = "cpu", threads: int = 1) -> Backend:
        import importlib

        return getattr(importlib.import_module(module), cls)(spec, device=device, threads=threads)

    factory.__qualname__ = f"{module}.{cls}"
    return factory


# name -> factory(spec, device=..., threads=...) -> Backend (not loaded yet).
# To add a backend: write workers/inference/<name>_backend.py with a class that
# satisfies `Backend`, and add it here (or call register_backend at import).
BACKENDS: dict[str, Callable[..., Backend]] = {
    "onnxruntime": _lazy("workers.inference.onnxruntime_backend", "OnnxRuntimeBackend"),  # cpu | cuda (CUDA EP)
    "onnxruntime-tensorrt": _lazy("workers.inference.onnxruntime_tensorrt_backend", "OnnxRuntimeTensorRTBackend"),  # cuda
    "tensorrt": _lazy("workers.inference.tensorrt_backend", "TensorRTBackend"),  # cuda, native engine
    "torch": _lazy("workers.inference.torch_backend", "TorchBackend"),  # cpu | cuda, from models/<name>/model.py
}


def register_backend(name: str, factory: Callable[..., Backend]) -> None:
    BACKENDS[name] = factory


def _plugin(name: str) -> Callable[..., Backend]:
    """A backend named ``package.module:factory`` (a class or function taking the same arguments as
    the registered ones). Named by import path, it also loads in the scoring processes, which do
    not see ``register_backend`` calls made in the worker process."""
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"unknown inference backend {name!r}; known backends: {', '.join(known_backends())} "
                         "(or 'package.module:factory')")
    import importlib

    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"inference backend {name!r} cannot be imported: {exc}") from exc
    if not callable(factory):
        raise ValueError(f"inference backend {name!r} is not callable")
    return factory


def known_backends() -> list[str]:
    return sorted(BACKENDS)


def create_backend(spec: "ModelSpec", backend: str = "onnxruntime", device: str = "cpu", threads: int = 1) -> Backend:
    """Create and load the named backend for a model.

    ``threads`` is the intra-op thread count of one call (the worker runs its own
    pool of inference threads, hence 1 by default).
    """
    factory = BACKENDS.get(backend) or _plugin(backend)
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    dev = str(device).lower()
    if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:<index>'")
    b = factory(spec, device=dev, threads=threads)
    b.load()
    return PaddedRows(b)


class PaddedRows:
    """A backend whose results do not depend on batch composition: rows padded to a fixed multiple."""

    def __init__(self, inner: Backend, multiple: int = INVARIANT_ROW_MULTIPLE):
        self.inner = inner
        self.multiple = multiple
        self.name = inner.name
        self.device = inner.device

    def load(self) -> None:
        self.inner.load()

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        m = self.multiple
        self.inner.warmup(sorted({-(-n // m) * m for n in batch_sizes}))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        pad = (-n) % self.multiple
        if not pad:
            return self.inner.infer(batch)
        padded = np.zeros((n + pad, batch.shape[1]), dtype=batch.dtype)
        padded[:n] = batch
        return self.inner.infer(padded)[:n]

    def describe(self) -> dict:
        return {**self.inner.describe(), "row_multiple": self.multiple}

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

