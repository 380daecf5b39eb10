"""Command lines: ``nm16-compress MODEL_DIR OUT_DIR [options]`` and ``nm16-eval MODEL_OR_CKPT --text PATH``.

Errors in the input are reported as one line ``error: ...`` with exit code 2 (bad input) or 1 (anything else);
SIGINT/SIGTERM stop the run (exit 130/143) and leave neither the output nor a temporary folder behind.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import sys
from pathlib import Path


def _default_threads() -> int | None:
    from vllm_nm16 import envs

    return envs.NM16_THREADS


def _cli_type(parse):
    """A recipe field's value parser as an argparse type: its ValueError message becomes the usage error."""
    if parse in (int, float, str, Path):
        return parse

    def typed(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    typed.__name__ = parse.__name__
    return typed


def add_recipe_options(ap: argparse.ArgumentParser) -> None:
    """One option per field of :class:`offline.recipe.Recipe`, from its default and metadata."""
    from dataclasses import fields

    from offline.recipe import Recipe

    for f in fields(Recipe):
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        help_ = meta["help"].replace("%", "%%") if meta.get("help") else None
        if isinstance(f.default, bool):
            ap.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", help=help_)
            continue
        kw = {k: meta[k] for k in ("choices", "metavar") if k in meta}
        parse = meta.get("type") or type(f.default)
        if parse is not str:
            kw["type"] = _cli_type(parse)
        ap.add_argument(flag, dest=f.name, default=f.default, help=help_, **kw)


def compress_parser() -> argparse.ArgumentParser:
    from offline.models import SUPPORTED_ARCHITECTURES
    from offline.recipe import positive_int

    ap = argparse.ArgumentParser(
        prog="nm16-compress",
        description="Compress a Hugging Face causal LM (safetensors; architectures: "
                    f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}) into an nm16 N:M sparse checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    add_recipe_options(ap)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--strict", dest="strict_divisible", action="store_true",
                    help="fail instead of keeping dense the layers whose in_features are not divisible")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    ap.add_argument("--threads", type=_cli_type(positive_int), default=_default_threads(), help="torch CPU threads")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    return ap


def eval_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nm16-eval", description="Perplexity of a dense HF folder or an nm16 "
                                 "checkpoint on a text file. The last line printed is 'perplexity: <float>'.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--text", type=Path, default=None, help="text file (default: the sotu-eval split)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--stride", type=int, default=None, help="window stride (default: seqlen, non-overlapping)")
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N tokens only")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--device", default="cpu", help="device for the hf engine")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward (hf engine)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result dict here")
    ap.add_argument("--threads", type=int, default=_default_threads())
    return ap


def _install_signal_handlers() -> None:
    def handler(signum, _frame):
        raise SystemExit(128 + signum)  # unwinds through the staging folder's cleanup
    signal.signal(signal.SIGTERM, handler)


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def compress_main(argv: list[str] | None = None) -> int:
    args = compress_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    _install_signal_handlers()
    from offline.api import CompressError, compress

    existed = args.out_dir.exists()
    try:
        from offline.recipe import recipe_options

        out = compress(args.model_dir, args.out_dir, device=args.device, overwrite=args.overwrite,
                       strict_divisible=args.strict_divisible, progress=not args.quiet, threads=args.threads,
                       **{name: getattr(args, name) for name in recipe_options()})
    except CompressError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written", 130)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = "left unchanged" if existed else "not created"
            return _fail(f"disk full while writing {args.out_dir} ({e.strerror}): nothing was written; the output "
                         f"folder was {kept} and the partial output removed; free space and run again", 1)
        return _fail(f"{type(e).__name__}: {e}".replace("\n", " "), 1)
    except (ValueError, RuntimeError) as e:
        return _fail(f"{type(e).__name__}: {e}".replace("\n", " "), 1)
    print(f"wrote {out}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from offline import evaluate
    from offline.assets import default_eval_path

    text = args.text or default_eval_path()
    if not args.model.exists():
        return _fail(f"model folder {args.model} does not exist")
    if not Path(text).is_file():
        return _fail(f"text file {text} does not exist")
    kw = {"device": args.device, "batch_size": args.batch_size, "progress": True} if args.engine == "hf" else {}
    try:
        res = evaluate(args.model, text, seqlen=args.seqlen, stride=args.stride, max_tokens=args.max_tokens,
                       engine=args.engine, **kw)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except (OSError, ValueError, RuntimeError) as e:
        return _fail(f"{type(e).__name__}: {e}".replace("\n", " "), 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "perplexity"}))
    print(f"perplexity: {res['perplexity']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("compress", "eval"):
        print("usage: python -m offline compress|eval ... (see --help of each)", file=sys.stderr)
        return 2
    return compress_main(argv[1:]) if argv[0] == "compress" else eval_main(argv[1:])
