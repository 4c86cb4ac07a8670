"""Tiny models and tokenizers built in seconds, for tests, benchmarks and examples.

Three tokenizer families (byte-level BPE with `Ġ`, SentencePiece-style BPE with `▁` and byte
fallback, WordPiece with `##`) on three architectures (GPT-2, Llama, GPT-NeoX), trained on a
small built-in text so that they split text differently.
"""

from __future__ import annotations

import json
from pathlib import Path

TRAIN_TEXT = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "Licensed under the Apache License, Version 2.0 (the \"License\");\nyou may not use this file.",
    "In the beginning God created the heaven and the earth. And the earth was without form.",
    "Numbers 12345 and 3.14159, dates 2024-01-31, emoji 🙂🚀 and 日本語のテキスト。",
    "   leading spaces,\ttabs,\n\nnew lines and    runs of spaces.",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tcontinue\n",
    "Permission is hereby granted, free of charge, to any person obtaining a copy.",
    "The model predicts the next token; fusion aligns the distributions of several models.",
]

KINDS = ("bpe", "spm", "wordpiece")


def _corpus(repeat: int = 30) -> list[str]:
    words = " ".join(TRAIN_TEXT).split()
    out = list(TRAIN_TEXT) * repeat
    # Some shuffled word salad so merges differ between tokenizers.
    for i in range(200):
        out.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)))
    return out


def build_tokenizer(kind: str, vocab_size: int = 400):
    """A trained `PreTrainedTokenizerFast` of the given kind."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(_corpus(), trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    if kind == "spm":
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(_corpus(), trainer)
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="</s>", add_bos_token=True)
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]", "[EOS]"],
                                            show_progress=False)
        tok.train_from_iterator(_corpus(), trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")


def build_model(kind: str, vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A tiny random causal LM; the architecture follows the tokenizer kind."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    torch.manual_seed(seed)
    if kind == "bpe":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=1024,
                         bos_token_id=0, eos_token_id=0)
    elif kind == "spm":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    else:
        cfg = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                            num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=1024,
                            bos_token_id=2, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def make_tiny_model(out: str | Path, kind: str, seed: int = 0, **kw) -> Path:
    """Build, save (safetensors) and return a tiny model + tokenizer directory."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    tok = build_tokenizer(kind)
    model = build_model(kind, len(tok), seed=seed, **kw)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def write_tiny_corpus(path: str | Path, docs_per_domain: int = 6) -> Path:
    """A small JSONL corpus with three domains, for end-to-end tests."""
    path = Path(path)
    domains = {
        "code": [TRAIN_TEXT[1], TRAIN_TEXT[6]],
        "legal": [TRAIN_TEXT[2], TRAIN_TEXT[7]],
        "prose": [TRAIN_TEXT[0], TRAIN_TEXT[3], TRAIN_TEXT[4], TRAIN_TEXT[8]],
    }
    with path.open("w") as f:
        for domain, texts in domains.items():
            for i in range(docs_per_domain):
                text = "\n".join(texts[(i + j) % len(texts)] for j in range(3 + i % 3))
                f.write(json.dumps({"domain": domain, "text": text}) + "\n")
    return path
