"""Triton decode helpers shared by the fused kernels (triton_nm16.py) and the scratch unpack (scratch.py): kept-value
positions of a tile in the three position modes of layout.py, and the in-register 8:16 tile decode."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# positions dtype -> position mode constexpr (layout.POS_LUT16 / POS_NIBBLE32 / POS_BYTE).
_POS_MODE_OF_DTYPE = {torch.int16: 0, torch.int32: 1, torch.uint8: 2}


@triton.jit
def _positions(wm_ptr, lut_ptr, offs_n, offs_g, g_ok, G, NK: tl.constexpr, POS_MODE: tl.constexpr):
    """int32 [BN, BG, NK]: column inside its group of every kept value of the tile (rows offs_n, groups offs_g)."""
    offs_i = tl.arange(0, NK)
    if POS_MODE == 2:  # one uint8 per kept value
        ptrs = wm_ptr + offs_n[:, None, None] * (G * NK) + offs_g[None, :, None] * NK + offs_i[None, None, :]
        pos = tl.load(ptrs, mask=g_ok[None, :, None], other=0).to(tl.int32)
    else:  # 8:16: one int32 word of 8 nibbles per group
        ptrs = wm_ptr + offs_n[:, None] * G + offs_g[None, :]
        if POS_MODE == 0:  # int16 bitmask -> word via the two byte tables (layout.byte_position_lut)
            bits = tl.load(ptrs, mask=g_ok[None, :], other=0).to(tl.int32)
            word = tl.load(lut_ptr + (bits & 255)) | tl.load(lut_ptr + 256 + ((bits >> 8) & 255))
        else:
            word = tl.load(ptrs, mask=g_ok[None, :], other=0)
        pos = (word[:, :, None] >> (offs_i[None, None, :] * 4)) & 15
    return pos


@triton.jit
def _pick(ps, vs, J: tl.constexpr):
    """Dense column J of a group: the kept value whose position is J, else 0. Kept value i can only sit at
    columns i..i+8 (positions are increasing), so only those candidates are compared: 72 selects per group
    instead of 128."""
    d = tl.zeros_like(vs[0])
    for i in tl.static_range(8):
        if i <= J and J <= i + 8:
            d = tl.where(ps[i] == J, vs[i], d)
    return d


@triton.jit
def _decode_tile_816(word, v3, BN: tl.constexpr, BG: tl.constexpr):
    """8:16 tile decode entirely inside each thread's registers: values [BN, BG, 8] (one thread holds a group's 16
    contiguous bytes) and position words [BN, BG] -> dense [BN, BG*16]. tl.split/tl.join only re-label registers,
    so unlike a 4-D compare + tl.sum there are no shuffles or shared-memory round trips."""
    v5 = tl.reshape(v3, (BN, BG, 2, 2, 2))         # i = 4a + 2b + c
    e, o = tl.split(v5)                              # c = 0 / 1
    e0, e1 = tl.split(e)
    o0, o1 = tl.split(o)
    v0, v4 = tl.split(e0)
    v2, v6 = tl.split(e1)
    v1, v5_ = tl.split(o0)
    v3_, v7 = tl.split(o1)
    vs = (v0, v1, v2, v3_, v4, v5_, v6, v7)
    ps = ((word & 15), (word >> 4) & 15, (word >> 8) & 15, (word >> 12) & 15,
          (word >> 16) & 15, (word >> 20) & 15, (word >> 24) & 15, (word >> 28) & 15)
    # Join tree: level 1 pairs columns j / j+8, level 2 j / j+4, ... so the flattened last dims give j in order.
    a0 = tl.join(_pick(ps, vs, 0), _pick(ps, vs, 8))
    a1 = tl.join(_pick(ps, vs, 1), _pick(ps, vs, 9))
    a2 = tl.join(_pick(ps, vs, 2), _pick(ps, vs, 10))
    a3 = tl.join(_pick(ps, vs, 3), _pick(ps, vs, 11))
    a4 = tl.join(_pick(ps, vs, 4), _pick(ps, vs, 12))
    a5 = tl.join(_pick(ps, vs, 5), _pick(ps, vs, 13))
    a6 = tl.join(_pick(ps, vs, 6), _pick(ps, vs, 14))
    a7 = tl.join(_pick(ps, vs, 7), _pick(ps, vs, 15))
    b0 = tl.join(a0, a4)
    b1 = tl.join(a1, a5)
    b2 = tl.join(a2, a6)
    b3 = tl.join(a3, a7)
    c0 = tl.join(b0, b2)
    c1 = tl.join(b1, b3)
    d = tl.join(c0, c1)                              # [BN, BG, 2, 2, 2, 2]
    return tl.reshape(d, (BN, BG * 16))


@triton.jit
def _group_words(wm_ptr, lut_ptr, offs_n, offs_g, g_ok, G, POS_MODE: tl.constexpr):
    """int32 [BN, BG] nibble words of 8:16 groups (POS_LUT16 or POS_NIBBLE32)."""
    ptrs = wm_ptr + offs_n[:, None] * G + offs_g[None, :]
    if POS_MODE == 0:
        bits = tl.load(ptrs, mask=g_ok[None, :], other=0).to(tl.int32)
        word = tl.load(lut_ptr + (bits & 255)) | tl.load(lut_ptr + 256 + ((bits >> 8) & 255))
    else:
        word = tl.load(ptrs, mask=g_ok[None, :], other=0)
    return word
