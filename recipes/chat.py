"""Chat with a GhostVis model: interactive (streaming, images with /image) or one-shot.

    python recipes/chat.py --checkpoint runs/sft                       # interactive
    python recipes/chat.py --checkpoint runs/sft --prompt "What is in this picture?" --image cat.png
    python recipes/chat.py --help                                      # every flag, documented

Interactive commands: ``/image PATH`` attaches an image to your next message
(VLMs), ``/reset`` starts a new conversation, ``/quit`` (or end of input) exits.
Replies stream token by token and stop at ``<|end|>``. The checkpoint may be a
GhostVis ``.safetensors`` file, a checkpoint folder (``.../step_000200``), a run
folder (its latest checkpoint) or an exported Hugging Face folder; the tokenizer
is found beside it (``tokenizer.json`` in that folder or up to three above).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from ghostvis.core.tree import tree_map  # noqa: E402
from ghostvis.infer.generate import stream  # noqa: E402
from ghostvis.infer.quantize import quantize  # noqa: E402
from ghostvis.train.chat import render_chat  # noqa: E402
from ghostvis.train.data.images import load_image  # noqa: E402
from ghostvis.train.loop import ModelSource, load_initial  # noqa: E402
from ghostvis.train.tokenizer import Tokenizer  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HELP = "commands: /image PATH attaches an image to your next message, /reset clears the conversation, /quit exits"


@dataclass
class ChatConfig:
    """Chat with a checkpoint.

    Attributes:
        checkpoint: a GhostVis .safetensors file, a checkpoint folder, a run folder (latest checkpoint)
            or a Hugging Face export folder.
        tokenizer: tokenizer.json (file or folder); default: the one found beside the checkpoint.
        prompt: one-shot mode: answer this message, print the reply and exit (no interactive loop).
        image: one-shot mode: image files attached to --prompt, in order (VLMs only).
        system: an optional system message that opens the conversation.
        max_new_tokens: longest reply, in tokens.
        temperature: sampling temperature; 0 is greedy (deterministic).
        top_k: sample only among the k most likely tokens (None: no limit).
        top_p: sample only from the smallest set of tokens with this total probability (None: no limit).
        seed: sampling seed, so a conversation can be replayed (None: a fresh random one each reply).
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ...
        dtype: weight dtype; ``auto`` is bfloat16 on CUDA and float32 on the CPU.
        quantize: ``int8`` quantizes the decoder's projection weights before chatting.
        quantize_lm_head: with ``quantize``, the (untied) LM head too: faster one-row decoding,
            every logit rounded.
        compile: ``torch.compile`` the decode step (faster replies after a slower first one; the
            compiled step, KV cache and CUDA graph are kept between replies of similar length).
    """

    checkpoint: str
    tokenizer: Optional[str] = None
    prompt: Optional[str] = None
    image: tuple[str, ...] = ()
    system: Optional[str] = None
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: Optional[int] = None
    top_p: Optional[float] = 0.9
    seed: Optional[int] = 0
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Optional[Literal["int8"]] = None
    quantize_lm_head: bool = False
    compile: bool = False


def find_tokenizer(checkpoint: str | Path) -> Path:
    """``tokenizer.json`` in the checkpoint's folder or up to three folders above it (a run folder)."""
    start = Path(checkpoint).resolve()
    folder = start if start.is_dir() else start.parent
    for candidate in [folder, *list(folder.parents)[:3]]:
        if (candidate / "tokenizer.json").is_file():
            return candidate / "tokenizer.json"
    raise SystemExit(f"no tokenizer.json found beside {checkpoint} (or up to three folders above); "
                     "pass --tokenizer PATH")


def load_model(cfg: ChatConfig):
    """``(params, model_cfg, tokenizer, device)`` as the flags ask."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if cfg.quantize_lm_head and not cfg.quantize:
        raise SystemExit("--quantize-lm-head needs --quantize int8")
    params, mcfg = load_initial(ModelSource(init=cfg.checkpoint))
    params = tree_map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype), params)
    if cfg.quantize:
        try:
            params = quantize(params, cfg.quantize, lm_head=cfg.quantize_lm_head)
        except ValueError as e:
            raise SystemExit(f"--quantize: {e}") from None
    tok = Tokenizer.load(cfg.tokenizer or find_tokenizer(cfg.checkpoint))
    return params, mcfg, tok, device


class Conversation:
    """The messages so far and their images, rendered and continued by the model."""

    def __init__(self, params, mcfg, tok: Tokenizer, cfg: ChatConfig, device):
        self.params, self.mcfg, self.tok, self.cfg, self.device = params, mcfg, tok, cfg, device
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        self.images: list[torch.Tensor] = []  # every image of the conversation, in order
        self.pending: list[torch.Tensor] = []  # attached to the next user message

    def attach(self, path: str) -> None:
        """Load an image for the next message; raises ValueError/OSError with a readable message."""
        if not self.mcfg.is_vlm:
            raise ValueError("this model has no vision encoder: it cannot take images")
        self.pending.append(load_image(path, self.mcfg.vision.image_size))

    def reply(self, text: str, out=sys.stdout) -> str:
        """Add a user message, stream the assistant's answer to ``out``, and return it."""
        content = [{"type": "image"}] * len(self.pending) + [text] if self.pending else text
        messages = self.messages + [{"role": "user", "content": content}]
        images = self.images + self.pending
        ids, _ = render_chat(self.tok, messages, self.mcfg.num_image_tokens, add_generation_prompt=True)
        context = self.mcfg.text.max_seq_len
        if len(ids) >= context:
            raise ValueError(f"the conversation is {len(ids)} tokens, the model's context is {context}: /reset")
        new, shown = [], ""
        for step in stream(self.params, self.mcfg, [ids], [[im.to(self.device) for im in images]],
                           max_new_tokens=self.cfg.max_new_tokens, stop_ids=[self.tok.end_id, self.tok.eos_id],
                           temperature=self.cfg.temperature, top_k=self.cfg.top_k, top_p=self.cfg.top_p,
                           seed=self.cfg.seed, compile=self.cfg.compile, reuse=True):
            if step[0] is None:
                break
            new.append(step[0])
            text_so_far = self.tok.decode(new)
            if not text_so_far.endswith("\ufffd"):  # hold back a half-decoded multi-byte character
                out.write(text_so_far[len(shown):])
                out.flush()
                shown = text_so_far
        answer = self.tok.decode(new)
        out.write(answer[len(shown):] + "\n")
        out.flush()
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.images, self.pending = images, []
        return answer


def interactive(conv: Conversation) -> None:
    """Read lines from stdin until /quit or end of input; each line is a message or a command."""
    print(f"GhostVis chat ({conv.mcfg.name or 'model'}). {HELP}", flush=True)
    while True:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            print()
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            conv.reset()
            print("(conversation cleared)", flush=True)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                conv.attach(path)
                print(f"(image attached: {path})", flush=True)
            except (OSError, ValueError) as e:
                print(f"(cannot attach {path!r}: {e})", flush=True)
            continue
        if line.startswith("/"):
            print(f"(unknown command {line.split()[0]!r}; {HELP})", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        try:
            conv.reply(line)
        except ValueError as e:
            print(f"\n({e})", flush=True)


def main(cfg: ChatConfig) -> None:
    params, mcfg, tok, device = load_model(cfg)
    conv = Conversation(params, mcfg, tok, cfg, device)
    if cfg.prompt is None:
        if cfg.image:
            raise SystemExit("--image goes with --prompt (one-shot mode); interactively, use /image PATH")
        interactive(conv)
        return
    try:
        for path in cfg.image:
            conv.attach(path)
        conv.reply(cfg.prompt)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main(tyro.cli(ChatConfig, description=__doc__))
