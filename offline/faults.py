"""Named fault points of the compressor, for its crash tests (``tests/test_compress_faults.py``).

The compressor calls ``point("<name>")`` at the steps a crash could hit: after the calibration samples are made, after
the model is loaded, after each block's statistics, after each linear layer, after each block, before and after each
shard is written, after config/aux/report files, after validation, just before the final rename. With the environment
variable ``NM16_FAULT`` unset (always, outside tests) a point does nothing but read the environment (``vllm_nm16.envs``).

``NM16_FAULT=ACTION:GLOB`` acts at the first point whose name matches the shell-style ``GLOB``:

* ``kill``: SIGKILL this process (no cleanup of any kind runs: the harshest crash there is);
* ``enospc``: raise ``OSError(ENOSPC)`` (a full disk);
* ``interrupt``: raise ``KeyboardInterrupt`` (Ctrl-C).

``NM16_FAULT_LOG=PATH`` appends every point name reached to ``PATH`` (how the tests list the points).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal

from vllm_nm16 import envs

ENV = "NM16_FAULT"
LOG_ENV = "NM16_FAULT_LOG"
ACTIONS = ("kill", "enospc", "interrupt")


def point(name: str) -> None:
    log = envs.NM16_FAULT_LOG
    if log:
        with open(log, "a") as f:
            f.write(name + "\n")
    spec = envs.NM16_FAULT
    if not spec:
        return
    action, _, pattern = spec.partition(":")
    if action not in ACTIONS or not pattern:
        raise ValueError(f"{ENV}={spec!r}: expected ACTION:GLOB with ACTION in {ACTIONS}")
    if not fnmatch.fnmatchcase(name, pattern):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {name})")
    else:
        raise KeyboardInterrupt
