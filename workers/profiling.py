"""Profiling hooks: where the worker's time goes (``--profile DIR``) and NVTX ranges on CUDA.

Three tools, one per question:

* **Sampling profiles (pyinstrument, the ``profile`` extra).** ``sluice run --profile DIR``
  and ``sluice bench --profile DIR`` profile the orchestrator thread of the worker process
  and every scoring process it starts. When a process stops it writes
  ``DIR/<name>.html`` (pyinstrument's interactive call tree and timeline),
  ``DIR/<name>.txt`` (the call tree, then the functions with the most time of their own)
  and ``DIR/<name>.speedscope.json`` (https://www.speedscope.app), where ``<name>`` is
  ``orchestrator`` or ``scoring-<pid>``. The CLI hands the folder to the scoring processes
  in the environment variable :data:`PROFILE_DIR_ENV` (``SLUICE_PROFILE_DIR``), set before
  the pool spawns them; spawned processes inherit the environment, and the scoring process
  (:func:`workers.inference.pipes.serve`) starts its profiler from it
  (:func:`start_scoring_process`). pyinstrument samples the thread that started it
  only: with ``[inference] processes = 0`` the scoring threads are *not* in the
  orchestrator's profile (their batches show there as the orchestrator's waits); profile
  with ``processes >= 1`` to see the scoring work.
* **NVTX ranges (Nsight Systems).** On a CUDA device, :func:`stage` marks featurize /
  infer / encode as NVTX ranges in the ``sluice`` domain, through the ``nvtx`` package
  (in the ``gpu-*`` extras) or, without it, ``torch.cuda.nvtx`` when torch is loaded
  (the torch backend). Elsewhere :func:`stage` does nothing and costs a dictionary
  lookup and two attribute checks (well under a microsecond; a batch takes milliseconds).
* **A torch profiler trace.** With profiling on, the torch backend records
  :data:`TORCH_TRACE_BATCHES` batches with ``torch.profiler`` (operators, and CUDA
  kernels on a GPU) into ``DIR/torch-<pid>.json``, a Chrome trace for Perfetto
  (https://ui.perfetto.dev) or ``chrome://tracing`` (:class:`TorchTrace`).

Profiles are written when their process stops cleanly (SIGTERM / SIGINT on the worker, the
end of a bench); a process that is killed (SIGKILL, a scoring process past the pool's
stop deadline, an orphan after its worker vanished) writes none.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, Callable, Iterator

from workers.exit_codes import ConfigError

log = logging.getLogger(__name__)

# The folder profiles go to; set by the CLI for the worker's own process and inherited by the
# scoring processes it spawns (which receive nothing else from the CLI).
PROFILE_DIR_ENV = "SLUICE_PROFILE_DIR"
PROFILE_HINT = "pip install 'sluice[profile]'"
# pyinstrument's sampling interval. 1 ms (its default) resolves a batch's stages (a few ms
# each). The cost is pyinstrument's hook on every Python call, not the sampling: scoring took
# 1.17x the CPU at 1 ms and 1.15x at 10 ms (README "Profiling"). The samples stay in memory
# until the process stops (the bench's orchestrator: about 1 MB of HTML per 30 s).
SAMPLE_INTERVAL_S = 0.001
# Functions listed by self time at the end of each .txt profile.
TXT_FLAT_TOP = 40
# The .txt call tree leaves out calls under this share of the profiled time. pyinstrument's 1%
# hid the scoring of a mostly idle scoring process (a batch is a millisecond or two, the rest is
# waiting for the next); 0.1% keeps it while a tree of an hour's run stays readable.
TXT_MIN_SHARE = 0.001
# The torch profiler trace: skip the first batches after warm-up (allocator growth, lazy
# initialisation are not steady state), then record this many batches. Bounded so the trace
# stays small (a few MB) and the profiler's own cost ends with the window.
TORCH_TRACE_SKIP_BATCHES = 3
TORCH_TRACE_BATCHES = 20
# NVTX domain (Nsight Systems groups the ranges under it).
NVTX_DOMAIN = "sluice"


# ------------------------------------------------------------ the profile folder

def profile_dir() -> Path | None:
    """The folder profiles go to (:data:`PROFILE_DIR_ENV`), or None when profiling is off."""
    value = os.environ.get(PROFILE_DIR_ENV)
    return Path(value) if value else None


def prepare_dir(directory: Path, flag: str = "--profile") -> Path:
    """Create ``directory`` (and parents) and check it is writable; its absolute path.

    Raises :class:`ConfigError` naming ``flag`` when it cannot be used, before the worker starts.
    """
    directory = Path(directory).expanduser().absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {directory}: cannot create the folder ({exc.strerror}); "
                          f"give a writable folder") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {directory}: the folder is not writable; give a writable folder")
    return directory


def _pyinstrument(flag: str = "--profile"):
    try:
        import pyinstrument
    except ImportError:
        raise ConfigError(f"{flag} needs pyinstrument, which is not installed: {PROFILE_HINT}") from None
    return pyinstrument


# ------------------------------------------------------------ sampling profiles

class ProcessProfile:
    """A pyinstrument sampling profile of the thread that starts it, written when stopped.

    :meth:`stop` writes ``<name>.html``, ``<name>.txt`` and ``<name>.speedscope.json`` into
    ``directory``. Start and stop on the same thread (pyinstrument's rule).
    """

    def __init__(self, directory: Path, name: str, interval: float = SAMPLE_INTERVAL_S):
        self.directory = Path(directory)
        self.name = name
        self.interval = interval
        self._profiler = None

    def start(self) -> "ProcessProfile":
        """Begin sampling this thread; ``ConfigError`` when pyinstrument is not installed."""
        pyinstrument = _pyinstrument()
        # async_mode off: the worker has no event loop, and the context-variable bookkeeping
        # of the async modes would only add cost.
        self._profiler = pyinstrument.Profiler(interval=self.interval, async_mode="disabled")
        self._profiler.start(target_description=self.title)
        return self

    @property
    def title(self) -> str:
        """The heading of the rendered profiles."""
        return f"sluice {self.name} (pid {os.getpid()})"

    def stop(self) -> list[Path]:
        """Stop sampling and write the files; the paths written.

        Never raises: a profile that cannot be written is logged, and the process ends as it
        would have without profiling.
        """
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return []
        written: list[Path] = []
        try:
            started = time.monotonic()
            session = profiler.stop()
            from pyinstrument.renderers import ConsoleRenderer, HTMLRenderer, SpeedscopeRenderer

            base = self.directory / self.name
            outputs = {
                ".html": lambda: HTMLRenderer().render(session),
                ".txt": lambda: _text_report(session, ConsoleRenderer, self.title),
                ".speedscope.json": lambda: SpeedscopeRenderer().render(session),
            }
            for suffix, render in outputs.items():
                path = base.with_name(base.name + suffix)
                path.write_text(render(), encoding="utf-8")
                written.append(path)
            log.info("profile written", extra={
                "files": [str(p) for p in written], "samples": session.sample_count,
                "profiled_s": round(session.duration, 1), "render_s": round(time.monotonic() - started, 2)})
        except Exception as exc:  # noqa: BLE001 - profiling must never change how the process ends
            log.warning("could not write the profile", extra={"profile": self.name, "error": f"{type(exc).__name__}: {exc}"})
        return written


def _text_report(session: Any, console_renderer: type, title: str) -> str:
    """The call tree (library frames folded away), then the top functions by self time."""
    options = {"filter_threshold": TXT_MIN_SHARE}
    tree = console_renderer(unicode=True, color=False, show_all=False, processor_options=options).render(session)
    flat = console_renderer(unicode=True, color=False, flat=True, flat_time="self",
                            processor_options=options).render(session).splitlines()
    # the flat rendering repeats the tree's banner, which ends with the title line
    body = flat[flat.index(title) + 1:] if title in flat else flat
    rows = [line for line in body if line.strip()][:TXT_FLAT_TOP]
    return f"{tree.rstrip()}\n\nFunctions by time of their own (top {TXT_FLAT_TOP}):\n" + "\n".join(rows) + "\n"


@contextmanager
def profiled(directory: Path | None, name: str = "orchestrator", flag: str = "--profile") -> Iterator[ProcessProfile | None]:
    """Profile the calling thread into ``directory`` and let child processes profile themselves.

    ``directory`` None: nothing happens. Otherwise the folder is created, pyinstrument is
    checked (:class:`ConfigError` naming ``flag`` if missing), :data:`PROFILE_DIR_ENV` is set
    for processes spawned inside the block (restored after), and the profile is written when
    the block ends, however it ends.
    """
    if directory is None:
        yield None
        return
    directory = prepare_dir(directory, flag)
    _pyinstrument(flag)
    previous = os.environ.get(PROFILE_DIR_ENV)
    os.environ[PROFILE_DIR_ENV] = str(directory)
    profile = ProcessProfile(directory, name).start()
    try:
        yield profile
    finally:
        try:
            profile.stop()
        finally:
            if previous is None:
                os.environ.pop(PROFILE_DIR_ENV, None)
            else:
                os.environ[PROFILE_DIR_ENV] = previous


def start_scoring_process(device: str) -> ProcessProfile | None:
    """In a scoring process, before its model loads: NVTX for ``device``, and its sampling
    profile (``scoring-<pid>``) when :data:`PROFILE_DIR_ENV` is set; pass the result to
    :func:`finish`. Never raises: a process that cannot profile still scores."""
    enable_nvtx(device)
    directory = profile_dir()
    if directory is None:
        return None
    try:
        return ProcessProfile(directory, f"scoring-{os.getpid()}").start()
    except Exception as exc:  # noqa: BLE001 - e.g. pyinstrument missing in this environment
        log.warning("scoring process not profiled", extra={"error": f"{type(exc).__name__}: {exc}"})
        return None


def finish(profile: ProcessProfile | None) -> None:
    """Stop and write ``profile`` (from :func:`start_scoring_process`); None does nothing."""
    if profile is not None:
        profile.stop()


# ------------------------------------------------------------ NVTX stages

class _Binding:
    """push(name) / pop() of one NVTX implementation."""

    def __init__(self, source: str, push: Callable[[str], Any], pop: Callable[[], Any]):
        self.source = source
        self.push = push
        self.pop = pop


_nvtx: _Binding | None = None   # None: stage() does nothing
_nvtx_lock = threading.Lock()


def _nvtx_package() -> _Binding | None:
    try:
        import nvtx
    except ImportError:
        return None
    domain = nvtx.get_domain(NVTX_DOMAIN)
    attributes: dict[str, Any] = {}  # one attributes object per stage name, made once

    def push(name: str) -> None:
        attr = attributes.get(name)
        if attr is None:
            attr = attributes[name] = domain.get_event_attributes(message=name)
        domain.push_range(attr)

    return _Binding("nvtx", push, domain.pop_range)


def _torch_nvtx() -> _Binding | None:
    # Only a torch already loaded (the torch backend): importing torch for NVTX alone would
    # add seconds and hundreds of MB to an onnxruntime scoring process.
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        nv = torch.cuda.nvtx
        nv.range_push("sluice-probe")  # a CPU build of torch has a stub that raises here
        nv.range_pop()
    except Exception:  # noqa: BLE001 - no usable NVTX in this torch
        return None
    return _Binding("torch.cuda.nvtx", nv.range_push, nv.range_pop)


def enable_nvtx(device: str) -> str | None:
    """Turn :func:`stage` into NVTX ranges when ``device`` is a CUDA device and an NVTX
    binding is there; the binding used (``"nvtx"``, ``"torch.cuda.nvtx"``) or None.

    Call it before scoring starts (a range opened before a change would be closed after it).
    Calling it again keeps a binding already found, or looks again (torch may be loaded now).
    """
    global _nvtx
    if not str(device).startswith("cuda"):
        return _nvtx.source if _nvtx is not None else None
    with _nvtx_lock:
        if _nvtx is None:
            _nvtx = _nvtx_package() or _torch_nvtx()
            if _nvtx is None:
                log.debug("no NVTX binding (pip install nvtx): scoring stages are not marked for Nsight")
            else:
                log.debug("scoring stages are NVTX ranges", extra={"binding": _nvtx.source})
        return _nvtx.source if _nvtx is not None else None


def disable_nvtx() -> None:
    """Make :func:`stage` a no-op again (tests; call it with no range open)."""
    global _nvtx
    _nvtx = None


def set_nvtx_binding(source: str, push: Callable[[str], Any], pop: Callable[[], Any]) -> None:
    """Use ``push(name)`` / ``pop()`` for :func:`stage` (tests, or another NVTX implementation)."""
    global _nvtx
    _nvtx = _Binding(source, push, pop)


class _Stage:
    """One named stage: a context manager, and a decorator that opens it per call.

    Stateless beyond its name, so one object serves every thread and nested use; whether a
    range is pushed is decided on entry by the binding in force.
    """

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> "_Stage":
        b = _nvtx
        if b is not None:
            b.push(self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        b = _nvtx
        if b is not None:
            b.pop()

    def __call__(self, fn: Callable) -> Callable:
        name = self.name

        @wraps(fn)
        def staged(*args: Any, **kwargs: Any) -> Any:
            with stage(name):
                return fn(*args, **kwargs)

        return staged


_stages: dict[str, _Stage] = {}


def stage(name: str) -> _Stage:
    """``with stage("infer"):`` (or ``@stage("infer")``): an NVTX range named ``name`` while
    NVTX is enabled (:func:`enable_nvtx`), else nothing at all."""
    s = _stages.get(name)
    if s is None:
        s = _stages.setdefault(name, _Stage(name))
    return s


# ------------------------------------------------------------ torch profiler trace

class TorchTrace:
    """A bounded ``torch.profiler`` recording of one torch backend's batches.

    Skips :data:`TORCH_TRACE_SKIP_BATCHES`, records :data:`TORCH_TRACE_BATCHES`, and writes
    ``torch-<pid>.json`` (Chrome trace) when the window ends or at :meth:`stop`, whichever
    first. One per process: torch has one profiler per process, so a second backend (another
    scoring thread) gets None from :meth:`start_if_profiling`.
    """

    _active_in_process = False
    _claim = threading.Lock()

    def __init__(self, torch: Any, device: str, directory: Path):
        self.path = Path(directory) / f"torch-{os.getpid()}.json"
        self.written = False
        activities = [torch.profiler.ProfilerActivity.CPU]
        if str(device).startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=TORCH_TRACE_SKIP_BATCHES, warmup=1,
                                             active=TORCH_TRACE_BATCHES, repeat=1),
            on_trace_ready=self._write,
        )
        self._prof.start()

    @classmethod
    def start_if_profiling(cls, torch: Any, device: str) -> "TorchTrace | None":
        """A running trace when :data:`PROFILE_DIR_ENV` is set and none runs in this process yet."""
        directory = profile_dir()
        if directory is None:
            return None
        with cls._claim:
            if cls._active_in_process:
                return None
            cls._active_in_process = True
        try:
            return cls(torch, device, directory)
        except Exception as exc:  # noqa: BLE001 - scoring goes on untraced
            cls._active_in_process = False
            log.warning("torch profiler trace not started", extra={"error": f"{type(exc).__name__}: {exc}"})
            return None

    def step(self) -> None:
        """One batch done (advances the recording window)."""
        self._prof.step()

    def _write(self, prof: Any) -> None:
        try:
            prof.export_chrome_trace(str(self.path))
            self.written = True
            log.info("torch profiler trace written", extra={"file": str(self.path)})
        except Exception as exc:  # noqa: BLE001 - profiling must never fail scoring
            log.warning("could not write the torch profiler trace", extra={"error": f"{type(exc).__name__}: {exc}"})

    def stop(self) -> None:
        """End the recording (writing what a window still open has recorded)."""
        try:
            self._prof.stop()
        except Exception as exc:  # noqa: BLE001 - e.g. stopped twice
            log.debug("torch profiler stop", extra={"error": str(exc)})
        finally:
            TorchTrace._active_in_process = False
        if not self.written:
            log.info("no torch profiler trace: fewer batches than the window skips",
                     extra={"skip_batches": TORCH_TRACE_SKIP_BATCHES})
