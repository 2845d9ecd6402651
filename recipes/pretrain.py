"""Text pretraining of a GhostVis decoder (next-token prediction on every token).

    python recipes/pretrain.py                                   # tiny preset on the built-in synthetic corpus
    python recipes/pretrain.py --data.source corpus/ --model.preset d12 --train.steps 5000
    torchrun --nproc_per_node=8 recipes/pretrain.py --data.source corpus/ --model.preset d20
    python recipes/pretrain.py --help                            # every flag, documented

A corpus is a ``.txt`` / ``.jsonl`` / ``.parquet`` file or a folder of them;
documents are packed into rows (each attends only to itself). At the end the
held-out loss is printed (for the built-in corpus: documents drawn with another
seed). The run folder gets checkpoints, ``tokenizer.json``, ``metrics.jsonl``
and ``loss.png``; the final checkpoint is the ``--model.init`` of a later VLM run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads collapse on a busy CPU

import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal, Optional  # noqa: E402

import tyro  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from ghostvis.train import distributed  # noqa: E402
from ghostvis.train.data import (BatchIterator, default_tokenizer, load_text, synthetic_corpus,  # noqa: E402
                                 text_samples)
from ghostvis.train.evaluate import mean_loss  # noqa: E402
from ghostvis.train.loop import (ModelSource, RunConfig, TrainConfig, append_metrics, data_rank,  # noqa: E402
                                 load_initial, train)
from ghostvis.train.tokenizer import Tokenizer  # noqa: E402


@dataclass
class Data:
    """Training text (the ``--data.*`` flags).

    Attributes:
        source: ``synthetic`` (the built-in templated corpus) or a corpus file / folder (txt, jsonl, parquet).
        tokenizer: a ``tokenizer.json`` (file or folder); default: the built-in tokenizer.
        docs: documents of the synthetic corpus.
        txt_mode: how ``.txt`` files split into documents: ``paragraph``, ``line`` or ``file``.
        strict: stop at the first bad record instead of skipping it with a warning.
        eval_docs: held-out synthetic documents for the final loss (0 skips it).
    """

    source: str = "synthetic"
    tokenizer: Optional[str] = None
    docs: int = 4000
    txt_mode: Literal["paragraph", "line", "file"] = "paragraph"
    strict: bool = False
    eval_docs: int = 200


@dataclass
class PretrainConfig:
    """Text pretraining: every field is a flag (``--train.steps 500``, ``--model.preset d12``)."""

    model: ModelSource = field(default_factory=lambda: ModelSource(preset="tiny"))
    data: Data = field(default_factory=Data)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=200, batch_size=8, seq_len=256, optimizer="muon", lr=3e-3, muon_lr=0.02, warmup=10))
    run: RunConfig = field(default_factory=lambda: RunConfig(name="pretrain"))


def main(cfg: PretrainConfig) -> dict:
    """Train and report ``{"final_loss", "eval_loss", "run_dir", ...}``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    di = distributed.init(cfg.run.device)
    params, mcfg = load_initial(cfg.model)
    run_dir = cfg.run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(cfg.data.tokenizer) if cfg.data.tokenizer else default_tokenizer()
    tok.save(run_dir / "tokenizer.json")
    if tok.vocab_size > mcfg.text.vocab_size:
        raise SystemExit(f"tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {mcfg.text.vocab_size}")
    seq = cfg.train.seq_len
    if cfg.data.source == "synthetic":
        samples = text_samples(tok, synthetic_corpus(cfg.data.docs, seed=0), seq)
    else:
        samples = load_text(cfg.data.source, tok, seq, strict=cfg.data.strict, txt_mode=cfg.data.txt_mode)
    rank, world = data_rank(di, cfg.train)  # context-parallel ranks read the same batches
    batches = BatchIterator(samples, batch_size=cfg.train.batch_size, seq_len=seq, pad_id=tok.pad_id,
                            seed=cfg.train.seed, rank=rank, world_size=world)
    result = train(params, mcfg, batches, cfg.train, cfg.run, di)
    report = {"run_dir": str(run_dir), "final_loss": result.final_loss, "train_wall_s": round(result.wall_s, 1)}
    if di.is_main and cfg.data.source == "synthetic" and cfg.data.eval_docs > 0:
        held_out = text_samples(tok, synthetic_corpus(cfg.data.eval_docs, seed=1), seq)
        it = BatchIterator(held_out, batch_size=cfg.train.batch_size, seq_len=seq, pad_id=tok.pad_id, shuffle=False)
        eval_batches = [next(it) for _ in range(it.batches_per_epoch)]
        report["eval_loss"] = mean_loss(result.params, mcfg, [
            {k: (v.to(di.device) if v is not None else None) for k, v in b.items()} for b in eval_batches])
        append_metrics(run_dir, {"eval": {"loss": report["eval_loss"]}})
        print(f"held-out loss: {report['eval_loss']:.4f}")
    if di.is_main:
        print(f"final train loss {result.final_loss:.4f}; run folder: {run_dir}")
    distributed.shutdown()
    return report


if __name__ == "__main__":
    main(tyro.cli(PretrainConfig, description=__doc__))
