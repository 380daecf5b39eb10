"""Writing a compressed model: an nm16 checkpoint (or, for unpackable comparison recipes, a dense HF folder), always
through a temporary folder next to the destination that is renamed at the very end, so an interrupted or failed run
leaves no destination folder (and no temporary folder) behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# Files copied from the source folder besides weights and config.json.
AUX_PATTERNS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "chat_template*", "vocab*",
                "merges.txt", "added_tokens.json")
MAX_SHARD_BYTES = 2 * 1024 ** 3
TMP_MARK = ".nm16-tmp-"


@contextlib.contextmanager
def staging_folder(out_dir: Path, overwrite: bool):
    """Yield a fresh temporary folder next to ``out_dir``; on success it becomes ``out_dir`` (replacing an existing
    one only when ``overwrite``), on any exception (KeyboardInterrupt, SystemExit from a signal included) it is
    removed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {out_dir} already exists (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}{TMP_MARK}"))
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_shards(tensors: dict, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES,
                metadata: dict | None = None) -> list[str]:
    """safetensors shards (``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index)."""
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for fname, shard in zip(names, shards):
        save_file(shard, str(folder / fname), metadata=meta)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return names


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in AUX_PATTERNS:
        for f in sorted(Path(src).glob(pattern)):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
