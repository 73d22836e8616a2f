"""Backends that hang, count or die, for the scoring-pool tests (named by import path, so they
load in scoring processes too). Settings come from environment variables read at load time.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from workers.inference.onnxruntime_backend import OnnxRuntimeBackend

#: a file CountingOnnxRuntime appends one line to as each batch begins (after warm-up)
CALLS_ENV = "SLUICE_TEST_CALLS_FILE"
#: seconds CountingOnnxRuntime sleeps per batch
DELAY_ENV = "SLUICE_TEST_BACKEND_DELAY_S"
#: HangOnnxRuntime: how many batches it scores before the one it hangs in (default 0)
HANG_AFTER_ENV = "SLUICE_TEST_HANG_AFTER"
#: HangOnLoad: "hang" (never finishes loading) or "exit" (the process exits with code 3)
LOAD_ENV = "SLUICE_TEST_LOAD"


class CountingOnnxRuntime(OnnxRuntimeBackend):
    """Records every batch it begins (a line in ``$SLUICE_TEST_CALLS_FILE``), then sleeps the delay."""

    def load(self) -> None:
        super().load()
        self.delay = float(os.environ.get(DELAY_ENV, "0"))
        self.calls_file = os.environ[CALLS_ENV]
        self.warm = False

    def warmup(self, batch_sizes) -> None:
        super().warmup(batch_sizes)
        self.warm = True

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.warm:
            with open(self.calls_file, "a") as f:
                f.write(f"{os.getpid()} {len(batch)}\n")
            time.sleep(self.delay)
        return super().infer(batch)


class HangOnnxRuntime(CountingOnnxRuntime):
    """Blocks for ever in a batch (after counting it), like a wedged GPU driver: the first, or
    the one after ``$SLUICE_TEST_HANG_AFTER`` batches."""

    def load(self) -> None:
        super().load()
        self.left = int(os.environ.get(HANG_AFTER_ENV, "0"))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        out = super().infer(batch)
        if self.warm:
            if self.left <= 0:
                threading.Event().wait()
            self.left -= 1
        return out


class HangOnLoad(OnnxRuntimeBackend):
    """Never finishes loading, or kills its process while loading (``$SLUICE_TEST_LOAD``)."""

    def load(self) -> None:
        how = os.environ.get(LOAD_ENV, "hang")
        if how == "exit":
            os._exit(3)
        threading.Event().wait()
