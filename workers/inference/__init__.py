"""Inference backends (onnxruntime now; tensorrt and torch plug into the same registry)."""

from workers.inference.base import (
    BACKENDS,
    Backend,
    BackendUnavailable,
    create_backend,
    known_backends,
    register_backend,
)

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "create_backend", "known_backends", "register_backend"]
