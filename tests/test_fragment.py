"""CPU model of the Gluon 8:16 kernel (vllm_nm16/kernels/fragment.py): its decode program, run bit-exactly, and its
load offsets rebuild exactly the dense weight of format.unpack. The kernel itself runs on the GPU host only
(benchmarks/results/raw/h200/gluon_check_h200.log, pytest_gpu_h200.log)."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch

from vllm_nm16 import format as fmt
from vllm_nm16.kernels import fragment as fr


def test_decode_program_on_every_8_of_16_mask():
    masks = np.array([sum(1 << c for c in cols) for cols in combinations(range(16), 8)], dtype=np.uint32)
    assert masks.size == 12870
    vals = np.arange(1, 9, dtype=np.uint32)                       # kept values 1..8 as 16-bit words
    words = np.broadcast_to((vals[0::2] | (vals[1::2] << 16)), (masks.size, 4)).copy()
    for bit0, mword in ((0, masks), (16, masks << 16 | 0xABCD)):   # the high half of a mask word, garbage below
        out = fr.run_program(fr.decode_program(bit0), words, mword).view(np.uint16).reshape(masks.size, 16)
        expect = np.zeros((masks.size, 16), dtype=np.uint16)
        for i, mk in enumerate(masks):
            cols = [c for c in range(16) if mk >> c & 1]
            expect[i, cols] = np.arange(1, 9)
        np.testing.assert_array_equal(out, expect)


def test_asm_is_the_program():
    asm = fr.decode_asm(0)
    prog = fr.decode_program(0)
    assert asm.count("prmt.b32") == sum(op == "prmt" for op, *_ in prog) == 8 * 2 + 7
    assert asm.count("shf.r.clamp.b32") == sum(op == "shf" for op, *_ in prog)


@pytest.mark.parametrize("n_rows,k,dtype", [(32, 128, torch.bfloat16), (48, 576, torch.bfloat16),
                                            (16, 96, torch.float16), (64, 1024, torch.bfloat16),
                                            (16, 160, torch.float16)])
def test_kernel_offsets_rebuild_format_unpack(n_rows, k, dtype):
    g = torch.Generator().manual_seed(n_rows * 7 + k)
    w = torch.randn(n_rows, k, generator=g).to(dtype)
    keep = fmt.nm_keep_topk(torch.rand(n_rows, k, generator=g), 8, 16)
    spec = fmt.NM16Spec(n=8, m=16)
    t = fmt.pack(w * keep, keep, spec)
    dense = fmt.unpack(t, spec).weight_nm.to(dtype)
    assert torch.equal(fr.unpack_like_kernel(t[fmt.VALUES], t[fmt.MASK]), dense)


def test_wrong_table_word_is_caught(monkeypatch):
    monkeypatch.setitem(fr._CONSTS, "kk", 0x20201000)  # popc(3) -> 32 but popc(2) -> 32 too: a wrong shift table
    masks = np.array([0b1010101010101010], dtype=np.uint32)
    words = np.array([[1 | 2 << 16, 3 | 4 << 16, 5 | 6 << 16, 7 | 8 << 16]], dtype=np.uint32)
    out = fr.run_program(fr.decode_program(0), words, masks).view(np.uint16).reshape(16)
    assert not np.array_equal(out[1::2], np.arange(1, 9))


def test_outlier_stage_covers_every_token():
    """The outlier stage's token count (pick_config's ``ot``): a power of two holding every token < M of the CTA's
    block, at most BM, and all of BM once M fills it; the kernel's launch shapes stay powers of two."""
    from vllm_nm16.kernels.gluon_nm16 import outlier_tokens, pick_config

    for M in range(1, 80):
        for N, K in ((4096, 4096), (28672, 4096), (4096, 14336), (96, 1536)):
            c = pick_config(M, N, K)
            BM, OT = c["BM"], c["ot"]
            assert OT & (OT - 1) == 0 and 1 <= OT <= BM, (M, c)
            assert (M <= OT) if M < BM else OT == BM, (M, c)
            assert (c["WK"] * c["WN"]) & (c["WK"] * c["WN"] - 1) == 0, (M, N, K, c)
    assert [outlier_tokens(M, 8) for M in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 8]


def test_load_masks_rule():
    """EVEN_X (no row masks on x) only where M fills the token blocks or with xc; never with a K tail."""
    from vllm_nm16.kernels.gluon_nm16 import load_masks, pick_config

    for M, xc, K, want in ((8, False, 4096, (True, True, False)), (1, False, 4096, (True, False, False)),
                           (1, True, 4096, (True, True, True)), (16, True, 4096, (True, True, False)),
                           (3, True, 1568, (False, False, True))):
        c = dict(pick_config(M, 4096, K), xc=xc)
        assert load_masks(M, K, c) == want, (M, xc, K, c)


def test_permute_x_is_the_fragment_order():
    """The x copy the wgmma kernel's TMA path loads: position 64 b + 32 s1 + 16 s0 + 8 h + 2 t + e of each 128-column
    step holds column 16 (2t + b) + 2 (4 s1 + 2 s0 + h) + e (lane t's group 2t + b, decoded word j, element e), the
    order the module docstring gives and unpack_like_kernel decodes W into."""
    x = torch.randn(3, 384)
    xp = fr.permute_x(x)
    for step in range(3):
        for b, s1, s0, h, t, e in np.ndindex(2, 2, 2, 2, 4, 2):
            p = step * 128 + 64 * b + 32 * s1 + 16 * s0 + 8 * h + 2 * t + e
            col = step * 128 + 16 * (2 * t + b) + 2 * (4 * s1 + 2 * s0 + h) + e
            assert torch.equal(xp[:, p], x[:, col]), (p, col)
    with pytest.raises(ValueError, match="multiple of 128"):
        fr.permute_x(torch.randn(2, 96))


def test_xc_default_only_where_measured():
    """xc (no row masks on x) by default only at BM = 8 on layers with outliers (H200: 0.75-1.11x the masked loop's
    time, geomean 0.91; bare layers were mixed and keep the masks); never at BM = 16 (not timed)."""
    from vllm_nm16.kernels.gluon_nm16 import load_masks, pick_config

    for M in range(1, 8):
        assert pick_config(M, 4096, 4096)["xc"] and load_masks(M, 4096, pick_config(M, 4096, 4096))[1:] == (True, True)
        assert not pick_config(M, 4096, 4096, has_outliers=False)["xc"]
    assert not any(pick_config(M, 4096, 4096)["xc"] for M in range(9, 33))


def test_wgmma_launch_shape_rules():
    """The wgmma kernel's TMA ring needs whole K steps; SPLIT fills whole waves (never more than steps // 8, at least
    1) and the ring fits the shared memory of two CTAs per SM."""
    from vllm_nm16.kernels import gluon_wgmma as w

    assert not w.pick_config(64, 4096, 4064)["tma"] and w.pick_config(64, 4096, 4096)["tma"]
    assert not w.pick_config(32, 4096, 4096)["tma"] and w.pick_config(32, 28672, 4096)["tma"]
    assert w.pick_config(64, 4096, 4096, tma=False)["stages"] == 0
    # 96 tiles on 264 slots, 32 steps: SPLIT 2 = one wave of 16 steps (3: two waves, the second 24 CTAs alone)
    assert w.wave_split(96, 32, 264) == 2
    # 448 tiles: already 1.7 waves unsplit; splitting only adds waves and ring fills
    assert w.wave_split(448, 32, 264) == 1
    for tiles in (16, 64, 96, 448, 896):
        for steps in (4, 32, 112, 224):
            assert 1 <= w.wave_split(tiles, steps, 264) <= max(1, steps // 8)
    for NW, BM in ((4, 32), (4, 64), (4, 128), (8, 64)):
        assert 2 <= w.tma_stages(NW, BM) <= 4 and 2 * w.tma_stages(NW, BM) * w._stage_bytes(NW, BM) <= w._SMEM_PER_SM
