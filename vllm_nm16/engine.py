"""Start and stop vLLM's offline engine (``vllm.LLM``) explicitly, in order, before the interpreter exits.

Why: vLLM tears an ``LLM`` down from ``weakref.finalize`` callbacks. When the ``LLM`` is still alive at exit (it is
usually kept alive by a reference cycle until then), that teardown runs from ``atexit`` and leaves vLLM's *daemon*
threads (``EngineCoreOutputQueueThread``, ``MPClientEngineMonitor``, the executor's monitors, ...) running while
Python finalizes. Python ends a daemon thread that wants the GIL back after finalization began with
``pthread_exit``; when that happens inside a C++ call that released the GIL (torch / pybind11's
``gil_scoped_release``, whose destructor is ``noexcept``), the forced unwind calls ``std::terminate``: the process
prints ``terminate called without an active exception`` and dies of SIGABRT (exit 134) *after* it printed its results.
Whether it happens depends on where each thread is at that instant, hence "3 runs of 5".

``shutdown_llm`` does the teardown while the interpreter is fully alive: the engine core client's ``shutdown()``
(multiprocess mode: stops the EngineCore process and its workers, closes the ZMQ sockets and tells the output thread to
exit; in-process mode: shuts the executor down and destroys the distributed groups), then joins every thread the
engine started, drops the engine, ``gc.collect()``, and destroys what is left of vLLM's distributed state. ``open_llm``
is the context manager that does it on every exit path.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from typing import Any, Iterator

log = logging.getLogger("vllm_nm16")


def _is_vllm_thread(t: threading.Thread) -> bool:
    """A thread running vLLM's (or its ZMQ sockets') code: its target or its Thread subclass lives there. Other
    libraries' helper threads (tqdm's monitor, ...) are not waited for."""
    target = getattr(t, "_target", None)
    module = getattr(target, "__module__", None) or type(t).__module__ or ""
    return module.split(".")[0] in ("vllm", "zmq")


def _engine_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t not in before and t is not threading.current_thread() and _is_vllm_thread(t)]


def shutdown_llm(llm: Any, threads_before: set[threading.Thread] | None = None,
                 timeout: float = 30.0) -> list[str]:
    """Shut ``llm`` (a ``vllm.LLM``) down now, in order (see the module docstring). ``threads_before``: the threads
    that existed before the ``LLM`` was made (default: only the main thread counts as not the engine's); every other
    thread is joined, up to ``timeout`` seconds in all. Returns the names of the threads still alive afterwards
    (empty when the shutdown was clean). Safe to call twice."""
    if threads_before is None:
        threads_before = {threading.main_thread()}
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        try:
            try:  # let the engine process exit by itself (vLLM's default grace is 5 s, then SIGKILL)
                core.shutdown(timeout=timeout)
            except TypeError:  # a build whose shutdown() takes no timeout
                core.shutdown()
        except Exception as e:  # noqa: BLE001 - keep tearing down what is left
            log.warning("engine core shutdown raised %s: %s", type(e).__name__, e)
    deadline = time.monotonic() + timeout
    for t in _engine_threads(threads_before):
        t.join(max(0.0, deadline - time.monotonic()))
    if engine is not None:
        with contextlib.suppress(AttributeError, TypeError):
            llm.llm_engine = None  # the engine and what it holds go now, not at exit
    del engine, core
    gc.collect()
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception as e:  # noqa: BLE001 - vLLM without these functions, or nothing to destroy
        log.debug("distributed teardown: %s", e)
    left = [t.name for t in _engine_threads(threads_before) if t.is_alive()]
    if left:
        log.warning("vLLM threads still alive after shutdown: %s", ", ".join(left))
    return left


@contextlib.contextmanager
def open_llm(**engine_kw: Any) -> Iterator[Any]:
    """``with open_llm(model=..., ...) as llm:`` a ``vllm.LLM`` that is shut down (``shutdown_llm``) on leaving the
    block, whether it ends normally or by an exception."""
    from vllm import LLM

    before = set(threading.enumerate())
    llm = LLM(**engine_kw)
    try:
        yield llm
    finally:
        shutdown_llm(llm, before)
