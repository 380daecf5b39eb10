"""Registers and shared memory of the Gluon kernels as the GPU host compiles them (its ptxas may differ from the one
sass_count.py uses on a CPU box): one launch per config, then the compiled kernel's n_regs / shared bytes and the
CTAs per SM they allow on this GPU. GPU host only:

    python3 benchmarks/gpu/kernel_resources.py '128|6144x4096|{"kernel": "wgmma", "tma": true}' ...   (M|NxK|CONFIG)
"""
from __future__ import annotations

import json
import sys

import torch

from nm16_dev.kernel_testing import layer_args, random_layer
from vllm_nm16.kernels import nm16_linear, prepare_device
from vllm_nm16.kernels import gluon_nm16, gluon_wgmma


def _kernels():
    out = []
    for fn in (gluon_wgmma.nm16_wgmma_kernel, gluon_nm16.nm16_fragment_kernel):
        for cache in fn.device_caches.values():
            out += list(cache[0].values())
    return out


def main() -> None:
    prepare_device(torch.device("cuda"))
    props = torch.cuda.get_device_properties(0)
    regs_sm, smem_sm = props.regs_per_multiprocessor, props.shared_memory_per_multiprocessor
    for spec in sys.argv[1:]:
        M, shape, cfg_s = spec.split("|", 2)
        N, K = (int(v) for v in shape.split("x"))
        cfg = json.loads(cfg_s)
        t = random_layer(N, K, outlier_block=256, outliers_per_block=4, scale=True, device="cuda")
        v, mk, ov, oi, sc, _ = layer_args(t)
        x = torch.randn(int(M), K, device="cuda", dtype=torch.bfloat16)
        before = {id(k) for k in _kernels()}
        nm16_linear(x, v, mk, ov, oi, sc, None, None, n=8, m=16, outlier_block=256, outliers_per_block=4,
                    in_features=K, out_features=N, config=cfg)
        torch.cuda.synchronize()
        for k in _kernels():
            if id(k) in before:
                continue
            nw = k.metadata.num_warps
            shared = k.metadata.shared
            by_regs = regs_sm // (k.n_regs * 32 * nw)
            by_smem = smem_sm // max(shared + 1024, 1)
            print(json.dumps({"config": cfg, "M": int(M), "N": N, "K": K, "kernel": k.name, "num_warps": nw,
                              "n_regs": k.n_regs, "n_spills": k.n_spills, "shared": shared,
                              "ctas_per_sm": min(by_regs, by_smem, 32 // nw * 2)}), flush=True)


if __name__ == "__main__":
    main()
