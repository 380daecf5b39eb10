"""Launch nm16 kernel configs once each, for Nsight Compute (GPU host; where the stall cycles of a kernel go).

    ncu --clock-control none -k regex:nm16 --section SpeedOfLight --section WarpStateStats \\
        --section SchedulerStats --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \\
        --section SourceCounters python3 benchmarks/gpu/ncu_probe.py 28672x4096:8:gluon:0 28672x4096:8:gluon:1 \\
        28672x4096:16:gluon:0 28672x4096:16:gluon:1 28672x4096:64:wgmma:0 28672x4096:64:wgmma:1 4096x4096:8:gluon:0

(the command behind benchmarks/results/raw/h200/ncu_session6.txt, on the kernels of commit 3a204a5; each case shows
up twice there: the checked launch and the NVTX-ranged one.)

A case is ``NxK:M:KERNEL:OUTLIERS[:JSON config overrides]`` (OUTLIERS 1 = 4 per 256 columns + scale, 0 = bare 8:16).
Each case is checked against the float64 reference first (an unprofiled warm-up launch compiles it), then launched
once more inside an NVTX range named after the case, so ``--nvtx-include`` or the launch order picks it out.
"""

from __future__ import annotations

import json
import sys

import torch

from nm16_dev.kernel_testing import layer_args, random_layer, reference_linear
from vllm_nm16.kernels import nm16_linear, prepare_device


def run_case(spec: str) -> None:
    shape, M, kernel, outl, *extra = spec.split(":", 4)
    N, K = (int(v) for v in shape.split("x"))
    M, outl = int(M), outl == "1"
    cfg = {"kernel": kernel, **(json.loads(extra[0]) if extra else {})}
    k, B = (4, 256) if outl else (0, None)
    t = random_layer(N, K, outlier_block=B, outliers_per_block=k, scale=outl, device="cuda")
    v, mk, ov, oi, sc, sh = layer_args(t)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    kw = dict(n=8, m=16, outlier_block=B, outliers_per_block=k, in_features=K, out_features=N, config=cfg)
    y = nm16_linear(x, v, mk, ov, oi, sc, sh, None, **kw)
    ref = reference_linear(x, v, mk, ov, oi, sc, sh, None, n=8, m=16, outlier_block=B, outliers_per_block=k)
    err = float((y.double() - ref).norm() / ref.norm())
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(spec)
    nm16_linear(x, v, mk, ov, oi, sc, sh, None, **kw)
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print(json.dumps({"case": spec, "rel_err": err}), flush=True)


def main() -> None:
    prepare_device(torch.device("cuda"))
    for spec in sys.argv[1:]:
        run_case(spec)


if __name__ == "__main__":
    main()
