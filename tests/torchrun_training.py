"""Shared by the multi-process tests: a tiny training job and a runner that starts it alone or under torchrun.

Not a test module (no ``test_`` prefix); tests import it from their own folder.

One launch trains several runs in a row (``runs``: run name -> ``TrainConfig`` fields, plus
``resume`` and ``save_every`` for ``RunConfig`` and ``run`` to name the run folder when it is not
the key, e.g. to resume an earlier run of the same launch), so the process start-up is paid once. Each rank
also writes ``stats-<run>-<rank>.json``: how many optimizer-state elements it held and how many
gradient buckets it launched inside a backward pass.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import json, os, sys
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
torch.set_num_threads(1)
sys.path[:0] = [sys.argv[5], os.path.join(sys.argv[5], "tests")]
from ghostvis.train import distributed
from torchrun_training import train_runs

di = distributed.init("cpu")
train_runs(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[6]), di)
distributed.shutdown()
'''


def train_runs(out, per_rank: int, cp: int, optimizer: str, runs: dict[str, dict], di=None) -> None:
    """Train each run of ``runs`` on this process (one rank of ``di``); see the module docstring."""
    import torch

    import ghostvis as gv
    from ghostvis.core.config import ModelConfig, TextConfig
    from ghostvis.core.tree import flatten
    from ghostvis.train import distributed, loop
    from ghostvis.train.data import BatchIterator
    from ghostvis.train.packing import Sample

    di = di or distributed.DistInfo()
    cfg = ModelConfig(text=TextConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                      ffn_dim=64, max_seq_len=64))
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(8, 64, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(200)]
    samples = [Sample(d, [i % 3 != 0 for i in range(len(d))]) for d in docs]  # uneven supervised counts per rank

    stats: dict = {}
    make_step = loop.make_train_step

    def counting_make_train_step(cfg, opt, frozen, **kw):
        stats["reducer"] = kw.get("reducer")
        step = make_step(cfg, opt, frozen, **kw)

        def counted(trainable, opt_state, micro, i):
            stats["opt_numel"] = sum(t.numel() for t in flatten(opt_state).values())
            return step(trainable, opt_state, micro, i)
        return counted

    loop.make_train_step = counting_make_train_step
    try:
        for key, over in runs.items():
            over = dict(over)
            name = over.pop("run", key)
            run_kw = {k: over.pop(k) for k in ("resume", "save_every") if k in over}
            tc = loop.TrainConfig(**{**dict(steps=5, batch_size=per_rank, seq_len=32, grad_accum=2,
                                            optimizer=optimizer, lr=1e-2, warmup=1, context_parallel=cp), **over})
            rank, world = loop.data_rank(di, tc)
            it = BatchIterator(samples, batch_size=tc.batch_size, seq_len=32, rank=rank, world_size=world, seed=1)
            rc = loop.RunConfig(name=name, out_dir=str(out), progress=False, plot=False, **run_kw)
            stats.clear()
            loop.train(gv.init(cfg, seed=0), cfg, it, tc, rc, di)
            with open(Path(out) / f"stats-{key}-{di.rank}.json", "w") as f:
                json.dump({"opt_numel": stats.get("opt_numel"),
                           "launched_in_backward": getattr(stats.get("reducer"), "launched_in_backward", 0)}, f)
    finally:
        loop.make_train_step = make_step


def run_many(workdir: Path, nproc: int, per_rank: int, runs: dict[str, dict], *, cp: int = 1,
             optimizer: str = "muon") -> Path:
    """Train each of ``runs`` (name -> ``TrainConfig`` fields) with ``nproc`` ranks in one launch.

    ``nproc`` 1 trains in this process; more start torchrun (gloo). Returns the output folder:
    run ``name`` is ``<folder>/<name>``. Defaults: 5 steps, ``grad_accum`` 2, ``seq_len`` 32.
    """
    out = workdir / f"n{nproc}-cp{cp}"
    out.mkdir(parents=True, exist_ok=True)
    if nproc == 1:
        train_runs(out, per_rank, cp, optimizer, runs)
        return out
    script = workdir / "train.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(script), str(out), str(per_rank), str(cp), optimizer, str(ROOT), json.dumps(runs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def run_training(workdir: Path, nproc: int, per_rank: int, *, cp: int = 1, optimizer: str = "muon") -> Path:
    """Train 5 steps with ``nproc`` ranks; returns the run folder."""
    return run_many(workdir, nproc, per_rank, {"r": {}}, cp=cp, optimizer=optimizer) / "r"


def losses(run_dir: Path) -> list[float]:
    """The per-step losses a run wrote to ``metrics.jsonl``."""
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stats(out: Path, run: str, nproc: int) -> list[dict]:
    """Each rank's ``stats-<run>-<rank>.json``."""
    return [json.loads((out / f"stats-{run}-{r}.json").read_text()) for r in range(nproc)]
