"""Every numeric primitive the GhostVis model calls.

Each public function here routes through :mod:`ghostvis.ops.dispatch`, which
picks a backend by device, dtype and what is installed:

==================== =============================================================
op                   backends, in the order they are tried
==================== =============================================================
rms_norm             triton, reference
swiglu               triton, reference
rope                 triton, reference
qkv_rope             triton, reference
swiglu_stacked       triton, reference
swiglu_mlp           unfused (the dispatched pieces), epilogue (Triton matmuls with SwiGLU
                     in their epilogues: only when forced by name), reference
add_rms_norm         triton, reference
add_rms_norm_linear  gemv (one row, no gradient), unfused (the dispatched pieces), reference
add_rms_norm_qkv_cache gemv (one row, no gradient), unfused (the dispatched pieces), reference
rope_into_cache      triton (no gradient), reference
linear_cross_entropy triton (chunked), chunked (chunked, torch rows), reference
int8_linear          triton, reference
attention            ring (inside ring.context_parallel), flex (packed documents),
                     decode (one query against a KV cache, no gradient), flash_attn,
                     sdpa, reference
linear               gemv (one row, no gradient), reference
layer_norm, gelu     reference (torch's own kernels are already fused)
==================== =============================================================

Triton backends run CUDA tensors, and CPU tensors through Triton's interpreter
when forced or when ``TRITON_INTERPRET=1``; otherwise CPU takes the reference.
Force a backend for a block with ``ghostvis.ops.use(attention="sdpa")``, globally
with ``force(...)``, or for one call with ``backend="..."``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import attention_backends as _attention
from . import dispatch, reference
from . import ring as _ring
from .dispatch import backends, force, use

Tensor = torch.Tensor

for _name in ("rms_norm", "layer_norm", "swiglu", "gelu", "linear", "rope", "attention",
              "linear_cross_entropy", "int8_linear", "add_rms_norm", "rope_into_cache", "qkv_rope",
              "swiglu_stacked", "swiglu_mlp", "add_rms_norm_linear", "add_rms_norm_qkv_cache"):
    dispatch.register(_name, "reference", getattr(reference, _name))

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # the ops still work: every op keeps its reference
    HAS_TRITON = False


def _triton_auto(first: Tensor, *args, **kwargs) -> bool:
    return first.is_cuda or (first.device.type == "cpu" and dispatch.interpreting())


def _triton_device(first: Tensor, *args, **kwargs) -> bool:
    return first.is_cuda or first.device.type == "cpu"


def _both(*preds):
    return lambda *a, **k: all(p(*a, **k) for p in preds)


if HAS_TRITON:
    from . import decode, fused, linear_ce, mlp

    # (op, backend, function, the inputs it takes, priority); all run CUDA, or CPU through the interpreter
    for _op, _name, _fn, _ok, _priority in (
            ("rms_norm", "triton", fused.rms_norm, fused.rms_norm_ok, 10),
            ("swiglu", "triton", fused.swiglu, fused.swiglu_ok, 10),
            ("rope", "triton", fused.rope, fused.rope_ok, 10),
            ("qkv_rope", "triton", fused.qkv_rope, fused.qkv_rope_ok, 10),
            ("swiglu_stacked", "triton", fused.swiglu_stacked, fused.swiglu_stacked_ok, 10),
            ("int8_linear", "triton", fused.int8_linear, fused.int8_linear_ok, 10),
            ("linear_cross_entropy", "triton", linear_ce.linear_cross_entropy, linear_ce.linear_cross_entropy_ok, 10),
            ("add_rms_norm", "triton", fused.add_rms_norm, fused.add_rms_norm_ok, 10),
            ("rope_into_cache", "triton", decode.rope_into_cache, decode.rope_into_cache_ok, 10),
            ("attention", "decode", decode.decode_attention, decode.decode_attention_ok, 25),
            ("linear", "gemv", decode.linear_gemv, decode.linear_gemv_ok, 10),
            ("add_rms_norm_linear", "gemv", decode.add_rms_norm_linear_gemv, decode.add_rms_norm_linear_gemv_ok,
             10),
            ("add_rms_norm_qkv_cache", "gemv", decode.add_rms_norm_qkv_cache_gemv,
             decode.add_rms_norm_qkv_cache_gemv_ok, 10)):
        dispatch.register(_op, _name, _fn, priority=_priority, auto=_triton_auto,
                          supports=_both(_triton_device, _ok))
    # its own backend name, so that forcing every op to "triton" does not pick it
    dispatch.register("swiglu_mlp", "epilogue", mlp.swiglu_mlp, priority=10, auto=mlp.swiglu_mlp_auto,
                      supports=_both(_triton_device, mlp.swiglu_mlp_ok))

# The chunked loss with plain-torch rows: no Triton needed; picked only when forced.
from . import linear_ce as _linear_ce  # noqa: E402


def _chunked_torch(h, weight, targets, **kw):
    return _linear_ce.linear_cross_entropy(h, weight, targets, impl="torch", **kw)


dispatch.register("linear_cross_entropy", "chunked", _chunked_torch, supports=_linear_ce.linear_cross_entropy_ok,
                  priority=-10, auto=lambda *a, **k: False)

dispatch.register("attention", "sdpa", _attention.sdpa_attention, supports=_attention.sdpa_ok, priority=10)
# inside ring.context_parallel(...) causal self-attention spans the sequence shards of a process group
dispatch.register("attention", "ring", _ring.ring_backend, supports=_ring.ring_supports, priority=100)
dispatch.register("attention", "flash_attn", _attention.flash_attention, supports=_attention.flash_attn_ok,
                  priority=20)
dispatch.register("attention", "flex", _attention.flex_attention, supports=_attention.flex_ok, priority=30,
                  auto=_attention.flex_for_documents)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, *, backend: Optional[str] = None) -> Tensor:
    """RMSNorm over the last dim, optionally times a learned ``weight``."""
    return dispatch.call("rms_norm", x, weight, eps, backend=backend)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6, *,
               backend: Optional[str] = None) -> Tensor:
    """LayerNorm over the last dim with affine ``weight`` and ``bias``."""
    return dispatch.call("layer_norm", x, weight, bias, eps, backend=backend)


def swiglu(gate: Tensor, up: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """The SwiGLU gate ``silu(gate) * up``."""
    return dispatch.call("swiglu", gate, up, backend=backend)


def swiglu_stacked(gate_up: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """:func:`swiglu` of the two halves of ``gate_up``'s last dim (a stacked gate/up projection);
    its gradient comes back as one tensor, so the projection's backward needs no concatenation."""
    return dispatch.call("swiglu_stacked", gate_up, backend=backend)


def _swiglu_mlp_unfused(x: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    return linear(swiglu_stacked(linear(x, w_gate_up)), w_down)


dispatch.register("swiglu_mlp", "unfused", _swiglu_mlp_unfused, priority=5)


def swiglu_mlp(x: Tensor, w_gate_up: Tensor, w_down: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """A SwiGLU MLP on stacked gate/up weights: ``swiglu_stacked(x @ w_gate_up.T) @ w_down.T``.

    By default it runs as its dispatched pieces (``unfused``: the matmuls, the stacked SwiGLU
    kernel, the one-row decoding kernels). ``backend="epilogue"`` runs it as one op whose
    backward applies SwiGLU's backward inside the down projection's input-gradient matmul
    (:mod:`ghostvis.ops.mlp`); it is not picked unasked, having measured slower at d20.
    """
    return dispatch.call("swiglu_mlp", x, w_gate_up, w_down, backend=backend)


def _add_rms_norm_linear_unfused(x: Tensor, residual: Optional[Tensor], norm_weight: Optional[Tensor],
                                 weight: Tensor, eps: float = 1e-6, *, scale: Optional[Tensor] = None,
                                 bias: Optional[Tensor] = None, gate: bool = False) -> tuple[Tensor, Tensor]:
    s, h = add_rms_norm(x, residual, norm_weight, eps)
    y = int8_linear(h, weight, scale, bias) if scale is not None else linear(h, weight, bias)
    return s, swiglu_stacked(y) if gate else y


dispatch.register("add_rms_norm_linear", "unfused", _add_rms_norm_linear_unfused, priority=5)


def add_rms_norm_linear(x: Tensor, residual: Optional[Tensor], norm_weight: Optional[Tensor], weight: Tensor,
                        eps: float = 1e-6, *, scale: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        gate: bool = False, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """``(s, y)``: the residual add and RMSNorm of :func:`add_rms_norm`, then the projection of the
    normalised row by ``weight`` ``[N, K]`` (INT8 times its per-row ``scale`` when ``scale`` is
    given) plus ``bias``. With ``gate``, ``weight`` stacks gate rows over up rows and ``y`` is
    :func:`swiglu_stacked` of the projection, ``[..., N / 2]``.

    A decoding step's one row takes the ``gemv`` backend: all of it in one kernel, where it
    was three (add + norm, GEMV, SwiGLU). Anything else runs as the dispatched pieces.
    """
    return dispatch.call("add_rms_norm_linear", x, residual, norm_weight, weight, eps, scale=scale, bias=bias,
                         gate=gate, backend=backend)


def _add_rms_norm_qkv_cache_unfused(x: Tensor, residual: Optional[Tensor], norm_weight: Optional[Tensor],
                                    weight: Tensor, eps: float, cos: Tensor, sin: Tensor, k_buf: Tensor,
                                    v_buf: Tensor, slots: Tensor, *, scale: Optional[Tensor] = None,
                                    bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    s, qkv = add_rms_norm_linear(x, residual, norm_weight, weight, eps, scale=scale, bias=bias)
    q, k, v = reference.split_qkv(qkv, k_buf.shape[1], k_buf.shape[3])
    return s, rope_into_cache(q, k, v, cos, sin, k_buf, v_buf, slots)


dispatch.register("add_rms_norm_qkv_cache", "unfused", _add_rms_norm_qkv_cache_unfused, priority=5)


def add_rms_norm_qkv_cache(x: Tensor, residual: Optional[Tensor], norm_weight: Optional[Tensor], weight: Tensor,
                           eps: float, cos: Tensor, sin: Tensor, k_buf: Tensor, v_buf: Tensor, slots: Tensor, *,
                           scale: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                           backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """``(s, q)``: :func:`add_rms_norm_linear` by a stacked q/k/v ``weight`` ``[(Hq + 2 Hkv) D, K]``
    (INT8 with ``scale``), then :func:`rope_into_cache`: q ``[B, Hq, T, D]`` rotated, k rotated
    and v written into ``k_buf`` / ``v_buf`` ``[B, Hkv, S, D]`` at ``slots``, in place.

    A decoding step's one row takes the ``gemv`` backend: add, norm, projection, RoPE and the
    cache writes in one kernel. Anything else runs as the dispatched pieces.
    """
    return dispatch.call("add_rms_norm_qkv_cache", x, residual, norm_weight, weight, eps, cos, sin, k_buf, v_buf,
                         slots, scale=scale, bias=bias, backend=backend)


def gelu(x: Tensor, approximate: str = "none", *, backend: Optional[str] = None) -> Tensor:
    """GELU; ``approximate="tanh"`` is SigLIP's ``gelu_pytorch_tanh``."""
    return dispatch.call("gelu", x, approximate, backend=backend)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``x @ weight.T (+ bias)``; weight is ``[out, in]``. INT8 weights go to :func:`int8_linear`."""
    return dispatch.call("linear", x, weight, bias, backend=backend)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Rotary position embedding on q ``[B,Hq,T,D]`` and k ``[B,Hk,T,D]`` (half-split convention)."""
    return dispatch.call("rope", q, k, cos, sin, backend=backend)


def qkv_rope(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int, *,
             backend: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (with RoPE) and v ``[B, H, T, D]`` from a stacked projection ``[B, T, (Hq + 2 Hkv) * D]``.

    One pass over the projection forward, and one backward that writes the projection's
    gradient in one piece; see :func:`ghostvis.ops.reference.qkv_rope`.
    """
    return dispatch.call("qkv_rope", qkv, cos, sin, n_heads, n_kv_heads, backend=backend)


def add_rms_norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor] = None, eps: float = 1e-6, *,
                 backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """``(x + residual, rms_norm(x + residual, weight))``: a residual add and the norm after it."""
    return dispatch.call("add_rms_norm", x, residual, weight, eps, backend=backend)


def rope_into_cache(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_buf: Tensor, v_buf: Tensor,
                    slots: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """RoPE on q and k, k and v written into the KV cache at ``slots``; returns the rotated q.

    A slot outside the cache is an error for the reference (``index_copy_``); the Triton
    kernel writes nothing there (it cannot raise without a host sync)."""
    return dispatch.call("rope_into_cache", q, k, v, cos, sin, k_buf, v_buf, slots, backend=backend)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, doc_ids: Optional[Tensor] = None,
              key_valid: Optional[Tensor] = None, mask: Optional[Tensor] = None,
              scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """Softmax attention with GQA; see :func:`ghostvis.ops.reference.attention` for the contract."""
    return dispatch.call("attention", q, k, v, causal=causal, doc_ids=doc_ids, key_valid=key_valid,
                         mask=mask, scale=scale, backend=backend)


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", backend: Optional[str] = None) -> Tensor:
    """Cross-entropy of ``h @ weight.T``; see :func:`ghostvis.ops.reference.linear_cross_entropy`."""
    return dispatch.call("linear_cross_entropy", h, weight, targets, ignore_index=ignore_index,
                         reduction=reduction, backend=backend)


def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Optional[Tensor] = None, *,
                backend: Optional[str] = None) -> Tensor:
    """Weight-only INT8 linear with per-output-channel ``scale``."""
    return dispatch.call("int8_linear", x, weight_int8, scale, bias, backend=backend)


__all__ = ["rms_norm", "layer_norm", "swiglu", "gelu", "linear", "rope", "attention", "linear_cross_entropy",
           "int8_linear", "add_rms_norm", "add_rms_norm_linear",
           "add_rms_norm_qkv_cache", "rope_into_cache", "qkv_rope", "swiglu_stacked",
           "swiglu_mlp",
           "use", "force", "backends",
           "dispatch", "reference",
           "HAS_TRITON"]
