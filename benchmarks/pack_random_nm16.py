"""Data-free nm16 packing of a (random-weight) checkpoint for SPEED benchmarks only.

Speed does not depend on which weights are kept, only on the tensors the kernel reads, so an 8B-shaped random model
does not need calibration text. This writes exactly the tensors a real ``nm16-compress`` checkpoint of the default
recipe has — values + masks, structured outliers (top-k |w| per (row, block)) and a per-output-channel scale — using
magnitude scores:

* outliers: the k largest |w| of every (row, B-column block) are taken out first and stored exactly;
* N:M: the N largest |w| of every group of M of the remainder are kept;
* scale: data-free variance correction ``‖w_row − outliers‖ / ‖kept_row‖`` (the channel scale that restores the output
  variance for isotropic inputs; the calibrated compressor measures it on real activations instead).

Everything goes through ``vllm_nm16.format.pack`` (the one spec) and is written by the compressor's writer
(``offline.writer``: safetensors shards + index, atomically through a temp folder).

    python benchmarks/pack_random_nm16.py DENSE_DIR OUT_DIR [--pattern 8:16] [--outliers 4/256] [--device cuda]

``--config-only`` writes only OUT_DIR/config.json (DENSE_DIR's config + the same ``quantization_config``) and the
auxiliary files (generation config, tokenizer if any), no tensors: with vLLM's ``--load-format dummy`` the plugin
fills each layer with a valid random nm16 layer itself, so any shape runs with no weight files (DENSE_DIR may be a
``make_random_llama.py --config-only`` folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

LINEAR_SUFFIXES = (".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight",
                   ".self_attn.o_proj.weight", ".mlp.gate_proj.weight", ".mlp.up_proj.weight",
                   ".mlp.down_proj.weight")
SHARD_BYTES = 4 * 1024 ** 3


def pack_weight(w, spec, name: str):
    import torch

    from vllm_nm16.format import nm_keep_topk, outlier_positions_topk, pack

    wf = w.to(torch.float32)
    out_mask = None
    outliers = None
    rest = wf
    if spec.has_outliers:
        out_mask = outlier_positions_topk(wf.abs(), spec.outliers_per_block, spec.outlier_block)
        outliers = torch.where(out_mask, wf, 0.0)
        rest = torch.where(out_mask, 0.0, wf)
    keep = nm_keep_topk(rest.abs(), spec.n, spec.m)
    kept = torch.where(keep, rest, 0.0)
    scale = None
    if spec.has_scale:
        scale = rest.norm(dim=1) / kept.norm(dim=1).clamp_min(1e-12)
    return pack(kept.to(w.dtype), keep, spec, outliers=None if outliers is None else outliers.to(w.dtype),
                outlier_mask=out_mask, scale=scale, name=name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dense_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--pattern", default="8:16")
    ap.add_argument("--outliers", default="4/256", help="k/B structured outlier budget, or 'none'")
    ap.add_argument("--no-scale", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config-only", action="store_true",
                    help="write config.json (+ generation config / tokenizer files) only, no tensors: for vLLM "
                         "--load-format dummy")
    args = ap.parse_args(argv)

    from safetensors import safe_open

    from offline.writer import copy_aux_files, save_shards, staging_folder, write_json
    from vllm_nm16.format import NM16Spec

    n, m = (int(v) for v in args.pattern.split(":"))
    block, k = (None, 0)
    if args.outliers != "none":
        k, block = (int(v) for v in args.outliers.split("/"))
    spec = NM16Spec(n=n, m=m, outlier_block=block, outliers_per_block=k, has_scale=not args.no_scale,
                    recipe={"tool": "benchmarks/pack_random_nm16.py", "method": "magnitude (data-free)",
                            "pattern": args.pattern, "outliers": args.outliers,
                            "variance_correction": "none" if args.no_scale else "channel (data-free norm ratio)"})
    cfg = json.loads((args.dense_dir / "config.json").read_text())
    if "quantization_config" in cfg:
        raise SystemExit(f"error: {args.dense_dir} is already quantized")
    if args.config_only:
        if args.out_dir.exists():
            raise SystemExit(f"error: {args.out_dir} exists")
        cfg["quantization_config"] = spec.to_config()
        cfg["quantization_config"]["recipe"].update(
            method="none: config only, random layers drawn by the plugin under --load-format dummy",
            variance_correction="none (random scales ~1)" if spec.has_scale else "none")
        with staging_folder(args.out_dir, overwrite=False) as tmp:
            write_json(tmp / "config.json", cfg)
            copy_aux_files(args.dense_dir, tmp)
        print(f"wrote the config of an nm16 model ({spec.pattern}, outliers {args.outliers}, scale {spec.has_scale}; "
              f"no tensors: load it with --load-format dummy) to {args.out_dir}")
        return 0
    files = sorted(args.dense_dir.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"error: no .safetensors in {args.dense_dir}")
    if args.out_dir.exists():
        raise SystemExit(f"error: {args.out_dir} exists")
    t0 = time.time()
    tensors: dict = {}
    npacked = 0
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                t = sf.get_tensor(key)
                if key.endswith(LINEAR_SUFFIXES):
                    prefix = key[: -len(".weight")]
                    packed = pack_weight(t.to(args.device), spec, prefix)
                    tensors.update({f"{prefix}.{suffix}": v.cpu() for suffix, v in packed.items()})
                    npacked += 1
                else:
                    tensors[key] = t
    cfg["quantization_config"] = spec.to_config()
    with staging_folder(args.out_dir, overwrite=False) as tmp:  # the compressor's atomic writer
        save_shards(tensors, tmp, max_shard_bytes=SHARD_BYTES)
        write_json(tmp / "config.json", cfg)
        copy_aux_files(args.dense_dir, tmp)
    print(f"packed {npacked} linear layers ({spec.pattern}, outliers {args.outliers}, scale {spec.has_scale}) "
          f"into {args.out_dir} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
