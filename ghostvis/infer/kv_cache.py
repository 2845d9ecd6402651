"""The static KV cache: one preallocated ``(k_buf, v_buf)`` pair per decoder layer.

Shapes never change during a generation (``[B, n_kv_heads, S, head_dim]`` with
``S`` = longest prompt + new tokens), so the decode step can be captured once
and replayed. Prompts are left-padded: row ``b`` of a batch whose longest prompt
has ``P`` tokens starts at slot ``pad[b] = P - len(prompt_b)``. A slot is a
column of the buffers; a position is the RoPE index of the token in it
(``slot - pad[b]``), so every row sees its own prompt starting at position 0.

The buffers are written in place by :func:`ghostvis.core.decoder.attention_block`;
everything else here is a pure function that builds indices and masks.
"""

from __future__ import annotations

import torch

from ..core.config import TextConfig

Tensor = torch.Tensor


def init_kv_cache(cfg: TextConfig, batch: int, slots: int, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    """Zeroed ``(k_buf, v_buf)`` per layer, each ``[batch, n_kv_heads, slots, head_dim]``."""
    shape = (batch, cfg.n_kv_heads, slots, cfg.head_dim)
    return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.n_layers)]


def left_pad(prompts: list[list[int]], pad_id: int = 0, device: str | torch.device = "cpu",
             width: int | None = None) -> tuple[Tensor, Tensor]:
    """Prompts as one left-padded ``[B, P]`` LongTensor, plus ``pad`` ``[B]`` (pad tokens per row).

    ``P`` is the longest prompt's length, or ``width`` when given (at least that length).
    """
    longest = max(len(p) for p in prompts)
    if width is not None:
        if width < longest:
            raise ValueError(f"width {width} is shorter than the longest prompt ({longest} tokens)")
        longest = width
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        tokens[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long)
    return tokens.to(device), pad.to(device)


def key_valid(pad: Tensor, slots: int) -> Tensor:
    """``[B, S]`` bool: True where a slot holds a real token of its row (not left padding)."""
    return torch.arange(slots, device=pad.device)[None, :] >= pad[:, None]


def positions_at(cache_pos: Tensor, pad: Tensor) -> Tensor:
    """RoPE positions ``[B, T]`` of the tokens written at slots ``cache_pos`` ``[T]`` (0 on padding)."""
    return (cache_pos[None, :] - pad[:, None]).clamp(min=0)


def attention_mask(cache_pos: Tensor, valid: Tensor) -> Tensor:
    """``[B, 1, T, S]`` bool for queries at slots ``cache_pos`` ``[T]``: causal and never onto padding."""
    slots = valid.shape[1]
    causal = torch.arange(slots, device=valid.device)[None, :] <= cache_pos[:, None]  # [T, S]
    return (causal[None] & valid[:, None, :])[:, None]
