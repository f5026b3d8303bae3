"""The text side of the harness: one small interface over Hugging Face tokenizers (and a byte
tokenizer for tiny random test models, which have no real tokenizer)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

_MARK = "\x00EVICTKIT\x00"


class Codec:
    """Encode/decode without special tokens, plus the chat wrapping of a user turn.

    `tokenizer` is a Hugging Face tokenizer, or any object with `encode(text) -> list[int]` and
    `decode(ids) -> str` (e.g. `ByteTokenizer`). With `chat=True` (default: when the tokenizer
    has a chat template) the task text is the user turn and the answer prefix opens the
    assistant turn, as RULER does with a model template; `chat=False` uses the raw text.
    """

    def __init__(self, tokenizer: Any, *, chat: bool | None = None, eos_ids: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None)
        if chat is None:
            chat = bool(template)
        if chat and not template:
            raise ValueError("chat=True needs a tokenizer with a chat template; use chat=False (--no-chat)")
        self.chat = chat
        self.prefix, self.suffix = "", ""
        if chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True
            )
            self.prefix, self.suffix = text.split(_MARK)
        eos = set(eos_ids)
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int):
            eos.add(tok_eos)
        self.eos_ids = frozenset(eos)
        self._bos = self._default_bos()

    def _default_bos(self) -> list[int]:
        """The BOS a tokenizer adds by default (Llama-2 style), which prompts should start with."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if not isinstance(bos, int):
            return []
        try:
            ids = self.tokenizer.encode("a", add_special_tokens=True)
        except TypeError:
            return []
        return [bos] if ids and ids[0] == bos else []

    def encode(self, text: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)
        except TypeError:
            return self.tokenizer.decode(list(ids))

    def start(self) -> list[int]:
        """Token ids every chat/plain prompt starts with (BOS + chat prefix)."""
        ids = self.encode(self.prefix) if self.prefix else []
        if self._bos and (not ids or ids[0] != self._bos[0]):
            ids = self._bos + ids
        return ids


class Encoding(dict):
    """What calling a tokenizer returns: `enc.input_ids` or `enc["input_ids"]`, as with Hugging Face."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ByteTokenizer:
    """One token per byte (non-ASCII bytes become '?'), ids = byte values: for tiny test models
    with a vocabulary of at least 128. Not a real tokenizer: tests, benchmarks and smoke runs only
    (the one byte tokenizer of the project: the tests, benchmarks/ and evictkit.eval share it)."""

    eos_token_id = None
    bos_token_id = None
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b if b < 128 else ord("?") for b in text.encode("utf-8", errors="replace")]

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = False) -> Encoding:
        """`tokenizer(text, return_tensors="pt").input_ids` [1, n] int64, as with a Hugging Face
        tokenizer (a list of ids without return_tensors)."""
        ids = self.encode(text)
        if return_tensors is None:
            return Encoding(input_ids=ids)
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: ByteTokenizer gives 'pt' tensors or lists")
        import torch

        return Encoding(input_ids=torch.tensor([ids], dtype=torch.long))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(int(i) % 128 for i in ids).decode("ascii", errors="replace")
