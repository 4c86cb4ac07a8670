"""What each token id stands for, as exact bytes, derived from the tokenizer's own decoding.

No tokenizer class or model name is looked up anywhere. The tokenizer's own `tokenizer.json`
(its backend's serialization) says which of three decodings applies to an ordinary token:

- the decoder or pre-tokenizer holds a `ByteLevel` step: the token string is written in the
  byte-level alphabet (`Ġ` = space, `Ċ` = newline, ...), which maps one character to one byte,
  so tokens that are partial UTF-8 sequences keep their exact bytes;
- the model has `byte_fallback` and the token is `<0xHH>`: the single byte `HH`;
- otherwise: the text the tokenizer's own decoder produces for the token *after* a fixed
  prefix token, minus the prefix's own decoding. Decoding after a prefix (not alone) keeps
  the space a SentencePiece `▁` stands for in mid-text (decoders strip it at the start), and
  gives WordPiece tokens their mid-text form: a `##` continuation is its text without `##`,
  a word token implies a leading space (`world` -> b" world"), as it does in running text.

Special tokens (BOS, EOS, pad, unk, every added token marked special) stand for b"" and are
flagged. Non-special added tokens stand for their content's UTF-8 bytes.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lmfuse.errors import LmfuseError

NORMAL, SPECIAL, BYTE = 0, 1, 2  # TokenTable.kind values
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class TokenTable:
    """Everything lmfuse needs to know about a vocabulary.

    Attributes:
        fingerprint: `lmfuse.models.tokenizer_fingerprint` of the tokenizer.
        bytes: [V] the exact bytes each id stands for (b"" for special tokens).
        texts: [V] the bytes as a string for comparisons: UTF-8 decoded with
            `surrogateescape`, so the mapping bytes <-> text is one-to-one and a token
            holding part of a UTF-8 sequence keeps one distinct character per stray byte.
        kind: int8 [V]: 0 ordinary, 1 special, 2 byte-fallback token (`<0xHH>`).
        byte_level: Whether the tokenizer writes tokens in the byte-level alphabet.
    """

    fingerprint: str
    bytes: list[bytes]
    texts: list[str]
    kind: np.ndarray
    byte_level: bool

    @property
    def special(self) -> np.ndarray:
        """bool [V]: the special tokens."""
        return self.kind == SPECIAL

    def __len__(self) -> int:
        return len(self.bytes)


def _json_has_type(node, name: str) -> bool:
    """Whether a tokenizer.json component (possibly a Sequence) contains a step of type `name`."""
    if isinstance(node, dict):
        if node.get("type") == name:
            return True
        return any(_json_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_json_has_type(v, name) for v in node)
    return False


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Character -> byte of the byte-level alphabet, as the `tokenizers` ByteLevel step defines it.

    Printable bytes map to themselves; the others map, in byte order, to code points from
    256 on. The result is checked against `tokenizers.pre_tokenizers.ByteLevel.alphabet()`.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    try:
        from tokenizers.pre_tokenizers import ByteLevel

        if set(ByteLevel.alphabet()) != set(chars.values()):
            raise LmfuseError("the byte-level alphabet of the installed `tokenizers` is not the expected one",
                              fix="report this together with your `tokenizers` version")
    except ImportError:
        pass
    return {c: b for b, c in chars.items()}


def _backend_json(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise LmfuseError("lmfuse needs a fast tokenizer (a `tokenizer.json`) to read token texts",
                          where=type(tok).__name__, fix="load the tokenizer with use_fast=True or convert it")
    return json.loads(backend.to_str())


def _special_ids(tok, spec: dict) -> set[int]:
    ids = {int(i) for i in getattr(tok, "all_special_ids", []) if i is not None}
    ids |= {int(a["id"]) for a in spec.get("added_tokens", []) if a.get("special")}
    for i, a in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(a, "special", False):
            ids.add(int(i))
    return ids


def _prefix_id(tok, backend, special: set[int]) -> int:
    """An ordinary token to decode others after (so decoders treat them as mid-text)."""
    for probe in ("a", "x", "the", "0", "."):
        ids = [i for i in backend.encode(probe, add_special_tokens=False).ids if i not in special]
        if ids:
            return ids[-1]
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        if i not in special:
            return i
    raise LmfuseError("the tokenizer has no ordinary token", fix="check the tokenizer")


def _compute(tok) -> TokenTable:
    from lmfuse.models import tokenizer_fingerprint

    spec = _backend_json(tok)
    backend = tok.backend_tokenizer
    V = len(tok)
    special = _special_ids(tok, spec)
    added = {int(a["id"]): a["content"] for a in spec.get("added_tokens", [])}
    byte_level = _json_has_type(spec.get("decoder"), "ByteLevel") or _json_has_type(spec.get("pre_tokenizer"),
                                                                                     "ByteLevel")
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    bl_decoder = _byte_level_decoder() if byte_level else {}
    strings = [backend.id_to_token(i) for i in range(V)]

    out: list[bytes | None] = [None] * V
    kind = np.zeros(V, dtype=np.int8)
    to_decode: list[int] = []
    for i, s in enumerate(strings):
        if byte_fallback and s is not None and (m := _BYTE_TOKEN.match(s)):
            # Byte tokens may be registered as special added tokens; they still stand for a byte.
            out[i] = bytes([int(m.group(1), 16)])
            kind[i] = BYTE
        elif i in special or s is None:
            out[i] = b""
            kind[i] = SPECIAL
        elif i in added:
            out[i] = added[i].encode("utf-8")
        elif byte_level and all(c in bl_decoder for c in s):
            out[i] = bytes(bl_decoder[c] for c in s)
        else:
            to_decode.append(i)
    if to_decode:
        p = _prefix_id(tok, backend, special)
        base = backend.decode([p], skip_special_tokens=False)
        decoded = backend.decode_batch([[p, i] for i in to_decode], skip_special_tokens=False)
        for i, d in zip(to_decode, decoded, strict=True):
            if d.startswith(base):
                d = d[len(base):]
            else:  # a decoder that rewrites the prefix too: fall back to the token alone
                d = backend.decode([i], skip_special_tokens=False)
            out[i] = d.encode("utf-8", errors="surrogateescape")
    texts = [b.decode("utf-8", errors="surrogateescape") for b in out]
    return TokenTable(tokenizer_fingerprint(tok), out, texts, kind, byte_level)


_CACHE: dict[str, TokenTable] = {}
_LOCK = threading.Lock()


def token_table(tok) -> TokenTable:
    """The `TokenTable` of a tokenizer, cached per vocabulary fingerprint.

    Args:
        tok: A fast Hugging Face tokenizer.

    Returns:
        Its `TokenTable` (bytes, texts and kinds of all `len(tok)` ids).
    """
    from lmfuse.models import tokenizer_fingerprint

    fp = tokenizer_fingerprint(tok)
    with _LOCK:
        table = _CACHE.get(fp)
    if table is None:
        table = _compute(tok)
        with _LOCK:
            _CACHE[fp] = table
    return table


def token_bytes(tok) -> list[bytes]:
    """The exact bytes each token id stands for (b"" for special tokens).

    Args:
        tok: A fast Hugging Face tokenizer.

    Returns:
        [V] bytes, `V = len(tok)`.
    """
    return token_table(tok).bytes


def token_texts(tok) -> list[str]:
    """Each token's bytes as a string for edit distances and exact matching.

    Decoded from UTF-8 with `surrogateescape`: one-to-one with the bytes, and a token that
    holds part of a multi-byte character keeps one distinct code point per stray byte.

    Args:
        tok: A fast Hugging Face tokenizer.

    Returns:
        [V] strings.
    """
    return token_table(tok).texts
