"""Inference-only Triton ops for the cached (prefill / decode) path: fewer, fused kernels per block.

A batch-1 decode step is bound by how many kernels each block launches, not by
their bytes, so these fold neighbouring steps together (so does ``add_rms_norm``,
the residual add and the RMSNorm after it in one kernel, which lives in
:mod:`ghostvis.ops.fused` because it also has a backward):

- ``rope_into_cache``: RoPE on q and k, and the write of k and v into the KV
  cache at their slots, in one kernel (was: RoPE, then one copy each for k and v).
- ``linear`` of one row (``gemv``): a Triton GEMV whose narrow strips keep more of the
  weight in flight than cuBLAS does on these small matrices.
- ``add_rms_norm_linear`` of one row (``gemv``): the residual add, the RMSNorm after it and
  the projection that reads it (q/k/v, or gate/up with SwiGLU applied to the two halves) in
  one GEMV kernel, bf16 or INT8 weights: three kernels of a block become one, twice.
- ``add_rms_norm_qkv_cache`` of one row (``gemv``): the same for the q/k/v projection, whose
  epilogue is ``rope_into_cache``'s (RoPE of q and k, k and v written into the cache).
- ``decode_attention``: one query per row against the whole cache under a
  boolean key mask, split along the cache so that every SM has slots to read
  (split-KV), then merged; slots the mask rules out are never read.

None of them has a backward: they are picked only where no gradient is wanted
(``torch.no_grad``, as generation runs), and their references in
:mod:`ghostvis.ops.reference` take over otherwise. Each is a ``torch.library``
custom op with a fake impl, so a compiled decode step keeps them as single kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from . import kernels as K
from .fused import FLOAT_DTYPES, _num_warps, _rope_launch, gemv_config, gemv_launch, rope_ok

Tensor = torch.Tensor


def _no_grad_wanted(*ts: Optional[Tensor]) -> bool:
    """True where these forward-only kernels may run: grad mode off, or nothing to differentiate.

    Inside ``torch.func`` transforms and while ``torch.compile`` traces with grad mode on,
    ``requires_grad`` does not tell (wrapped tensors report False), so those say no.
    """
    if not torch.is_grad_enabled():
        return True
    present = [t for t in ts if t is not None]
    if torch.compiler.is_compiling() or any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in present):
        return False
    return not any(t.requires_grad for t in present)


# ----------------------------------------------------------------------------- rope + cache write


@torch.library.custom_op("ghostvis::rope_into_cache", mutates_args=("k_buf", "v_buf"))
def rope_into_cache_fwd(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_buf: Tensor, v_buf: Tensor,
                        slots: Tensor) -> Tensor:
    """RoPE of q (returned) and k; k and v written into ``k_buf`` / ``v_buf`` at columns ``slots``."""
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return _rope_launch(q, k, cos, sin, backward=False, v=v, qo=qo, ko=k_buf, vo=v_buf, slots=slots)[0]


@rope_into_cache_fwd.register_fake
def _(q, k, v, cos, sin, k_buf, v_buf, slots):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def rope_into_cache(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_buf: Tensor, v_buf: Tensor,
                    slots: Tensor) -> Tensor:
    """See :func:`ghostvis.ops.reference.rope_into_cache`."""
    return rope_into_cache_fwd(q, k, v, cos, sin, k_buf, v_buf, slots)


def rope_into_cache_ok(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_buf: Tensor, v_buf: Tensor,
                       slots: Tensor) -> bool:
    if k.dim() != 4 or not rope_ok(q, k, cos, sin):
        return False
    b, hk, t, d = k.shape
    return (v.shape == k.shape and k_buf.shape == v_buf.shape
            and k_buf.dim() == 4 and k_buf.shape[:2] == (b, hk) and k_buf.shape[3] == d
            and k_buf.stride(-1) == 1 and v_buf.stride(-1) == 1 and k_buf.dtype in FLOAT_DTYPES
            and slots.shape == (t,) and slots.dtype in (torch.int32, torch.int64)
            and _no_grad_wanted(q, k, v))


# ----------------------------------------------------------------------------- decode attention

BLOCK_S = 32  # cache slots per loop step of a split
MAX_SPLITS = 64  # the merge kernel holds every split of a row in registers


def decode_splits(batch: int, kv_heads: int, slots: int, programs: int) -> tuple[int, int]:
    """``(n_splits, split_len)``: enough splits of the cache that ``batch * kv_heads * n_splits``
    programs reach ``programs``, each a whole number of ``BLOCK_S`` slots."""
    chunks = triton.cdiv(slots, BLOCK_S)
    n = max(1, min(chunks, programs // max(1, batch * kv_heads), MAX_SPLITS))
    split_len = triton.cdiv(chunks, n) * BLOCK_S
    return triton.cdiv(slots, split_len), split_len


@torch.library.custom_op("ghostvis::decode_attention", mutates_args=())
def decode_attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Attention of q ``[B, Hq, 1, D]`` over k/v ``[B, Hkv, S, D]`` where ``mask`` ``[B, S]`` (bool) is set."""
    b, hq, _, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    out = torch.empty((b, hq, 1, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    g = hq // hk
    programs = 4 if not q.is_cuda else 4 * K._sm_count(q.device.index if q.device.index is not None
                                                        else torch.cuda.current_device())
    n_splits, split_len = decode_splits(b, hk, s, programs)
    o_part = torch.empty((b * hq * n_splits, d), dtype=torch.float32, device=q.device)
    m_part = torch.empty(b * hq * n_splits, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    block_g = max(16, triton.next_power_of_2(g))  # a tensor-core tile has at least 16 rows
    upcast, precision = K.dot_mode(q)
    pdl = K.pdl(q)
    K.decode_attention_split.on(q)[(b * hk, n_splits)](
        q, k, v, mask, o_part, m_part, l_part, s, hk, g, split_len, n_splits, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0), mask.stride(1), D=d, BLOCK_G=block_g, BLOCK_S=BLOCK_S, UPCAST=upcast, PRECISION=precision,
        num_warps=4, num_stages=3, **pdl)
    K.decode_attention_merge.on(q)[(b * hq,)](
        o_part, m_part, l_part, out, hq, n_splits, out.stride(0), out.stride(1),
        D=d, BLOCK_SPLITS=triton.next_power_of_2(n_splits), num_warps=_num_warps(d), **pdl)
    return out


@decode_attention_fwd.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape)


def decode_attention(q, k, v, *, causal=True, doc_ids=None, key_valid=None, mask=None, scale=None):
    """The ``ops.attention`` contract for one query per row against a cache (see :func:`decode_attention_ok`)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = mask[:, 0, 0, :].expand(q.shape[0], k.shape[2])  # a view; a mask shared by all rows gets stride 0
    return decode_attention_fwd(q, k, v, keys, scale)


def decode_attention_ok(q, k, v, *, causal=True, doc_ids=None, key_valid=None, mask=None, scale=None) -> bool:
    """One query per row and a boolean ``[B|1, 1, 1, S]`` mask that says it all (a cache's): no causal,
    document or key-padding arguments, and no gradient."""
    if q.dim() != 4 or q.shape[2] != 1 or causal or doc_ids is not None or key_valid is not None or mask is None:
        return False
    b, hq, _, d = q.shape
    hk = k.shape[1]
    return (k.shape == v.shape and k.shape[0] == b and k.shape[3] == d and hk > 0 and hq % hk == 0
            and k.shape[2] > 0
            and d == triton.next_power_of_2(d) and 16 <= d <= 256 and q.dtype in FLOAT_DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype and k.stride(-1) == 1 and v.stride(-1) == 1
            and q.stride(-1) == 1 and mask.dtype == torch.bool and mask.dim() == 4
            and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[0] in (1, b)
            and mask.shape[3] == k.shape[2] and _no_grad_wanted(q, k, v))


# ----------------------------------------------------------------------------- one-row linear

GEMV_MAX_N = 16384  # wider matrices (an LM head) stream at full bandwidth through cuBLAS already


@torch.library.custom_op("ghostvis::gemv", mutates_args=())
def gemv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ weight.T + bias`` for ``x`` holding one row (any leading shape of size 1)."""
    n, k = weight.shape
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    gemv_launch(x.reshape(1, k), weight, None, bias, y.view(1, n))
    return y


@gemv_fwd.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The ``ops.linear`` contract for a single row of ``x`` (see :func:`linear_gemv_ok`)."""
    return gemv_fwd(x, weight, bias)


def linear_gemv_ok(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """One row of bf16/fp16 ``x``, a same-dtype ``[N, K]`` weight with N <= ``GEMV_MAX_N``, no gradient."""
    return (x.dim() >= 1 and x.numel() == x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dim() == 2 and weight.dtype == x.dtype and weight.shape[1] == x.shape[-1]
            and 0 < weight.shape[0] <= GEMV_MAX_N and weight.stride(-1) == 1 and x.stride(-1) == 1
            and (bias is None or (bias.shape == (weight.shape[0],) and bias.dtype == x.dtype))
            and _no_grad_wanted(x, weight, bias))


# ----------------------------------------------------------------------------- add + norm + one-row linear


def norm_gemv_config(n: int, k: int, weight_dtype: torch.dtype, gate: bool) -> Optional[tuple[int, int, int]]:
    """``(BLOCK_N, BLOCK_K, num_warps)`` of :func:`add_rms_norm_gemv_fwd` for ``n`` output rows of an
    ``[n, k]`` weight (``[2n, k]`` with ``gate``), or None where a program cannot hold its strips whole.

    The strips are :func:`~ghostvis.ops.fused.gemv_config`'s (a gated program holds half as many
    rows of each half, so the same rows in all); the norm needs the whole row in every program."""
    rows, bk, warps = gemv_config(2 * n if gate else n, k, weight_dtype)
    if bk < k:  # wider than a whole strip: try the narrowest one
        rows, bk = 2, triton.next_power_of_2(k)
        warps = 8 if rows * bk >= 16384 else 4
        if rows * bk > 16384:
            return None
    return (max(rows // 2, 1) if gate else rows), bk, warps


@torch.library.custom_op("ghostvis::add_rms_norm_gemv", mutates_args=())
def add_rms_norm_gemv_fwd(x: Tensor, residual: Optional[Tensor], norm_weight: Optional[Tensor], weight: Tensor,
                          scale: Optional[Tensor], bias: Optional[Tensor], eps: float,
                          gate: bool) -> tuple[Tensor, Tensor]:
    """``(s, y)`` for one row: ``s = x + residual``, ``y = rms_norm(s) @ (weight * scale).T + bias``,
    with ``gate`` ``silu(y1) * y2`` of ``y``'s two halves, in one kernel (see :func:`add_rms_norm_linear`)."""
    k = x.shape[-1]
    n = weight.shape[0] // 2 if gate else weight.shape[0]
    s = torch.empty_like(x)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    bn, bk, warps = norm_gemv_config(n, k, weight.dtype, gate)
    K.add_rms_norm_gemv.on(x)[(triton.cdiv(n, bn),)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else x, weight,
        scale if scale is not None else x, bias if bias is not None else x, s, y, n, k, eps, weight.stride(0),
        HAS_R=residual is not None, HAS_NW=norm_weight is not None, HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None, GATE=gate, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **K.pdl(x))
    return s, y


@add_rms_norm_gemv_fwd.register_fake
def _(x, residual, norm_weight, weight, scale, bias, eps, gate):
    n = weight.shape[0] // 2 if gate else weight.shape[0]
    return torch.empty_like(x), x.new_empty((*x.shape[:-1], n))


def add_rms_norm_linear_gemv(x: Tensor, residual: Optional[Tensor], norm_weight: Optional[Tensor], weight: Tensor,
                             eps: float = 1e-6, *, scale: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                             gate: bool = False) -> tuple[Tensor, Tensor]:
    """The ``ops.add_rms_norm_linear`` contract for one row (see :func:`add_rms_norm_linear_gemv_ok`)."""
    return add_rms_norm_gemv_fwd(x, residual, norm_weight, weight, scale, bias, float(eps), bool(gate))


def add_rms_norm_linear_gemv_ok(x: Tensor, residual: Optional[Tensor], norm_weight: Optional[Tensor],
                                weight: Tensor, eps: float = 1e-6, *, scale: Optional[Tensor] = None,
                                bias: Optional[Tensor] = None, gate: bool = False) -> bool:
    """One contiguous row; ``residual``, ``norm_weight``, ``scale`` and ``bias`` of its dtype and
    device; a ``[N, K]`` weight of ``x``'s dtype, or INT8 with a ``[N]`` ``scale``, N <=
    ``GEMV_MAX_N`` (even with ``gate``), held whole by a program; no gradient."""
    if not (x.dim() >= 1 and x.numel() == x.shape[-1] and x.dtype in FLOAT_DTYPES and x.is_contiguous()
            and weight.dim() == 2 and weight.shape[1] == x.shape[-1] and weight.stride(-1) == 1):
        return False
    if any(t is not None and (t.device != x.device or (t.is_floating_point() and t.dtype != x.dtype))
           for t in (residual, norm_weight, weight, scale, bias)):
        return False
    n, k = weight.shape
    if not 0 < n <= GEMV_MAX_N or (gate and n % 2):
        return False
    quantized = weight.dtype == torch.int8
    if quantized != (scale is not None) or not (quantized or weight.dtype == x.dtype):
        return False
    if scale is not None and (scale.shape != (n,) or not scale.is_contiguous()):
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or not residual.is_contiguous()):
        return False
    if norm_weight is not None and (norm_weight.shape != (k,) or not norm_weight.is_contiguous()):
        return False
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        return False
    if norm_gemv_config(n // 2 if gate else n, k, weight.dtype, gate) is None:
        return False
    return _no_grad_wanted(x, residual, norm_weight, weight, scale, bias)


# ----------------------------------------------------------------------------- add + norm + q/k/v + RoPE + cache


@torch.library.custom_op("ghostvis::add_rms_norm_qkv_cache", mutates_args=("k_buf", "v_buf"))
def add_rms_norm_qkv_cache_fwd(x: Tensor, residual: Optional[Tensor], norm_weight: Optional[Tensor], weight: Tensor,
                               scale: Optional[Tensor], bias: Optional[Tensor], eps: float, cos: Tensor,
                               sin: Tensor, k_buf: Tensor, v_buf: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, q)`` of :func:`ghostvis.ops.reference.add_rms_norm_qkv_cache` for one row, in one kernel."""
    k = x.shape[-1]
    hk, d = k_buf.shape[1], k_buf.shape[3]
    hq = weight.shape[0] // d - 2 * hk
    s = torch.empty_like(x)
    q = torch.empty((1, hq, 1, d), dtype=x.dtype, device=x.device)
    pairs = weight.shape[0] // 2
    bn, bk, warps = norm_gemv_config(pairs, k, weight.dtype, True)
    K.add_rms_norm_qkv_cache.on(x)[(triton.cdiv(pairs, bn),)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else x, weight,
        scale if scale is not None else x, bias if bias is not None else x, s, q, cos, sin, k_buf, v_buf, slots,
        pairs, k, eps, weight.stride(0), hq, hk, k_buf.shape[2], k_buf.stride(1), k_buf.stride(2),
        v_buf.stride(1), v_buf.stride(2),
        HAS_R=residual is not None, HAS_NW=norm_weight is not None, HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None, HALF=d // 2, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **K.pdl(x))
    return s, q


@add_rms_norm_qkv_cache_fwd.register_fake
def _(x, residual, norm_weight, weight, scale, bias, eps, cos, sin, k_buf, v_buf, slots):
    hk, d = k_buf.shape[1], k_buf.shape[3]
    return torch.empty_like(x), x.new_empty((1, weight.shape[0] // d - 2 * hk, 1, d))


def add_rms_norm_qkv_cache_gemv(x: Tensor, residual: Optional[Tensor], norm_weight: Optional[Tensor], weight: Tensor,
                                eps: float, cos: Tensor, sin: Tensor, k_buf: Tensor, v_buf: Tensor, slots: Tensor, *,
                                scale: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The ``ops.add_rms_norm_qkv_cache`` contract for one row (see :func:`add_rms_norm_qkv_cache_gemv_ok`)."""
    return add_rms_norm_qkv_cache_fwd(x, residual, norm_weight, weight, scale, bias, float(eps), cos, sin,
                                      k_buf, v_buf, slots)


def add_rms_norm_qkv_cache_gemv_ok(x: Tensor, residual: Optional[Tensor], norm_weight: Optional[Tensor],
                                   weight: Tensor, eps: float, cos: Tensor, sin: Tensor, k_buf: Tensor,
                                   v_buf: Tensor, slots: Tensor, *, scale: Optional[Tensor] = None,
                                   bias: Optional[Tensor] = None) -> bool:
    """What :func:`add_rms_norm_linear_gemv_ok` takes (``x`` ``[1, 1, K]``), for a ``[(Hq + 2 Hkv) D, K]``
    weight, with a
    ``[1, Hkv, S, D]`` cache of ``x``'s dtype (even ``D``, unit stride along it), contiguous
    ``cos`` / ``sin`` of ``D`` values for the one position, and one slot."""
    if not add_rms_norm_linear_gemv_ok(x, residual, norm_weight, weight, eps, scale=scale, bias=bias, gate=True):
        return False
    if x.dim() != 3 or k_buf.dim() != 4 or k_buf.shape != v_buf.shape or k_buf.shape[0] != 1:
        return False
    if any(t.device != x.device for t in (cos, sin, k_buf, v_buf, slots)):
        return False
    hk, d = k_buf.shape[1], k_buf.shape[3]
    n = weight.shape[0]
    return (d % 2 == 0 and hk > 0 and n % d == 0 and n // d > 2 * hk
            and k_buf.dtype == x.dtype and v_buf.dtype == x.dtype
            and k_buf.stride(-1) == 1 and v_buf.stride(-1) == 1
            and cos.numel() == d and sin.numel() == d and cos.is_contiguous() and sin.is_contiguous()
            and cos.dtype == torch.float32 and sin.dtype == torch.float32
            and slots.numel() == 1 and slots.dtype in (torch.int32, torch.int64))
