"""nm16 test checkpoints built directly with ``vllm_nm16.format.pack`` (no compressor): magnitude N:M masks of a dense
HF folder's linear weights, optional outliers (the largest pruned weights of each block), a per-row scale (norm ratio)
and a small per-row shift. Also helpers that write *malformed* variants of a good checkpoint.

Checkpoints are cached under ``.cache/test-ckpts/<name>-<hash of the inputs and of this file>`` (written to a temp
folder, then renamed), so the test modules that need the same checkpoint share it within and across runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from offline.writer import staging_folder
from vllm_nm16 import format as fmt

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "test-ckpts"
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "generation_config.json")


def _read_folder(src: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def _is_packable(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEAR_SUFFIXES


def pack_state(state: dict[str, torch.Tensor], spec: fmt.NM16Spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Dense state dict -> nm16 state dict (layers in ``spec.ignore`` keep their dense weight)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        prefix = name.rpartition(".")[0]
        if not _is_packable(name) or prefix in spec.ignore:
            out[name] = w
            continue
        w32 = w.float()
        keep = fmt.nm_keep_topk(w32.abs(), spec.n, spec.m)
        kw = {}
        approx = w32 * keep
        if spec.has_outliers:
            opos = fmt.outlier_positions_topk(w32.abs() * (~keep), spec.outliers_per_block, spec.outlier_block)
            kw.update(outliers=w * opos, outlier_mask=opos)
            approx = approx + w32 * opos
        if spec.has_scale:
            # Norm ratio of the pruned rows, a stand-in for variance correction (any positive per-row factor works).
            kw["scale"] = (w32.norm(dim=1) / approx.norm(dim=1).clamp_min(1e-6)).clamp(0.5, 2.0)
        if spec.has_shift:
            kw["shift"] = torch.randn(w.shape[0], generator=gen) * 0.01
        for suffix, t in fmt.pack(w, keep, spec, name=prefix, **kw).items():
            out[f"{prefix}.{suffix}"] = t
    return out


def write_checkpoint(dst: Path, config: dict, tensors: dict[str, torch.Tensor], aux_from: Path) -> Path:
    """Write config.json + model.safetensors + tokenizer files to ``dst`` atomically (temp folder, then rename)."""
    with staging_folder(dst, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for name in AUX_FILES:
            if (aux_from / name).is_file():
                shutil.copy(aux_from / name, tmp / name)
    return dst


def _key(*parts) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(Path(fmt.__file__).read_bytes())
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:12]


def nm16_checkpoint(src: Path, name: str, *, n: int = 8, m: int = 16, outlier_block: int | None = None,
                    outliers_per_block: int = 0, has_scale: bool = False, has_shift: bool = False,
                    ignore: tuple[str, ...] = (), seed: int = 0, root: Path | None = None) -> Path:
    """A cached nm16 checkpoint of the dense HF folder ``src`` (see the module docstring); ``root`` replaces the
    cache folder (e.g. a pytest tmp folder for checkpoints of temporary models)."""
    src = Path(src)
    spec = fmt.NM16Spec(n=n, m=m, outlier_block=outlier_block, outliers_per_block=outliers_per_block,
                        has_scale=has_scale, has_shift=has_shift, ignore=tuple(ignore),
                        recipe={"tool": "tests/ckpt_factory.py", "method": "magnitude"})
    src_stat = sorted((f.name, f.stat().st_size) for f in src.glob("*.safetensors"))
    dst = Path(root or CACHE) / f"{name}-{_key(str(src.resolve()), src_stat, spec.to_config(), seed)}"
    if (dst / "model.safetensors").is_file():
        return dst
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = spec.to_config()
    return write_checkpoint(dst, config, pack_state(_read_folder(src), spec, seed), aux_from=src)


# -------------------------------------------------------------------------------------------- malformed variants
def variant(good: Path, dst: Path, *, config_fn: Callable[[dict], None] | None = None,
            tensors_fn: Callable[[dict], None] | None = None) -> Path:
    """Copy checkpoint ``good`` to ``dst`` with its config dict and/or tensor dict edited in place by the callbacks."""
    config = json.loads((good / "config.json").read_text())
    tensors = _read_folder(good)
    if config_fn:
        config_fn(config)
    if tensors_fn:
        tensors_fn(tensors)
    return write_checkpoint(Path(dst), config, tensors, aux_from=good)
