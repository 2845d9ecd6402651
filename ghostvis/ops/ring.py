"""Ring attention: causal attention over a sequence split across a process group.

Each rank holds a shard of the sequence (queries, keys and values of its own
tokens). K/V blocks travel around the ring; at every hop a rank attends its
queries to the block it holds, and the partial results are merged with their
log-sum-exp, so the full ``[T, T]`` score matrix never exists anywhere. The
next block is already in flight while the current one is computed.

Causal balance: with a plain split, rank 0 would skip almost every block and the
last rank would do all the work. ``zigzag`` layout cuts the sequence into
``2 * world`` chunks and gives rank ``r`` chunks ``r`` and ``2*world-1-r``, so
every rank does the same amount of unmasked work.

The backward pass runs the ring again: K/V travel with their gradient
accumulators and arrive home after one extra hop.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def shard_positions(seq_len: int, world: int, rank: int, layout: str = "zigzag", device=None) -> Tensor:
    """Global token positions held by ``rank`` (in the order they are stored locally)."""
    if layout == "contiguous":
        if seq_len % world:
            raise ValueError(f"sequence length {seq_len} must divide by world size {world}")
        n = seq_len // world
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    if layout != "zigzag":
        raise ValueError(f"layout must be 'zigzag' or 'contiguous', got {layout!r}")
    if seq_len % (2 * world):
        raise ValueError(f"zigzag needs the sequence length {seq_len} to divide by 2*world = {2 * world}")
    c = seq_len // (2 * world)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c, device=device)])


def shard(x: Tensor, world: int, rank: int, dim: int = 2, layout: str = "zigzag") -> Tensor:
    """This rank's shard of a full-sequence tensor (sequence along ``dim``)."""
    return x.index_select(dim, shard_positions(x.shape[dim], world, rank, layout, x.device))


def unshard(parts: list[Tensor], dim: int = 2, layout: str = "zigzag") -> Tensor:
    """Reassemble the full sequence from every rank's shard (inverse of :func:`shard`)."""
    world = len(parts)
    seq = sum(p.shape[dim] for p in parts)
    pos = torch.cat([shard_positions(seq, world, r, layout, parts[0].device) for r in range(world)])
    out = torch.cat(parts, dim)
    return out.index_select(dim, torch.argsort(pos))


def _block_forward(q, k, v, qpos, kpos, scale, causal):
    """Scores of local queries against one K/V block: (out, lse) in float32, GQA by grouping."""
    b, hq, tq, d = q.shape
    hk = k.shape[1]
    qg = q.float().reshape(b, hk, hq // hk, tq, d)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.float()) * scale
    if causal:
        s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no allowed key
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    out = torch.einsum("bhgqk,bhkd->bhgqd", p, v.float())
    return out, lse


def _merge(out, lse, blk_out, blk_lse):
    """Combine two softmax-normalised partial results by their log-sum-exp."""
    new_lse = torch.logaddexp(lse, blk_lse)
    w_old = torch.exp(lse - new_lse).nan_to_num(0.0)[..., None]
    w_new = torch.exp(blk_lse - new_lse).nan_to_num(0.0)[..., None]
    return out * w_old + blk_out * w_new, new_lse


def _ring_pass(tensors: list[Tensor], group) -> tuple[list[Tensor], list]:
    """Start sending ``tensors`` to the next rank and receiving the previous rank's; returns (buffers, requests)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    recv = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, r in zip(tensors, recv):
        ops.append(dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, nxt) if group else nxt, group))
        ops.append(dist.P2POp(dist.irecv, r, dist.get_global_rank(group, prv) if group else prv, group))
    return recv, dist.batch_isend_irecv(ops)


def _skip(qpos, kpos, causal) -> bool:
    return causal and bool(kpos.min() > qpos.max())


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, qpos, scale, causal, group):
        world = dist.get_world_size(group)
        b, hq, tq, d = q.shape
        hk = k.shape[1]
        out = torch.zeros(b, hk, hq // hk, tq, d, dtype=torch.float32, device=q.device)
        lse = torch.full((b, hk, hq // hk, tq), float("-inf"), device=q.device)
        all_pos = [torch.empty_like(qpos) for _ in range(world)]
        dist.all_gather(all_pos, qpos.contiguous(), group=group)
        rank = dist.get_rank(group)
        kb, vb = k, v
        for step in range(world):
            reqs = None
            if step < world - 1:
                (kn, vn), reqs = _ring_pass([kb, vb], group)
            kpos = all_pos[(rank - step) % world]
            if not _skip(qpos, kpos, causal):
                blk_out, blk_lse = _block_forward(q, kb, vb, qpos, kpos, scale, causal)
                out, lse = _merge(out, lse, blk_out, blk_lse)
            if reqs is not None:
                for r in reqs:
                    r.wait()
                kb, vb = kn, vn
        ctx.save_for_backward(q, k, v, qpos, out, lse, *all_pos)
        ctx.scale, ctx.causal, ctx.group = scale, causal, group
        return out.reshape(b, hq, tq, d).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, qpos, out, lse, *all_pos = ctx.saved_tensors
        scale, causal, group = ctx.scale, ctx.causal, ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b, hq, tq, d = q.shape
        hk = k.shape[1]
        do = grad_out.float().reshape(b, hk, hq // hk, tq, d)
        qg = q.float().reshape(b, hk, hq // hk, tq, d)
        delta = (do * out).sum(-1)  # rowsum(dO * O)
        lse_safe = lse.nan_to_num(neginf=0.0)
        dq = torch.zeros_like(qg)
        kb, vb = k.float(), v.float()
        dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
        for step in range(world):
            kpos = all_pos[(rank - step) % world]
            if not _skip(qpos, kpos, causal):
                s = torch.einsum("bhgqd,bhkd->bhgqk", qg, kb) * scale
                if causal:
                    s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
                p = torch.exp(s - lse_safe[..., None])
                dvb = dvb + torch.einsum("bhgqk,bhgqd->bhkd", p, do)
                dp = torch.einsum("bhgqd,bhkd->bhgqk", do, vb)
                ds = p * (dp - delta[..., None]) * scale
                dq = dq + torch.einsum("bhgqk,bhkd->bhgqd", ds, kb)
                dkb = dkb + torch.einsum("bhgqk,bhgqd->bhkd", ds, qg)
            # after the last step one more hop brings each block's gradients home
            (kb2, vb2, dkb, dvb), reqs = _ring_pass([kb, vb, dkb, dvb], group)
            for r in reqs:
                r.wait()
            kb, vb = kb2, vb2
        return (dq.reshape(b, hq, tq, d).to(q.dtype), dkb.to(k.dtype), dvb.to(v.dtype), None, None, None, None)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, *, group=None, causal: bool = True,
                   scale: Optional[float] = None) -> Tensor:
    """Attention of this rank's queries over the whole sequence held across ``group``.

    Args:
        q: ``[B, Hq, Tl, D]`` local queries; k, v: ``[B, Hkv, Tl, D]`` local keys/values (GQA allowed).
        positions: ``[Tl]`` global positions of the local tokens (e.g. :func:`shard_positions`); the
            same length on every rank.
        group: the context-parallel process group (default: the world).
        causal: mask keys at later global positions.

    Returns the local shard of the output, ``[B, Hq, Tl, D]``. Differentiable.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, positions, scale, causal, group)
