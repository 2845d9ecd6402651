"""Data parallel: bucketing, and torchrun x2 / x4 on CPU (gloo) == one process with the same global batch."""

from pathlib import Path

import pytest
import torch

import ghostvis as gv
from ghostvis.core.tree import flatten
from ghostvis.train import checkpoint as ckpt
from ghostvis.train.distributed import DataParallel, DistInfo, buckets, init
from torchrun_training import run_training

ROOT = Path(__file__).resolve().parent.parent




def test_buckets_group_by_size():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(100), torch.zeros(5), torch.zeros(5, dtype=torch.float64)]
    assert buckets(ts, 4 * 25) == [[0, 1], [2], [3], [4]]
    assert buckets(ts, 10**6) == [[0, 1, 2, 3], [4]]


def test_single_process_is_a_no_op():
    assert init("cpu") == DistInfo(device="cpu")
    g = {"a": torch.ones(3)}
    assert DataParallel().sum_grads_(g)["a"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_torchrun_ranks_match_one_process(tmp_path, nproc):
    one_dir = run_training(tmp_path, 1, 4)
    two_dir = run_training(tmp_path, nproc, 4 // nproc)
    one, cfg, _, s1 = ckpt.load_checkpoint(ckpt.latest(one_dir / "checkpoints"))
    two, _, _, s2 = ckpt.load_checkpoint(ckpt.latest(two_dir / "checkpoints"))
    assert s1["step"] == s2["step"] == 5
    start = flatten(gv.init(cfg, seed=0))
    for k, v in flatten(one).items():
        assert not torch.equal(v, start[k]), f"{k} did not train"
        torch.testing.assert_close(flatten(two)[k], v, atol=2e-5, rtol=1e-4, msg=k)
