"""Data parallel: bucketing, and torchrun x2 / x4 on CPU (gloo) == one process with the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ghostvis as gv
from ghostvis.core.tree import flatten
from ghostvis.train import checkpoint as ckpt
from ghostvis.train.distributed import DataParallel, DistInfo, buckets, init

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import os, sys
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
import ghostvis as gv
from ghostvis.core.config import ModelConfig, TextConfig
from ghostvis.train import distributed, loop
from ghostvis.train.data import BatchIterator
from ghostvis.train.packing import Sample

out, per_rank = sys.argv[1], int(sys.argv[2])
cfg = ModelConfig(text=TextConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                                  ffn_dim=64, max_seq_len=64))
g = torch.Generator().manual_seed(0)
docs = [torch.randint(8, 64, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(200)]
samples = [Sample(d, [i % 3 != 0 for i in range(len(d))]) for d in docs]  # uneven supervised counts per rank
di = distributed.init("cpu")
it = BatchIterator(samples, batch_size=per_rank, seq_len=32, rank=di.rank, world_size=di.world_size, seed=1)
tc = loop.TrainConfig(steps=5, batch_size=per_rank, seq_len=32, grad_accum=2, optimizer="muon", lr=1e-2, warmup=1)
rc = loop.RunConfig(name="r", out_dir=out, progress=False, plot=False)
loop.train(gv.init(cfg, seed=0), cfg, it, tc, rc, di)
distributed.shutdown()
'''


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
    script = tmp_path / "dp.py"
    script.write_text(SCRIPT)
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "4", str(ROOT)],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                            str(script), str(tmp_path / "two"), str(4 // nproc), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, cfg, _, s1 = ckpt.load_checkpoint(ckpt.latest(tmp_path / "one" / "r" / "checkpoints"))
    two, _, _, s2 = ckpt.load_checkpoint(ckpt.latest(tmp_path / "two" / "r" / "checkpoints"))
    assert s1["step"] == s2["step"] == 5
    start = flatten(gv.init(cfg, seed=0))
    for k, v in flatten(one).items():
        assert not torch.equal(v, start[k]), f"{k} did not train"
        torch.testing.assert_close(flatten(two)[k], v, atol=2e-5, rtol=1e-4, msg=k)
