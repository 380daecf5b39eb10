"""Every environment variable this project reads, in one place (modelled on ``vllm/envs.py``).

Read lazily: ``from vllm_nm16 import envs; envs.NM16_SCRATCH_MIN_M`` reads the environment at that moment (module
``__getattr__``), so importing this module reads nothing and a variable set after import is seen by the next read.
Where a variable takes effect is the reader's business: the ``where`` column says who reads it and when.

The README's knob table is generated from :data:`ENV_VARS` (``python -m vllm_nm16.envs``) and checked against it by
``tests/test_envs.py``. Stdlib only: ``import vllm_nm16.envs`` must stay as cheap as ``import vllm_nm16``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

_REPO = Path(__file__).resolve().parent.parent


def _csv(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str | Callable[[], str]  # the text the variable has when unset (parsed like a set value)
    parse: Callable[[str], Any]
    meaning: str
    where: str
    default_doc: str = ""  # how the README states the default (when it is not the text itself)

    def read(self) -> Any:
        raw = os.environ.get(self.name)
        if raw is None:
            raw = self.default() if callable(self.default) else self.default
        return self.parse(raw)

    @property
    def default_text(self) -> str:
        return self.default_doc or f"`{self.default}`"


ENV_VARS: tuple[EnvVar, ...] = (
    # --- the vLLM plugin (serving) ---
    EnvVar("VLLM_NM16_BACKEND", "auto", str.lower,
           "the nm16 kernel backend (`vllm_nm16/backends.py`): `auto` = `gluon` on CUDA (the Gluon 8:16 fragment "
           "kernel at M <= 32, the Triton kernels elsewhere), the PyTorch path on CPU; `triton` = the Triton "
           "kernels only; `torch` = the PyTorch path on CUDA too (the reference the GPU checks compare against)",
           "`vllm_nm16/backends.py`, when a layer's weights are processed (the backend name is then a constant of "
           "the compiled graph); part of vLLM's compile-cache hash (`compat.tag_compile_cache`)"),
    EnvVar("NM16_SCRATCH_MIN_M", "17", int,
           "from which token count M a layer is decoded into a transient dense buffer + cuBLAS; 0 = never",
           "`vllm_nm16/kernels/configs.py`, at every call that reaches the Triton kernels' table (GPU)"),
    EnvVar("NM16_SCRATCH_CHUNK_MB", "0", float,
           "decode that many MB of the layer at a time, bounding the scratch memory; 0 = whole layer (chunks "
           "measured slower)",
           "`vllm_nm16/kernels/scratch.py`, at every scratch-path call (GPU)"),
    EnvVar("NM16_POS_MODE", "lut16", str,
           "kernel position layout for 8:16: `lut16`, `nibble32` or `byte` (benchmarks compare them)",
           "`vllm_nm16/kernels/layout.py`, when the weights are repacked at load (GPU)"),
    EnvVar("TRITON_INTERPRET", "0", lambda s: s == "1",
           "Triton's own switch: `1` runs the kernels in Triton's CPU interpreter (the kernel tests); the plugin "
           "then also computes `tl.dot` in fp32 (bf16 dots are wrong in the interpreter)",
           "`vllm_nm16/kernels/triton_nm16.py`, at every launch"),
    # --- the offline compressor ---
    EnvVar("NM16_THREADS", "0", lambda s: int(s) or None,
           "torch CPU threads for `nm16-compress` / `nm16-eval` (the default of `--threads`; 0 = torch's "
           "default); use 1 on a shared CPU",
           "`offline/cli.py`, when the argument parser is built"),
    EnvVar("NM16_CACHE", lambda: str(_REPO / ".cache"), Path,
           "folder of the default model and corpus (`make setup` / `python -m offline.assets` build them there; "
           "the tests, the demo and the CLIs' defaults read them)",
           "`offline/assets.py`, at every call", default_doc="`.cache/` next to the packages"),
    EnvVar("NM16_FAULT", "", str,
           "test hook of the compressor's crash tests: `ACTION:GLOB` (`kill`, `enospc` or `interrupt`) at the first "
           "named fault point matching GLOB (`offline/faults.py`); unset = no faults",
           "`offline/faults.py`, at every fault point", default_doc="unset"),
    EnvVar("NM16_FAULT_LOG", "", str,
           "test hook: append the name of every fault point reached to this file",
           "`offline/faults.py`, at every fault point", default_doc="unset"),
    # --- the GPU check script ---
    EnvVar("SMOLLM_BACKENDS", "triton", _csv,
           "comma-separated `VLLM_NM16_BACKEND` values for the `LLM()` greedy + perplexity runs",
           "`benchmarks/gpu/smollm_check.py`"),
    EnvVar("SMOLLM_SERVE", "triton,torch", _csv,
           "comma-separated `VLLM_NM16_BACKEND` values served with `vllm serve` and compared",
           "`benchmarks/gpu/smollm_check.py`"),
    EnvVar("SMOLLM_SERVE_DTYPE", "bfloat16", str,
           "`--dtype` of those `vllm serve` runs",
           "`benchmarks/gpu/smollm_check.py`"),
    EnvVar("SMOLLM_KV_CACHE_BYTES", "0", int,
           "KV-cache bytes of those `LLM()` / `vllm serve` engines (`kv_cache_memory_bytes`: skips vLLM's start-up "
           "memory profiling, which fails while another process frees GPU memory); 0 = vLLM profiles",
           "`benchmarks/gpu/smollm_check.py`"),
    EnvVar("NM16_COMMIT", "", str,
           "the commit a copied tree came from, recorded in result files instead of git's answer (the GPU host's copy "
           "answers git with the commit its session started from); empty = ask git",
           "`benchmarks/common.commit_record` (ablation.py, bench_e2e.py, bench_kernels.py, fuzz.py, load_test.py; "
           "a `--commit` argument wins), when a result is written", default_doc="empty"),
)

_BY_NAME: dict[str, EnvVar] = {v.name: v for v in ENV_VARS}

# name -> reader, as in vllm/envs.py
environment_variables: dict[str, Callable[[], Any]] = {v.name: v.read for v in ENV_VARS}

if TYPE_CHECKING:  # attribute types for type checkers; at run time every read goes through __getattr__
    VLLM_NM16_BACKEND: str
    NM16_SCRATCH_MIN_M: int
    NM16_SCRATCH_CHUNK_MB: float
    NM16_POS_MODE: str
    TRITON_INTERPRET: bool
    NM16_THREADS: int | None
    NM16_FAULT: str
    NM16_FAULT_LOG: str
    NM16_CACHE: Path
    SMOLLM_BACKENDS: list[str]
    SMOLLM_SERVE: list[str]
    SMOLLM_SERVE_DTYPE: str
    SMOLLM_KV_CACHE_BYTES: int
    NM16_COMMIT: str


def __getattr__(name: str) -> Any:
    if name in _BY_NAME:
        return _BY_NAME[name].read()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_BY_NAME))


def markdown_table() -> str:
    """The README's knob table."""
    rows = ["| variable | default | meaning | read by |", "|---|---|---|---|"]
    rows += [f"| `{v.name}` | {v.default_text} | {v.meaning} | {v.where} |" for v in ENV_VARS]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
