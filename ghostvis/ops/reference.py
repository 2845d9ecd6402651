"""Plain-torch reference implementations of every GhostVis op.

These are the oracles: fast backends are tested against them, and they are the
CPU path. They favour clarity over speed, accumulate in float32 where it
matters, and return the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """``x / rms(x) * weight`` over the last dim, computed in float32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim, computed in float32."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU, exact (``approximate="none"``) or the tanh form SigLIP uses."""
    return F.gelu(x, approximate=approximate)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight.T + bias`` with weight in the ``[out, in]`` layout."""
    return F.linear(x, weight, bias)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding in the half-split (HF Llama ``rotate_half``) convention.

    q: ``[B, Hq, T, D]``, k: ``[B, Hk, T, D]``, cos/sin: ``[B, T, D]`` (or ``[T, D]``).
    """
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    c, s = cos[:, None].float(), sin[:, None].float()
    qf, kf = q.float(), k.float()
    return (qf * c + _rotate_half(qf) * s).to(q.dtype), (kf * c + _rotate_half(kf) * s).to(k.dtype)


def qkv_rope(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int,
             n_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (rotated by :func:`rope`) and v ``[B, H, T, D]`` from a stacked projection.

    ``qkv`` is ``[B, T, (n_heads + 2 * n_kv_heads) * D]``: the q, k and v projections side by
    side along the last dim, heads ``D`` wide within each, as ``x @ cat([wq, wk, wv]).T`` gives.
    """
    heads = n_heads + 2 * n_kv_heads
    x = qkv.unflatten(-1, (heads, qkv.shape[-1] // heads)).transpose(1, 2)
    q, k, v = x.split([n_heads, n_kv_heads, n_kv_heads], dim=1)
    q, k = rope(q, k, cos, sin)
    return q, k, v


def swiglu_stacked(gate_up: Tensor) -> Tensor:
    """:func:`swiglu` of ``gate_up = [gate | up]`` (the two halves of the last dim)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up)


def swiglu_mlp(x: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """A SwiGLU MLP with stacked gate/up weights: ``swiglu_stacked(x @ w_gate_up.T) @ w_down.T``.

    ``w_gate_up`` is ``[2F, D]`` (the gate rows, then the up rows), ``w_down`` ``[D, F]``.
    """
    return F.linear(swiglu_stacked(F.linear(x, w_gate_up)), w_down)


def add_rms_norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor] = None,
                 eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``(s, rms_norm(s, weight))`` with ``s = x + residual`` (``s = x`` when ``residual`` is None).

    A pre-norm block's residual add and the norm that follows it, as one op.
    """
    s = x if residual is None else x + residual
    return s, rms_norm(s, weight, eps)


def add_rms_norm_linear(x: Tensor, residual: Optional[Tensor], norm_weight: Optional[Tensor], weight: Tensor,
                        eps: float = 1e-6, *, scale: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        gate: bool = False) -> tuple[Tensor, Tensor]:
    """``(s, y)``: ``s, h = add_rms_norm(x, residual, norm_weight, eps)`` and ``y`` the projection of
    ``h`` by ``weight`` (INT8 times ``scale`` when given), plus ``bias``; with ``gate``,
    ``swiglu_stacked`` of it (``weight`` stacks the gate rows over the up rows).

    A block's residual add, the norm and the projection reading it, as one op.
    """
    s, h = add_rms_norm(x, residual, norm_weight, eps)
    y = int8_linear(h, weight, scale, bias) if scale is not None else linear(h, weight, bias)
    return s, swiglu_stacked(y) if gate else y


def add_rms_norm_qkv_cache(x: Tensor, residual: Optional[Tensor], norm_weight: Optional[Tensor], weight: Tensor,
                           eps: float, cos: Tensor, sin: Tensor, k_buf: Tensor, v_buf: Tensor, slots: Tensor, *,
                           scale: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(s, q)``: :func:`add_rms_norm_linear` with a stacked q/k/v ``weight`` (heads as ``k_buf``'s),
    then :func:`rope_into_cache` of its q, k and v; ``q`` ``[B, Hq, T, D]``, k and v written into
    ``k_buf`` / ``v_buf`` at ``slots``. A decoding block's attention input, as one op."""
    s, qkv = add_rms_norm_linear(x, residual, norm_weight, weight, eps, scale=scale, bias=bias)
    q, k, v = split_qkv(qkv, k_buf.shape[1], k_buf.shape[3])
    return s, rope_into_cache(q, k, v, cos, sin, k_buf, v_buf, slots)


def split_qkv(qkv: Tensor, n_kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """q ``[B, Hq, T, D]``, k and v ``[B, Hkv, T, D]`` (views) of a stacked projection ``[B, T, (Hq + 2 Hkv) D]``."""
    b, t, width = qkv.shape
    heads = qkv.view(b, t, width // head_dim, head_dim).transpose(1, 2)
    n_heads = width // head_dim - 2 * n_kv_heads
    return heads[:, :n_heads], heads[:, n_heads:n_heads + n_kv_heads], heads[:, n_heads + n_kv_heads:]


def rope_into_cache(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_buf: Tensor, v_buf: Tensor,
                    slots: Tensor) -> Tensor:
    """RoPE on q and k, then k and v written into a KV cache; returns the rotated q.

    q ``[B, Hq, T, D]``, k/v ``[B, Hk, T, D]``, cos/sin as for :func:`rope`; ``k_buf`` /
    ``v_buf`` ``[B, Hk, S, D]`` receive k (rotated) and v at columns ``slots`` ``[T]``, in place.
    """
    q, k = rope(q, k, cos, sin)
    k_buf.index_copy_(2, slots, k.to(k_buf.dtype))
    v_buf.index_copy_(2, slots, v.to(v_buf.dtype))
    return q


def attention_mask(
    tq: int,
    tk: int,
    *,
    causal: bool,
    doc_ids: Optional[Tensor] = None,
    key_valid: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    device=None,
) -> Optional[Tensor]:
    """The boolean ``[B|1, 1, Tq, Tk]`` mask (True = may attend) the arguments describe, or None.

    Causal masking is bottom-right aligned: query ``i`` sits at position ``tk - tq + i``.
    """
    out = None
    if causal:
        qpos = torch.arange(tq, device=device) + (tk - tq)
        out = (torch.arange(tk, device=device)[None, :] <= qpos[:, None])[None, None]
    if doc_ids is not None:
        if tq != tk:
            raise ValueError(f"doc_ids need as many queries as keys, got {tq} and {tk}")
        same = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
        out = same if out is None else out & same
    if key_valid is not None:
        kv = key_valid[:, None, None, :].bool()
        out = kv if out is None else out & kv
    if mask is not None:
        out = mask.bool() if out is None else out & mask.bool()
    return out


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    doc_ids: Optional[Tensor] = None,
    key_valid: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Softmax attention with GQA, computed in float32 without repeating K/V.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` with ``Hkv`` dividing ``Hq``.
        causal: bottom-right aligned causal mask (decode against a cache works).
        doc_ids: ``[B, T]`` document ids of a packed row; tokens attend only
            within their own document.
        key_valid: ``[B, Tk]`` bool, False for padding keys.
        mask: extra bool mask broadcastable to ``[B, 1, Tq, Tk]`` (True = attend).
        scale: softmax scale, default ``D ** -0.5``.

    A query row with no allowed key returns zeros.
    """
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = hq // hk
    scale = d**-0.5 if scale is None else scale
    qg = q.float().reshape(b, hk, g, tq, d)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.float()) * scale
    allowed = attention_mask(tq, tk, causal=causal, doc_ids=doc_ids, key_valid=key_valid, mask=mask, device=q.device)
    if allowed is not None:
        allowed = allowed[:, :, None]  # broadcast over the group dim
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, v.float())
    return out.reshape(b, hq, tq, d).to(q.dtype)


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of ``h @ weight.T`` against ``targets``, logits in float32.

    h: ``[N, D]``, weight: ``[V, D]``, targets: ``[N]``. ``reduction`` is
    ``mean`` (over non-ignored tokens; 0 when all are ignored), ``sum`` or
    ``none`` (per token, 0 at ignored positions). This reference materialises
    the ``[N, V]`` logits; fast backends never do.
    """
    logits = (h @ weight.T).float()
    losses = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        count = (targets != ignore_index).sum().clamp(min=1)
        return losses.sum() / count
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Weight-only INT8 linear: ``x @ (weight_int8 * scale[:, None]).T``.

    weight_int8: ``[out, in]`` int8; scale: ``[out]`` per-output-channel scales.
    """
    y = F.linear(x, weight_int8.to(x.dtype)) * scale.to(x.dtype)
    return y + bias if bias is not None else y
