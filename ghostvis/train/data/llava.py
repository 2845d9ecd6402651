"""LLaVA-format conversations (JSON list or JSONL) with an image folder -> multimodal samples.

A record looks like::

    {"image": "cat.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

``"image"`` may also be a list of files (one ``<image>`` marker each) or absent
(a text-only conversation). Every ``<image>`` marker becomes an image part of
the message (whitespace around it is dropped, as LLaVA does); a record with
images but no markers gets them at the start of its first user turn. Roles:
``human``/``user`` -> user, ``gpt``/``assistant`` -> assistant, ``system``.

Bad records are skipped, counted and named by file and line (JSONL) or record
index (JSON list): a broken JSON line, a missing or truncated image, an empty
conversation or one without an assistant turn, a marker/image count mismatch.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from ..chat import render_chat
from ..packing import Sample
from ..tokenizer import Tokenizer
from .images import load_image
from .records import BadRecords, DataError, SampleSet

IMAGE_MARKER = "<image>"
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadRecord(Exception):
    """Internal: why one record is skipped (``kind`` is its category)."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.kind = kind


def _records(path: str, bad: BadRecords) -> Iterator[tuple[str, object]]:
    """``(where, record)`` for each record of a JSON-list or JSONL file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); use .jsonl for line-wise skipping") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for k, record in enumerate(data):
            yield f"record {k}", record
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield str(lineno), json.loads(line)
        except json.JSONDecodeError as e:
            bad.skip(path, lineno, f"broken JSON line ({e.msg})", "broken json")


def split_markers(value: str) -> list:
    """Message content for a LLaVA ``value``: text pieces with ``{"type": "image"}`` at each marker."""
    pieces = value.split(IMAGE_MARKER)
    content: list = []
    for j, piece in enumerate(pieces):
        if j > 0:
            content.append({"type": "image"})
        piece = piece.strip() if len(pieces) > 1 else piece
        if piece:
            content.append(piece)
    return content


def record_messages(record: object) -> tuple[list[dict], list[str]]:
    """The chat messages and image file names of one record; raises :class:`BadRecord`."""
    if not isinstance(record, dict):
        raise BadRecord(f"record is a {type(record).__name__}, not an object", "malformed")
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadRecord("empty or missing conversations", "empty conversation")
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise BadRecord(f'"image" must be a file name or a list of them, got {record.get("image")!r}', "malformed")
    messages = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRecord(f"turn {j} has no string 'value'", "malformed")
        role = ROLE_NAMES.get(turn.get("from"))
        if role is None:
            raise BadRecord(f"turn {j} has unknown 'from' {turn.get('from')!r}", "malformed")
        messages.append({"role": role, "content": split_markers(turn["value"])})
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise BadRecord("no non-empty assistant turn (nothing to learn)", "empty conversation")
    markers = sum(part == {"type": "image"} for m in messages for part in m["content"])
    if markers == 0 and images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise BadRecord("images but no user turn to put them in", "malformed")
        first_user["content"] = [{"type": "image"}] * len(images) + first_user["content"]
    elif markers != len(images):
        raise BadRecord(f"{markers} {IMAGE_MARKER} markers but {len(images)} images", "image count mismatch")
    return messages, images


def _load_images(names: list[str], image_folder: str, image_size: int) -> list:
    pixels = []
    for name in names:
        path = os.path.join(image_folder, name)
        if not os.path.isfile(path):
            raise BadRecord(f"missing image {path}", "missing image")
        try:
            pixels.append(load_image(path, image_size))
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated / corrupt files
            raise BadRecord(f"unreadable image {path} ({e})", "bad image") from None
    return pixels


def load_llava(path: str | os.PathLike, image_folder: str | os.PathLike | None, tok: Tokenizer, *,
               num_image_tokens: int, image_size: int, strict: bool = False) -> SampleSet:
    """Samples from a LLaVA-format ``.json`` / ``.jsonl`` file (see the module docstring).

    Args:
        path: the conversations file.
        image_folder: where image file names are resolved (default: the file's directory).
        tok: the tokenizer.
        num_image_tokens: placeholders per image (``cfg.num_image_tokens``).
        image_size: the encoder's pixel side (``cfg.vision.image_size``).
        strict: raise :class:`DataError` on the first bad record instead of skipping it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LLaVA conversations file at {path!r}")
    if not path.endswith((".json", ".jsonl")):
        raise DataError(f"{path}: expected a .json or .jsonl file")
    folder = os.fspath(image_folder) if image_folder is not None else os.path.dirname(path)
    bad = BadRecords(strict)
    samples = []
    for where, record in _records(path, bad):
        try:
            messages, names = record_messages(record)
            images = _load_images(names, folder, image_size)
        except BadRecord as e:
            bad.skip(path, where, str(e), e.kind)
            continue
        ids, mask = render_chat(tok, messages, num_image_tokens)
        samples.append(Sample(ids, mask, images))
    bad.warn_summary(path)
    return SampleSet(samples, bad)
