"""Triton kernels for the memory-bound ops and the INT8 matmul, forward and backward.

The kernels are plain functions turned into launchers by :class:`Kernel`: on a
CUDA tensor they compile with Triton's JIT, on a CPU tensor they run in Triton's
interpreter (slow, for tests). Building the interpreted form per call, instead of
at import, means ``TRITON_INTERPRET`` need not be set before this module loads.

They use plain pointer arithmetic, except the MLP matmuls at the end, which load
through host-side tensor descriptors; the same source runs on triton 3.6 (GPU
machine) and 3.9 (CPU interpreter, which takes descriptors too). The decode kernels
take a ``PDL`` flag for programmatic dependent launch (see below).
Every reduction accumulates in float32. The wrappers that own shapes, strides and
autograd live in :mod:`ghostvis.ops.fused` and :mod:`ghostvis.ops.linear_ce`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
import triton.language.core as tl_core  # noqa: F401  (visible to the interpreter, which patches it too)
from triton.runtime.interpreter import InterpretedFunction


class _Interpreted:
    """Runs a kernel in Triton's interpreter, whenever triton was imported.

    With ``TRITON_INTERPRET`` unset at import, triton.language's own helpers
    (``tl.sum``, ``tl.sigmoid``...) are compiled-only objects that refuse to be
    called; for the length of one launch they are made to run their Python body.
    """

    def __init__(self, fn):
        self.fn = InterpretedFunction(fn)

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            jit_cls = triton.runtime.jit.JITFunction
            saved = jit_cls.__call__
            jit_cls.__call__ = lambda self, *a, **k: self.fn(*a, **k)
            try:
                return launch(*args, **kwargs)
            finally:
                jit_cls.__call__ = saved

        return run


class Kernel:
    """A Triton kernel that compiles for CUDA tensors and interprets for CPU tensors."""

    def __init__(self, fn):
        self.fn = fn
        self._jit = None
        self._interpreted = None

    def on(self, t: torch.Tensor):
        """The launcher for tensors living where ``t`` lives: ``KERNEL.on(x)[grid](...)``."""
        if t.is_cuda:
            if self._jit is None:
                self._jit = triton.runtime.jit.JITFunction(self.fn)
            return self._jit
        if self._interpreted is None:
            self._interpreted = _Interpreted(self.fn)
        return self._interpreted


def kernel(fn) -> Kernel:
    return Kernel(fn)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs_for(t: torch.Tensor, per_sm: Optional[int] = None) -> int:
    """How many programs fill the device holding ``t``: ``per_sm`` (default 8) per SM, or a handful
    when interpreting."""
    if per_sm is not None and per_sm < 1:
        raise ValueError(f"per_sm must be at least 1, got {per_sm}")
    if not t.is_cuda:
        return 4
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * (8 if per_sm is None else per_sm)


# ----------------------------------------------------------------------------- programmatic dependent launch
# Inside a captured decode step, the kernels below are launched with PDL: each one lets the
# next start as soon as it is running (gdc_launch_dependents) and waits for the one before
# to finish and flush (gdc_wait) before it reads that one's output or writes anything. A
# one-row GEMV loads its weight strip before the wait, so the weights stream in while the
# kernel before it still runs. Only weights (constant within a decode step) are read before
# the wait, which is why PDL is scoped to the decode step (:func:`programmatic_launch`).

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except ImportError:  # a triton without the intrinsics: never launched with PDL
    HAS_PDL = False

    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass


_PDL_ON = [False]


@contextlib.contextmanager
def programmatic_launch(on: bool = True) -> Iterator[None]:
    """Launch the decode kernels with programmatic dependent launch inside this block (Hopper and later).

    For code in which no kernel writes a weight (a decode step): a one-row GEMV reads its
    weight before waiting for the kernel before it.
    """
    saved, _PDL_ON[0] = _PDL_ON[0], on
    try:
        yield
    finally:
        _PDL_ON[0] = saved


@functools.lru_cache(maxsize=None)
def _sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl(t: torch.Tensor) -> dict:
    """Launch arguments for a decode kernel on ``t``'s device: ``{"PDL": True, "launch_pdl": True}``
    (the kernel's flag and the launch option) inside :func:`programmatic_launch` on a Hopper or
    later GPU, else none (the kernels' ``PDL`` defaults to False)."""
    if not (_PDL_ON[0] and t.is_cuda):
        return {}
    if not HAS_PDL:
        from .dispatch import log_once

        log_once("pdl-unavailable", "this triton has no programmatic dependent launch; decode kernels launch "
                 "without it")
        return {}
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if not _sm90(index):
        from .dispatch import log_once

        log_once("pdl-unavailable", "programmatic dependent launch needs a Hopper or later GPU; "
                 "decode kernels launch without it")
        return {}
    return {"PDL": True, "launch_pdl": True}


def dot_mode(t: torch.Tensor) -> tuple[bool, str]:
    """``(UPCAST, PRECISION)`` for a kernel's ``tl.dot`` on ``t``: the interpreter's half-precision
    dot is not exact enough (upcast to float32 there), and float32 inputs want an exact dot, not tf32."""
    upcast = not t.is_cuda
    return upcast, "ieee" if (upcast or t.dtype == torch.float32) else "tf32"


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    # let the next kernel launch, then wait for the previous one's writes
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


# ----------------------------------------------------------------------------- rms_norm


@kernel
def rms_norm_fwd(X, R, W, S, Y, RSTD, stride_x, stride_r, stride_s, stride_y, N, D, eps,
                 HAS_R: tl.constexpr, HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                 PDL: tl.constexpr = False):
    # With HAS_R the residual add before the norm is fused in: S = X + R (rounded to S's
    # dtype, as an unfused add would store it) is written and normalised.
    _pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < D)
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_R:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows64[:, None] * stride_s + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        y = y * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@kernel
def rms_norm_bwd(X, W, DY, DS, RSTD, DX, DW_PARTIAL, stride_x, stride_dy, stride_ds, stride_dx, N, D,
                 rows_per_program, HAS_W: tl.constexpr, HAS_DS: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    # Each program walks a contiguous range of rows and keeps its share of dW in
    # registers; the partial sums are added up by the caller (one small [P, D] sum).
    # With HAS_DS the gradient DS reaching the norm's input by other paths (the residual
    # stream of a fused add + norm) is added to DX.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = pid * rows_per_program
    for start in range(first, first + rows_per_program, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        if HAS_W:
            wdy = dy * w[None, :]
            dw += tl.sum(dy * x_hat, axis=0)
        else:
            wdy = dy
        c = tl.sum(x_hat * wdy, axis=1) / D
        dx = (wdy - x_hat * c[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * D + cols, dw, mask=col_ok)


# ----------------------------------------------------------------------------- swiglu
# Tensors are seen as [rows, cols] with a row stride each and unit column stride;
# a contiguous tensor is one long row, so the common case is a flat streaming loop.


@kernel
def swiglu_fwd(G, U, Y, n_cols, stride_g, stride_u, stride_y, blocks_per_row, BLOCK: tl.constexpr,
               PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@kernel
def swiglu_bwd(G, U, DY, DG, DU, n_cols, stride_g, stride_u, stride_dy, stride_out, blocks_per_row,
               BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(DG + row * stride_out + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_out + cols, du.to(DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- rope


@triton.jit
def _rotate_heads(SRC, DST, n_heads, s_src, s_dst, c1, c2, s1, s2, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr, ROTATE: tl.constexpr):
    # heads [BLOCK_H, 2 * HALF] at SRC (head stride s_src) to DST, rotated by the angles
    # whose cos/sin halves are c1, c2, s1, s2 (or copied when not ROTATE). The backward
    # pass is the transposed rotation (rotation by minus the angle).
    h = tl.arange(0, BLOCK_H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = (h[:, None] < n_heads) & (d < HALF)[None, :]
    src = SRC + h[:, None] * s_src + d[None, :]
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    if ROTATE:
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
    else:
        o1 = x1
        o2 = x2
    dst = DST + h[:, None] * s_dst + d[None, :]
    tl.store(dst, o1.to(DST.dtype.element_ty), mask=m)
    tl.store(dst + HALF, o2.to(DST.dtype.element_ty), mask=m)


@kernel
def rope_qk(Q, K, V, COS, SIN, QO, KO, VO, SLOT, T, S, HQ, HK,
            sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
            sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t, svo_b, svo_h, svo_t, sc_b, sc_t,
            HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
            BACKWARD: tl.constexpr, WITH_V: tl.constexpr, TO_CACHE: tl.constexpr, PDL: tl.constexpr = False):
    # One program per (batch, position): it rotates every q head and every k head
    # there, so cos/sin are read once per position. WITH_V copies v to VO as well (one
    # kernel lays out all three of q, k, v); with TO_CACHE, k (rotated) and v go to
    # column SLOT[t] of the cache buffers KO / VO (S columns) instead of to t; a slot outside
    # [0, S) is not written (no store lands outside the buffers).
    _pdl_enter(PDL)
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    cs = b * sc_b + t * sc_t
    c1 = tl.load(COS + cs + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + cs + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + cs + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + cs + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q + b * sq_b + t * sq_t, QO + b * sqo_b + t * sqo_t, HQ, sq_h, sqo_h, c1, c2, s1, s2,
                  HALF, BLOCK_D, BLOCK_HQ, BACKWARD, True)
    out_t = t
    heads_out = HK
    if TO_CACHE:
        out_t = tl.load(SLOT + t).to(tl.int64)
        heads_out = tl.where((out_t >= 0) & (out_t < S), HK, 0)
        out_t = tl.where((out_t >= 0) & (out_t < S), out_t, 0)
    if WITH_V:
        _rotate_heads(V + b * sv_b + t * sv_t, VO + b * svo_b + out_t * svo_t, heads_out, sv_h, svo_h,
                      c1, c2, s1, s2, HALF, BLOCK_D, BLOCK_HK, BACKWARD, False)
    _rotate_heads(K + b * sk_b + t * sk_t, KO + b * sko_b + out_t * sko_t, heads_out, sk_h, sko_h, c1, c2, s1, s2,
                  HALF, BLOCK_D, BLOCK_HK, BACKWARD, True)


# ----------------------------------------------------------------------------- decode attention
# One query per row against a KV cache, split along the cache (split-KV / flash-decoding):
# programs (row, kv head, split) each reduce a span of slots for all the query heads of
# their kv head, keeping a running max and sum; a second kernel merges the splits.


@kernel
def decode_attention_split(Q, K, V, MASK, O_PART, M_PART, L_PART, S, HK, G, split_len, n_splits, scale,
                           sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_s,
                           D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr = False):
    # The query heads of one kv head are the rows of a tensor-core tile (padded to BLOCK_G >= 16),
    # so both products are tl.dot. UPCAST (the interpreter) multiplies in float32.
    _pdl_enter(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // HK).to(tl.int64)
    hk = (pid % HK).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    heads = hk * G + g
    d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=g_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_G,), -1e30, tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    first = split * split_len
    for s0 in range(first, first + split_len, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s64 = s.to(tl.int64)
        keep = tl.load(MASK + b * sm_b + s64 * sm_s, mask=s < S, other=0) != 0
        kt = tl.load(K + b * sk_b + hk * sk_h + s64[None, :] * sk_s + d[:, None], mask=keep[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        scores = tl.dot(q, kt, input_precision=PRECISION) * scale
        scores = tl.where(keep[None, :], scores, -1e30)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.where(keep[None, :], tl.exp(scores - m_new[:, None]), 0.0)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(V + b * sv_b + hk * sv_h + s64[:, None] * sv_s + d[None, :], mask=keep[:, None], other=0.0)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    part = ((b * HK * G + heads) * n_splits + split).to(tl.int64)
    tl.store(O_PART + part[:, None] * D + d[None, :], acc, mask=g_ok[:, None])
    tl.store(M_PART + part, m_i, mask=g_ok)
    tl.store(L_PART + part, l_i, mask=g_ok)


@kernel
def decode_attention_merge(O_PART, M_PART, L_PART, OUT, HQ, n_splits, so_b, so_h,
                           D: tl.constexpr, BLOCK_SPLITS: tl.constexpr, PDL: tl.constexpr = False):
    # one program per (row, query head): rescale each split to the common max and add up;
    # a query with no allowed key (every split's sum is 0) gets zeros
    _pdl_enter(PDL)
    pid = tl.program_id(0)
    b = (pid // HQ).to(tl.int64)
    h = (pid % HQ).to(tl.int64)
    sp = tl.arange(0, BLOCK_SPLITS)
    ok = sp < n_splits
    base = pid.to(tl.int64) * n_splits
    m = tl.load(M_PART + base + sp, mask=ok, other=-1e30)
    l_part = tl.load(L_PART + base + sp, mask=ok, other=0.0)
    w = tl.where(ok, tl.exp(m - tl.max(m, axis=0)), 0.0)
    total = tl.sum(l_part * w, axis=0)
    d = tl.arange(0, D)
    o = tl.load(O_PART + (base + sp)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.maximum(total, 1e-30)
    out = tl.where(total > 0, out, 0.0)
    tl.store(OUT + b * so_b + h * so_h + d, out.to(OUT.dtype.element_ty))


# ----------------------------------------------------------------------------- cross-entropy rows


@kernel
def cross_entropy_rows(LOGITS, stride_l, TARGETS, LOSS, LSE, SCALE, scale_stride, V, ignore_index,
                       WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    # One program per token row of a logits chunk: an online log-sum-exp pass, then
    # (for training) a second pass that overwrites the logits in place with
    # d loss / d logits = (softmax - onehot) * scale, so the chunk buffer is reused.
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    target = tl.load(TARGETS + row).to(tl.int64)
    ignored = target == ignore_index
    safe_target = tl.where(ignored, 0, target)
    offs = tl.arange(0, BLOCK)
    m_vec = tl.full((BLOCK,), float("-inf"), tl.float32)
    s_vec = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        # lanes that have seen only -inf subtract 0 instead, keeping their sum 0 (not NaN)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_vec = s_vec * tl.exp(m_vec - shift) + tl.exp(x - shift)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    s = tl.sum(s_vec * tl.exp(m_vec - m), axis=0)
    lse = m + tl.log(s)
    x_target = tl.load(base + safe_target).to(tl.float32)
    loss = tl.where(ignored, 0.0, lse - x_target)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)
    if WRITE_GRAD:
        scale = tl.load(SCALE + row * scale_stride).to(tl.float32)
        scale = tl.where(ignored, 0.0, scale)
        for start in range(0, V, BLOCK):
            cols = start + offs
            ok = cols < V
            x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            grad = (p - tl.where(cols == safe_target, 1.0, 0.0)) * scale
            tl.store(base + cols, grad.to(LOGITS.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- int8 matmul


@kernel
def int8_matmul(X, W, SCALE, BIAS, Y, M, N, K, sx_m, sx_k, sw_n, sw_k, sy_m, sy_n,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y = (x @ w_int8.T) * scale + bias; the INT8 tile is widened in registers, so
    # the weight crosses memory at one byte per element (what decode is bound by).
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * sx_m + kk[None, :] * sx_k, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(W + rn[None, :] * sw_n + kk[:, None] * sw_k, mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    scale = tl.load(SCALE + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = acc * scale[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * sy_m + rn[None, :] * sy_n, y.to(Y.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@kernel
def gemv(X, W, SCALE, BIAS, Y, N, K, sx_k, sw_n, sw_k,
         HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         PDL: tl.constexpr = False):
    # y = x @ w.T for one row of x (batch-1 decode): no tensor-core tile to fill, so each
    # program reads a narrow strip of the weight (bf16, or INT8 times a per-row SCALE) and
    # reduces it in fp32; many programs keep the loads in flight. With BLOCK_K >= K a
    # program holds its whole strip, loaded before it waits for the kernel before it (PDL).
    pid = tl.program_id(0)
    rn = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    if PDL:
        gdc_launch_dependents()
    if HAS_SCALE:
        scale = tl.load(SCALE + rn, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)
    if BLOCK_K >= K:
        w = tl.load(W + rn[:, None] * sw_n + rk[None, :] * sw_k, mask=n_ok[:, None] & (rk[None, :] < K), other=0)
        if PDL:
            gdc_wait()
        x = tl.load(X + rk * sx_k, mask=rk < K, other=0.0).to(tl.float32)
        acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    else:
        if PDL:
            gdc_wait()
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(X + kk * sx_k, mask=kk < K, other=0.0).to(tl.float32)
            w = tl.load(W + rn[:, None] * sw_n + kk[None, :] * sw_k, mask=n_ok[:, None] & (kk[None, :] < K), other=0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    y = acc
    if HAS_SCALE:
        y = y * scale
    if HAS_BIAS:
        y += bias
    tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=n_ok)


@triton.jit
def _add_norm_row(X, R, S, K, eps, rk, k_ok, nw, HAS_R: tl.constexpr, HAS_NW: tl.constexpr,
                  OUT_TY: tl.constexpr):
    # s = x + r (rounded to s's dtype, as the add + norm kernel stores it; program 0 writes it)
    # and rms_norm(s) * nw rounded to OUT_TY (as the norm stores it), returned in float32
    x = tl.load(X + rk, mask=k_ok, other=0.0)
    if HAS_R:
        r = tl.load(R + rk, mask=k_ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
    if tl.program_id(0) == 0:
        tl.store(S + rk, x.to(S.dtype.element_ty), mask=k_ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / K + eps)
    h = xf * rstd
    if HAS_NW:
        h = h * nw
    return h.to(OUT_TY).to(tl.float32)


@triton.jit
def _norm_weight(NW, rk, k_ok, HAS_NW: tl.constexpr):
    if HAS_NW:
        nw = tl.load(NW + rk, mask=k_ok, other=0.0).to(tl.float32)
    else:
        nw = tl.full(rk.shape, 1.0, tl.float32)
    return nw


@triton.jit
def _strip_dot(W, rows, row_ok, h, SCALE, BIAS, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    # (w[rows] @ h) * scale[rows] + bias[rows] for a strip of whole weight rows already loaded as W
    y = tl.sum(W.to(tl.float32) * h[None, :], axis=1)
    if HAS_SCALE:
        y = y * tl.load(SCALE + rows, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + rows, mask=row_ok, other=0.0).to(tl.float32)
    return y


@kernel
def add_rms_norm_gemv(X, R, NW, W, SCALE, BIAS, S, Y, N, K, eps, sw_n,
                      HAS_R: tl.constexpr, HAS_NW: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      GATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    # One row (batch-1 decode), three kernels in one: s = x + r, h = rms_norm(s) * nw, and
    # y = h @ w.T (times SCALE per row for INT8, plus BIAS). Every program recomputes the norm
    # of the row, which is cheaper than a launch. With GATE the weight stacks gate rows
    # [0, N) over up rows [N, 2N): a program holds the matching strips of both and writes
    # y = silu(gate) * up (each rounded first, as the projection stores them). Strips are held
    # whole (BLOCK_K >= K) and load before the wait (PDL).
    pid = tl.program_id(0)
    rn = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K
    w_mask = n_ok[:, None] & k_ok[None, :]
    if PDL:
        gdc_launch_dependents()
    w = tl.load(W + rn[:, None] * sw_n + rk[None, :], mask=w_mask, other=0)
    if GATE:
        w_up = tl.load(W + (rn + N)[:, None] * sw_n + rk[None, :], mask=w_mask, other=0)
    nw = _norm_weight(NW, rk, k_ok, HAS_NW)
    if PDL:
        gdc_wait()
    h = _add_norm_row(X, R, S, K, eps, rk, k_ok, nw, HAS_R, HAS_NW, Y.dtype.element_ty)
    y = _strip_dot(w, rn, n_ok, h, SCALE, BIAS, HAS_SCALE, HAS_BIAS)
    if GATE:
        up = _strip_dot(w_up, rn + N, n_ok, h, SCALE, BIAS, HAS_SCALE, HAS_BIAS)
        g = y.to(Y.dtype.element_ty).to(tl.float32)
        y = g * tl.sigmoid(g) * up.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=n_ok)


@kernel
def add_rms_norm_qkv_cache(X, R, NW, W, SCALE, BIAS, S, Q, COS, SIN, KB, VB, SLOT, N, K, eps, sw_n,
                           HQ, HK, n_slots, skb_h, skb_s, svb_h, svb_s,
                           HAS_R: tl.constexpr, HAS_NW: tl.constexpr, HAS_SCALE: tl.constexpr,
                           HAS_BIAS: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    # add_rms_norm_gemv for a stacked q/k/v projection whose epilogue is rope_into_cache's:
    # program p holds BLOCK_N of the N = (HQ + 2 HK) * HALF pairs of rows (d, d + HALF) of a
    # head, rotates the q and k pairs by the angles of the one position (COS/SIN [2 HALF]),
    # writes q to Q ([HQ, 2 HALF]) and k and v to column SLOT[0] of the cache buffers (not
    # at all when the slot is outside [0, n_slots), as rope_into_cache does).
    pid = tl.program_id(0)
    pair = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    head = pair // HALF
    d = pair % HALF
    row1 = head * (2 * HALF) + d
    row2 = row1 + HALF
    rk = tl.arange(0, BLOCK_K)
    n_ok = pair < N
    k_ok = rk < K
    w_mask = n_ok[:, None] & k_ok[None, :]
    if PDL:
        gdc_launch_dependents()
    w1 = tl.load(W + row1[:, None] * sw_n + rk[None, :], mask=w_mask, other=0)
    w2 = tl.load(W + row2[:, None] * sw_n + rk[None, :], mask=w_mask, other=0)
    nw = _norm_weight(NW, rk, k_ok, HAS_NW)
    if PDL:
        gdc_wait()
    c1 = tl.load(COS + d, mask=n_ok, other=0.0).to(tl.float32)  # (the angles are computed, not weights)
    c2 = tl.load(COS + HALF + d, mask=n_ok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + d, mask=n_ok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + HALF + d, mask=n_ok, other=0.0).to(tl.float32)
    h = _add_norm_row(X, R, S, K, eps, rk, k_ok, nw, HAS_R, HAS_NW, Q.dtype.element_ty)
    x1 = _strip_dot(w1, row1, n_ok, h, SCALE, BIAS, HAS_SCALE, HAS_BIAS)
    x2 = _strip_dot(w2, row2, n_ok, h, SCALE, BIAS, HAS_SCALE, HAS_BIAS)
    x1 = x1.to(Q.dtype.element_ty).to(tl.float32)  # as the projection stores them
    x2 = x2.to(Q.dtype.element_ty).to(tl.float32)
    rotate = head < HQ + HK
    o1 = tl.where(rotate, x1 * c1 - x2 * s1, x1)
    o2 = tl.where(rotate, x2 * c2 + x1 * s2, x2)
    is_q = n_ok & (head < HQ)
    tl.store(Q + row1, o1.to(Q.dtype.element_ty), mask=is_q)
    tl.store(Q + row2, o2.to(Q.dtype.element_ty), mask=is_q)
    slot = tl.load(SLOT).to(tl.int64)
    last = tl.where((slot >= 0) & (slot < n_slots), HQ + 2 * HK, HQ)  # no k/v head when the slot is outside
    slot = tl.where((slot >= 0) & (slot < n_slots), slot, 0)
    in_cache = n_ok & (head >= HQ) & (head < last)
    is_k = in_cache & (head < HQ + HK)
    is_v = in_cache & (head >= HQ + HK)
    k_at = KB + (head - HQ) * skb_h + slot * skb_s + d
    v_at = VB + (head - HQ - HK) * svb_h + slot * svb_s + d
    tl.store(k_at, o1.to(KB.dtype.element_ty), mask=is_k)
    tl.store(k_at + HALF, o2.to(KB.dtype.element_ty), mask=is_k)
    tl.store(v_at, o1.to(VB.dtype.element_ty), mask=is_v)
    tl.store(v_at + HALF, o2.to(VB.dtype.element_ty), mask=is_v)


# ----------------------------------------------------------------------------- SwiGLU inside the MLP matmuls
# Tiled matmuls whose epilogue does SwiGLU's work, so that neither the gated product (forward)
# nor its gradient (backward) crosses memory on its own. The operands come in through tensor
# descriptors (TMA copies on Hopper; tiles past an edge read as zeros); programs walk the
# output tiles in groups of GROUP_M row blocks, so that a group's operands stay in L2.


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:  # the interpreter's half-precision dot is not exact enough
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@kernel
def gate_up_swiglu(X_DESC, WG_DESC, WU_DESC, GU, H, M, F, K, s_gu, s_h,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # GU = X @ W.T with W = [W_gate; W_up] ([2F, K]; WG_DESC and WU_DESC are its two halves),
    # and H = silu(GU[:, :F]) * GU[:, F:]. Each program owns columns n of both halves (two
    # accumulators sharing the X tile), so its epilogue has the gate and up values it gates.
    # H is computed from GU rounded to its dtype, as the backward (which reads GU) sees it.
    off_m, off_n = _grouped_tile(M, F, BLOCK_M, BLOCK_N, GROUP_M)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        x = X_DESC.load([off_m, k * BLOCK_K])
        acc_g = _dot(x, WG_DESC.load([off_n, k * BLOCK_K]).T, acc_g, UPCAST, PRECISION)
        acc_u = _dot(x, WU_DESC.load([off_n, k * BLOCK_K]).T, acc_u, UPCAST, PRECISION)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    g = acc_g.to(GU.dtype.element_ty)
    u = acc_u.to(GU.dtype.element_ty)
    rm64 = rm.to(tl.int64)
    mask = (rm[:, None] < M) & (rn[None, :] < F)
    out = GU + rm64[:, None] * s_gu + rn[None, :]
    tl.store(out, g, mask=mask)
    tl.store(out + F, u, mask=mask)
    g32 = g.to(tl.float32)
    h = g32 * tl.sigmoid(g32) * u.to(tl.float32)
    tl.store(H + rm64[:, None] * s_h + rn[None, :], h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_tile(dh, GU, DGU, M, F, s_gu, s_dgu, off_m, off_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # SwiGLU's backward of one [BLOCK_M, BLOCK_N] tile of DH (float32) at columns off_n of GU
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    mask = (rm[:, None] < M) & (rn[None, :] < F)
    src = GU + rm64[:, None] * s_gu + rn[None, :]
    g = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(src + F, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dst = DGU + rm64[:, None] * s_dgu + rn[None, :]
    tl.store(dst + F, (dh * g * sig).to(DGU.dtype.element_ty), mask=mask)
    tl.store(dst, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DGU.dtype.element_ty), mask=mask)


@kernel
def swiglu_bwd_matmul(DY_DESC, WT_DESC, GU, DGU, M, F, K, s_gu, s_dgu,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # DGU = SwiGLU's backward of DH = DY @ WT.T (WT = w_down.T, [F, K], K-major as the tensor
    # cores want it) at GU = [gate | up]:
    # DGU[:, :F] = DH * up * silu'(gate), DGU[:, F:] = DH * silu(gate). DH stays in float32
    # registers; only GU is read and DGU written. With SPLIT the epilogue works on the tile's
    # two column halves in turn (fewer values live at once).
    off_m, off_n = _grouped_tile(M, F, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        acc = _dot(DY_DESC.load([off_m, k * BLOCK_K]), WT_DESC.load([off_n, k * BLOCK_K]).T, acc, UPCAST, PRECISION)
    if SPLIT:
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        _swiglu_bwd_tile(left, GU, DGU, M, F, s_gu, s_dgu, off_m, off_n, BLOCK_M, BLOCK_N // 2)
        _swiglu_bwd_tile(right, GU, DGU, M, F, s_gu, s_dgu, off_m, off_n + BLOCK_N // 2, BLOCK_M, BLOCK_N // 2)
    else:
        _swiglu_bwd_tile(acc, GU, DGU, M, F, s_gu, s_dgu, off_m, off_n, BLOCK_M, BLOCK_N)
