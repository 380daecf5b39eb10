"""Start and stop a ``vllm serve`` subprocess (used by ``scripts/demo.py`` and ``tests/test_server.py``).

The server runs in its own session (process group), so stopping it reaches the API server, the engine core and its
workers: SIGINT first (vLLM's clean shutdown; its API server handles SIGTERM the same way, and ``stop(sig=...)`` sends
either), SIGTERM after a grace period, SIGKILL as a last resort; the caller gets the exit code and the list of processes
of the group still alive afterwards (should be empty).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    """The ``vllm`` console script of this interpreter's environment."""
    here = Path(sys.executable).parent / "vllm"
    return str(here) if here.is_file() else (shutil.which("vllm") or "vllm")


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid:
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are dead
                    alive.append(int(entry.name))
        except (ProcessLookupError, PermissionError, FileNotFoundError, OSError):
            continue
    return alive


class VLLMServer:
    """``with VLLMServer(ckpt, extra_args, log_path) as srv: srv.base_url ...``"""

    def __init__(self, model: str | Path, args: list[str] | None = None, *, log_path: str | Path,
                 host: str = "127.0.0.1", port: int | None = None, env: dict | None = None,
                 served_model_name: str = "nm16") -> None:
        self.host, self.port = host, port or free_port()
        self.name = served_model_name
        self.cmd = [vllm_executable(), "serve", str(model), "--host", host, "--port", str(self.port),
                    "--served-model-name", served_model_name, *(args or [])]
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.leftover: list[int] = []

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 600) -> "VLLMServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before it was healthy; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def stop(self, grace: float = 60, sig: int = signal.SIGINT, group: bool = False) -> int | None:
        """Stop the whole process group; returns the server's exit code. ``sig`` (default SIGINT) goes to the server
        process (``group=True``: to its whole process group, as a terminal's Ctrl+C does); SIGTERM after ``grace``
        seconds, SIGKILL of the group as a last resort. Afterwards: ``self.leftover`` (pids of the group still alive
        15 s after the server exited), ``self.signals`` (what was sent), ``self.exit_seconds`` (first signal -> server
        exited), ``self.group_exit_seconds`` (first signal -> no process of the group left) and
        ``self.stop_log_offset`` (where the log stood when the first signal went out)."""
        if self.proc is None:
            return None
        pgid = self.proc.pid  # leader of its own session
        self.signals: list[str] = []
        self._log.flush()
        try:
            self.stop_log_offset = self.log_path.stat().st_size
        except OSError:
            self.stop_log_offset = 0
        t0 = time.monotonic()
        for s, wait in ((sig, grace), (signal.SIGTERM, 20)):
            if self.proc.poll() is None:
                if group and not self.signals:
                    os.killpg(pgid, s)
                else:
                    self.proc.send_signal(s)
                self.signals.append(signal.Signals(s).name)
                try:
                    self.proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    pass
        if self.proc.poll() is None:
            os.killpg(pgid, signal.SIGKILL)
            self.signals.append("SIGKILL")
            self.proc.wait(timeout=10)
        self.exit_seconds = round(time.monotonic() - t0, 2)
        end = time.time() + 15  # the engine core and workers exit after the API server
        while _group_alive(pgid) and time.time() < end:
            time.sleep(0.2)
        self.group_exit_seconds = round(time.monotonic() - t0, 2)
        self.returncode = self.proc.returncode
        self.leftover = _group_alive(pgid)
        if self.leftover:  # report them, but never leave orphans behind
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.returncode

    def log_since_stop(self) -> str:
        """What the server (and its engine processes) wrote after the first stop signal went out."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(getattr(self, "stop_log_offset", 0))
                return f.read().decode(errors="replace")
        except OSError:
            return "<no log>"

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.returncode is None:
            self.stop()
