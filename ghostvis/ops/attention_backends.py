"""Fast attention backends: FlashAttention, torch SDPA and FlexAttention for packed documents.

All take the contract of :func:`ghostvis.ops.reference.attention` (q ``[B,Hq,Tq,D]``,
k/v ``[B,Hkv,Tk,D]``, GQA without repeating K/V) and each has a ``*_ok``
predicate saying which inputs it takes:

- ``sdpa``: torch's scaled_dot_product_attention; torch picks cuDNN / flash /
  memory-efficient. GQA through ``enable_gqa``. Masks other than plain causal
  become a dense boolean mask (fine for decode, slow for packed rows).
- ``flex``: FlexAttention with a block mask built from document ids, so blocks
  that straddle no document boundary run dense and blocks across documents are
  skipped. The block mask is cached: every layer of one step passes the same
  ``doc_ids`` tensor, so it is built once per step.
- ``flash_attn``: the ``flash_attn`` package when it is installed (dense causal,
  and packed documents through its variable-length entry point).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from .reference import attention_mask

Tensor = torch.Tensor
HALF_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- sdpa


def sdpa_attention(q, k, v, *, causal=True, doc_ids=None, key_valid=None, mask=None, scale=None):
    """torch SDPA (cuDNN/flash/efficient/math picked by torch) with GQA, no K/V repeat."""
    tq, tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if doc_ids is None and key_valid is None and mask is None and (not causal or tq == tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    allowed = attention_mask(tq, tk, causal=causal, doc_ids=doc_ids, key_valid=key_valid, mask=mask, device=q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    # rows with no allowed key come back as NaN from SDPA; make them zero like the reference
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


def sdpa_ok(q, k, v, **kw) -> bool:
    # The masked reference is exact on CPU; SDPA pays off where a fused kernel exists.
    return q.is_cuda


# ----------------------------------------------------------------------------- flex


@functools.lru_cache(maxsize=1)
def _flex():
    """``(flex_attention compiled, create_block_mask)``; compiled once, lazily."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(flex_attention), create_block_mask


_BLOCK_MASKS: dict = {}
_BLOCK_MASK_CACHE_SIZE = 4


def _doc_mask_mod(doc_ids: Tensor, causal: bool, offset: int, key_valid: Optional[Tensor]):
    def mask_mod(b, h, q_idx, kv_idx):
        keep = doc_ids[b, q_idx + offset] == doc_ids[b, kv_idx]
        if causal:
            keep = keep & (q_idx + offset >= kv_idx)
        if key_valid is not None:
            keep = keep & key_valid[b, kv_idx]
        return keep

    return mask_mod


def document_block_mask(doc_ids: Optional[Tensor], tq: int, tk: int, *, causal: bool = True,
                        key_valid: Optional[Tensor] = None, batch: int = 1, device=None):
    """The FlexAttention block mask for packed documents (and/or causal, key padding).

    Cached by the identity, version and shape of ``doc_ids`` / ``key_valid``: the
    layers of one step share it; a new step's new tensor builds a new one.
    """
    def ident(t):
        if t is None:
            return None
        try:
            ptr = t.data_ptr()
        except RuntimeError:  # a tensor without storage (a transform's wrapper): identity alone
            ptr = None
        return id(t), ptr, t._version, tuple(t.shape)

    # under torch.compile the inputs are fake tensors: no cache, the mask is built inside the graph
    compiling = torch.compiler.is_compiling()
    key = None if compiling else (ident(doc_ids), ident(key_valid), tq, tk, causal, batch, str(device))
    if not compiling and key in _BLOCK_MASKS:
        return _BLOCK_MASKS[key][0]
    _, create_block_mask = _flex()
    ids = doc_ids if doc_ids is not None else torch.zeros(batch, tk, dtype=torch.int32, device=device)
    kv = key_valid.bool() if key_valid is not None else None
    b = ids.shape[0] if (doc_ids is not None or kv is not None) else 1
    block_mask = create_block_mask(_doc_mask_mod(ids, causal, tk - tq, kv), b, None, tq, tk, device=device)
    if not compiling:
        if len(_BLOCK_MASKS) >= _BLOCK_MASK_CACHE_SIZE:
            _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
        # keep the tensors alive with the entry so their ids cannot be reused by others
        _BLOCK_MASKS[key] = (block_mask, doc_ids, key_valid)
    return block_mask


def flex_attention(q, k, v, *, causal=True, doc_ids=None, key_valid=None, mask=None, scale=None):
    """FlexAttention with a (cached) document / causal block mask; GQA native."""
    if mask is not None:
        raise ValueError("flex attention takes doc_ids / key_valid / causal, not a dense mask")
    tq, tk = q.shape[2], k.shape[2]
    if doc_ids is not None and tq != tk:
        raise ValueError(f"doc_ids need as many queries as keys, got {tq} and {tk}")
    flex, _ = _flex()
    block_mask = document_block_mask(doc_ids, tq, tk, causal=causal, key_valid=key_valid,
                                     batch=q.shape[0], device=q.device)
    return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def under_transform(q: Tensor) -> bool:
    """Whether ``q`` is traced by ``torch.compile`` or wrapped by a ``torch.func`` transform (grad, vmap).

    The compiled FlexAttention kernel cannot run there: ``torch.compile(flex_attention)`` called on
    a ``torch.func.grad`` wrapper fails to fake-ify its inputs, and the same call traced inside a
    compiled ``torch.func.grad`` fails the same way (measured on torch 2.11). The training step is
    exactly that, so packed documents train through the dense-mask SDPA path instead.
    """
    # is_compiling first: dynamo cannot trace the functorch query, and never needs to
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(q)


def flex_ok(q, k, v, *, causal=True, doc_ids=None, key_valid=None, mask=None, scale=None) -> bool:
    d = q.shape[-1]
    shape_ok = d >= 16 and d & (d - 1) == 0 and q.shape[2] >= 1
    same_docs_len = doc_ids is None or q.shape[2] == k.shape[2]
    ok = q.is_cuda and mask is None and shape_ok and same_docs_len
    if ok and under_transform(q):
        if doc_ids is not None:
            dispatch.log_once("no-flex-under-transform", "packed documents inside torch.func / torch.compile: "
                              "FlexAttention cannot run there, attention takes a dense document mask instead")
        return False
    return ok


def flex_for_documents(q, k, v, *, doc_ids=None, mask=None, **kw) -> bool:
    """Automatic choice: flex only where its block mask skips work (packed documents)."""
    return doc_ids is not None and flex_ok(q, k, v, doc_ids=doc_ids, mask=mask, **kw)


# ----------------------------------------------------------------------------- flash_attn


def _import_flash_attn():
    try:
        import flash_attn

        return flash_attn
    except Exception:
        return None


# Resolved once at import: an import inside a traced function breaks torch.compile(fullgraph=True).
_FLASH_ATTN = _import_flash_attn()


def flash_attn_module():
    """The ``flash_attn`` module, or None when it is not installed."""
    return _FLASH_ATTN


def _cu_seqlens(doc_ids: Tensor) -> tuple[Tensor, int]:
    """Cumulative document lengths over the flattened ``[B*T]`` tokens (a new doc starts each row)."""
    b, t = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.nonzero(starts.reshape(-1))[:, 0]
    cu = torch.cat([idx, idx.new_tensor([b * t])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def flash_attention(q, k, v, *, causal=True, doc_ids=None, key_valid=None, mask=None, scale=None):
    """FlashAttention (``flash_attn`` package); packed documents go through its varlen entry point."""
    fa = flash_attn_module()
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # flash_attn wants [B, T, H, D]
    if doc_ids is None:
        out = fa.flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=causal)
        return out.transpose(1, 2)
    b, t = doc_ids.shape
    cu, max_len = _cu_seqlens(doc_ids)
    flat = [x.reshape(b * t, x.shape[2], x.shape[3]) for x in (qt, kt, vt)]
    out = fa.flash_attn_varlen_func(*flat, cu, cu, max_len, max_len, softmax_scale=scale, causal=causal)
    return out.reshape(b, t, q.shape[1], q.shape[3]).transpose(1, 2)


def flash_attn_ok(q, k, v, *, causal=True, doc_ids=None, key_valid=None, mask=None, scale=None) -> bool:
    return (flash_attn_module() is not None and q.is_cuda and q.dtype in HALF_DTYPES and q.shape[-1] <= 256
            and key_valid is None and mask is None and (not causal or q.shape[2] == k.shape[2])
            and (doc_ids is None or q.shape[2] == k.shape[2]))
