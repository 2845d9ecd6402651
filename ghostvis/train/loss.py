"""The training loss: token-level cross-entropy of the supervised positions of a batch.

``loss_fn(params, batch, cfg)`` is pure: decoder hidden states, then the fused
``ops.linear_cross_entropy`` over positions whose target is not ``-100``. With
``normalizer`` the *sum* of token losses is divided by a count the caller
chooses: dividing every micro-batch by the token count of the whole (global)
batch makes the sum over micro-batches -- and over data-parallel ranks --
exactly the loss of one big batch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import ops
from ..core import decoder
from ..core.model import hidden_states
from ..infer.quantize import dequantize_weight, is_quantized

Tensor = torch.Tensor
IGNORE = -100


def supervised_tokens(batch: dict) -> Tensor:
    """Number of positions with a target (an int64 scalar tensor)."""
    return (batch["targets"] != IGNORE).sum()


def loss_fn(params: dict, batch: dict, cfg, *, normalizer: Optional[Tensor | float] = None,
            block_fn: Optional[Callable] = None, select: bool = True) -> Tensor:
    """Cross-entropy over supervised tokens: ``sum(token losses) / normalizer``.

    Args:
        params: the full parameter pytree.
        batch: ``tokens``, ``targets``, ``positions``, ``doc_ids`` ``[B, T]`` and ``images`` (or None).
        cfg: the :class:`ModelConfig`.
        normalizer: what the summed loss is divided by; default the batch's own
            supervised-token count (a plain mean).
        block_fn: replaces the decoder block (e.g. a rematerialised one).
        select: gather supervised positions before the LM head (fast when few are
            supervised, as in SFT); ``False`` keeps shapes static for ``torch.compile``.
    """
    h = hidden_states(params, cfg, batch["tokens"], batch.get("images"), positions=batch.get("positions"),
                      doc_ids=batch.get("doc_ids"), block_fn=block_fn)
    targets = batch["targets"]
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if select:
        keep = targets != IGNORE
        h, targets = h[keep], targets[keep]
    head = decoder.lm_head_weight(params["text"])
    if is_quantized(head):  # an INT8 head is frozen: its float value, no gradient
        head = dequantize_weight(head).detach()
    if torch.is_autocast_enabled(h.device.type):
        # autocast does not reach this custom op: cast its matmul's inputs as autocast casts a matmul's
        # (float32 params and residual stream would otherwise run the LM head as a float32 GEMM)
        dtype = torch.get_autocast_dtype(h.device.type)
        h, head = h.to(dtype), head.to(dtype)
    total = ops.linear_cross_entropy(h, head, targets, ignore_index=IGNORE, reduction="sum")
    if normalizer is None:
        normalizer = (targets != IGNORE).sum().clamp(min=1)
    return total / normalizer
