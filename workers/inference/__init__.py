"""Inference backends behind one protocol: onnxruntime (CPU, CUDA EP, TensorRT EP), native TensorRT
and torch, the batch-invariance wrapper, the scoring pool, and ``bench`` (sluice bench-inference)."""

from workers.inference.base import (
    BACKENDS,
    Backend,
    BackendUnavailable,
    create_backend,
    known_backends,
    register_backend,
)

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "create_backend", "known_backends", "register_backend"]
