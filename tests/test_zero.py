"""Sharded optimizer state (ZeRO stage 1): ownership, shard sizes, the whole-state checkpoint file, and torchrun
x2 / x4 on CPU (gloo) with sharding == without, resuming exactly."""

import pytest
import torch

import ghostvis as gv
from ghostvis.core.io import CheckpointError
from ghostvis.core.tree import flatten
from ghostvis.train import checkpoint as ckpt
from ghostvis.train import step as tstep
from ghostvis.train.distributed import ShardedOptimizer, assign_owners
from ghostvis.train.optim import load_state, make_optimizer, save_state
from test_train import CFG, random_batch
from torchrun_training import losses, run_many, stats


def _numel(flat: dict) -> int:
    return sum(t.numel() for t in flat.values())


@pytest.mark.parametrize("world", [2, 3, 4])
def test_owners_are_whole_tensors_balanced_by_size(world):
    trainable, _ = tstep.partition(gv.init(CFG), "all")
    owners = assign_owners(trainable, world)
    assert list(owners) == list(trainable) and set(owners.values()) == set(range(world))
    load = [sum(t.numel() for k, t in trainable.items() if owners[k] == r) for r in range(world)]
    assert max(load) - min(load) <= max(t.numel() for t in trainable.values())
    assert owners == assign_owners(dict(reversed(trainable.items())), world)  # whatever the order (a resume's)


@pytest.mark.parametrize("kind", ["adamw", "muon"])
@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_holds_only_its_share_of_the_state(kind, world):
    trainable, _ = tstep.partition(gv.init(CFG), "all")
    opt = make_optimizer(kind)
    whole = flatten(opt.init(trainable))
    shards = [flatten(ShardedOptimizer(opt, r, world).init(trainable)) for r in range(world)]
    scalars = {k for k, v in whole.items() if v.dim() == 0}  # step counts: every rank keeps one
    for shard in shards:
        assert _numel(shard) < _numel(whole) / world * 1.5
        assert scalars <= shard.keys()
    tensors = [k for shard in shards for k in shard if k not in scalars]
    assert sorted(tensors) == sorted(k for k in whole if k not in scalars)  # every tensor on exactly one rank
    assert sum(_numel(s) for s in shards) == _numel(whole) + (world - 1) * len(scalars)


def test_shards_load_from_a_whole_state_file(tmp_path):
    """load_state gives each rank exactly its tensors of an unsharded optim.safetensors; a mismatch is named."""
    trainable, frozen = tstep.partition(gv.init(CFG, seed=1), "all")
    opt = make_optimizer("muon", lr=1e-2)
    state = opt.init(trainable)
    step = tstep.make_train_step(CFG, opt, frozen)
    for s in range(2):
        trainable, state, _ = step(trainable, state, [random_batch(seed=s)], s)
    save_state(tmp_path / "optim.safetensors", state)
    whole = flatten(state)
    for r in range(3):
        sharded = ShardedOptimizer(opt, r, 3)
        shard = sharded.load_state(tmp_path / "optim.safetensors", trainable, sharded.init(trainable))
        for k, v in flatten(shard).items():
            assert torch.equal(v, whole[k]), k
    # one process: the gathered whole state is the state, and it loads like any optim.safetensors
    sharded = ShardedOptimizer(opt, 0, 1)
    save_state(tmp_path / "gathered.safetensors", sharded.gather_state(trainable, state))
    again = load_state(tmp_path / "gathered.safetensors", opt.init(trainable))
    assert all(torch.equal(v, whole[k]) for k, v in flatten(again).items())
    fewer = dict(list(trainable.items())[1:])
    with pytest.raises(CheckpointError, match="unexpected"):
        ShardedOptimizer(opt, 0, 2).load_state(tmp_path / "optim.safetensors", fewer,
                                               ShardedOptimizer(opt, 0, 2).init(fewer))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_sharded_optimizer_matches_replicated_and_resumes_exactly(tmp_path, nproc):
    """--train.shard-optimizer: the same losses and params after 5 steps as without, each rank holding about 1/N of
    the optimizer state; a run saved at step 3 and resumed writes the same losses, bit for bit."""
    const = {"schedule": "constant", "bucket_mb": 0.01}  # the learning rate does not depend on the run's length
    runs = {"replicated": {**const},
            "sharded": {**const, "shard_optimizer": True},
            "cut": {**const, "shard_optimizer": True, "steps": 3},
            "cut-resumed": {**const, "shard_optimizer": True, "run": "cut", "resume": True}}
    out = run_many(tmp_path, nproc, 4 // nproc, runs)
    rep, shard, cut = (out / name for name in ("replicated", "sharded", "cut"))
    torch.testing.assert_close(torch.tensor(losses(shard)), torch.tensor(losses(rep)), atol=1e-6, rtol=1e-5)
    assert losses(cut) == losses(shard)  # resumed at step 3: exact

    loaded = {p: ckpt.load_checkpoint(ckpt.latest(p / "checkpoints")) for p in (rep, shard, cut)}
    (want, cfg, _, s1), (got, _, _, s2), (resumed, _, _, s3) = loaded.values()
    assert s1["step"] == s2["step"] == s3["step"] == 5
    start = flatten(gv.init(cfg, seed=0))
    for k, v in flatten(want).items():
        assert not torch.equal(v, start[k]), f"{k} did not train"
        torch.testing.assert_close(flatten(got)[k], v, atol=2e-5, rtol=1e-4, msg=k)
        assert torch.equal(flatten(resumed)[k], flatten(got)[k]), k

    # the checkpoint holds the whole optimizer state, gathered from the ranks
    trainable, _ = tstep.partition(gv.init(cfg), "all")
    opt = make_optimizer("muon")
    whole_rep = flatten(load_state(ckpt.latest(rep / "checkpoints") / ckpt.OPTIM_FILE, opt.init(trainable)))
    whole_shard = flatten(load_state(ckpt.latest(shard / "checkpoints") / ckpt.OPTIM_FILE, opt.init(trainable)))
    for k, v in whole_rep.items():
        torch.testing.assert_close(whole_shard[k], v, atol=1e-5, rtol=1e-4, msg=k)

    full = _numel(whole_rep)
    held = [s["opt_numel"] for s in stats(out, "sharded", nproc)]
    assert all(s["opt_numel"] == full for s in stats(out, "replicated", nproc))
    assert max(held) < full / nproc * 1.5 and sum(held) == full + nproc - 1  # + each rank's AdamW step count
