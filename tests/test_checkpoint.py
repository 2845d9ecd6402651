"""Checkpoints: atomic save, keep-last-k, failure mid-save, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ghostvis as gv
from ghostvis.core.config import ModelConfig, TextConfig
from ghostvis.core.io import CheckpointError
from ghostvis.core.tree import flatten
from ghostvis.train import checkpoint as ckpt
from ghostvis.train.optim import make_optimizer

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig(text=TextConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                                  ffn_dim=64, max_seq_len=64))

# A small training run over random text documents, resumable;
# argv: out_dir steps batch_per_rank sleep_per_batch repo_root prefetch_depth
SCRIPT = r'''
import os, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[5])
import ghostvis as gv
from ghostvis.core.config import ModelConfig, TextConfig
from ghostvis.train import distributed, loop
from ghostvis.train.data import BatchIterator
from ghostvis.train.packing import Sample

out, steps, per_rank, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
prefetch = int(sys.argv[6])
cfg = ModelConfig(text=TextConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                                  ffn_dim=64, max_seq_len=64))
g = torch.Generator().manual_seed(0)
docs = [torch.randint(8, 64, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(300)]
samples = [Sample(d, [True] * (len(d) - 1) + [False]) for d in docs]

class Slow:
    def __init__(self, it): self.it = it
    def __next__(self):  # the cursor moves before the pause: a prefetching thread is ahead while it sleeps
        batch = next(self.it)
        time.sleep(pause)
        return batch
    def state_dict(self): return self.it.state_dict()
    def load_state_dict(self, s): self.it.load_state_dict(s)

di = distributed.init("cpu")
it = Slow(BatchIterator(samples, batch_size=per_rank, seq_len=32, rank=di.rank, world_size=di.world_size, seed=3))
tc = loop.TrainConfig(steps=steps, batch_size=per_rank, seq_len=32, optimizer="muon", lr=1e-2, muon_lr=0.02, warmup=2,
                      weight_decay=0.01)
rc = loop.RunConfig(name="r", out_dir=out, save_every=2, keep_last=2, resume=True, progress=False, plot=False,
                    prefetch=prefetch)
loop.train(gv.init(cfg, seed=0), cfg, it, tc, rc, di)
distributed.shutdown()
'''


def _script(tmp_path) -> Path:
    path = tmp_path / "run_train.py"
    path.write_text(SCRIPT)
    return path


def _run(script, out, steps, per_rank=4, pause=0.0, prefetch=0, **kw):
    return subprocess.Popen([sys.executable, str(script), str(out), str(steps), str(per_rank), str(pause), str(ROOT),
                             str(prefetch)], **kw)


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "r" / "metrics.jsonl").read_text().splitlines()
            if line.strip() and "loss" in json.loads(line)]


def _state(seed=0):
    params = gv.init(CFG, seed=seed)
    opt = make_optimizer("muon")
    return params, opt, opt.init(flatten(params))


def test_save_load_roundtrip_and_keep_last(tmp_path):
    params, opt, state = _state()
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, params, CFG, state, {"data": {"epoch": 0, "step": step},
                                                                   "rng": ckpt.rng_state()}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000004", "step_000006"]
    p2, cfg2, s2, extra = ckpt.load_checkpoint(ckpt.latest(tmp_path), opt.init(flatten(gv.init(CFG, seed=9))))
    assert cfg2 == CFG and extra["step"] == 6 and extra["data"] == {"epoch": 0, "step": 6}
    for k, v in flatten(params).items():
        assert torch.equal(flatten(p2)[k], v)
    for k, v in flatten(state).items():
        assert torch.equal(flatten(s2)[k], v)


def test_rng_state_roundtrip():
    saved = json.loads(json.dumps(ckpt.rng_state()))
    a = torch.rand(3)
    ckpt.set_rng_state(saved)
    assert torch.equal(torch.rand(3), a)


def test_failure_mid_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    params, opt, state = _state()
    ckpt.save_checkpoint(tmp_path, 2, params, CFG, state, {"data": {}})

    def broken(path, st):  # dies after writing half a file, like a full disk or a kill
        Path(path).write_bytes(b"\x00" * 100)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ckpt, "save_state", broken)
    with pytest.raises(OSError, match="injected"):
        ckpt.save_checkpoint(tmp_path, 4, gv.init(CFG, seed=1), CFG, state, {"data": {}})
    assert ckpt.latest(tmp_path).name == "step_000002"
    assert not list(tmp_path.glob(".tmp-*"))
    loaded, _, _, extra = ckpt.load_checkpoint(ckpt.latest(tmp_path), opt.init(flatten(params)))
    assert extra["step"] == 2 and torch.equal(loaded["text"]["embed"], params["text"]["embed"])
    # a stale temp folder (a kill mid-save) is ignored and cleaned by the next save
    (tmp_path / ".tmp-step_000004-1").mkdir()
    assert ckpt.latest(tmp_path).name == "step_000002"
    monkeypatch.undo()
    ckpt.save_checkpoint(tmp_path, 4, params, CFG, state, {"data": {}})
    assert ckpt.latest(tmp_path).name == "step_000004" and not list(tmp_path.glob(".tmp-*"))


def test_load_rejects_non_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        ckpt.load_checkpoint(tmp_path)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_losses_exactly(tmp_path):
    """The killed and the resumed runs draw their batches ahead in a thread (``--run.prefetch 2``), the
    reference in the loop: the losses must still be bit-identical, so the saved data cursor is that of
    the batches trained on, not of those prefetched."""
    script = _script(tmp_path)
    steps = 12
    ref = _run(script, tmp_path / "ref", steps)
    assert ref.wait(timeout=240) == 0
    want = _losses(tmp_path / "ref")
    assert len(want) == steps

    victim = _run(script, tmp_path / "kill", steps, pause=0.15, prefetch=2)
    metrics = tmp_path / "kill" / "r" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline:  # kill once a checkpoint exists and a few more steps ran past it
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    done = len(_losses(tmp_path / "kill"))
    assert 0 < done < steps, f"the kill should land mid-training, {done} steps had run"
    resumed = _run(script, tmp_path / "kill", steps, prefetch=2)
    assert resumed.wait(timeout=240) == 0
    assert _losses(tmp_path / "kill") == want  # bit-identical, not just close
