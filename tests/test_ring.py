"""Ring attention over gloo processes equals single-process attention, forward and backward.

The fused hop (flash kernels on CUDA, float32 stand-ins elsewhere) is checked hop by hop against the
reference hop, and through the whole ring; the ``gpu`` tests run the real kernels on bf16.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ghostvis.ops import reference
from ghostvis.ops import ring
from ghostvis.ops.ring import ring_attention, shard, shard_positions, unshard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, layout, hq, hk, causal, impl, use_func, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        b, t, d = 2, 8 * world, 16
        q = torch.randn(b, hq, t, d, generator=g)
        k = torch.randn(b, hk, t, d, generator=g)
        v = torch.randn(b, hk, t, d, generator=g)
        go = torch.randn(b, hq, t, d, generator=g)
        ql, kl, vl = (shard(x, world, rank, 2, layout).requires_grad_() for x in (q, k, v))
        pos = shard_positions(t, world, rank, layout)
        gol = shard(go, world, rank, 2, layout)
        out = ring_attention(ql, kl, vl, pos, causal=causal, impl=impl)
        if use_func:
            loss = lambda a, b_, c: (ring_attention(a, b_, c, pos, causal=causal, impl=impl) * gol).sum()
            dq, dk, dv = torch.func.grad(loss, argnums=(0, 1, 2))(ql.detach(), kl.detach(), vl.detach())
        else:
            out.backward(gol)
            dq, dk, dv = ql.grad, kl.grad, vl.grad
        torch.save({"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world,layout,hq,hk,causal,impl,use_func", [
    (2, "zigzag", 4, 2, True, "reference", False),
    (4, "zigzag", 4, 1, True, "reference", False),
    (2, "contiguous", 2, 1, False, "reference", False),
    # the fused hop plumbing (hop shapes, row/column slices, GQA expansion, global-LSE backward)
    # with float32 stand-ins for the flash kernels
    (2, "zigzag", 4, 2, True, "fused", True),
    (4, "zigzag", 4, 1, True, "fused", False),
    (3, "contiguous", 4, 2, True, "fused", True),
    (2, "contiguous", 2, 1, False, "fused", False),
])
def test_ring_attention_matches_single_process(tmp_path, world, layout, hq, hk, causal, impl, use_func):
    mp.spawn(_worker, args=(world, _free_port(), layout, hq, hk, causal, impl, use_func, str(tmp_path)),
             nprocs=world)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]

    g = torch.Generator().manual_seed(0)
    b, t, d = 2, 8 * world, 16
    q = torch.randn(b, hq, t, d, generator=g).requires_grad_()
    k = torch.randn(b, hk, t, d, generator=g).requires_grad_()
    v = torch.randn(b, hk, t, d, generator=g).requires_grad_()
    go = torch.randn(b, hq, t, d, generator=g)
    ref = reference.attention(q, k, v, causal=causal)
    ref.backward(go)
    for name, want in (("out", ref), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        got = unshard([p[name] for p in parts], 2, layout)
        torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5, msg=name)


def test_zigzag_balances_causal_work():
    """Every rank sees the same number of (query, key) pairs under the causal mask."""
    t, world = 64, 4
    work = []
    for r in range(world):
        qpos = shard_positions(t, world, r)
        work.append(int((torch.arange(t)[None, :] <= qpos[:, None]).sum()))
    assert len(set(work)) == 1, work
    with pytest.raises(ValueError, match="divide by 2\\*world"):
        shard_positions(30, 4, 0)


def _hop_mask(plan, tq, tk):
    m = torch.zeros(tq, tk, dtype=torch.bool)
    if isinstance(plan, ring._Hop):
        n_r, n_c = plan.rows.stop - plan.rows.start, plan.cols.stop - plan.cols.start
        m[plan.rows, plan.cols] = torch.ones(n_r, n_c, dtype=torch.bool).tril() if plan.causal else True
    return m


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_hop_shapes_cover_standard_layouts(layout, world):
    """Every hop of zigzag and contiguous shards has a fused shape whose mask is exactly the causal mask."""
    t = 8 * world
    pos = [shard_positions(t, world, r, layout) for r in range(world)]
    kinds = set()
    for r in range(world):
        for s in range(world):
            plan = ring._classify(pos[r], pos[s], True)
            assert plan is not None, (r, s)
            want = pos[s][None, :] <= pos[r][:, None]
            assert torch.equal(_hop_mask(plan, len(pos[r]), len(pos[s])), want), (r, s, plan)
            kinds.add("skip" if plan == ring._SKIP else ("causal" if plan.causal else "full" if
                      plan.rows == slice(0, t // world) and plan.cols == slice(0, t // world) else "part"))
            assert ring._classify(pos[r], pos[s], False) == ring._Hop(slice(0, t // world), slice(0, t // world),
                                                                     False)
    assert "causal" in kinds
    if world > 1:
        assert kinds >= ({"part"} if layout == "zigzag" else {"full", "skip"}), kinds


def test_hop_shapes_of_odd_positions():
    """Unsorted or interleaved positions get a fused shape only when it is exact, else the reference."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        t = int(torch.randint(2, 9, (1,), generator=g))
        qpos = torch.randperm(24, generator=g)[:t]
        kpos = qpos.clone() if torch.rand(1, generator=g) < 0.3 else torch.randperm(24, generator=g)[:t]
        plan = ring._classify(qpos, kpos, True)
        if plan is not None:
            assert torch.equal(_hop_mask(plan, t, t), kpos[None, :] <= qpos[:, None]), (qpos, kpos, plan)
    assert ring._classify(torch.tensor([0, 2]), torch.tensor([1, 3]), True) is None  # interleaved


def test_impl_switch():
    q = torch.randn(1, 2, 4, 8)
    assert not ring._use_fused(q, q, q, None, "auto")  # CPU: the reference
    assert ring._use_fused(q, q, q, None, "fused")
    assert not ring._use_fused(q, q, q, None, "reference")
    with pytest.raises(ValueError, match="doc_ids"):
        ring._use_fused(q, q, q, torch.zeros(1, 4), "fused")
    with pytest.raises(ValueError, match="impl"):
        ring._use_fused(q, q, q, None, "flash")


def _hop_cases():
    """(name, query positions, key positions, causal) of every hop shape, from zigzag over 4 and contiguous."""
    z = [shard_positions(64, 4, r) for r in range(4)]
    c = [shard_positions(32, 2, r, "contiguous") for r in range(2)]
    return [("own", z[1], z[1], True), ("first-half-keys", z[1], z[0], True),
            ("second-half-queries", z[1], z[2], True), ("full", c[1], c[0], True),
            ("not-causal", z[1], z[3], False)]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _check_fused_hop(qpos, kpos, causal, device, dtype, d, scale_t, tol):
    g = torch.Generator().manual_seed(1)
    b, hq, hk = 2, 6, 3
    tq, tk = len(qpos) * scale_t, len(kpos) * scale_t
    # stretch the positions so each chunk holds scale_t times more tokens, keeping the hop's shape
    qpos = (qpos[:, None] * scale_t + torch.arange(scale_t)).flatten()
    kpos = (kpos[:, None] * scale_t + torch.arange(scale_t)).flatten()
    plan = ring._classify(qpos, kpos, causal)
    assert isinstance(plan, ring._Hop)
    scale = d ** -0.5
    # q as the model makes it: a transposed [B, T, H, D]
    q = torch.randn(b, tq, hq, d, generator=g).transpose(1, 2).to(device, dtype)
    k, v = (torch.randn(b, hk, tk, d, generator=g).to(device, dtype) for _ in range(2))
    allowed = ring._allowed(qpos.to(device), kpos.to(device), None, None, causal)

    # forward: the rows the hop covers, against the float32 reference hop
    out, lse = ring._fused_block_forward(q, k, v, plan, scale)
    ref_out, ref_lse = ring._block_forward(q, k, v, allowed, scale)
    r = plan.rows
    assert _rel(out, ref_out[..., r, :]) < tol
    assert float((lse - ref_lse[..., r]).abs().max()) < tol
    assert torch.isinf(ref_lse[..., :r.start]).all() and torch.isinf(ref_lse[..., r.stop:]).all()

    # backward given a global out/lse: this block merged with what "other blocks" contributed
    rest_out = torch.randn(ref_out.shape, generator=g).to(device)
    rest_lse = ref_lse.nan_to_num(neginf=0.0) + torch.randn(ref_lse.shape, generator=g).to(device)
    glob_out, glob_lse = ring._merge(ref_out, ref_lse, rest_out, rest_lse)
    out_q = glob_out.reshape(b, hq, tq, d).to(dtype)
    do = torch.randn(b, hq, tq, d, generator=g).to(device, dtype)
    dq, dk, dv = ring._fused_block_backward(do, q, k, v, out_q, glob_lse.reshape(b, hq, tq), plan, scale)
    qg, dog, delta, lse_safe = ring._reference_grad_operands(q, do, out_q, glob_lse)
    rdq, rdk, rdv = ring._block_backward(qg, k.float(), v.float(), dog, lse_safe, delta, allowed, scale)
    rdq = rdq.reshape(b, hq, tq, d)
    c = plan.cols
    for name, got, want, outside in (("dq", dq, rdq[:, :, r], [rdq[:, :, :r.start], rdq[:, :, r.stop:]]),
                                     ("dk", dk, rdk[:, :, c], [rdk[:, :, :c.start], rdk[:, :, c.stop:]]),
                                     ("dv", dv, rdv[:, :, c], [rdv[:, :, :c.start], rdv[:, :, c.stop:]])):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert _rel(got, want) < tol, (name, _rel(got, want))
        assert all(int(x.count_nonzero()) == 0 for x in outside), name


@pytest.mark.parametrize("name,qpos,kpos,causal", _hop_cases(), ids=[c[0] for c in _hop_cases()])
def test_fused_hop_matches_reference_hop(name, qpos, kpos, causal):
    """The fused hop's plumbing with float32 stand-in kernels equals the reference hop."""
    _check_fused_hop(qpos, kpos, causal, "cpu", torch.float32, 16, 1, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,qpos,kpos,causal", _hop_cases(), ids=[c[0] for c in _hop_cases()])
def test_flash_hop_matches_reference_hop(name, qpos, kpos, causal, dtype):
    """The flash kernels' hop (out, natural-log LSE; dq, dk, dv from the global out/LSE) against float32."""
    q = torch.zeros(1, 1, 1, 128, device="cuda", dtype=dtype)
    assert ring.fused_supported(q, q, q)
    # 8 chunks x 40 tokens: not a multiple of the kernels' tiles, 320 rows per rank
    _check_fused_hop(qpos, kpos, causal, "cuda", dtype, 128, 40, 2e-2)


def _nccl_worker(rank, world, port, layout, impl, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    try:
        g = torch.Generator().manual_seed(0)
        b, hq, hk, t, d = 1, 6, 3, 384 * world, 128
        q, go = (torch.randn(b, hq, t, d, generator=g).bfloat16() for _ in range(2))
        k, v = (torch.randn(b, hk, t, d, generator=g).bfloat16() for _ in range(2))
        ql, kl, vl, gol = (shard(x, world, rank, 2, layout).cuda() for x in (q, k, v, go))
        pos = shard_positions(t, world, rank, layout, device="cuda")
        lay = ring.ring_layout(pos)
        assert impl != "auto" or ring._use_fused(ql, kl, vl, None, "auto")
        f = lambda a, b_, c: ring_attention(a, b_, c, pos, impl=impl, layout=lay)
        out = f(ql, kl, vl)
        dq, dk, dv = torch.func.grad(lambda a, b_, c: (f(a, b_, c).float() * gol.float()).sum(),
                                     argnums=(0, 1, 2))(ql, kl, vl)
        torch.save({n: x.cpu() for n, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv))},
                   f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.parametrize("world,layout", [(1, "zigzag"), (2, "zigzag"), (2, "contiguous")])
def test_fused_ring_on_gpus_matches_float32(tmp_path, world, layout):
    """The whole ring with the flash hops (auto) over NCCL, bf16, through torch.func.grad, against float32."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    mp.spawn(_nccl_worker, args=(world, _free_port(), layout, "auto", str(tmp_path)), nprocs=world)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    g = torch.Generator().manual_seed(0)
    b, hq, hk, t, d = 1, 6, 3, 384 * world, 128
    q, go = (torch.randn(b, hq, t, d, generator=g).bfloat16().float() for _ in range(2))
    k, v = (torch.randn(b, hk, t, d, generator=g).bfloat16().float() for _ in range(2))
    q, k, v = (x.cuda().requires_grad_() for x in (q, k, v))
    ref = reference.attention(q, k, v, causal=True)
    ref.backward(go.cuda())
    for name, want in (("out", ref), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        got = unshard([p[name] for p in parts], 2, layout)
        assert got.dtype == torch.bfloat16
        assert _rel(got, want.detach().cpu()) < 2e-2, (name, _rel(got, want.detach().cpu()))


@pytest.mark.distributed
@pytest.mark.slow
def test_context_parallel_training_matches_one_process(tmp_path):
    """torchrun x2 with --train.context-parallel 2 (ring attention over packed rows) == one process."""
    import json

    import ghostvis as gv
    from ghostvis.core.tree import flatten
    from ghostvis.train import checkpoint as ckpt

    from torchrun_training import run_training

    runs = {"one": run_training(tmp_path, 1, 3, optimizer="adamw"),
            "two": run_training(tmp_path, 2, 3, cp=2, optimizer="adamw")}
    one, cfg, _, _ = ckpt.load_checkpoint(ckpt.latest(runs["one"] / "checkpoints"))
    two, _, _, _ = ckpt.load_checkpoint(ckpt.latest(runs["two"] / "checkpoints"))
    losses = [[json.loads(line)["loss"] for line in (runs[r] / "metrics.jsonl").read_text().splitlines()]
              for r in ("one", "two")]
    assert len(losses[0]) == 5
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=1e-6, rtol=1e-5)
    start = flatten(gv.init(cfg, seed=0))
    for k, v in flatten(one).items():
        assert not torch.equal(v, start[k]), f"{k} did not train"
        # Adam's first steps are nearly lr * sign(grad): where a gradient entry is ~0 the different
        # reduction order of the ring flips the sign, so entries can differ by a fraction of lr (1e-2)
        torch.testing.assert_close(flatten(two)[k], v, atol=1e-3, rtol=0, msg=k)


@pytest.mark.distributed
@pytest.mark.slow
def test_context_by_data_parallel_grid_matches_one_process(tmp_path):
    """torchrun x4 as a 2 (data) x 2 (context) grid == one process with the whole global batch."""
    from torchrun_training import losses, run_training

    one = run_training(tmp_path, 1, 6, optimizer="adamw")
    grid = run_training(tmp_path, 4, 3, cp=2, optimizer="adamw")
    assert len(losses(one)) == 5
    torch.testing.assert_close(torch.tensor(losses(grid)), torch.tensor(losses(one)), atol=1e-6, rtol=1e-5)


def test_context_parallel_must_divide_the_ranks():
    from ghostvis.train import distributed

    with pytest.raises(ValueError, match="must divide"):
        distributed.context_parallel_group(2)  # one process: 2 does not divide 1
