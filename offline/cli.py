"""Command lines: ``nm16-compress MODEL_DIR OUT_DIR [options]`` and ``nm16-eval MODEL_OR_CKPT --text PATH``.

Errors in the input are reported as one line ``error: ...`` with exit code 2 (bad input) or 1 (anything else);
SIGINT/SIGTERM stop the run (exit 130/143) and leave neither the output nor a temporary folder behind.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
from pathlib import Path

DEFAULT_THREADS = int(os.environ.get("NM16_THREADS", "0")) or None


def _equalize_arg(text: str):
    if text.lower() == "none":
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ALPHA in [0, 1] or 'none', got {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"ALPHA must be in [0, 1], got {v}")
    return v


def compress_parser() -> argparse.ArgumentParser:
    from offline.models import SUPPORTED_ARCHITECTURES

    ap = argparse.ArgumentParser(
        prog="nm16-compress",
        description="Compress a Hugging Face causal LM (safetensors; architectures: "
                    f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}) into an nm16 N:M sparse checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--pattern", default="8:16", help="N:M (2:4, 4:8, 8:16, 16:32) or 'unstructured' (50%%, "
                    "quality comparisons only: written as a dense HF folder holding zeros)")
    ap.add_argument("--method", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--calib", type=Path, default=None,
                    help="calibration text file or folder of .txt (default: the sotu-calib split)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--outliers", default="auto", help="k/B outliers per (row, block of B input columns), 'auto' "
                    "(1 per 64 weights with the largest B in 256/192/128/64 dividing every layer) or 'none'")
    ap.add_argument("--outlier-structure", default="structured", choices=["structured", "unstructured"],
                    help="unstructured = global top weights at equal bytes (comparison only; dense output)")
    ap.add_argument("--variance-correction", default="channel", choices=["channel", "tensor", "none"])
    ap.add_argument("--mean-shift", action="store_true", help="also restore the output mean (weight_shift)")
    ap.add_argument("--equalize", type=_equalize_arg, default=0.5, metavar="ALPHA|none",
                    help="SmoothQuant-like equalization strength (folded into the norms / producing layers)")
    ap.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size")
    ap.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT Hessian damping (fraction of mean diag)")
    ap.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                    help="collect all statistics of a block before compressing any of its layers")
    ap.add_argument("--strict", dest="strict_divisible", action="store_true",
                    help="fail instead of keeping dense the layers whose in_features are not divisible")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads")
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
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
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
        out = compress(args.model_dir, args.out_dir, pattern=args.pattern, method=args.method, calib=args.calib,
                       nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, device=args.device,
                       outliers=args.outliers, outlier_structure=args.outlier_structure,
                       variance_correction=args.variance_correction, mean_shift=args.mean_shift,
                       equalize=args.equalize, blocksize=args.blocksize, percdamp=args.percdamp,
                       true_sequential=args.true_sequential, overwrite=args.overwrite,
                       strict_divisible=args.strict_divisible, progress=not args.quiet, threads=args.threads)
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
