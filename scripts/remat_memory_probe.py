"""Diagnostic: the activation peak of a compiled training gradient, with and without remat.

    python3 scripts/remat_memory_probe.py LAYERS BATCH SEQ [CODE_DIR]

Builds a d20-shaped decoder with LAYERS layers and compiles ``value_and_grad`` for remat
``off``, ``full`` and ``selective``, as the training step does (CUDA, bf16). For each it prints the
activation peak that ``torch.cuda.max_memory_allocated`` measures on top of the weights. With
CODE_DIR it also writes inductor's generated code there (``code_<policy>.py``), where the buffers
kept between the forward and the backward can be read off.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ghostvis as gv  # noqa: E402
from ghostvis.core.config import ModelConfig  # noqa: E402
from ghostvis.core.presets import depth  # noqa: E402
from ghostvis.train import step as tstep  # noqa: E402


def main(layers: int, batch: int, seq: int, code_dir: str | None = None) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("the probe measures CUDA memory: it needs a CUDA device")
    cfg = ModelConfig(text=dataclasses.replace(depth(20), n_layers=layers))
    trainable = {k: v.to("cuda", torch.bfloat16) for k, v in gv.flatten(gv.init(cfg, seed=0)).items()}
    tokens = torch.randint(8, cfg.text.vocab_size, (batch, seq), device="cuda")
    b = {"tokens": tokens, "targets": tokens.roll(-1, 1), "positions": None, "doc_ids": None, "images": None}
    n = torch.tensor(float(tokens.numel()), device="cuda")
    for policy in ("off", "full", "selective"):
        torch._dynamo.reset()
        remat = policy != "off"
        fn = tstep.compile_value_and_grad(tstep.value_and_grad(cfg, {}, remat_blocks=remat,
                                                     remat_policy=policy if remat else "full", select=False),
                                remat_blocks=remat)
        _, codes = run_and_get_code(fn, trainable, b, n)  # compiles and runs once
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads, _ = fn(trainable, b, n)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        del grads
        print(f"{policy:<10} activation peak {peak:.3f} GiB (weights {base / 2**30:.3f} GiB)", flush=True)
        if code_dir:
            Path(code_dir, f"code_{policy}.py").write_text(codes[-1])


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) == 5 else None)
