"""Every numeric primitive the GhostVis model calls.

Each public function here routes through :mod:`ghostvis.ops.dispatch`, which
picks a backend (``reference`` plain torch, or a fast one) by device, dtype and
what is installed. Force one with ``ghostvis.ops.use(attention="reference")``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, reference
from .dispatch import backends, force, use

Tensor = torch.Tensor

for _name in ("rms_norm", "layer_norm", "swiglu", "gelu", "linear", "rope", "attention",
              "linear_cross_entropy", "int8_linear"):
    dispatch.register(_name, "reference", getattr(reference, _name))


def _sdpa_ok(q, k, v, **kw) -> bool:
    # The masked reference is exact on CPU; SDPA pays off where a fused kernel exists.
    return q.is_cuda


dispatch.register("attention", "sdpa", reference.sdpa_attention, supports=_sdpa_ok, priority=10)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim, optionally times a learned ``weight``."""
    return dispatch.call("rms_norm", x, weight, eps)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim with affine ``weight`` and ``bias``."""
    return dispatch.call("layer_norm", x, weight, bias, eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """The SwiGLU gate ``silu(gate) * up``."""
    return dispatch.call("swiglu", gate, up)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU; ``approximate="tanh"`` is SigLIP's ``gelu_pytorch_tanh``."""
    return dispatch.call("gelu", x, approximate)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight.T (+ bias)``; weight is ``[out, in]``. INT8 weights go to :func:`int8_linear`."""
    return dispatch.call("linear", x, weight, bias)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary position embedding on q ``[B,Hq,T,D]`` and k ``[B,Hk,T,D]`` (half-split convention)."""
    return dispatch.call("rope", q, k, cos, sin)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, doc_ids: Optional[Tensor] = None,
              key_valid: Optional[Tensor] = None, mask: Optional[Tensor] = None,
              scale: Optional[float] = None) -> Tensor:
    """Softmax attention with GQA; see :func:`ghostvis.ops.reference.attention` for the contract."""
    return dispatch.call("attention", q, k, v, causal=causal, doc_ids=doc_ids, key_valid=key_valid,
                         mask=mask, scale=scale)


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``h @ weight.T``; see :func:`ghostvis.ops.reference.linear_cross_entropy`."""
    return dispatch.call("linear_cross_entropy", h, weight, targets, ignore_index=ignore_index,
                         reduction=reduction)


def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Weight-only INT8 linear with per-output-channel ``scale``."""
    return dispatch.call("int8_linear", x, weight_int8, scale, bias)


__all__ = ["rms_norm", "layer_norm", "swiglu", "gelu", "linear", "rope", "attention", "linear_cross_entropy",
           "int8_linear", "use", "force", "backends", "dispatch", "reference"]
