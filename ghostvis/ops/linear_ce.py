"""Chunked linear cross-entropy: ``CE(h @ W.T, targets)`` without the ``[N, V]`` logits.

Tokens are processed in chunks. For each chunk the logits are one matmul; a
row kernel (Triton, or plain torch as a fallback) turns them into the loss and,
in training, overwrites them in place with ``d loss / d logits``; two more
matmuls give that chunk's share of the gradients for ``h`` and ``W`` (the
latter accumulated in float32). So only one chunk of logits ever exists.

For ``mean``/``sum`` the gradients are computed during the forward pass (the
loss is a scalar, so the backward only rescales them by the incoming grad):
three matmuls in all, like the materialised version, with one chunk of memory.
For ``none`` (per-token losses) the forward keeps only the per-token
log-sum-exp and the backward recomputes each chunk of logits.
"""

from __future__ import annotations

import logging

import torch

from .library import backward_only, differentiable

log = logging.getLogger(__name__)

Tensor = torch.Tensor

# logits per chunk: 8192 tokens at a 65536 vocab (1 GiB in bf16). On an H100 (scripts/lce_probe.py)
# 8192-token chunks took 0.3-0.8 ms less per 32k-token step than 4096-token ones; larger chunks
# gained 0.3-0.4 ms more on one card and nothing on another, for twice the memory.
CHUNK_ELEMENTS = 2**29


def chunk_rows(n: int, vocab: int) -> int:
    """Tokens per chunk so one chunk of logits holds about ``CHUNK_ELEMENTS`` values."""
    return max(1, min(n, CHUNK_ELEMENTS // max(vocab, 1)))


def _rows_torch(logits: Tensor, targets: Tensor, scale: Tensor, ignore_index: int,
                write_grad: bool) -> tuple[Tensor, Tensor]:
    """Per-row (loss, lse) of a logits chunk; optionally writes the scaled softmax grad into it."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    ignored = targets == ignore_index
    safe = torch.where(ignored, 0, targets)
    loss = torch.where(ignored, 0.0, lse - lf.gather(1, safe[:, None])[:, 0])
    if write_grad:
        grad = torch.exp(lf - lse[:, None])
        grad[torch.arange(len(safe), device=grad.device), safe] -= 1.0
        s = torch.where(ignored, 0.0, scale.float().expand(len(targets)))
        logits.copy_(grad * s[:, None])
    return loss, lse


# the row kernel's launch on a GPU: columns per loop step and warps. On an H100, 8192 x 16 warps
# took 1.11 ms on 8192 x 65536 bf16 logits, 4096 x 8 warps 1.23 ms (scripts/lce_probe.py)
ROWS_LAUNCH = {"block": 8192, "warps": 16}


def _rows_triton(logits: Tensor, targets: Tensor, scale: Tensor, ignore_index: int,
                 write_grad: bool) -> tuple[Tensor, Tensor]:
    from . import kernels as K

    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss, lse
    block = min(ROWS_LAUNCH["block"] if logits.is_cuda else 1024, 1 << (v - 1).bit_length())
    warps = ROWS_LAUNCH["warps"] if block >= ROWS_LAUNCH["block"] else 8 if block >= 2048 else 4
    K.cross_entropy_rows.on(logits)[(n,)](
        logits, logits.stride(0), targets, loss, lse, scale, 1 if scale.numel() > 1 else 0, v, ignore_index,
        WRITE_GRAD=write_grad, BLOCK=block, num_warps=warps)
    return loss, lse


_ROW_IMPLS = {"torch": _rows_torch, "triton": _rows_triton}


def _chunks(n: int, vocab: int):
    step = chunk_rows(n, vocab)
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _scale_for(targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "mean":
        return 1.0 / (targets != ignore_index).sum().clamp(min=1).float().reshape(1)
    return torch.ones(1, dtype=torch.float32, device=targets.device)


_FP32_OUT_OK: dict[str, bool] = {}


def _fp32_out_ok(a: Tensor) -> bool:
    """Whether this device multiplies bf16/fp16 matrices into a float32 output (``out_dtype``), tried once."""
    if not a.is_cuda or a.dtype not in (torch.float16, torch.bfloat16):
        return False
    key = f"{a.device}:{a.dtype}"
    if key not in _FP32_OUT_OK:
        if torch.cuda.is_current_stream_capturing():  # no trial launches inside a CUDA graph capture
            return False
        try:  # both calls the accumulation makes; no result is read back, so no sync
            x = torch.ones(2, 2, dtype=a.dtype, device=a.device)
            acc = torch.mm(x, x, out_dtype=torch.float32)
            torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc)
            _FP32_OUT_OK[key] = acc.dtype == torch.float32
        except (RuntimeError, TypeError) as e:
            _FP32_OUT_OK[key] = False
            log.info("linear_cross_entropy on %s: no float32-output matmul (%s); the weight gradient "
                     "takes a half-precision product and a float32 add per chunk", key, type(e).__name__)
    return _FP32_OUT_OK[key]


class _WeightGrad:
    """Sum of per-chunk ``dlogits.T @ h`` in float32 (or the weight's dtype when that is wider).

    Where the device can (``_fp32_out_ok``), each chunk's matmul adds its float32 result into the
    sum itself (``addmm`` with ``out_dtype``): no half-precision product, no separate add pass.
    """

    def __init__(self, weight: Tensor):
        self.weight = weight
        self.acc = None

    def add_mm(self, a: Tensor, b: Tensor) -> None:
        """Add ``a @ b`` to the sum."""
        if _fp32_out_ok(a) and self.weight.dtype != torch.float64:
            if self.acc is None:
                self.acc = torch.mm(a, b, out_dtype=torch.float32)
            else:
                torch.addmm(self.acc, a, b, out_dtype=torch.float32, out=self.acc)
            return
        part = a @ b
        if self.acc is None:
            self.acc = part.float() if part.dtype != torch.float32 else part
        else:
            self.acc += part

    def result(self) -> Tensor:
        if self.acc is None:
            return torch.zeros_like(self.weight)
        return self.acc.to(self.weight.dtype)


def _backward_chunk(dlogits: Tensor, h_chunk: Tensor, weight: Tensor, grad_h: Tensor, gw: _WeightGrad) -> None:
    torch.mm(dlogits, weight, out=grad_h)
    gw.add_mm(dlogits.t(), h_chunk)


@torch.library.custom_op("ghostvis::linear_ce_fused", mutates_args=())
def linear_ce_fused(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, reduction: str,
                    impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, dloss/dh, dloss/dweight)`` for ``mean``/``sum`` in one chunked pass."""
    n = h.shape[0]
    rows = _ROW_IMPLS[impl]
    scale = _scale_for(targets, ignore_index, reduction)
    losses = torch.empty(n, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
    gw = _WeightGrad(weight)
    for s, e in _chunks(n, weight.shape[0]):
        logits = h[s:e] @ weight.t()
        losses[s:e], _ = rows(logits, targets[s:e], scale, ignore_index, True)
        _backward_chunk(logits, h[s:e], weight, grad_h[s:e], gw)
    return losses.sum() * scale[0], grad_h, gw.result()


@linear_ce_fused.register_fake
def _(h, weight, targets, ignore_index, reduction, impl):
    return h.new_empty((), dtype=torch.float32), torch.empty_like(h), torch.empty_like(weight)


def _fused_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _fused_backward(ctx, dloss, _dgh, _dgw):
    grad_h, grad_w = ctx.saved_tensors
    return grad_h * dloss.to(grad_h.dtype), grad_w * dloss.to(grad_w.dtype), None, None, None, None


fused_loss_function = differentiable("FusedLossFunction", linear_ce_fused, _fused_setup, _fused_backward,
                                   non_differentiable=(1, 2))


@torch.library.custom_op("ghostvis::linear_ce_fwd", mutates_args=())
def linear_ce_fwd(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, impl: str) -> tuple[Tensor, Tensor]:
    """Per-token ``(loss, lse)`` in float32, chunked; loss is 0 at ignored tokens."""
    n = h.shape[0]
    rows = _ROW_IMPLS[impl]
    losses = torch.empty(n, dtype=torch.float32, device=h.device)
    lses = torch.empty(n, dtype=torch.float32, device=h.device)
    unused = torch.ones(1, dtype=torch.float32, device=h.device)
    for s, e in _chunks(n, weight.shape[0]):
        losses[s:e], lses[s:e] = rows(h[s:e] @ weight.t(), targets[s:e], unused, ignore_index, False)
    return losses, lses


@linear_ce_fwd.register_fake
def _(h, weight, targets, ignore_index, impl):
    n = h.shape[0]
    return h.new_empty((n,), dtype=torch.float32), h.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("ghostvis::linear_ce_bwd", mutates_args=())
def linear_ce_bwd(dlosses: Tensor, h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                  impl: str) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(dlosses * losses)`` for per-token losses, recomputing each logits chunk."""
    n = h.shape[0]
    rows = _ROW_IMPLS[impl]
    grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
    gw = _WeightGrad(weight)
    dl = dlosses.float().contiguous()
    for s, e in _chunks(n, weight.shape[0]):
        logits = h[s:e] @ weight.t()
        rows(logits, targets[s:e], dl[s:e], ignore_index, True)
        _backward_chunk(logits, h[s:e], weight, grad_h[s:e], gw)
    return grad_h, gw.result()


@linear_ce_bwd.register_fake
def _(dlosses, h, weight, targets, ignore_index, impl):
    return torch.empty_like(h), torch.empty_like(weight)


def _fwd_setup(ctx, inputs, output):
    h, weight, targets, ignore_index, impl = inputs
    ctx.ignore_index, ctx.impl = ignore_index, impl
    ctx.save_for_backward(h, weight, targets)


def _fwd_backward(ctx, dlosses, _dlse):
    h, weight, targets = ctx.saved_tensors
    grad_h, grad_w = per_token_loss_backward(dlosses, h, weight, targets, ctx.ignore_index, ctx.impl)
    return grad_h, grad_w, None, None, None


per_token_loss_backward = backward_only("per_token_loss_backward", linear_ce_bwd)
per_token_loss_function = differentiable("PerTokenLossFunction", linear_ce_fwd, _fwd_setup, _fwd_backward,
                                      non_differentiable=(1,))


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", impl: str = "triton") -> Tensor:
    """Cross-entropy of ``h @ weight.T`` (contract of the reference), never holding all logits.

    h: ``[N, D]`` (leading dims are flattened), weight: ``[V, D]``, targets: ``[N]``.
    ``impl`` picks the per-row kernel: ``triton`` or ``torch``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    lead = h.shape[:-1]
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    if h.shape[0] != targets.shape[0]:
        raise ValueError(f"h has {h.shape[0]} tokens but targets has {targets.shape[0]}")
    if h.stride(-1) != 1:
        h = h.contiguous()
    wants_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if reduction != "none" and wants_grad:
        return fused_loss_function(h, weight, targets, ignore_index, reduction, impl)[0]
    losses = per_token_loss_function(h, weight, targets, ignore_index, impl)[0]
    if reduction == "none":
        return losses.reshape(lead)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum().clamp(min=1)


def linear_cross_entropy_ok(h: Tensor, weight: Tensor, targets: Tensor, **kw) -> bool:
    return (h.dim() >= 1 and weight.dim() == 2 and h.shape[-1] == weight.shape[1] and h.dtype == weight.dtype
            and h.dtype in (torch.float32, torch.float16, torch.bfloat16) and not targets.is_floating_point())
