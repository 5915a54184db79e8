"""Tokenizers for dsv4-serve: the V4 special tokens, a byte-level tokenizer for generated
checkpoints, a wrapper around a real `tokenizer.json`, and a streaming (incremental) decoder.

This module owns text <-> token-id conversion only. The prompt layout (which special tokens go
where) lives in `model_shards.chat_format`. Pure Python: `tokenizers` is imported lazily, and
only when a `tokenizer.json` is actually loaded.

Layout of `ByteTokenizer` (fixed, so that random-weight checkpoints need no vocabulary file):
    id 0 = BOS, id 1 = EOS, ids 2..31 = the other special tokens then reserved ids,
    ids 32..287 = raw bytes 0x00..0xFF.  A model using it needs vocab_size >= MIN_BYTE_VOCAB.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from typing import Iterable, Protocol, runtime_checkable

# Special token strings. Note the full-width bar U+FF5C and the U+2581 "lower one eighth block"
# used by DeepSeek in place of spaces; they are part of the exact strings.
BOS_TOKEN = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS_TOKEN = "<\uff5cend\u2581of\u2581sentence\uff5c>"
USER_TOKEN = "<\uff5cUser\uff5c>"
ASSISTANT_TOKEN = "<\uff5cAssistant\uff5c>"
LATEST_REMINDER_TOKEN = "<\uff5clatest_reminder\uff5c>"
THINK_START = "<think>"
THINK_END = "</think>"
# Quick-instruction task tokens (internal side tasks of the V4 checkpoints; not used for chat).
ACTION_TOKEN = "<\uff5caction\uff5c>"
QUERY_TOKEN = "<\uff5cquery\uff5c>"
AUTHORITY_TOKEN = "<\uff5cauthority\uff5c>"
DOMAIN_TOKEN = "<\uff5cdomain\uff5c>"
TITLE_TOKEN = "<\uff5ctitle\uff5c>"
READ_URL_TOKEN = "<\uff5cread_url\uff5c>"

# All named special tokens, in ByteTokenizer id order (BOS = 0, EOS = 1, ...). Appending to the
# end of this tuple keeps existing ids stable; reordering would change every generated checkpoint.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, LATEST_REMINDER_TOKEN,
    THINK_START, THINK_END,
    ACTION_TOKEN, QUERY_TOKEN, AUTHORITY_TOKEN, DOMAIN_TOKEN, TITLE_TOKEN, READ_URL_TOKEN,
)

NUM_SPECIAL_IDS = 32          # ids 0..31 are special (named, then reserved)
BYTE_OFFSET = NUM_SPECIAL_IDS  # id of byte 0x00
MIN_BYTE_VOCAB = BYTE_OFFSET + 256  # 288

assert len(SPECIAL_TOKENS) <= NUM_SPECIAL_IDS


@runtime_checkable
class Tokenizer(Protocol):
    """The interface the engine and the HTTP layer use; both classes below implement it."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    def encode(self, text: str, allow_special: bool = True) -> list[int]: ...
    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...
    def is_special(self, token_id: int) -> bool: ...


def _special_pattern(tokens: Iterable[str]) -> re.Pattern[str]:
    # Longest first, so that a token that is a prefix of another never wins the alternation.
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


class ByteTokenizer:
    """Byte-level tokenizer with a fixed 288-id layout (see the module docstring)."""

    _PATTERN = _special_pattern(SPECIAL_TOKENS)
    _BYTE_NAME = re.compile(r"<0x([0-9A-F]{2})>")

    def __init__(self) -> None:
        self._special_ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

    @property
    def vocab_size(self) -> int:
        return MIN_BYTE_VOCAB

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if not allow_special:
            return [BYTE_OFFSET + b for b in text.encode("utf-8")]
        ids: list[int] = []
        pos = 0
        for m in self._PATTERN.finditer(text):
            ids.extend(BYTE_OFFSET + b for b in text[pos:m.start()].encode("utf-8"))
            ids.append(self._special_ids[m.group()])
            pos = m.end()
        ids.extend(BYTE_OFFSET + b for b in text[pos:].encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        # Each run of byte ids is decoded on its own: a special token ends a run, so an incomplete
        # UTF-8 sequence before it becomes U+FFFD (IncrementalDecoder relies on the same rule).
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if BYTE_OFFSET <= i < MIN_BYTE_VOCAB:
                run.append(i - BYTE_OFFSET)
                continue
            text = self._special_text(i, skip_special)
            if text:
                out.append(run.decode("utf-8", errors="replace"))
                run.clear()
                out.append(text)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def _special_text(self, token_id: int, skip_special: bool) -> str:
        """Text of a non-byte id: a named special token's string, or "" (reserved / out of
        range ids decode to nothing)."""
        if skip_special or not 0 <= token_id < len(SPECIAL_TOKENS):
            return ""
        return SPECIAL_TOKENS[token_id]

    def token_to_id(self, token: str) -> int | None:
        if token in self._special_ids:
            return self._special_ids[token]
        m = self._BYTE_NAME.fullmatch(token)
        if m:
            return BYTE_OFFSET + int(m.group(1), 16)
        m = re.fullmatch(r"<\uff5creserved_(\d+)\uff5c>", token)
        if m and len(SPECIAL_TOKENS) <= int(m.group(1)) < NUM_SPECIAL_IDS:
            return int(m.group(1))
        return None

    def id_to_token(self, token_id: int) -> str | None:
        """Named special -> its string; reserved id N -> `<｜reserved_N｜>`; byte id -> `<0xNN>`
        (the sentencepiece byte-fallback spelling); anything else -> None."""
        if 0 <= token_id < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[token_id]
        if len(SPECIAL_TOKENS) <= token_id < NUM_SPECIAL_IDS:
            return f"<\uff5creserved_{token_id}\uff5c>"
        if BYTE_OFFSET <= token_id < MIN_BYTE_VOCAB:
            return f"<0x{token_id - BYTE_OFFSET:02X}>"
        return None

    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < NUM_SPECIAL_IDS


class HFTokenizer:
    """A `tokenizer.json` (HuggingFace `tokenizers`) behind the same interface as ByteTokenizer.

    BOS/EOS are found by their strings; `tokenizer_config.json` next to the file, when present,
    may name different ones (`bos_token` / `eos_token`, as a string or {"content": ...}).
    """

    def __init__(self, tokenizer, bos_token: str | None = None, eos_token: str | None = None):
        from tokenizers import Tokenizer as _HFTok

        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = _HFTok.from_file(os.fspath(tokenizer))
        self._tok = tokenizer
        # A second instance that encodes special-token strings as plain text. Toggling
        # `encode_special_tokens` on the shared instance would race between threads.
        self._plain = _HFTok.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._bos = self._require(bos_token or BOS_TOKEN, "BOS")
        self._eos = self._require(eos_token or EOS_TOKEN, "EOS")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "HFTokenizer":
        path = os.fspath(path)
        bos = eos = None
        cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
            bos, eos = _config_token(cfg.get("bos_token")), _config_token(cfg.get("eos_token"))
        return cls(path, bos_token=bos, eos_token=eos)

    def _require(self, token: str, what: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer.json has no {what} token {token!r}")
        return tid

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        # add_special_tokens=False: prompts carry BOS as text; a post-processor must not add one.
        tok = self._tok if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        n = self.vocab_size
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < n],
                                skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


def _config_token(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> Tokenizer:
    """HFTokenizer when `checkpoint_dir/tokenizer.json` exists, else the ByteTokenizer."""
    path = os.path.join(os.fspath(checkpoint_dir), "tokenizer.json")
    if os.path.isfile(path):
        return HFTokenizer.from_file(path)
    return ByteTokenizer()


class IncrementalDecoder:
    """Streaming detokenizer: `push(id)` returns the text completed by that token.

    Incomplete UTF-8 sequences are held back, so a character split across tokens comes out
    whole; `flush()` returns what is left. The concatenation of all pushes and the flush equals
    `tokenizer.decode(all_ids)` (exactly for ByteTokenizer and for byte-level BPE tokenizers,
    which is what the V4 checkpoints ship).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._byte_mode = isinstance(tokenizer, ByteTokenizer)
        # Byte mode: Python's incremental UTF-8 decoder gives the same output as a one-shot
        # decode of the same bytes, including U+FFFD placement for invalid input.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Generic mode: ids[prefix:read] was already emitted; ids[prefix:] is re-decoded each
        # push so byte-level merges and multi-token characters come out right.
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if self._byte_mode:
            return self._push_byte(token_id)
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            # Keep only the ids the next window needs, so memory stays bounded.
            del self._ids[:self._read]
            self._prefix, self._read = 0, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def _push_byte(self, token_id: int) -> str:
        if BYTE_OFFSET <= token_id < MIN_BYTE_VOCAB:
            return self._utf8.decode(bytes([token_id - BYTE_OFFSET]))
        text = self._tok._special_text(token_id, self._skip)  # type: ignore[attr-defined]
        if not text:
            return ""
        # A special token ends the current byte run, as in ByteTokenizer.decode.
        return self._utf8.decode(b"", final=True) + text

    def flush(self) -> str:
        if self._byte_mode:
            return self._utf8.decode(b"", final=True)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]
