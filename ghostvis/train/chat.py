"""Chat rendering: messages -> token ids + loss mask, and the same format as an HF chat template.

The format (no whitespace is added anywhere)::

    <|bos|> <|user|> text <|end|> <|assistant|> text <|end|> ...

A message is ``{"role": "system" | "user" | "assistant", "content": c}`` where
``c`` is a string or a list of parts: strings, ``{"type": "text", "text": s}``
or ``{"type": "image"}``. Each image part becomes exactly ``num_image_tokens``
copies of ``<|image|>``. Text is encoded with :meth:`Tokenizer.encode`, so no
text, however hostile, can produce a special id: role, end and image tokens come
only from the structure of the messages.

The loss mask is True exactly on assistant text tokens and the ``<|end|>`` that
closes an assistant turn: the model learns to answer and to stop, never to
predict the user.

:data:`CHAT_TEMPLATE` renders the same sequence in HF transformers'
``apply_chat_template``. Two documented differences, both inherent to string
templates: it writes one ``<|image|>`` per image (the HF processor expands it to
``image_seq_length`` copies), and special-token strings inside message text are
matched as special tokens by HF, whereas :func:`render_chat` keeps them as text.
"""

from __future__ import annotations

from typing import Any

from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")

# Same structure as render_chat: adjacent text parts are concatenated before
# tokenisation in both, so the ids agree for text-only conversations.
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part is string -%}{{- part -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


class ChatFormatError(ValueError):
    """A message list that is not in the chat format (names the message and part)."""


def content_parts(content: Any, where: str = "message") -> list[str | None]:
    """Normalise ``content`` to a list of text strings and ``None`` (an image), merging adjacent text."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, (list, tuple)):
        raise ChatFormatError(f"{where}: content must be a str or a list of parts, got {type(content).__name__}")
    parts: list[str | None] = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            text = part
        elif isinstance(part, dict) and part.get("type") == "image":
            parts.append(None)
            continue
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            text = part["text"]
        else:
            raise ChatFormatError(f"{where} part {j}: expected a str, {{'type': 'text', 'text': ...}} "
                                  f"or {{'type': 'image'}}, got {part!r}")
        if parts and isinstance(parts[-1], str):
            parts[-1] += text
        else:
            parts.append(text)
    return parts


def count_images(messages: list[dict]) -> int:
    """Number of image parts in ``messages``."""
    return sum(p is None for i, m in enumerate(messages)
               for p in content_parts(m.get("content", ""), f"message {i}"))


def render_chat(tok: Tokenizer, messages: list[dict], num_image_tokens: int,
                add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of a conversation (see the module docstring for the format).

    Args:
        tok: the :class:`Tokenizer`.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        num_image_tokens: placeholders per image (``cfg.num_image_tokens``).
        add_generation_prompt: append ``<|assistant|>`` so a model continues with an answer.
    """
    if num_image_tokens < 0:
        raise ValueError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
    role_ids = {"system": tok.system_id, "user": tok.user_id, "assistant": tok.assistant_id}
    ids, mask = [tok.bos_id], [False]
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatFormatError(f"message {i}: expected {{'role': ..., 'content': ...}}, got {message!r}")
        role = message["role"]
        if role not in role_ids:
            raise ChatFormatError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
        supervised = role == "assistant"
        ids.append(role_ids[role])
        mask.append(False)
        for part in content_parts(message["content"], f"message {i}"):
            if part is None:
                ids += [tok.image_id] * num_image_tokens
                mask += [False] * num_image_tokens  # images are inputs, never predicted
            else:
                piece = tok.encode(part)
                ids += piece
                mask += [supervised] * len(piece)
        ids.append(tok.end_id)
        mask.append(supervised)
    if add_generation_prompt:
        ids.append(tok.assistant_id)
        mask.append(False)
    return ids, mask
