"""Byte-level BPE tokenizer with the chat and image special tokens at fixed ids.

A thin wrapper around an HF ``tokenizers.Tokenizer`` so that ``tokenizer.json``
exports as-is to transformers and vLLM. The first eight ids are reserved:

    0 <|pad|>  1 <|bos|>  2 <|eos|>  3 <|image|>  4 <|user|>  5 <|assistant|>  6 <|system|>  7 <|end|>

They are registered as *special* added tokens, so HF's ``PreTrainedTokenizerFast``
matches them in rendered chat-template strings. Our own :meth:`Tokenizer.encode`
is for plain text only: it switches added-token matching off, so the text
``"<|image|>"`` typed by a user becomes ordinary byte tokens and can never
smuggle in an image placeholder or end a turn. Special ids are inserted only by
code (:mod:`ghostvis.train.chat`) that knows where they belong.

Byte-level means every string round-trips exactly: ``decode(encode(s)) == s``
for any unicode text (no normaliser, no prefix space).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

PAD, BOS, EOS, IMAGE, USER, ASSISTANT, SYSTEM, END = (
    "<|pad|>", "<|bos|>", "<|eos|>", "<|image|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE, USER, ASSISTANT, SYSTEM, END]  # list index == token id
TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer file or object does not have GhostVis's special tokens at their fixed ids."""


class Tokenizer:
    """Byte-level BPE with GhostVis's special tokens; see the module docstring.

    Attributes:
        vocab_size: number of ids the tokenizer can produce (specials included).
        pad_id, bos_id, eos_id, image_id, user_id, assistant_id, system_id, end_id: the fixed special ids.
    """

    pad_id, bos_id, eos_id, image_id, user_id, assistant_id, system_id, end_id = range(8)

    def __init__(self, hf_tokenizer: HFTokenizer):
        _check_specials(hf_tokenizer)
        # a private copy whose added-token matching is off: encode() sees text only
        self._text_only = HFTokenizer.from_str(hf_tokenizer.to_str())
        self._text_only.encode_special_tokens = True
        self._json = hf_tokenizer.to_str()
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> list[int]:
        """The ids of all special tokens (0..7)."""
        return list(range(len(SPECIAL_TOKENS)))

    def encode(self, text: str) -> list[int]:
        """Token ids of plain ``text``; special-token strings in it become ordinary byte tokens."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(text).__name__}")
        return self._text_only.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` over many texts (parallel inside ``tokenizers``)."""
        return [e.ids for e in self._text_only.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """The text of ``ids``; special tokens are dropped unless ``skip_special=False``."""
        return self._text_only.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary string of id ``i`` (byte-level alphabet), or None if out of range."""
        return self._text_only.id_to_token(int(i))

    def to_str(self) -> str:
        """The ``tokenizer.json`` text (special-token matching on, as HF expects)."""
        return self._json

    def save(self, path: str | os.PathLike) -> str:
        """Write ``tokenizer.json`` to ``path`` (a directory path gets ``path/tokenizer.json``); returns the file."""
        path = os.fspath(path)
        if os.path.isdir(path) or path.endswith(os.sep):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, TOKENIZER_FILE)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self._json)
        os.replace(tmp, path)  # never leave a half-written tokenizer.json
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> "Tokenizer":
        """Read a ``tokenizer.json`` file, or ``dir/tokenizer.json`` when ``path`` is a directory."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path!r}")
        try:
            hf = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
        return Tokenizer(hf)

    def to_hf(self, chat_template: str | None = None, **kwargs):
        """A ``transformers.PreTrainedTokenizerFast`` over the same ``tokenizer.json``.

        Sets bos/eos/pad tokens (eos is ``<|end|>``: generation stops at the end of a
        turn), ``image_token``, the other specials as extra special tokens and, by default,
        :data:`ghostvis.train.chat.CHAT_TEMPLATE`.
        """
        from transformers import PreTrainedTokenizerFast

        from .chat import CHAT_TEMPLATE
        hf = PreTrainedTokenizerFast(
            tokenizer_object=HFTokenizer.from_str(self._json), bos_token=BOS, eos_token=END, pad_token=PAD,
            image_token=IMAGE, extra_special_tokens=[EOS, IMAGE, USER, ASSISTANT, SYSTEM],
            chat_template=CHAT_TEMPLATE if chat_template is None else chat_template, **kwargs)
        return hf

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def _check_specials(hf: HFTokenizer) -> None:
    for i, tok in enumerate(SPECIAL_TOKENS):
        got = hf.token_to_id(tok)
        if got != i:
            raise TokenizerError(f"special token {tok} must have id {i}, found {got}")
    added = hf.get_added_tokens_decoder()
    for i, tok in enumerate(SPECIAL_TOKENS):
        if i not in added or not added[i].special:
            raise TokenizerError(f"{tok} (id {i}) must be registered as a special added token")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` with the special tokens at ids 0..7.

    ``vocab_size`` is an upper bound: a small corpus may run out of merges first
    (``Tokenizer.vocab_size`` says how many ids there are). Deterministic for a
    given corpus.
    """
    base = len(SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise ValueError(f"vocab_size={vocab_size} is below the {base} ids of specials + 256 bytes")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf)
