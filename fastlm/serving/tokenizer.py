"""Text <-> token ids for the server: a Hugging Face tokenizer from the model folder, or UTF-8 bytes as
ids for `--random` models, and incremental detokenization for streaming.

A streamed token is turned into text only once that text decodes cleanly: a multi-byte UTF-8
character split across tokens (byte-level BPE, or the byte tokenizer) is held back until its last
byte arrives, so a client never sees a replacement character that the full decode would not show.
"""
from __future__ import annotations

import codecs
import json
import os
from typing import Any, Dict, List, Optional, Sequence

REPLACEMENT = "\ufffd"


class ByteTokenizer:
    """UTF-8 bytes as token ids (ids 0..255). For random-weight models, whose vocabulary has no text:
    an id >= 256 decodes to U+FFFD. No chat template, no special tokens."""

    name = "bytes"
    eos_token_id: Optional[int] = None
    chat_template: Optional[str] = None

    def __init__(self, vocab_size: int = 256):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return list(text.encode("utf-8"))

    @staticmethod
    def _bytes(ids: Sequence[int]) -> bytes:
        return b"".join(bytes((i,)) if 0 <= i < 256 else REPLACEMENT.encode() for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._bytes(ids).decode("utf-8", errors="replace")

    def detokenizer(self) -> "ByteDetokenizer":
        return ByteDetokenizer(self)

    def apply_chat_template(self, messages: List[Dict[str, Any]]) -> List[int]:
        raise ValueError("this model has no chat template (random weights, byte tokenizer): "
                         "use /v1/completions")


class ByteDetokenizer:
    """Incremental UTF-8: emits each character once its last byte has arrived; invalid bytes become
    U+FFFD exactly where a full decode with errors='replace' puts them."""

    def __init__(self, tok: ByteTokenizer):
        self._tok = tok
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> str:
        return self._dec.decode(self._tok._bytes(ids)) if ids else ""

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class HFTokenizer:
    """A transformers tokenizer loaded from a local model folder (no network)."""

    def __init__(self, path: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoTokenizer

        self.path = path
        self.name = path
        self.tok = AutoTokenizer.from_pretrained(path)
        self.vocab_size = len(self.tok)
        self.eos_token_id = self.tok.eos_token_id
        self.chat_template = getattr(self.tok, "chat_template", None) or None

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def detokenizer(self) -> "HFDetokenizer":
        return HFDetokenizer(self)

    def apply_chat_template(self, messages: List[Dict[str, Any]]) -> List[int]:
        if not self.chat_template:
            raise ValueError(f"the tokenizer of {self.path} has no chat template (no chat_template in its "
                             "tokenizer_config.json): use /v1/completions")
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # the template writes the special tokens itself (bos, role markers)
        return self.encode(text, add_special_tokens=False)


class HFDetokenizer:
    """vLLM-style incremental detokenization: decode a short window of ids before the unread ones and
    emit the new suffix, unless it ends in U+FFFD (a character still incomplete)."""

    def __init__(self, tok: HFTokenizer):
        self._tok = tok
        self.ids: List[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        self.ids.extend(ids)
        return self._advance(final=False)

    def _advance(self, final: bool) -> str:
        prefix = self._tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._tok.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith(REPLACEMENT)):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        return self._advance(final=True) if self.read_offset < len(self.ids) else ""


def load_tokenizer(model_dir: Optional[str], vocab_size: int):
    """The folder's tokenizer when it has one, else the byte tokenizer (random models)."""
    if model_dir is not None and any(os.path.exists(os.path.join(model_dir, f))
                                     for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return HFTokenizer(model_dir)
    return ByteTokenizer(vocab_size)


class SequenceText:
    """The text of one generated sequence, for streaming and not: `push(ids)` returns the text that may
    be sent now; `finish(reason)` returns the rest. Stop strings: text that could still become a stop
    string is held back, and a sequence that finished on one is cut before it (OpenAI's semantics:
    the stop string is not returned)."""

    def __init__(self, tokenizer, stop: Optional[List[str]] = None):
        self.detok = tokenizer.detokenizer()
        self.stops = [s for s in (stop or []) if s]
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""      # everything decoded so far
        self.sent = 0       # how much of it was returned

    def _cut(self) -> Optional[int]:
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def push(self, ids: Sequence[int]) -> str:
        self.text += self.detok.push(ids)
        limit = len(self.text) - self.holdback
        cut = self._cut()
        if cut is not None:
            limit = min(limit, cut)
        return self._emit(limit)

    def finish(self, finish_reason: Optional[str]) -> str:
        self.text += self.detok.flush()
        cut = self._cut()
        if cut is not None and finish_reason == "stop":
            self.text = self.text[:cut]
        return self._emit(len(self.text))

    def _emit(self, limit: int) -> str:
        if limit <= self.sent:
            return ""
        out = self.text[self.sent:limit]
        self.sent = limit
        return out

    @property
    def final_text(self) -> str:
        return self.text[:self.sent]


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
