"""Text corpora (txt / jsonl / parquet) -> text-pretraining samples.

Each document becomes ``<|bos|> text <|eos|>``, every token after ``<|bos|>``
supervised. A document longer than ``max_len`` tokens is cut into consecutive
chunks of at most ``max_len`` (each packed as its own document), so nothing is
thrown away by the packer's truncation.

Formats, picked by file extension (a directory means all such files in it, sorted):

- ``.txt``: documents separated by blank lines (``txt_mode="paragraph"``), one per line
  (``"line"``) or the whole file (``"file"``);
- ``.jsonl``: one JSON object per line with a string ``"text"`` field;
- ``.parquet``: a ``"text"`` column (needs ``pyarrow``).

Broken JSON lines, records without text and empty documents are skipped and
counted (see :mod:`.records`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator, Literal

from ..packing import Sample
from ..tokenizer import Tokenizer
from .records import BadRecords, DataError, SampleSet

TEXT_EXTENSIONS = (".txt", ".jsonl", ".parquet")


def text_samples(tok: Tokenizer, texts: Iterable[str], max_len: int) -> list[Sample]:
    """``<|bos|> text <|eos|>`` samples of at most ``max_len`` tokens (long documents are chunked)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    out = []
    for text in texts:
        ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
        for start in range(0, len(ids), max_len):
            chunk = ids[start:start + max_len]
            mask = [start + j > 0 for j in range(len(chunk))]  # only the leading <|bos|> is never a target
            out.append(Sample(chunk, mask))
    return out


def corpus_files(path: str | os.PathLike) -> list[str]:
    """The text files at ``path``: the file itself, or the supported files of a directory (sorted)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(TEXT_EXTENSIONS))
        if not files:
            raise DataError(f"{path}: no {'/'.join(TEXT_EXTENSIONS)} files in this directory")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no text corpus at {path!r}")
    if not path.endswith(TEXT_EXTENSIONS):
        raise DataError(f"{path}: unsupported text corpus extension; expected one of {TEXT_EXTENSIONS}")
    return [path]


def _read_txt(path: str, mode: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            content = f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if mode == "file":
        pieces = [content]
    elif mode == "line":
        pieces = content.splitlines()
    elif mode == "paragraph":
        pieces = re.split(r"\n[ \t]*\n", content)
    else:
        raise ValueError(f"txt_mode must be 'paragraph', 'line' or 'file', got {mode!r}")
    for doc in pieces:
        if doc.strip():
            yield doc.strip("\n")


def _read_jsonl(path: str, bad: BadRecords) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad.skip(path, lineno, f"broken JSON line ({e.msg})", "broken json")
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                bad.skip(path, lineno, 'no string "text" field', "no text")
            elif not text.strip():
                bad.skip(path, lineno, "empty text", "empty text")
            else:
                yield text


def _read_parquet(path: str, bad: BadRecords) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise DataError(f"{path}: no 'text' column (columns: {table.column_names})")
    for row, text in enumerate(table.column("text").to_pylist()):
        if not isinstance(text, str) or not text.strip():
            bad.skip(path, f"row {row}", "missing or empty text", "empty text")
        else:
            yield text


def read_texts(path: str | os.PathLike, *, strict: bool = False,
               txt_mode: Literal["paragraph", "line", "file"] = "paragraph",
               bad: BadRecords | None = None) -> tuple[list[str], BadRecords]:
    """The documents of a corpus file or directory, and the bad records skipped."""
    bad = BadRecords(strict) if bad is None else bad
    texts: list[str] = []
    for file in corpus_files(path):
        if file.endswith(".txt"):
            texts += _read_txt(file, txt_mode)
        elif file.endswith(".jsonl"):
            texts += _read_jsonl(file, bad)
        else:
            texts += _read_parquet(file, bad)
    return texts, bad


def load_text(path: str | os.PathLike, tok: Tokenizer, max_len: int, *, strict: bool = False,
              txt_mode: Literal["paragraph", "line", "file"] = "paragraph") -> SampleSet:
    """Text-pretraining samples from a corpus file or directory (see the module docstring).

    Args:
        path: a ``.txt`` / ``.jsonl`` / ``.parquet`` file or a directory of them.
        tok: the tokenizer.
        max_len: longest sample (use the training ``seq_len``); longer documents are chunked.
        strict: raise :class:`DataError` on the first bad record instead of skipping it.
        txt_mode: how ``.txt`` files split into documents.
    """
    texts, bad = read_texts(path, strict=strict, txt_mode=txt_mode)
    bad.warn_summary(os.fspath(path))
    return SampleSet(text_samples(tok, texts, max_len), bad)
