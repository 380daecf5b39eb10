"""8:16 straight into mma fragments: the index math of the Gluon kernel and the stream decode it runs (torch/numpy).

The kernel computes ``y^T = W x^T`` with ``mma.m16n8k16``: W is the A operand (16 output rows x 16 K columns per
instruction), x^T the B operand (16 K columns x 8 tokens). Lane ``(g, t)`` of a warp (``g = lane // 4``,
``t = lane % 4``) holds, for each k16 step, the A registers of rows ``g`` and ``g + 8`` at K columns ``2t, 2t+1,
2t+8, 2t+9``. The kernel permutes K inside every 64-column tile -- in registers, identically for W and x, so memory
keeps the on-disk order -- so that lane ``(g, t)`` owns *all 16 columns of one 8:16 group*::

    permuted index p = 32*s1 + 16*s0 + 8*h + 2*t + e   <->   column 2*j + e of the lane's group,  j = 4*s1 + 2*s0 + h

(``s = 2*s1 + s0`` the k16 step, ``h`` the A-register half, ``e`` the element of a bf16 pair). A K step is 128
columns = 8 groups = two tiles; lane t owns groups ``2t`` (tile 0) and ``2t + 1`` (tile 1) of the step, for rows g and
g + 8, and the same 32 columns of its token rows of x. So from the on-disk tensors (``weight_values`` [N, K/2],
``weight_mask`` int16 [N, K/16]) a lane loads per row one contiguous 32-byte run of values (2 x 16 B), one int32 of
masks (groups 2t and 2t+1: low and high half) and 64 contiguous bytes of each token row of x. No repack: the same
tensors serve the Triton kernels (gemv, scratch) at the M where those run.

Each lane decodes the groups it owns -- 4 int32 of kept values + 16 mask bits -> 8 int32 words, word ``j`` = columns
``2j, 2j+1`` of the group -- and every decoded word IS an A register: no shared-memory round trip, no shuffles.
The decode is a short PTX program (:func:`decode_program`), emitted as inline assembly by :func:`decode_asm` and
executed bit-exactly on the CPU by :func:`run_program`; :func:`unpack_like_kernel` rebuilds the dense weight with the
kernel's own load offsets and that program, which CI compares with ``format.unpack`` (Gluon kernels do not run under
``TRITON_INTERPRET``).

The stream decode of one group: keep a 128-bit window ``s0..s3`` on the not yet consumed kept values; for word j take
the 2-bit code ``b`` of columns ``2j, 2j+1`` from the mask, build the output with one ``prmt`` from the window's first
16-bit value and zero (selector from a 4-entry table, itself a ``prmt``), then advance the window by ``popc(b)``
values with funnel shifts.
"""

from __future__ import annotations

import numpy as np
import torch

STEP_COLS = 128           # K columns per kernel step: two 64-column tiles (8 groups; a lane owns 2 of them)

# Selector table for the output word of a 2-bit code b (bit 0: column 2j kept, bit 1: column 2j+1 kept): bytes of
# (window, zero) -> b=0: 0x4444 (zero), 1: 0x4410 (value, 0), 2: 0x1044 (0, value), 3: 0x3210 (two values).
# prmt(_SEL_LO, _SEL_HI, 0x22*b + 0x10) picks bytes 2b, 2b+1 of that table: the 16-bit selector.
_SEL_LO, _SEL_HI = 0x44104444, 0x32101044
# prmt(_SHIFT, 0, b) = 16 * popc(b): how far the window advances.
_SHIFT = 0x20101000


def decode_program(mask_bit0: int = 0) -> list[tuple]:
    """The decode of one group as (op, dst, *operands) tuples. Inputs: ``s0..s3`` (the 4 value words), ``m`` (the mask
    word; this group's 16 bits start at ``mask_bit0``). Outputs: ``o0..o7``."""
    prog: list[tuple] = []
    for j in range(8):
        prog += [("bfe", "b", "m", mask_bit0 + 2 * j, 2),
                 ("mad", "t", "b", 0x22, 0x10),
                 ("prmt", "sel", "cl", "ch", "t"),
                 ("prmt", f"o{j}", "s0", "z", "sel")]
        if j == 7:
            break
        prog.append(("prmt", "sh", "kk", "z", "b"))
        # Words j+1..7 read at most 7-j more registers of the window: only those advance (each pulls from the next).
        for i in range(min(4, 7 - j)):
            prog.append(("shf", f"s{i}", f"s{i}", f"s{i + 1}", "sh") if i < 3 else ("shr", "s3", "s3", "sh"))
    return prog


_CONSTS = {"z": 0, "cl": _SEL_LO, "ch": _SEL_HI, "kk": _SHIFT}


# The table words the kernel passes in as registers (``$13``, ``$14``): PTX constants in the asm were rematerialised by
# ptxas before every use (one extra move per prmt); values loaded once from memory stay in two registers.
ASM_TABLE_WORDS = (_SEL_LO, _SHIFT)


def decode_asm(mask_bit0: int = 0) -> str:
    """PTX for ``inline_asm_elementwise``: ``$0..$7`` the output words, ``$8..$11`` the value words, ``$12`` the mask,
    ``$13, $14`` the table words :data:`ASM_TABLE_WORDS`."""
    regs = {f"o{j}": f"${j}" for j in range(8)}
    lines = ["{", ".reg .b32 s0, s1, s2, s3, m, b, t, sel, sh, z, cl, ch, kk;",
             "mov.b32 s0, $8; mov.b32 s1, $9; mov.b32 s2, $10; mov.b32 s3, $11; mov.b32 m, $12;",
             "mov.b32 cl, $13; mov.b32 kk, $14;"]
    lines += [f"mov.b32 {name}, {val:#x};" for name, val in _CONSTS.items() if name in ("z", "ch")]
    r = lambda v: regs.get(v, v) if isinstance(v, str) else str(v)  # noqa: E731
    for op, dst, *a in decode_program(mask_bit0):
        if op == "bfe":
            lines.append(f"bfe.u32 {r(dst)}, {r(a[0])}, {a[1]}, {a[2]};")
        elif op == "mad":
            lines.append(f"mad.lo.u32 {r(dst)}, {r(a[0])}, {a[1]:#x}, {a[2]:#x};")
        elif op == "prmt":
            lines.append(f"prmt.b32 {r(dst)}, {r(a[0])}, {r(a[1])}, {r(a[2])};")
        elif op == "shf":
            lines.append(f"shf.r.clamp.b32 {r(dst)}, {r(a[0])}, {r(a[1])}, {r(a[2])};")
        elif op == "shr":
            lines.append(f"shr.b32 {r(dst)}, {r(a[0])}, {r(a[1])};")
        else:  # pragma: no cover - the program only holds the ops above
            raise AssertionError(op)
    lines.append("}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- bit-exact CPU execution
def _prmt(a, b, c):
    """PTX prmt.b32 (default mode) on uint64 arrays holding 32-bit values."""
    U = np.uint64
    src = (b << U(32)) | a
    out = np.zeros_like(a)
    for i in range(4):
        nib = (c >> U(4 * i)) & U(0xF)
        byte = (src >> ((nib & U(7)) * U(8))) & U(0xFF)
        byte = np.where(nib & U(8), np.where(byte & U(0x80), U(0xFF), U(0)), byte).astype(np.uint64)
        out |= byte << U(8 * i)
    return out


def run_program(prog: list[tuple], s: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Execute a decode program: ``s`` uint32 [..., 4] value words, ``m`` uint32 [...] mask words -> uint32 [..., 8]."""
    u = lambda v: np.asarray(v, dtype=np.uint64)  # noqa: E731
    regs = {f"s{i}": u(s[..., i]) for i in range(4)}
    regs["m"] = u(m)
    regs.update({k: u(np.full(m.shape, v)) for k, v in _CONSTS.items()})
    val = lambda v: regs[v] if isinstance(v, str) else u(v)  # noqa: E731
    mask32 = np.uint64(0xFFFFFFFF)
    for op, dst, *a in prog:
        if op == "bfe":
            res = (val(a[0]) >> np.uint64(a[1])) & np.uint64((1 << a[2]) - 1)
        elif op == "mad":
            res = (val(a[0]) * np.uint64(a[1]) + np.uint64(a[2])) & mask32
        elif op == "prmt":
            res = _prmt(val(a[0]), val(a[1]), val(a[2]))
        elif op == "shf":  # shf.r.clamp: (hi:lo) >> min(sh, 32)
            sh = np.minimum(val(a[2]), np.uint64(32))
            res = (((val(a[1]) << np.uint64(32)) | val(a[0])) >> sh) & mask32
        elif op == "shr":  # shift amounts >= 32 give 0
            sh = val(a[1])
            res = np.where(sh >= 32, np.uint64(0), val(a[0]) >> np.minimum(sh, np.uint64(31))).astype(np.uint64)
        else:  # pragma: no cover
            raise AssertionError(op)
        regs[dst] = res
    return np.stack([regs[f"o{j}"] for j in range(8)], axis=-1).astype(np.uint32)


# --------------------------------------------------------------------------------------- the kernel's index math
def permute_x(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K a multiple of 128) with K permuted inside every 128-column step into the fragment order:
    position ``64*b + 32*s1 + 16*s0 + 8*h + 2*t + e`` holds column ``16*(2t + b) + 2*(4*s1 + 2*s0 + h) + e`` (lane t's
    group 2t + b, word j = 4 s1 + 2 s0 + h). The Gluon kernels permute x in registers; the wgmma kernel's TMA path
    loads this copy instead (TMA moves >= 16-byte runs, the permutation 4-byte ones). One copy kernel."""
    M, K = x.shape
    if K % STEP_COLS:
        raise ValueError(f"permute_x: K={K} is not a multiple of {STEP_COLS}")
    # column = 32 t + 16 b + 8 s1 + 4 s0 + 2 h + e  ->  [M, step, t, b, s1, s0, h, e] -> [M, step, b, s1, s0, h, t, e]
    return x.reshape(M, K // STEP_COLS, 4, 2, 2, 2, 2, 2).permute(0, 1, 3, 4, 5, 6, 2, 7).reshape(M, K)


def unpack_like_kernel(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense [N, K] from on-disk 8:16 tensors, read with the Gluon kernel's offsets (per row, K step s and lane
    group slot t, tile b: values at int32 ``row*K/4 + s*32 + (2t+b)*4 + q``, the mask word at ``row*K/32 + s*4 + t``,
    this tile's bits at ``16*b``) and decoded by :func:`run_program`; decoded word j of that group lands at column
    ``s*128 + (2t+b)*16 + 2j (+1)``. K must be a multiple of 32 (the kernel's condition); a last partial step is
    what the kernel masks."""
    n_rows, groups = mask.shape
    K = groups * 16
    if K % 32:
        raise ValueError(f"in_features={K} is not a multiple of 32")
    v = values.contiguous().view(torch.int32).cpu().numpy().view(np.uint32).reshape(-1)
    mw = mask.contiguous().view(torch.int32).cpu().numpy().view(np.uint32).reshape(-1)
    steps = -(-K // STEP_COLS)
    row, s, t, b, q = np.ix_(np.arange(n_rows), np.arange(steps), np.arange(4), np.arange(2), np.arange(4))
    col0 = s * STEP_COLS + (2 * t + b) * 16                                  # first column of the lane's group
    ok = (col0 < K)[..., 0]                                                  # [rows, steps, 4, 2]
    v_off = row * (K // 4) + s * 32 + (2 * t + b) * 4 + q
    m_off = (row * (K // 32) + s * 4 + t)[..., 0]
    vals = np.where(ok[..., None], v[np.minimum(v_off, v.size - 1)], 0)
    mwords = np.where(ok, mw[np.minimum(m_off, mw.size - 1)] >> (16 * b[..., 0]).astype(np.uint32), 0)
    words = run_program(decode_program(0), vals.astype(np.uint32), mwords.astype(np.uint32))  # [.., 8]
    dense16 = words.view(np.uint16).reshape(n_rows, steps, 4, 2, 16)       # [row, s, t, b, column in group]
    dense16 = dense16.transpose(0, 1, 2, 3, 4).reshape(n_rows, steps * STEP_COLS)
    # (t, b) -> group 2t + b: the reshape above already orders groups as 2t + b inside each step
    return torch.from_numpy(dense16[:, :K].astype(np.int16)).view(values.dtype)
