"""Multimodal supervised fine-tuning (SFT) of a GhostVis VLM; with no arguments, the project's demo.

    python recipes/sft.py                                  # tiny VLM on built-in synthetic VQA, CPU, minutes
    python recipes/sft.py --data.source llava.jsonl --data.image-folder imgs/ --model.init runs/align
    torchrun --nproc_per_node=2 recipes/sft.py --train.batch-size 8
    python recipes/sft.py --help                           # every flag, documented

The demo trains the ``tiny-vlm`` preset from scratch on synthetic pictures of
a coloured shape with questions about its colour and position (``--data.kinds``
and ``--data.max-objects`` make harder tasks), then answers held-out questions -- about scene layouts never seen in
training -- by greedy generation and prints the exact-match accuracy. The run
folder ``runs/<name>/`` gets the checkpoints, ``tokenizer.json``,
``metrics.jsonl``, ``loss.png`` and ``eval.json``.

Only assistant answers are supervised. ``--train.trainable`` freezes the rest
(e.g. ``connector,text`` keeps the vision encoder fixed).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads collapse on a busy CPU

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import tyro  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from ghostvis.train import distributed  # noqa: E402
from ghostvis.train.data import BatchIterator, SyntheticVQA, default_tokenizer, load_llava  # noqa: E402
from ghostvis.train.data.synthetic import LEARNABLE_KINDS  # noqa: E402
from ghostvis.train.evaluate import vqa_accuracy  # noqa: E402
from ghostvis.train.loop import (ModelSource, RunConfig, TrainConfig, append_metrics, load_initial,  # noqa: E402
                                 train)
from ghostvis.train.tokenizer import Tokenizer  # noqa: E402


@dataclass
class Data:
    """Training data (the ``--data.*`` flags).

    Attributes:
        source: ``synthetic`` (the built-in VQA generator) or a LLaVA-format ``.json`` / ``.jsonl`` file.
        image_folder: where a LLaVA file's image names are resolved (default: next to the file).
        tokenizer: a ``tokenizer.json`` (file or folder); default: the built-in tokenizer trained on the
            synthetic corpus.
        train_size: synthetic training samples (images) to draw.
        questions_per_image: synthetic question/answer turns per image.
        max_objects: at most this many shapes per synthetic image (1-4); the demo's single-shape scenes are
            learned in ~150 steps, busier scenes need far longer runs.
        kinds: synthetic question templates: any of ``color``, ``where``, ``shape``, ``count``, ``exists``.
        packed: pack several samples into each row (else one sample per padded row).
        strict: stop at the first bad record of a LLaVA file instead of skipping it with a warning.
        seed: seed of the synthetic data.
    """

    source: str = "synthetic"
    image_folder: Optional[str] = None
    tokenizer: Optional[str] = None
    train_size: int = 20000
    questions_per_image: int = 4
    max_objects: int = 1
    kinds: tuple[str, ...] = LEARNABLE_KINDS
    packed: bool = True
    strict: bool = False
    seed: int = 0


@dataclass
class Eval:
    """Held-out evaluation after training (the ``--eval.*`` flags).

    Attributes:
        images: held-out synthetic images; each of their questions is asked (0 skips the evaluation).
        max_new_tokens: longest generated answer.
        batch_size: prompts generated together.
        seed: seed of the held-out set (its scene layouts never occur in training).
    """

    images: int = 100
    max_new_tokens: int = 8
    batch_size: int = 100
    seed: int = 1234


@dataclass
class SFTConfig:
    """Multimodal SFT: every field is a flag (``--train.steps 200``, ``--model.init runs/align``)."""

    model: ModelSource = field(default_factory=lambda: ModelSource(preset="tiny-vlm"))
    data: Data = field(default_factory=Data)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=200, batch_size=8, seq_len=256, optimizer="muon", lr=5e-3, muon_lr=0.02, warmup=10))
    run: RunConfig = field(default_factory=lambda: RunConfig(name="sft"))
    eval: Eval = field(default_factory=Eval)


def load_tokenizer(data: Data, run_dir: Path) -> Tokenizer:
    """The tokenizer ``data`` names (saved into the run folder so the checkpoint is self-contained)."""
    tok = Tokenizer.load(data.tokenizer) if data.tokenizer else default_tokenizer()
    run_dir.mkdir(parents=True, exist_ok=True)
    tok.save(run_dir / "tokenizer.json")
    return tok


def training_samples(data: Data, tok: Tokenizer, mcfg):
    """The SFT samples: synthetic VQA or a LLaVA file."""
    if data.source == "synthetic":
        return SyntheticVQA(tok, mcfg.num_image_tokens, mcfg.vision.image_size, size=data.train_size,
                            split="train", seed=data.seed, questions_per_image=data.questions_per_image,
                            max_objects=data.max_objects, kinds=data.kinds)
    return load_llava(data.source, data.image_folder, tok, num_image_tokens=mcfg.num_image_tokens,
                      image_size=mcfg.vision.image_size, strict=data.strict)


def evaluate(params, mcfg, tok: Tokenizer, cfg: SFTConfig, device) -> Optional[dict]:
    """Held-out exact-match accuracy on synthetic questions (None when disabled)."""
    if cfg.eval.images <= 0:
        return None
    held_out = SyntheticVQA(tok, mcfg.num_image_tokens, mcfg.vision.image_size, size=cfg.eval.images, split="test",
                            seed=cfg.eval.seed, questions_per_image=cfg.data.questions_per_image,
                            max_objects=cfg.data.max_objects, kinds=cfg.data.kinds)
    held_out.image(0).save(cfg.run.run_dir / "example.png")  # a held-out picture to chat about
    scores = vqa_accuracy(params, mcfg, tok, held_out.eval_examples(), batch_size=cfg.eval.batch_size,
                          max_new_tokens=cfg.eval.max_new_tokens, device=device)
    scores["example_question"] = held_out.item(0).qa[0][0]
    return scores


def main(cfg: SFTConfig) -> dict:
    """Train, evaluate and report; returns ``{"accuracy", "wall_s", "run_dir", ...}``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    di = distributed.init(cfg.run.device)
    params, mcfg = load_initial(cfg.model)
    if not mcfg.is_vlm:
        raise SystemExit(f"sft needs a vision-language model; {cfg.model.init!r} / preset {cfg.model.preset!r} "
                         "is text-only (use recipes/pretrain.py)")
    run_dir = cfg.run.run_dir
    tok = load_tokenizer(cfg.data, run_dir)
    if tok.vocab_size > mcfg.text.vocab_size:
        raise SystemExit(f"tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {mcfg.text.vocab_size}")
    samples = training_samples(cfg.data, tok, mcfg)
    batches = BatchIterator(samples, batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len, pad_id=tok.pad_id,
                            image_token_id=mcfg.image_token_id, packed=cfg.data.packed, seed=cfg.train.seed,
                            rank=di.rank, world_size=di.world_size)
    result = train(params, mcfg, batches, cfg.train, cfg.run, di)
    report = {"run_dir": str(run_dir), "train_wall_s": round(result.wall_s, 1), "final_loss": result.final_loss,
              "skipped_steps": result.skipped}
    if di.is_main:
        scores = evaluate(result.params, mcfg, tok, cfg, di.device)
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        if scores is not None:
            report |= {"accuracy": scores["accuracy"], "correct": scores["correct"], "total": scores["total"],
                       "by_kind": scores["by_kind"], "examples": scores["examples"]}
            append_metrics(run_dir, {"eval": {k: scores[k] for k in ("accuracy", "correct", "total", "by_kind")}})
            print(f"held-out exact match: {scores['correct']}/{scores['total']} = {100 * scores['accuracy']:.1f}%  "
                  + "  ".join(f"{k}: {100 * v:.0f}%" for k, v in scores["by_kind"].items()))
            for ex in scores["examples"][:4]:
                print(f"  Q: {ex['question']}  A: {ex['prediction']!r}  (expected {ex['answer']!r})")
        (run_dir / "eval.json").write_text(json.dumps({**report, "config": asdict(cfg)}, indent=2, default=str))
        print(f"run folder: {run_dir}  (checkpoints/, metrics.jsonl, loss.png, tokenizer.json, eval.json); "
              f"total {report['wall_s']:.0f}s")
        if scores is not None:
            exe = sys.executable
            py = os.path.relpath(exe) if exe.startswith(os.getcwd() + os.sep) else "python"
            print(f"talk to it: {py} recipes/chat.py --checkpoint {run_dir} --temperature 0 "
                  f"--image {run_dir / 'example.png'} --prompt '{scores['example_question']}'\n"
                  f"        or: {py} recipes/chat.py --checkpoint {run_dir}  (then /image {run_dir}/example.png)")
    distributed.shutdown()
    return report


if __name__ == "__main__":
    main(tyro.cli(SFTConfig, description=__doc__))
