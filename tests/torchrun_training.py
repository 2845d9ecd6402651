"""Shared by the multi-process tests: a tiny training script and a runner that starts it alone or under torchrun.

Not a test module (no ``test_`` prefix); tests import it from their own folder.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import os, sys
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[5])
import ghostvis as gv
from ghostvis.core.config import ModelConfig, TextConfig
from ghostvis.train import distributed, loop
from ghostvis.train.data import BatchIterator
from ghostvis.train.packing import Sample

out, per_rank, cp, optimizer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = ModelConfig(text=TextConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                  ffn_dim=64, max_seq_len=64))
g = torch.Generator().manual_seed(0)
docs = [torch.randint(8, 64, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(200)]
samples = [Sample(d, [i % 3 != 0 for i in range(len(d))]) for d in docs]  # uneven supervised counts per rank
di = distributed.init("cpu")
tc = loop.TrainConfig(steps=5, batch_size=per_rank, seq_len=32, grad_accum=2, optimizer=optimizer, lr=1e-2, warmup=1,
                      context_parallel=cp)
rank, world = loop.data_rank(di, tc)
it = BatchIterator(samples, batch_size=per_rank, seq_len=32, rank=rank, world_size=world, seed=1)
rc = loop.RunConfig(name="r", out_dir=out, progress=False, plot=False)
loop.train(gv.init(cfg, seed=0), cfg, it, tc, rc, di)
distributed.shutdown()
'''


def run_training(workdir: Path, nproc: int, per_rank: int, *, cp: int = 1, optimizer: str = "muon") -> Path:
    """Train 5 steps in ``nproc`` processes (1: plain python; more: torchrun, gloo); returns the run folder."""
    script = workdir / "train.py"
    script.write_text(SCRIPT)
    out = workdir / f"n{nproc}-cp{cp}"
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, str(script), str(out), str(per_rank), str(cp), optimizer, str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "r"
