"""Numerals and the token rule (issue 26, item 6), the data: a numeral-heavy corpus, a digit-packing
target and the lmfuse configs.

Writes, under OUT:

- `data/numerals.jsonl` (`text`, `domain`, `source`) and `data/stats.json`: four domains of text
  found on this machine (no network), each about `tokens_per_domain` tokens of the counting
  tokenizer (SmolLM2's; with `--tiny` the tiny BPE model's):
  `changelog` (Debian's /usr/share/doc/*/changelog.Debian.gz: versions, dates, bug numbers),
  `code-lines` (Python standard-library modules with `cat -n` line numbers),
  `tables` (/etc/services, /etc/protocols, /etc/rpc, /etc/ethertypes, tzdata's zone1970.tab,
  tzdata.zi and leap-seconds.list, comment lines left out) and the control `prose` (docstrings of
  other standard-library modules, doctests left out: few digits);
- `models/gpt2-digits/`: a digit-PACKING target, GPT-2's byte-level BPE (50,257 ids: " 2024" is one
  token, " 10452" is " 10" + "452") on a tiny randomly initialised Llama. Its own predictions do not
  matter: alignment maps the source's distributions onto its tokens;
- `configs/<pair>-<rule>.yaml`, one lmfuse config per pair and token rule (`map`, `consistent`):
  pair A = target SmolLM2-135M-Instruct, source Gemma-3-270M (both write digits one per token);
  pair B = target the GPT-2-tokenizer model, source SmolLM2 (digits one per token into a target
  that packs them). `--tiny` puts lmfuse's tiny test models where SmolLM2 (BPE) and Gemma-3 (SPM)
  stand.

    python experiments/numerals/data.py --out runs/numerals
    python experiments/numerals/measure.py --out runs/numerals    # the lmfuse stages and the table

GPT-2's BPE ranks come from the PyPI sdist of `openai-whisper` (MIT; whisper/assets/gpt2.tiktoken):
`--gpt2-ranks PATH`, else a copy already unpacked under OUT/downloads or /tmp/whisper_dl, else
`pip download --no-deps --no-binary :all: openai-whisper==20250625` into OUT/downloads.
"""

from __future__ import annotations

import argparse
import ast
import glob
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/common.py

from common import Problem, build_once, log_line, main_of, ntok, tiny_model, write_jsonl  # noqa: E402

DOMAINS = ("changelog", "code-lines", "tables", "prose")
RULES = ("map", "consistent")

# The data's knobs (recorded in stats.json; data made with other settings is refused).
SETTINGS = {
    "real": {"models": "real", "tokens_per_domain": 20_000, "piece_chars": 1_500, "block_size": 256, "top_k": 10,
             "seed": 0},
    "tiny": {"models": "tiny", "tokens_per_domain": 1_200, "piece_chars": 500, "block_size": 64, "top_k": 10,
             "seed": 0},
}

WHISPER = "openai-whisper==20250625"
RANKS_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer split (its encoder's published regular expression): letters, numbers and
# other symbols each with an optional leading space; numbers of any length, so BPE may pack digits.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"

TABLE_FILES = ("/etc/services", "/etc/protocols", "/etc/rpc", "/etc/ethertypes", "/usr/share/zoneinfo/zone1970.tab",
               "/usr/share/zoneinfo/tzdata.zi", "/usr/share/zoneinfo/leap-seconds.list")
CHANGELOGS = "/usr/share/doc/*/changelog.Debian.gz"
ENTRY = re.compile(r"^(?=\S[^\n]*\([^\n]*\)[^\n]*;\s*urgency=)", re.M)  # a Debian changelog entry's first line


# -- the text ---------------------------------------------------------------------------------------
def cut_lines(lines: list[str], start: int, max_chars: int) -> tuple[list[str], int]:
    """Consecutive lines from `start` up to `max_chars` characters (at least one line)."""
    out, n = [], 0
    for line in lines[start:]:
        if out and n + len(line) + 1 > max_chars:
            break
        out.append(line[:max_chars])
        n += len(line) + 1
    return out, start + len(out)


def stdlib_files() -> tuple[Path, list[Path], list[Path]]:
    """The standard library's modules (no tests), split in two fixed halves by a hash of the path:
    one for `code-lines`, one for `prose`, so the two domains share no file."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(p for p in lib.rglob("*.py") if not skip & set(p.relative_to(lib).parts))
    halves: tuple[list[Path], list[Path]] = ([], [])
    for p in files:
        halves[hashlib.sha256(str(p.relative_to(lib)).encode()).digest()[0] % 2].append(p)
    return lib, *halves


def changelog_pieces(rng: random.Random, piece_chars: int) -> Iterator[dict]:
    """One piece per package: a few consecutive entries of its Debian changelog from a random entry."""
    seen, paths = set(), []
    for p in sorted(glob.glob(CHANGELOGS)):
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            paths.append(p)
    rng.shuffle(paths)
    for p in paths:
        try:
            with gzip.open(p, "rt", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except (OSError, EOFError):
            continue
        entries = [e.strip("\n") for e in ENTRY.split(text) if e.strip()]
        if not entries:
            continue
        i = rng.randrange(len(entries))
        lines, _ = cut_lines("\n\n".join(entries[i:]).split("\n"), 0, piece_chars)
        yield {"text": "\n".join(lines).strip("\n"), "source": f"{p}#entry{i}"}


def code_line_pieces(rng: random.Random, piece_chars: int, files: list[Path], lib: Path) -> Iterator[dict]:
    """One piece per module: lines from a random start, numbered as `cat -n` numbers them."""
    files = list(files)
    rng.shuffle(files)
    for p in files:
        lines = p.read_text(encoding="utf-8", errors="replace").split("\n")
        if len(lines) < 20:
            continue
        start = rng.randrange(len(lines) - 10)
        numbered = [f"{n + 1:6d}\t{line}".rstrip() for n, line in enumerate(lines)]
        chunk, _ = cut_lines(numbered, start, piece_chars)
        yield {"text": "\n".join(chunk), "source": f"{p.relative_to(lib)}:{start + 1}"}


def table_pieces(rng: random.Random, piece_chars: int) -> Iterator[dict]:
    """Consecutive non-comment lines of the tables, cut into pieces; the files taken in turn."""
    queues = []
    for f in TABLE_FILES:
        if not Path(f).exists():
            continue
        lines = [x.rstrip() for x in Path(f).read_text(encoding="utf-8", errors="replace").split("\n")]
        lines = [x for x in lines if x.strip() and not x.lstrip().startswith("#")]
        pieces, i = [], 0
        while i < len(lines):
            chunk, i = cut_lines(lines, i, piece_chars)
            pieces.append({"text": "\n".join(chunk), "source": f"{f}#{len(pieces)}"})
        rng.shuffle(pieces)
        queues.append(pieces)
    while any(queues):
        for q in queues:
            if q:
                yield q.pop()


def prose_pieces(rng: random.Random, piece_chars: int, files: list[Path], lib: Path) -> Iterator[dict]:
    """One piece per module: its docstrings (module, classes, functions) without doctests."""
    files = list(files)
    rng.shuffle(files)
    for p in files:
        try:
            tree = ast.parse(p.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= 150 and ">>>" not in d:
                    docs.append(d.strip())
        if not docs:
            continue
        chunk, _ = cut_lines("\n\n".join(docs).split("\n"), 0, piece_chars)
        yield {"text": "\n".join(chunk).strip("\n"), "source": f"{p.relative_to(lib)} docstrings"}


def digit_share(text: str) -> float:
    return sum(c in "0123456789" for c in text) / max(len(text), 1)


def build_corpus(s: dict, tok, tmp: Path, log) -> dict:
    """Pieces of every domain until it holds `tokens_per_domain` tokens of `tok`; tmp/numerals.jsonl."""
    lib, code_files, prose_files = stdlib_files()
    sources = {
        "changelog": lambda r: changelog_pieces(r, s["piece_chars"]),
        "code-lines": lambda r: code_line_pieces(r, s["piece_chars"], code_files, lib),
        "tables": lambda r: table_pieces(r, s["piece_chars"]),
        "prose": lambda r: prose_pieces(r, s["piece_chars"], prose_files, lib),
    }
    rows, stats = [], {}
    for domain in DOMAINS:
        rng = random.Random(f"{s['seed']}/{domain}")
        total, chars, digits, n = 0, 0, 0, 0
        for piece in sources[domain](rng):
            if total >= s["tokens_per_domain"]:
                break
            if len(piece["text"].strip()) < 32:
                continue
            count = ntok(tok, [piece["text"]])[0]
            rows.append({"text": piece["text"], "domain": domain, "source": piece["source"]})
            total, n = total + count, n + 1
            chars += len(piece["text"])
            digits += sum(c in "0123456789" for c in piece["text"])
        if total < s["tokens_per_domain"]:
            raise Problem(f"domain {domain!r}: only {total} tokens of text on this machine "
                          f"(< {s['tokens_per_domain']}); lower tokens_per_domain")
        stats[domain] = {"pieces": n, "tokens": int(total), "chars": chars, "digit_chars": round(digits / chars, 4)}
        log(f"data: {domain}: {n} pieces, {total} tokens, {chars} characters, {digits / chars:.1%} digits")
    write_jsonl(tmp / "numerals.jsonl", rows)
    return {"domains": stats}


# -- the digit-packing target -----------------------------------------------------------------------
def find_ranks(out: Path, given: Path | None, log) -> Path:
    """GPT-2's BPE ranks (whisper/assets/gpt2.tiktoken of openai-whisper's sdist), checked by sha256."""
    candidates = [given] if given else [
        out / "downloads" / RANKS_MEMBER,
        Path("/tmp/whisper_dl") / RANKS_MEMBER,
    ]
    for c in candidates:
        if c and c.exists():
            break
    else:
        dl = out / "downloads"
        dl.mkdir(parents=True, exist_ok=True)
        log(f"gpt2 ranks: `pip download --no-deps --no-binary :all: {WHISPER}` into {dl}")
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", WHISPER,
                            "-d", str(dl)], check=True, capture_output=True, text=True)
            sdist = next(dl.glob("openai_whisper-20250625.tar.gz"))
            with tarfile.open(sdist) as tf:
                for member in (RANKS_MEMBER, "openai_whisper-20250625/LICENSE"):
                    tf.extract(member, dl, filter="data")
        except (OSError, subprocess.CalledProcessError, StopIteration, KeyError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise Problem(f"GPT-2's BPE ranks are not here and `pip download {WHISPER}` failed "
                          f"({detail.strip()[:300]}); pass --gpt2-ranks PATH to a gpt2.tiktoken") from e
        c = dl / RANKS_MEMBER
    if not c.exists():
        raise Problem(f"--gpt2-ranks {c}: no such file")
    digest = hashlib.sha256(c.read_bytes()).hexdigest()
    if digest != RANKS_SHA256:
        raise Problem(f"{c} is not GPT-2's BPE ranks as openai-whisper 20250625 ships them (sha256 {digest})")
    return c


def gpt2_target(out: Path, ranks: Path, log) -> Path:
    """OUT/models/gpt2-digits: GPT-2's tokenizer on a tiny random Llama (built once)."""
    dest = out / "models" / "gpt2-digits"
    if (dest / "config.json").exists():
        return dest
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks), pattern=GPT2_SPLIT).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                  model_max_length=1024)
    eot = tok.convert_tokens_to_ids(EOT)
    if len(tok) != 50_257 or eot != 50_256:
        raise Problem(f"the GPT-2 tokenizer has {len(tok)} ids and {EOT} = {eot}; expected 50,257 and 50,256")
    for text, want in ((" 2024", [" 2024"]), (" 10452", [" 10", "452"])):
        got = [tok.decode([i]) for i in tok(text)["input_ids"]]
        if got != want:
            raise Problem(f"the GPT-2 tokenizer writes {text!r} as {got}, not {want}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "NOTICE.md").write_text(
        "A digit-packing target for experiments/numerals: GPT-2's byte-level BPE (50,256 merges' ranks\n"
        f"from whisper/assets/gpt2.tiktoken of the PyPI sdist {WHISPER}, sha256 {RANKS_SHA256},\n"
        "MIT licence, Copyright (c) 2022 OpenAI; `<|endoftext|>` = id 50256) on a randomly initialised\n"
        "2-layer Llama (hidden 64, seed 0). Its predictions mean nothing.\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    log(f"model: GPT-2 tokenizer on a tiny random Llama -> {dest}")
    return dest


# -- the configs ------------------------------------------------------------------------------------
def write_configs(out: Path, s: dict, models: dict[str, dict]) -> list[Path]:
    """OUT/configs/<pair>-<rule>.yaml; each its own run directory under OUT/runs/."""
    pairs = {"A": ("smollm2", "gemma3"), "B": ("gpt2-digits", "smollm2")}
    paths = []
    for pair, (tgt, src) in pairs.items():
        for rule in RULES:
            data = {
                "output_dir": str(out / "runs" / f"{pair}-{rule}"),
                "target": models[tgt], "sources": [models[src]],
                "corpus": {"path": str(out / "data" / "numerals.jsonl")},
                "prepare": {"block_size": s["block_size"]},
                "extract": {"distribution": "topk", "top_k": s["top_k"], "batch_size": 4},
                "vocab_map": {"method": "retokenize"},
                "align": {"method": "offsets", "token_rule": rule},
            }
            path = out / "configs" / f"{pair}-{rule}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            text = (f"# experiments/numerals, pair {pair} ({models[src]['name']} into {models[tgt]['name']}), "
                    f"token rule {rule}; written by data.py\n" + yaml.safe_dump(data, sort_keys=False))
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory (what is there is reused)")
    p.add_argument("--tiny", action="store_true", help="lmfuse's tiny test models, small budgets: tests the chain")
    p.add_argument("--gpt2-ranks", type=Path, help="GPT-2's gpt2.tiktoken (default: found or pip-downloaded)")
    args = p.parse_args(argv)
    s = SETTINGS["tiny" if args.tiny else "real"]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:  # to stdout and OUT/data.log
        log_line(msg)
        with (out / "data.log").open("a", encoding="utf-8") as f:
            f.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")

    def run() -> None:
        from lmfuse.config import ModelSpec
        from lmfuse.models import load_tokenizer

        dtype = "float32" if args.tiny else "bfloat16"
        if args.tiny:  # the tiny BPE model stands for SmolLM2, the tiny SPM one for Gemma-3
            paths = {"smollm2": tiny_model(out, "tiny-bpe", "bpe"), "gemma3": tiny_model(out, "tiny-spm", "spm")}
            names = {"smollm2": "tiny-bpe", "gemma3": "tiny-spm"}
        else:
            paths = {"smollm2": "pull:smollm2-135m-instruct", "gemma3": "pull:gemma3-270m"}
            names = {"smollm2": "smollm2", "gemma3": "gemma3"}
        models = {k: {"name": names[k], "path": v, "dtype": dtype} for k, v in paths.items()}
        ranks = find_ranks(out, args.gpt2_ranks, log)
        models["gpt2-digits"] = {"name": "gpt2-digits", "path": str(gpt2_target(out, ranks, log)),
                                 "dtype": "float32"}
        tok = load_tokenizer(ModelSpec(name="count", path=paths["smollm2"]))
        stats = build_once(out, s, lambda tmp: build_corpus(s, tok, tmp, log), log)
        configs = write_configs(out, s, models)
        (out / "models.json").write_text(json.dumps(models, indent=2) + "\n")
        log(f"configs: {', '.join(str(c) for c in configs)}")
        log(f"data: {sum(d['tokens'] for d in stats['domains'].values())} tokens in all; next: "
            f"python {HERE / 'measure.py'} --out {out}")

    return main_of(run)


if __name__ == "__main__":
    raise SystemExit(main())
