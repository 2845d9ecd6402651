"""Data parallel: bucketing, the gradient tap, the all-reduce overlapped with the backward, and torchrun x2 / x4
on CPU (gloo) == one process with the same global batch."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ghostvis as gv
from ghostvis.core.tree import flatten
from ghostvis.train import checkpoint as ckpt
from ghostvis.train import step as tstep
from ghostvis.train.distributed import DataParallel, DistInfo, buckets, init
from ghostvis.train.optim import AdamW
from test_train import CFG, random_batch
from torchrun_training import losses, run_many, stats

ROOT = Path(__file__).resolve().parent.parent


def test_buckets_group_by_size():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(100), torch.zeros(5), torch.zeros(5, dtype=torch.float64)]
    assert buckets(ts, 4 * 25) == [[0, 1], [2], [3], [4]]
    assert buckets(ts, 10**6) == [[0, 1, 2, 3], [4]]


def test_single_process_is_a_no_op():
    assert init("cpu") == DistInfo(device="cpu")
    g = {"a": torch.ones(3)}
    assert DataParallel().sum_grads_(g)["a"].tolist() == [1.0, 1.0, 1.0]
    dp = DataParallel()
    dp.start_overlap(g)
    dp.grad_ready("a", torch.full((3,), 5.0))
    assert dp.finish_overlap_(g)["a"].tolist() == [1.0, 1.0, 1.0] and dp.launched_in_backward == 0


@pytest.mark.parametrize("remat", [False, True])
def test_grad_tap_sees_each_complete_gradient_once(remat):
    """Under torch.func.grad_and_value the tap's backward gets each trainable leaf's whole gradient, exactly once,
    equal to what grad_and_value returns and to the gradient without taps; frozen leaves are never tapped."""
    params = gv.init(CFG, seed=7)
    trainable, frozen = tstep.partition(params, "text,connector")
    kw = dict(remat_blocks=remat)
    seen: list[tuple[str, torch.Tensor]] = []

    def record(name, grad):
        assert type(grad) is torch.Tensor and not grad.requires_grad
        seen.append((name, grad.clone()))

    for images in (True, False):
        seen.clear()
        b = random_batch(seed=7, images=images)
        n = (b["targets"] != -100).sum().float()
        g0, l0 = tstep.value_and_grad(CFG, frozen, **kw)(trainable, b, n)
        g1, l1 = tstep.value_and_grad(CFG, frozen, **kw, grad_sink=record)(trainable, b, n)
        torch.testing.assert_close(l1, l0, atol=0, rtol=0)
        names = [name for name, _ in seen]
        assert len(names) == len(set(names))
        reached = set(trainable) if images else {k for k in trainable if not k.startswith("connector.")}
        assert set(names) == reached  # without images the connector never reaches the loss: no call, zero grads
        for name, grad in seen:
            assert torch.equal(grad, g1[name]) and torch.equal(grad, g0[name]), name
        for k in trainable.keys() - reached:
            assert not g1[k].any()


class RecordingReducer:
    """One process: sums nothing, records which path the train step took."""

    overlap = True

    def __init__(self):
        self.calls: list[str] = []
        self.prior = None

    def sum_(self, t):
        return t

    def sum_grads_(self, grads):
        self.calls.append("sum_grads_")
        return grads

    def start_overlap(self, params, prior=None):
        self.calls.append("start")
        self.prior = prior

    def grad_ready(self, name, grad):
        self.calls.append(name)

    def finish_overlap_(self, grads):
        self.calls.append("finish")
        return grads


@pytest.mark.parametrize("compile_grad", [False, True])
def test_train_step_overlaps_only_without_compile(compile_grad):
    """Eager: the last micro-batch's backward reports every leaf (the earlier one's sum passed as prior) and the step
    equals one without a reducer. Compiled: a traced backward would drop the Python hook, so the step falls back
    to summing after the backward."""
    params = gv.init(CFG, seed=9)
    trainable, frozen = tstep.partition(params, "text")
    micro = [random_batch(seed=9, images=False), random_batch(seed=10, images=False)]
    results = []
    for reducer in (None, RecordingReducer()):
        t = {k: v.clone() for k, v in trainable.items()}
        opt = AdamW(lr=1e-2)
        step_fn = tstep.make_train_step(CFG, opt, frozen, reducer=reducer, compile_grad=compile_grad,
                                        compile_kwargs={"backend": "aot_eager"})
        t, _, res = step_fn(t, opt.init(t), micro, 0)
        results.append((t, res))
    calls = reducer.calls
    if compile_grad:
        assert calls == ["sum_grads_"]
    else:
        assert calls[0] == "start" and calls[-1] == "finish" and sorted(calls[1:-1]) == sorted(trainable)
        assert set(reducer.prior) == set(trainable)
    (t0, r0), (t1, r1) = results
    assert r0.loss == r1.loss and r0.grad_norm == r1.grad_norm
    assert all(torch.equal(t0[k], t1[k]) for k in t0)


# --------------------------------------------------------------------------- overlap, two gloo ranks in-process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overlap_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for overlap in (False, True):
            trainable, frozen = tstep.partition(gv.init(CFG, seed=8), "text,connector")
            opt = AdamW(lr=1e-2)
            state = opt.init(trainable)
            reducer = DataParallel(bucket_mb=0.004, overlap=overlap)
            step_fn = tstep.make_train_step(CFG, opt, frozen, reducer=reducer)
            loss = []
            for s in range(3):
                # only one micro-batch per rank has images (rank 0: the first, rank 1: the last), so the backward
                # passes reach different leaves, and only rank 1's last one reaches the connector
                micro = [random_batch(seed=10 * s + 2 * rank + m, images=(m + rank) % 2 == 0) for m in range(2)]
                trainable, state, res = step_fn(trainable, state, micro, s)
                loss.append(res.loss)
            results[overlap] = {"loss": torch.tensor(loss), **trainable, "launched": reducer.launched_in_backward,
                                "buckets": len(reducer._buckets.groups) if overlap else 0}
        torch.save(results, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_overlap_with_ranks_reaching_different_leaves(tmp_path):
    """Overlapped == post-backward all-reduce when one rank's backward never reaches some leaves (buckets still
    launch in the same order everywhere), with grad_accum 2, across the switch to the learned bucket order."""
    mp.spawn(_overlap_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    assert r0[True]["buckets"] > 10 and r0[True]["launched"] > 0 and r1[True]["launched"] > 0
    for k, v in r0[False].items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(r0[True][k], v, atol=1e-6, rtol=1e-5, msg=k)
            assert torch.equal(r1[True][k], r0[True][k]), k  # every rank holds the same params


# --------------------------------------------------------------------------- whole training runs under torchrun

RUNS = {"adamw": {"optimizer": "adamw"}, "muon": {"optimizer": "muon"},
        "muon-remat": {"optimizer": "muon", "remat": True}, "adamw-accum1": {"optimizer": "adamw", "grad_accum": 1}}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_torchrun_ranks_match_one_process(tmp_path, nproc):
    """adamw / muon / remat / no accumulation: overlapped all-reduce == all-reduce after the backward == one process
    with the same global batch (losses per step and final params)."""
    runs = {f"{name}-{mode}": {**over, **extra} for name, over in RUNS.items()
            for mode, extra in (("on", {"bucket_mb": 0.01, "overlap_comm": True}), ("off", {"overlap_comm": False}))}
    many = run_many(tmp_path, nproc, 4 // nproc, runs)
    one = run_many(tmp_path, 1, 4, RUNS)
    for name in RUNS:
        want, cfg = ckpt.load_checkpoint(ckpt.latest(one / name / "checkpoints"))[:2]
        start = flatten(gv.init(cfg, seed=0))
        assert all(s["launched_in_backward"] > 10 for s in stats(many, f"{name}-on", nproc)), name
        assert all(s["launched_in_backward"] == 0 for s in stats(many, f"{name}-off", nproc)), name
        for mode in ("on", "off"):
            run = many / f"{name}-{mode}"
            got, _, _, s = ckpt.load_checkpoint(ckpt.latest(run / "checkpoints"))
            assert s["step"] == 5
            torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses(one / name)),
                                       atol=1e-6, rtol=1e-5)
            for k, v in flatten(want).items():
                assert not torch.equal(v, start[k]), f"{k} did not train"
                # Adam's first steps are nearly lr * sign(grad): where a gradient entry is ~0, summing it in another
                # order can flip its sign, so a few entries differ by a small fraction of lr (1e-2)
                torch.testing.assert_close(flatten(got)[k], v, atol=2e-4, rtol=1e-4, msg=f"{name}-{mode} {k}")
        on, off = (flatten(ckpt.load_checkpoint(ckpt.latest(many / f"{name}-{m}" / "checkpoints"))[0])
                   for m in ("on", "off"))
        for k in on:  # the same sums, bucketed differently: bit for bit with two ranks (a + b == b + a); with
            # four, gloo's reduction order depends on where an entry sits in its bucket (see above)
            torch.testing.assert_close(on[k], off[k], atol=0 if nproc == 2 else 2e-4, rtol=0 if nproc == 2 else 1e-4)
