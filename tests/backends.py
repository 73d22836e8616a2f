"""Backends for tests, named by import path (``[model] backend = "tests.backends:SlowOnnxRuntime"``).

Named that way they load in the worker's scoring processes too, which do not share the
test's memory. Each is the real onnxruntime backend with one misbehaviour added.
"""

from __future__ import annotations

import os
import time

import numpy as np

from workers.inference.onnxruntime_backend import OnnxRuntimeBackend

#: seconds SlowOnnxRuntime sleeps per batch (read in the scoring process at load)
DELAY_ENV = "SLUICE_TEST_BACKEND_DELAY_S"


class SlowOnnxRuntime(OnnxRuntimeBackend):
    """A model too big for its hardware: every batch takes at least the configured delay."""

    def load(self) -> None:
        super().load()
        self.delay = float(os.environ.get(DELAY_ENV, "0.4"))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        return super().infer(batch)


class InvertedOnnxRuntime(OnnxRuntimeBackend):
    """A bad candidate model: the real model's scores turned upside down (a canary the guard must stop)."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return 1.0 - super().infer(batch)
