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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(out_dir: Path) -> list[str]:
    """Remove the temporary folders of ``out_dir`` left by runs that were killed (SIGKILL, power loss: no cleanup
    could run). A temporary folder's name carries its writer's pid; only those whose writer is gone are removed."""
    removed = []
    for p in Path(out_dir).parent.glob(f".{Path(out_dir).name}{TMP_MARK}*"):
        pid = p.name[len(f".{Path(out_dir).name}{TMP_MARK}"):].split("-", 1)[0]
        if p.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system or file system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def staging_folder(out_dir: Path, overwrite: bool):
    """Yield a fresh temporary folder next to ``out_dir``; on success it becomes ``out_dir`` (replacing an existing
    one only when ``overwrite``), on any exception (KeyboardInterrupt, SystemExit from a signal included) it is
    removed.

    A process killed outright (SIGKILL) cannot clean up: what it leaves is a hidden ``.<name>.nm16-tmp-<pid>-*``
    folder next to ``out_dir``, never ``out_dir`` itself; the next run for the same ``out_dir`` removes it. The final
    step is one rename (a new ``out_dir``) or one atomic exchange (``overwrite`` of an existing one), so ``out_dir``
    is at every instant either absent, the old folder, or the complete new one."""
    from offline.faults import point

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {out_dir} already exists (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}{TMP_MARK}{os.getpid()}-"))
    try:
        yield tmp
        point("rename")
        if out_dir.exists():
            if _exchange(tmp, out_dir):  # tmp now holds the old folder
                point("exchanged")
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # two renames: out_dir is briefly absent (never partial)
                old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}{TMP_MARK}{os.getpid()}-"))
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

    from offline.faults import point

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
        point("shard.model.safetensors")
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        point("shard.model.safetensors.done")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for fname, shard in zip(names, shards):
        point(f"shard.{fname}")
        save_file(shard, str(folder / fname), metadata=meta)
        point(f"shard.{fname}.done")
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
