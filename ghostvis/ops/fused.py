"""The Triton kernels as ``torch.library`` ops with autograd and fake (meta) impls.

Each kernel is a ``torch.library.custom_op``: opaque to ``torch.compile`` (which
traces through the fake impl, so ``fullgraph=True`` holds) and free to take any
strides: the wrappers here turn shapes and strides into kernel arguments.

The forward and backward kernels are separate custom ops (each with a fake
impl); a ``torch.autograd.Function`` with ``setup_context`` joins them, which
is the form ``torch.func`` transforms accept.

The public functions (``rms_norm``, ``swiglu``, ``rope``, ``int8_linear``) take
the same arguments as their references in :mod:`ghostvis.ops.reference`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from . import dispatch
from . import kernels as K
from .library import backward_only, differentiable

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rows(t: Tensor) -> Tensor:
    """``t`` as ``[rows, last_dim]`` with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(elements: int) -> int:
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16


# ----------------------------------------------------------------------------- rms_norm


def _rms_blocks(d: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(64, 2048 // block_d))  # several short rows per program keep loads wide
    return block_r, block_d


def _rms_bwd_shape(d: int) -> tuple[int, int, int]:
    """``(rows per iteration, block width, warps)`` of the RMSNorm backward for rows of ``d``.

    Widths of 513 to 2048 take two rows per iteration and a warp per 1024 elements: on an
    H100 that moved the d20 (1280) and d12 (768) backward from 2.06 and 2.04 to 2.45 and 2.37 TB/s
    (``scripts/norm_probe.py``, CUDA-graph replays). Other widths keep the forward's shape.
    """
    block_r, block_d = _rms_blocks(d)
    if 1024 <= block_d <= 2048:
        return 2, block_d, 2 * block_d // 1024
    return block_r, block_d, _num_warps(block_r * block_d)


def rms_norm_launch(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], eps: float, *,
                    block_r: Optional[int] = None, num_warps: Optional[int] = None
                    ) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """``(s, y, rstd)``: ``s = x + residual`` (None without a residual), ``y`` its RMSNorm times
    ``weight``, ``rstd`` the per-row ``1/rms`` (float32); outputs contiguous.

    ``block_r`` (rows per program) and ``num_warps`` override the launch shape, for
    ``scripts/norm_probe.py``.
    """
    d = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return s, y, rstd
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    n = x2.shape[0]
    default_r, block_d = _rms_blocks(d)
    block_r = block_r or default_r
    K.rms_norm_fwd.on(x)[(triton.cdiv(n, block_r),)](
        x2, r2, weight if weight is not None else x2, s.view(n, d) if s is not None else x2, y.view(n, d), rstd,
        x2.stride(0), r2.stride(0), d, d, n, d, eps,
        HAS_R=residual is not None, HAS_W=weight is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=num_warps or _num_warps(block_r * block_d), **K.pdl(x))
    return s, y, rstd


@torch.library.custom_op("ghostvis::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """``(y, rstd)``: RMSNorm of ``x`` over the last dim and the per-row ``1/rms`` (float32)."""
    return rms_norm_launch(x, None, weight, eps)[1:]


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    # contiguous, as the kernel's output is (empty_like would copy a transposed input's strides)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(x.shape[:-1], dtype=torch.float32)


def rms_norm_bwd_launch(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor,
                        ds: Optional[Tensor] = None, *, block_r: Optional[int] = None,
                        num_warps: Optional[int] = None, per_sm: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """``(dx, dweight)`` of RMSNorm (plus ``ds``, the input's gradient from other paths, when given);
    ``dweight`` is empty when there is no weight.

    ``block_r`` (rows per iteration), ``num_warps`` and ``per_sm`` (programs per SM) override
    the launch shape, for ``scripts/norm_probe.py``.
    """
    d = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        dw = torch.zeros_like(weight) if weight is not None else x.new_empty(0)
        return dx, dw
    x2, dy2 = _rows(x), _rows(dy)
    ds2 = _rows(ds) if ds is not None else dy2
    n = x2.shape[0]
    default_r, block_d, default_warps = _rms_bwd_shape(d)
    block_r, num_warps = block_r or default_r, num_warps or default_warps
    programs = min(K.programs_for(x, per_sm), triton.cdiv(n, block_r))
    rows_per_program = triton.cdiv(triton.cdiv(n, programs), block_r) * block_r
    programs = triton.cdiv(n, rows_per_program)
    partial = torch.empty((programs, d) if weight is not None else (0,), dtype=torch.float32, device=x.device)
    K.rms_norm_bwd.on(x)[(programs,)](
        x2, weight if weight is not None else x2, dy2, ds2, rstd.reshape(-1), dx.view(n, d), partial,
        x2.stride(0), dy2.stride(0), ds2.stride(0), d, n, d, rows_per_program,
        HAS_W=weight is not None, HAS_DS=ds is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=num_warps)
    dw = partial.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    return dx, dw


@torch.library.custom_op("ghostvis::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor) -> tuple[Tensor, Tensor]:
    """``(dx, dweight)`` of RMSNorm; ``dweight`` is empty when there is no weight."""
    return rms_norm_bwd_launch(dy, x, weight, rstd)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    # contiguous like the kernel's dx (empty_like would keep a transposed input's strides)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty_like(weight) if weight is not None else x.new_empty(0))


def _rms_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.has_weight = weight is not None
    ctx.save_for_backward(x, weight, output[1])


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_backward(dy, x, weight, rstd)
    return dx, (dw if ctx.has_weight else None), None


rms_norm_backward = backward_only("rms_norm_backward", rms_norm_bwd)
rms_norm_function = differentiable("RMSNormFunction", rms_norm_fwd, _rms_setup, _rms_backward, non_differentiable=(1,))


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim (Triton forward and backward)."""
    return rms_norm_function(x, weight, eps)[0]


def rms_norm_ok(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> bool:
    """Whether the Triton RMSNorm takes these inputs."""
    return (x.dtype in FLOAT_DTYPES and x.dim() >= 1 and 0 < x.shape[-1] <= 65536
            and (weight is None or (weight.shape == (x.shape[-1],) and weight.device == x.device
                                    and weight.dtype in FLOAT_DTYPES)))


# ----------------------------------------------------------------------------- add + rms_norm


@torch.library.custom_op("ghostvis::add_rms_norm", mutates_args=())
def add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor],
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, rms_norm(s) * weight, rstd)`` with ``s = x + residual``, in one pass over the rows."""
    return rms_norm_launch(x, residual, weight, eps)


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device), x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("ghostvis::add_rms_norm_bwd", mutates_args=())
def add_rms_norm_bwd(dy: Tensor, ds: Optional[Tensor], s: Tensor, weight: Optional[Tensor],
                     rstd: Tensor) -> tuple[Tensor, Tensor]:
    """``(dx, dweight)`` of :func:`add_rms_norm_fwd`: ``dx`` (the gradient of ``x`` and of
    ``residual`` alike) is the norm's input gradient plus ``ds``, the gradient of ``s``."""
    return rms_norm_bwd_launch(dy, s, weight, rstd, ds)


@add_rms_norm_bwd.register_fake
def _(dy, ds, s, weight, rstd):
    return (torch.empty(s.shape, dtype=s.dtype, device=s.device),
            torch.empty_like(weight) if weight is not None else s.new_empty(0))


def _add_rms_setup(ctx, inputs, output):
    x, residual, weight, _ = inputs
    ctx.has_weight = weight is not None
    ctx.residual_dtype = residual.dtype
    ctx.save_for_backward(output[0], weight, output[2])


def _add_rms_backward(ctx, ds, dy, _drstd):
    s, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(s)
    dx, dw = add_rms_norm_backward(dy, ds, s, weight, rstd)
    return dx, dx.to(ctx.residual_dtype), (dw if ctx.has_weight else None), None


add_rms_norm_backward = backward_only("add_rms_norm_backward", add_rms_norm_bwd)
add_rms_norm_function = differentiable("AddRMSNormFunction", add_rms_norm_fwd, _add_rms_setup, _add_rms_backward,
                                       non_differentiable=(2,))


def add_rms_norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor] = None,
                 eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(x + residual, rms_norm(x + residual, weight))`` with a Triton forward and backward.

    ``residual=None`` is a plain RMSNorm of ``x`` (through the dispatcher, so a backend
    forced for ``rms_norm`` applies). ``residual`` may be of a narrower float dtype than ``x``
    (a bf16 branch output on a float32 residual stream, as under autocast): the sum takes
    ``x``'s dtype, as ``x + residual`` would.
    """
    if residual is None:
        return x, dispatch.call("rms_norm", x, weight, eps)
    s, y, _ = add_rms_norm_function(x, residual, weight, eps)
    return s, y


def add_rms_norm_ok(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor] = None,
                    eps: float = 1e-6) -> bool:
    return (rms_norm_ok(x, weight, eps)
            and (residual is None or (residual.shape == x.shape and residual.dtype in FLOAT_DTYPES
                                      and torch.promote_types(x.dtype, residual.dtype) == x.dtype)))


# ----------------------------------------------------------------------------- swiglu


def _elementwise_layout(*ts: Tensor) -> tuple[list[Tensor], int, int, int]:
    """Views of same-shaped tensors as ``[rows, cols]``; contiguous inputs become one long row."""
    if all(t.is_contiguous() for t in ts):
        return [t.view(1, -1) for t in ts], 1, ts[0].numel(), 0
    views = [_rows(t) for t in ts]
    return views, views[0].shape[0], views[0].shape[1], 1


def _swiglu_grid(rows: int, cols: int) -> tuple[int, int, int]:
    block = min(2048, triton.next_power_of_2(cols))
    blocks_per_row = triton.cdiv(cols, block)
    return block, blocks_per_row, rows * blocks_per_row


@torch.library.custom_op("ghostvis::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (Triton)."""
    return _swiglu_launch(gate, up)


def _swiglu_launch(gate: Tensor, up: Tensor) -> Tensor:
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() == 0:
        return y
    (g, u), rows, cols, has_rows = _elementwise_layout(gate, up)
    y2 = y.view(rows, cols)
    block, per_row, programs = _swiglu_grid(rows, cols)
    K.swiglu_fwd.on(gate)[(programs,)](g, u, y2, cols, g.stride(0) * has_rows, u.stride(0) * has_rows,
                                       y2.stride(0) * has_rows, per_row, BLOCK=block, num_warps=_num_warps(block),
                                       **K.pdl(gate))
    return y


@swiglu_fwd.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("ghostvis::swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """``(dgate, dup)`` of ``silu(gate) * up``."""
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel() == 0:
        return dg, du
    (g, u, d), rows, cols, has_rows = _elementwise_layout(gate, up, dy)
    block, per_row, programs = _swiglu_grid(rows, cols)
    K.swiglu_bwd.on(gate)[(programs,)](g, u, d, dg.view(rows, cols), du.view(rows, cols), cols,
                                       g.stride(0) * has_rows, u.stride(0) * has_rows, d.stride(0) * has_rows,
                                       cols * has_rows, per_row, BLOCK=block, num_warps=_num_warps(block))
    return dg, du


@swiglu_bwd.register_fake
def _(dy, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return swiglu_backward(dy, gate, up)


swiglu_backward = backward_only("swiglu_backward", swiglu_bwd)
swiglu_function = differentiable("SwiGLUFunction", swiglu_fwd, _swiglu_setup, _swiglu_backward)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` with a Triton forward and backward."""
    return swiglu_function(gate, up)


def swiglu_ok(gate: Tensor, up: Tensor) -> bool:
    return gate.shape == up.shape and gate.dtype == up.dtype and gate.dtype in FLOAT_DTYPES and gate.dim() >= 1


# ----------------------------------------------------------------------------- rope


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def bthd_empty(shape: torch.Size, dtype: torch.dtype, device) -> Tensor:
    """An empty ``[B, H, T, D]`` tensor laid out as ``[B, T, H, D]`` in memory (a transposed view).

    The layout of a projection's output. Attention takes it as is; where its output keeps
    the layout (SDPA's cuDNN and flash kernels do), that output goes back to
    ``[B, T, H * D]`` without a copy.
    """
    b, h, t, d = shape
    return torch.empty((b, t, h, d), dtype=dtype, device=device).transpose(1, 2)


def _rope_launch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool, *, v: Optional[Tensor] = None,
                 qo: Optional[Tensor] = None, ko: Optional[Tensor] = None, vo: Optional[Tensor] = None,
                 slots: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Rotate q and k into ``qo`` / ``ko`` (new ``[B, T, H, D]``-laid-out tensors where not given),
    and copy ``v`` to ``vo`` when ``v`` is given; with ``slots`` k and v go to the cache columns
    ``slots`` of ``ko`` / ``vo`` (the KV cache buffers; slots outside them are not written).
    Returns ``(qo, ko, vo)``."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    qo = bthd_empty(q.shape, q.dtype, q.device) if qo is None else qo
    ko = bthd_empty(k.shape, k.dtype, k.device) if ko is None else ko
    if v is not None and vo is None:
        vo = bthd_empty(v.shape, v.dtype, v.device)
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko, vo
    q, k = _unit_last(q), _unit_last(k)
    v_, vo_ = (_unit_last(v), vo) if v is not None else (k, ko)  # unused by the kernel without WITH_V
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.contiguous(), sin.contiguous()
    cos_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    half = d // 2
    block_d = triton.next_power_of_2(half)
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    K.rope_qk.on(q)[(b * t,)](
        q, k, v_, cos, sin, qo, ko, vo_, slots if slots is not None else q, t, ko.shape[2], hq, hk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v_.stride(0), v_.stride(1), v_.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        vo_.stride(0), vo_.stride(1), vo_.stride(2), cos_b, cos.stride(1),
        HALF=half, BLOCK_D=block_d, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BACKWARD=backward,
        WITH_V=v is not None, TO_CACHE=slots is not None,
        num_warps=_num_warps((block_hq + 2 * block_hk) * block_d), **K.pdl(q))
    return qo, ko, vo


@torch.library.custom_op("ghostvis::rope_fwd", mutates_args=())
def rope_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q and k in one launch (half-split convention); outputs laid out
    ``[B, T, H, D]`` (see :func:`bthd_empty`)."""
    return _rope_launch(q, k, cos, sin, backward=False)[:2]


@torch.library.custom_op("ghostvis::rope_bwd", mutates_args=())
def rope_bwd(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`rope_fwd`: the transposed rotation."""
    return _rope_launch(dq, dk, cos, sin, backward=True)[:2]


@rope_fwd.register_fake
def _(q, k, cos, sin):
    return bthd_empty(q.shape, q.dtype, q.device), bthd_empty(k.shape, k.dtype, k.device)


@rope_bwd.register_fake
def _(dq, dk, cos, sin):
    return bthd_empty(dq.shape, dq.dtype, dq.device), bthd_empty(dk.shape, dk.dtype, dk.device)


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.q_meta = (q.shape, q.dtype, q.device)
    ctx.k_meta = (k.shape, k.dtype, k.device)


def _rope_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    # an unused output (say only q feeds the loss) arrives as None
    if dq is None:
        dq = torch.zeros(ctx.q_meta[0], dtype=ctx.q_meta[1], device=ctx.q_meta[2])
    if dk is None:
        dk = torch.zeros(ctx.k_meta[0], dtype=ctx.k_meta[1], device=ctx.k_meta[2])
    gq, gk = rope_backward(dq, dk, cos, sin)
    return gq, gk, None, None


rope_backward = backward_only("rope_backward", rope_bwd)
rope_function = differentiable("RopeFunction", rope_fwd, _rope_setup, _rope_backward)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding on q ``[B,Hq,T,D]`` and k ``[B,Hk,T,D]``; cos/sin ``[B|1,T,D]`` or ``[T,D]``.

    cos and sin are constants here: no gradient flows into them.
    """
    return rope_function(q, k, cos, sin)


def rope_ok(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        return False
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.dtype not in FLOAT_DTYPES:
        return False
    cb = cos if cos.dim() == 3 else cos[None]
    return (cos.shape == sin.shape and cb.dim() == 3 and cb.shape[1:] == (q.shape[2], q.shape[3])
            and cb.shape[0] in (1, q.shape[0]))


# ----------------------------------------------------------------------------- qkv_rope (stacked projection)


def _heads(qkv: Tensor, n_heads: int, n_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[B, H, T, D]`` views of a stacked projection ``[B, T, (Hq + 2 Hkv) * D]``."""
    b, t, w = qkv.shape
    x = _unit_last(qkv).view(b, t, n_heads + 2 * n_kv_heads, w // (n_heads + 2 * n_kv_heads)).transpose(1, 2)
    return x[:, :n_heads], x[:, n_heads:n_heads + n_kv_heads], x[:, n_heads + n_kv_heads:]


@torch.library.custom_op("ghostvis::qkv_rope_fwd", mutates_args=())
def qkv_rope_fwd(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q and k rotated, v copied, from a stacked projection, each ``[B, H, T, D]`` laid out
    ``[B, T, H, D]``: one pass over the projection."""
    q, k, v = _heads(qkv, n_heads, n_kv_heads)
    return _rope_launch(q, k, cos, sin, backward=False, v=v)


@qkv_rope_fwd.register_fake
def _(qkv, cos, sin, n_heads, n_kv_heads):
    return tuple(bthd_empty(h.shape, qkv.dtype, qkv.device) for h in _heads(qkv, n_heads, n_kv_heads))


@torch.library.custom_op("ghostvis::qkv_rope_bwd", mutates_args=())
def qkv_rope_bwd(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The gradient of :func:`qkv_rope_fwd`'s input, written as one ``[B, T, (Hq + 2 Hkv) * D]`` tensor."""
    b, hq, t, d = dq.shape
    hk = dk.shape[1]
    dqkv = torch.empty((b, t, (hq + 2 * hk) * d), dtype=dq.dtype, device=dq.device)
    gq, gk, gv = _heads(dqkv, hq, hk)
    _rope_launch(dq, dk, cos, sin, backward=True, v=dv, qo=gq, ko=gk, vo=gv)
    return dqkv


@qkv_rope_bwd.register_fake
def _(dq, dk, dv, cos, sin):
    b, hq, t, d = dq.shape
    return dq.new_empty((b, t, (hq + 2 * dk.shape[1]) * d))


def _qkv_rope_setup(ctx, inputs, output):
    qkv, cos, sin, n_heads, n_kv_heads = inputs
    ctx.save_for_backward(cos, sin)
    ctx.heads = [(h.shape, h.dtype, h.device) for h in _heads(qkv, n_heads, n_kv_heads)]


def _qkv_rope_backward(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    grads = [g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
             for g, (shape, dtype, device) in zip((dq, dk, dv), ctx.heads)]
    return qkv_rope_backward(*grads, cos, sin), None, None, None, None


qkv_rope_backward = backward_only("qkv_rope_backward", qkv_rope_bwd)
qkv_rope_function = differentiable("QKVRopeFunction", qkv_rope_fwd, _qkv_rope_setup, _qkv_rope_backward)


def qkv_rope(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """See :func:`ghostvis.ops.reference.qkv_rope`; the backward writes the stacked gradient in one pass."""
    return qkv_rope_function(qkv, cos, sin, n_heads, n_kv_heads)


def qkv_rope_ok(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int) -> bool:
    # shapes only: a view made here would be traced too (and breaks compiled remat's recompute)
    heads = n_heads + 2 * n_kv_heads
    if qkv.dim() != 3 or n_kv_heads < 1 or n_heads % n_kv_heads or qkv.shape[-1] % heads:
        return False
    d = qkv.shape[-1] // heads
    table = tuple(cos.shape) if cos.dim() == 3 else (1, *cos.shape)
    return (qkv.dtype in FLOAT_DTYPES and d % 2 == 0 and cos.shape == sin.shape and len(table) == 3
            and table[1:] == (qkv.shape[1], d) and table[0] in (1, qkv.shape[0]))


# ----------------------------------------------------------------------------- swiglu_stacked


@torch.library.custom_op("ghostvis::swiglu_stacked_fwd", mutates_args=())
def swiglu_stacked_fwd(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of ``gate_up = [gate | up]`` along the last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return _swiglu_launch(gate, up)


@swiglu_stacked_fwd.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("ghostvis::swiglu_stacked_bwd", mutates_args=())
def swiglu_stacked_bwd(dy: Tensor, gate_up: Tensor) -> Tensor:
    """The gradient of :func:`swiglu_stacked_fwd`'s input as one ``[..., 2F]`` tensor."""
    d_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if gate_up.numel() == 0:
        return d_gate_up
    f = gate_up.shape[-1] // 2
    gu, dy2, out = _rows(gate_up), _rows(dy), d_gate_up.view(-1, 2 * f)
    block, per_row, programs = _swiglu_grid(gu.shape[0], f)
    K.swiglu_bwd.on(gate_up)[(programs,)](gu, gu[:, f:], dy2, out, out[:, f:], f, gu.stride(0), gu.stride(0),
                                          dy2.stride(0), out.stride(0), per_row, BLOCK=block,
                                          num_warps=_num_warps(block))
    return d_gate_up


@swiglu_stacked_bwd.register_fake
def _(dy, gate_up):
    return torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)


def _swiglu_stacked_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_stacked_backward(ctx, dy):
    return swiglu_stacked_backward(dy, ctx.saved_tensors[0])


swiglu_stacked_backward = backward_only("swiglu_stacked_backward", swiglu_stacked_bwd)
swiglu_stacked_function = differentiable("SwiGLUStackedFunction", swiglu_stacked_fwd, _swiglu_stacked_setup,
                                         _swiglu_stacked_backward)


def swiglu_stacked(gate_up: Tensor) -> Tensor:
    """See :func:`ghostvis.ops.reference.swiglu_stacked`; the backward writes one ``[..., 2F]`` gradient."""
    return swiglu_stacked_function(gate_up)


def swiglu_stacked_ok(gate_up: Tensor) -> bool:
    return gate_up.dtype in FLOAT_DTYPES and gate_up.dim() >= 1 and gate_up.shape[-1] % 2 == 0


# ----------------------------------------------------------------------------- int8_linear


def _int8_blocks(m: int) -> tuple[int, int, int]:
    # decode (few rows) is bound by reading the weight: narrow N tiles give more programs to read it
    if m <= 16:
        return 16, 32, 256
    return (triton.next_power_of_2(m), 32, 128) if m <= 64 else (64, 128, 64)


def gemv_config(n: int, k: int, weight_dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)`` of the one-row GEMV for an ``[n, k]`` weight.

    These matmuls are bound by latency more than bytes, so narrow strips (two rows a program,
    many programs) win; only the widest INT8 matrices want wider ones, and an INT8 LM head
    (more than 16K rows) short blocks looped over ``k``. A strip of up to 16K
    elements is held whole (``BLOCK_K >= k``), so that under programmatic dependent launch it
    loads before the kernel waits for its input (``scripts/pdl_probe.py``); wider rows loop
    over ``k`` with the blocks ``scripts/gemv_probe.py`` chose on an H100.
    """
    # INT8 with more than 16K rows (an LM head; also any such projection run alone): tuned on
    # 65536 x 1280 only, 32.7 us on an H100
    if weight_dtype == torch.int8 and n > 16384:
        return 8, 256, 4
    bn = 8 if (weight_dtype == torch.int8 and n >= 4096) else 2
    whole = triton.next_power_of_2(max(k, 1))
    if bn * whole <= 16384:
        return bn, whole, 8 if bn * whole >= 16384 else 4
    if weight_dtype == torch.int8 and n >= 4096:
        return 8, 512, 8
    return (2, 512, 2) if n >= 4096 else (2, 1024, 4)


def gemv_launch(x: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], y: Tensor,
                config: Optional[tuple[int, int, int]] = None) -> Tensor:
    """``y[0] = x[0] @ (weight * scale[:, None]).T + bias`` for one row ``x`` ``[1, K]``;
    ``weight`` ``[N, K]`` bf16/fp16/fp32, or INT8 with ``scale``."""
    n, k = weight.shape
    bn, bk, warps = config if config is not None else gemv_config(n, k, weight.dtype)
    K.gemv.on(x)[(triton.cdiv(n, bn),)](
        x, weight, scale if scale is not None else y, bias if bias is not None else y, y, n, k,
        x.stride(1), weight.stride(0), weight.stride(1),
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        **K.pdl(x))
    return y


@torch.library.custom_op("ghostvis::int8_linear", mutates_args=())
def int8_linear_fwd(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ (weight_int8 * scale[:, None]).T + bias`` without dequantising the weight in memory."""
    n, k = weight_int8.shape
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y2 = y.view(m, n)
    if m == 1:
        gemv_launch(x2, weight_int8, scale, bias, y2)
        return y
    bm, bn, bk = _int8_blocks(m)
    upcast, precision = K.dot_mode(x)
    K.int8_matmul.on(x)[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x2, weight_int8, scale, bias if bias is not None else scale, y2, m, n, k,
        x2.stride(0), x2.stride(1), weight_int8.stride(0), weight_int8.stride(1), y2.stride(0), y2.stride(1),
        HAS_BIAS=bias is not None, UPCAST=upcast, PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return y


@int8_linear_fwd.register_fake
def _(x, weight_int8, scale, bias):
    return x.new_empty((*x.shape[:-1], weight_int8.shape[0]))


def _int8_setup(ctx, inputs, output):
    x, w, scale, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(w, scale)


def _int8_backward(ctx, dy):
    # The weight is frozen (it is integer); only the activation and bias get gradients.
    w, scale = ctx.saved_tensors
    dx = (dy * scale.to(dy.dtype)) @ w.to(dy.dtype)
    dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias else None
    return dx, None, None, dbias


int8_linear_function = differentiable("Int8LinearFunction", int8_linear_fwd, _int8_setup, _int8_backward)


def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Weight-only INT8 linear (Triton forward); weight ``[out, in]`` int8, ``scale`` ``[out]``."""
    return int8_linear_function(x, weight_int8, scale, bias)


def int8_linear_ok(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> bool:
    return (weight_int8.dtype == torch.int8 and weight_int8.dim() == 2 and x.shape[-1] == weight_int8.shape[1]
            and x.dtype in FLOAT_DTYPES and scale.shape == (weight_int8.shape[0],))
