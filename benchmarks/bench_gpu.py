"""lmfuse on a GPU: the whole pipeline on CUDA, and its kernels against same-run baselines.

No pretrained model is needed (the GPU machine has no network and no model hub): the benchmark
builds synthetic models of realistic shapes with random weights, tokenizers trained in seconds
on a synthetic corpus of four domains it writes itself, and then measures, each part on its own
(a part that fails is recorded as `<part>_error` in the JSON, its traceback printed, and the
other parts still run; the exit code is 1 if any part failed):

1. `env`: the device, library versions, and a bf16 matrix product as a sanity figure.
2. `pipeline`: `lmfuse run CONFIG` in a subprocess (the CLI, as a user runs it): a Qwen2-shaped
   target (byte-level BPE) and two sources of other tokenizer families and architectures
   (Llama + SentencePiece-style BPE, GPT-NeoX + WordPiece): prepare, extract, vocab-map, align,
   train (fused and the lambda = 1 control, bf16), eval, report. Per-stage wall time (from the
   manifests), train and eval tokens/s, finite losses and bits/byte, and the CUDA peak memory of
   the subprocess (proof that it ran on the GPU).
3. `extract`: `lmfuse.extract.topk_from_logits` over a batch's logits against the bare forward
   pass that made them (`extract_over_forward_v<V>`; issue 25's goal is <= 1.10), at a 262,144
   (Gemma-3-shaped) and a 49,152 (SmolLM2-shaped) vocabulary; other chunk sizes; and the whole
   `extract_shard` (tokenizing, copies to the host, the Arrow table), topk and sampled.
4. `train_step`: forward + backward + AdamW at seq 2048 and a 262,144 vocabulary: plain
   `F.cross_entropy` on the logits (the baseline) against `lmfuse.loss.fused_clm_loss` without
   targets (the control), with sparse fused targets, and with `logits_chunk_size`: peak memory
   and step time, and their ratios to the baseline (the [B, T, V] logits cost, issue 25).
5. `eval`: `lmfuse.evaluate.block_nll` against a bare forward over the same batches.

Timings: CUDA synchronised, warm-up runs first, median of repeats (variants interleaved).

    python benchmarks/bench_gpu.py --json gpu.json --out /tmp/gpurun    # on the GPU (< 6 min)
    python benchmarks/bench_gpu.py --quick --json quick.json            # CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if (SRC / "lmfuse").is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))  # runs from a checkout without `pip install -e .`

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MARKER = ".bench_gpu"  # in --out: the folder is ours to clear
PEAK_TAG = "BENCH_GPU_CUDA_PEAK_BYTES="
PROGRESS = re.compile(r"\d+%\|")
# The CLI under a wrapper that reports the subprocess's CUDA peak memory at exit.
CLI_WRAPPER = f"""
import atexit, sys
def _peak():
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            print("{PEAK_TAG}%d" % torch.cuda.max_memory_allocated(), flush=True)
    except Exception as e:
        print("{PEAK_TAG}error " + repr(e), flush=True)
atexit.register(_peak)
from lmfuse.cli import main
sys.argv = ["lmfuse", *sys.argv[1:]]
main()
"""


@dataclass(frozen=True)
class Arch:
    kind: str  # tokenizer family: bpe | spm | wordpiece
    arch: str  # qwen2 | llama | gpt_neox
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    head_dim: int | None = None
    tie: bool = False


@dataclass(frozen=True)
class Sizes:
    # pipeline
    docs_per_domain: int
    doc_chars: int
    block_size: int
    max_blocks_per_domain: int
    tok_vocab: dict = field(default_factory=dict)  # kind -> tokenizer vocab size
    target: Arch | None = None
    sources: tuple = ()
    top_k: int = 32
    extract_batch: int = 8
    shard_size: int = 64
    epochs: float = 2.0
    train_batch: int = 4
    grad_accum: int = 2
    max_steps: int | None = None
    eval_batch: int = 8
    pipeline_timeout: int = 300
    # kernels
    big: Arch | None = None  # vocabulary `big_vocab`, Gemma-3-270M-shaped
    small: Arch | None = None  # vocabulary `small_vocab`, SmolLM2-135M-shaped
    big_vocab: int = 262144
    small_vocab: int = 49152
    ext_batch: int = 8
    ext_seq: int = 512
    train_seq: int = 2048
    chunk: int = 256  # logits_chunk_size of the chunked variant
    eval_blocks: int = 32
    reps: int = 7
    warmup: int = 2
    matmul: int = 8192


FULL = Sizes(
    docs_per_domain=30, doc_chars=5000, block_size=512, max_blocks_per_domain=50,
    tok_vocab={"bpe": 8192, "spm": 6144, "wordpiece": 4096},
    target=Arch("bpe", "qwen2", 1024, 24, 16, 2, 4096),  # ~0.37B with its own vocabulary
    sources=(Arch("spm", "llama", 768, 16, 12, 4, 2048),  # ~0.1B
             Arch("wordpiece", "gpt_neox", 768, 12, 12, 12, 3072)),  # ~0.09B
    big=Arch("bpe", "llama", 640, 18, 4, 1, 2048, head_dim=256, tie=True),
    small=Arch("bpe", "llama", 576, 30, 9, 3, 1536, tie=True),
)
QUICK = Sizes(
    docs_per_domain=4, doc_chars=900, block_size=64, max_blocks_per_domain=6,
    tok_vocab={"bpe": 700, "spm": 600, "wordpiece": 500},
    target=Arch("bpe", "qwen2", 64, 2, 4, 2, 128),
    sources=(Arch("spm", "llama", 48, 2, 4, 2, 96), Arch("wordpiece", "gpt_neox", 48, 2, 4, 4, 96)),
    top_k=8, extract_batch=4, shard_size=8, epochs=1.0, train_batch=2, grad_accum=1, max_steps=3,
    eval_batch=4, pipeline_timeout=170,
    big=Arch("bpe", "llama", 64, 2, 4, 1, 128, head_dim=32, tie=True),
    small=Arch("bpe", "llama", 48, 2, 4, 2, 96, tie=True),
    big_vocab=8192, small_vocab=2048, ext_batch=2, ext_seq=64, train_seq=128, chunk=32,
    eval_blocks=4, reps=2, warmup=1, matmul=256,
)


def log(msg: str = "") -> None:
    print(msg, flush=True)


# -- timing helpers ---------------------------------------------------------------------------
def sync(dev: str) -> None:
    import torch

    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, dev: str) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def bench(fns: dict, dev: str, reps: int, warmup: int) -> dict[str, float]:
    """Median seconds of each function; the functions interleaved within each repeat."""
    for _ in range(warmup):
        for fn in fns.values():
            timed(fn, dev)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn, dev))
    return {k: statistics.median(v) for k, v in times.items()}


def free_gpu() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# -- synthetic corpus -------------------------------------------------------------------------
SYLLABLES = (
    "ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "zu", "an", "el", "or", "ix", "qu",
    "th", "ph", "str", "ing", "ed", "ba", "co", "di", "fe", "gu", "ha", "ji", "ko", "la", "mo",
    "nu", "pa", "re", "si", "to", "ul", "vi", "wa", "xe", "yo", "ze", "ar", "en", "is", "on", "ur",
)
EXTRA = ("café", "naïve", "über", "façade", "日本語", "テキスト", "données", "Straße", "🙂", "→")


class TextGen:
    """Seeded synthetic text of four domains over a Zipf-distributed lexicon of pseudo-words."""

    def __init__(self, seed: int = 0, lexicon: int = 6000):
        self.rng = random.Random(seed)
        words = set()
        while len(words) < lexicon:
            words.add("".join(self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(1, 4))))
        self.words = sorted(words)
        self.rng.shuffle(self.words)
        self.weights = [1.0 / (r + 1) ** 1.07 for r in range(len(self.words))]

    def word(self) -> str:
        if self.rng.random() < 0.01:
            return self.rng.choice(EXTRA)
        return self.rng.choices(self.words, self.weights)[0]

    def sentence(self, n: int | None = None) -> str:
        ws = [self.word() for _ in range(n or self.rng.randint(5, 18))]
        for i in range(1, len(ws) - 1):
            if self.rng.random() < 0.08:
                ws[i] += ","
        return ws[0].capitalize() + " " + " ".join(ws[1:]) + self.rng.choice(".....?!;")

    def prose(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(3, 7)))

    def code(self) -> str:
        r = self.rng
        name = "_".join(self.word() for _ in range(r.randint(1, 3)))
        args = ", ".join(self.word() for _ in range(r.randint(0, 3)))
        var, k = self.word(), r.randint(2, 9)
        body = [f"def {name}({args}):", f'    """{self.sentence(8)}"""',
                f"    {var} = {r.randint(0, 999)}", f"    for i in range({r.randint(2, 64)}):",
                f"        if i % {k} == 0:",
                f"            {var} += i * {r.randint(1, 7)}", "        else:",
                f"            {var} -= {r.choice(['i', '1', str(k)])}",
                f"    return {var}  # {self.word()} {self.word()}"]
        return "\n".join(body)

    def legal(self) -> str:
        r = self.rng
        sec = f"Section {r.randint(1, 30)}.{r.randint(1, 9)}."
        items = [f"({chr(97 + i)}) {self.sentence(r.randint(6, 12))}"
                 for i in range(r.randint(1, 4))]
        party = r.choice(["the Licensee", "the Licensor", "each Party", "the Contractor"])
        return (f"{sec} Subject to the terms of this Agreement, {party} shall {self.word()} "
                f"{self.word()} provided that {self.sentence(9)}\n" + "\n".join(items))

    def data(self) -> str:
        r = self.rng
        status = ("ok", "fail", "n/a")
        rows = [f"20{r.randint(10, 29)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d},"
                f"{self.word()},{r.uniform(-1000, 1000):.3f},{r.randint(0, 99999)},"
                f"{r.choice(status)}"
                for _ in range(r.randint(3, 8))]
        return "date,name,value,count,status\n" + "\n".join(rows)

    DOMAINS = ("prose", "code", "legal", "data")

    def document(self, domain: str, chars: int) -> str:
        parts: list[str] = []
        n = 0
        while n < chars:
            p = getattr(self, domain)()
            parts.append(p)
            n += len(p) + 2
        return "\n\n".join(parts)


def write_corpus(path: Path, sz: Sizes, seed: int = 0) -> list[str]:
    gen = TextGen(seed)
    texts = []
    with path.open("w") as f:
        for d in TextGen.DOMAINS:
            for _ in range(sz.docs_per_domain):
                t = gen.document(d, sz.doc_chars)
                texts.append(t)
                f.write(json.dumps({"domain": d, "text": t}, ensure_ascii=False) + "\n")
    return texts


# -- synthetic models and tokenizers ------------------------------------------------------------
def train_tokenizer(kind: str, texts: list[str], vocab: int):
    """lmfuse.testing's tokenizer of this family, retrained on `texts` with `vocab` ids."""
    from tokenizers import pre_tokenizers

    from lmfuse.testing import build_tokenizer

    base = build_tokenizer(kind)
    if kind != "spm":
        return base.train_new_from_iterator(texts, vocab_size=vocab)
    # As SentencePiece trains (split_by_whitespace): no piece spans a word boundary, which a
    # BPE trained without a pre-tokenizer on a large vocabulary learns ("▁of▁the"). At use, as
    # in Llama's fast tokenizer, there is no pre-tokenizer.
    base.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok = base.train_new_from_iterator(texts, vocab_size=vocab)
    tok.backend_tokenizer.pre_tokenizer = None
    return tok


def model_config(a: Arch, vocab: int, tok=None, max_pos: int = 4096):
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    special = {}
    if tok is not None:
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
        special = {"bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else eos,
                   "eos_token_id": eos, "pad_token_id": tok.pad_token_id}
    common = {"vocab_size": vocab, "hidden_size": a.hidden, "num_hidden_layers": a.layers,
              "num_attention_heads": a.heads, "intermediate_size": a.inter,
              "max_position_embeddings": max_pos, "tie_word_embeddings": a.tie, **special}
    if a.arch == "qwen2":
        return Qwen2Config(num_key_value_heads=a.kv_heads, **common)
    if a.arch == "llama":
        extra = {"head_dim": a.head_dim} if a.head_dim else {}
        return LlamaConfig(num_key_value_heads=a.kv_heads, **extra, **common)
    if a.arch == "gpt_neox":
        return GPTNeoXConfig(**common)
    raise ValueError(a.arch)


def build_model(a: Arch, vocab: int, dev: str, dtype: str, seed: int, tok=None):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(model_config(a, vocab, tok),
                                                 dtype=getattr(torch, dtype))
    model.to(dev)
    where = next(model.parameters()).device.type
    if where != torch.device(dev).type:
        raise RuntimeError(f"the model is on {where}, not on {dev}")
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the parts ------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, sz: Sizes):
        self.args, self.sz, self.dev = args, sz, args.device
        self.res: dict[str, float | int | str] = {}
        self.failed: list[str] = []
        self.work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_gpu_"))
        self.texts: list[str] = []
        self.toks: dict = {}

    def put(self, key: str, value) -> None:
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, float):
            value = round(value, 6) if math.isfinite(value) else str(value)
        elif not isinstance(value, int | str):
            value = str(value)
        self.res[key] = value

    def save(self) -> None:
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.res, indent=2) + "\n")

    def part(self, name: str, fn) -> None:
        log(f"\n=== {name} ===")
        t = time.perf_counter()
        try:
            fn()
        except BaseException as e:  # one shot at the GPU: record it and go on
            if isinstance(e, KeyboardInterrupt):
                raise
            tb = traceback.format_exc()
            log(tb)
            self.failed.append(name)
            self.put(f"{name}_error", f"{type(e).__name__}: {e}"[:2000])
        finally:
            free_gpu()
        self.put(f"{name}_seconds", time.perf_counter() - t)
        log(f"=== {name}: {'FAILED' if name in self.failed else 'ok'} in "
            f"{time.perf_counter() - t:.1f} s ===")
        self.save()

    # 1. environment
    def env(self) -> None:
        import torch
        import transformers

        r = self.put
        r("device", self.dev)
        r("quick", self.args.quick)
        r("python", platform.python_version())
        r("torch", torch.__version__)
        r("transformers", transformers.__version__)
        for mod in ("accelerate", "pyarrow", "datasets", "pydantic", "numba", "tokenizers",
                    "numpy"):
            try:
                r(mod, __import__(mod).__version__)
            except Exception as e:  # recorded, not fatal: the pipeline part will show the effect
                r(mod, f"missing: {e}")
        r("cpu_count", os.cpu_count() or 0)
        r("torch_threads", torch.get_num_threads())
        r("cuda_available", torch.cuda.is_available())
        with contextlib.suppress(Exception):
            git = ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]
            r("lmfuse_commit", subprocess.run(git, capture_output=True, text=True,
                                              timeout=10).stdout.strip())
        if self.dev.startswith("cuda"):
            p = torch.cuda.get_device_properties(self.dev)
            r("device_name", torch.cuda.get_device_name(self.dev))
            r("cuda_version", torch.version.cuda or "")
            r("device_capability", f"{p.major}.{p.minor}")
            r("device_memory_gib", p.total_memory / 2**30)
            r("device_sm_count", p.multi_processor_count)
            r("bf16_supported", torch.cuda.is_bf16_supported())
        else:
            r("device_name", f"cpu ({platform.processor() or platform.machine()})")
            log("no GPU found (or --device cpu): the same code paths run on the CPU; the times "
                "below are not GPU figures")
        n = self.sz.matmul
        dt = torch.bfloat16 if self.dev.startswith("cuda") else torch.float32
        a = torch.randn(n, n, device=self.dev, dtype=dt)
        b = torch.randn(n, n, device=self.dev, dtype=dt)
        s = bench({"mm": lambda: a @ b}, self.dev, 5, 2)["mm"]
        r("matmul_n", n)
        r("matmul_tflops", 2 * n**3 / s / 1e12)
        log(json.dumps({k: v for k, v in self.res.items()}, indent=1))

    # shared inputs: corpus text and tokenizers
    def setup(self) -> None:
        w = self.work
        if w.exists() and any(w.iterdir()):
            if not (w / MARKER).exists():
                raise RuntimeError(f"--out {w} is not empty and was not made by this benchmark; "
                                   "choose an empty or new folder")
            shutil.rmtree(w)
        w.mkdir(parents=True, exist_ok=True)
        (w / MARKER).write_text("made by benchmarks/bench_gpu.py; cleared at its next run\n")
        t = time.perf_counter()
        self.texts = write_corpus(w / "corpus.jsonl", self.sz)
        self.put("corpus_docs", len(self.texts))
        self.put("corpus_chars", sum(len(x) for x in self.texts))
        self.put("corpus_s", time.perf_counter() - t)
        for kind, v in self.sz.tok_vocab.items():
            t = time.perf_counter()
            tok = train_tokenizer(kind, self.texts, v)
            self.toks[kind] = tok
            self.put(f"tokenizer_{kind}_vocab", len(tok))
            self.put(f"tokenizer_{kind}_s", time.perf_counter() - t)
        log(f"corpus: {len(self.texts)} docs, {self.res['corpus_chars']} chars; tokenizers: "
            + ", ".join(f"{k} {len(t)} ids" for k, t in self.toks.items()))

    # 2. the pipeline through the CLI
    def pipeline(self) -> None:
        import torch
        import yaml

        if not self.toks:
            raise RuntimeError("setup failed: no corpus or tokenizers")
        sz, w = self.sz, self.work
        dtype = "bfloat16"
        build_dev = self.dev if self.dev.startswith("cuda") else "cpu"
        specs = []
        for i, (role, a) in enumerate([("tgt", sz.target), *[("src", s) for s in sz.sources]]):
            name = f"{role}-{a.arch.replace('_', '')}-{a.kind}"
            tok = self.toks[a.kind]
            t = time.perf_counter()
            model = build_model(a, len(tok), build_dev, dtype, seed=i, tok=tok)
            path = w / "models" / name
            model.save_pretrained(path, safe_serialization=True)
            tok.save_pretrained(path)
            self.put(f"pipe_model_{role}{i}_params_m", n_params(model) / 1e6)
            self.put(f"pipe_model_{role}{i}", f"{name}: {a.arch}, vocab {len(tok)}")
            log(f"built {name}: {n_params(model) / 1e6:.1f}M params, vocab {len(tok)}, "
                f"{time.perf_counter() - t:.1f} s")
            del model
            specs.append({"name": name, "path": str(path), "dtype": dtype})
        free_gpu()
        run_dir = w / "run"
        cfg = {
            "output_dir": str(run_dir),
            "target": specs[0],
            "sources": specs[1:],
            "corpus": {"path": str(w / "corpus.jsonl"), "text_field": "text",
                       "domain_field": "domain"},
            "prepare": {"block_size": sz.block_size, "validation_fraction": 0.1,
                        "max_blocks_per_domain": sz.max_blocks_per_domain, "seed": 0},
            "extract": {"distribution": "topk", "top_k": sz.top_k, "batch_size": sz.extract_batch,
                        "shard_size": sz.shard_size},
            "vocab_map": {"method": "retokenize"},
            "align": {"method": "offsets", "token_rule": "map"},
            "train": {"fusion": "minCE", "include_target": False, "outside_topk": "rest",
                      "clm_weight": 0.5, "learning_rate": 1.0e-4, "epochs": sz.epochs,
                      "max_steps": sz.max_steps, "batch_size": sz.train_batch,
                      "grad_accum": sz.grad_accum, "precision": "bfloat16", "eval_every": 0,
                      "control": True},
            "eval": {"batch_size": sz.eval_batch, "split": "validation"},
        }
        cfg_path = w / "fuse.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TQDM_DISABLE", "1")
        if not self.dev.startswith("cuda"):
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif ":" in self.dev:  # lmfuse takes the first visible GPU
            env["CUDA_VISIBLE_DEVICES"] = self.dev.split(":", 1)[1]
        cmd = [sys.executable, "-c", CLI_WRAPPER, "run", str(cfg_path)]
        log(f"$ lmfuse run {cfg_path}   (timeout {sz.pipeline_timeout} s)")
        rc, out, wall = run_streaming(cmd, env, sz.pipeline_timeout, cwd=str(w))
        self.put("pipe_wall_s", wall)
        self.put("pipe_rc", rc)
        self.pipeline_results(run_dir, out)
        if rc != 0:
            why = " (killed: timed out)" if rc == -9 else ""
            raise RuntimeError(f"`lmfuse run` exited with {rc}{why}; its output is above")
        problems = []
        m = re.search(PEAK_TAG + r"(\d+)", out)
        peak = int(m.group(1)) if m else 0
        self.put("pipe_cuda_peak_mib", peak / 2**20)
        if self.dev.startswith("cuda"):
            if peak <= 0:
                problems.append("the pipeline's process allocated no CUDA memory: "
                                "it did not run on the GPU")
            self.put("pipe_eval_log_says_cuda", bool(re.search(r"eval: .* on cuda", out)))
        for key in ("pipe_train_fused_losses_finite", "pipe_train_clm_losses_finite",
                    "pipe_eval_all_finite"):
            if self.res.get(key) != 1:
                problems.append(f"{key} = {self.res.get(key)}")
        if torch.cuda.is_available() and self.dev.startswith("cuda"):
            self.put("pipe_gpu", torch.cuda.get_device_name(self.dev))
        if problems:
            raise AssertionError("; ".join(problems))

    def pipeline_results(self, run_dir: Path, out: str) -> None:
        """Stage times, tokens/s and finiteness from the run's manifests, logs and results."""
        r = self.put
        total = 0.0
        for m in sorted(run_dir.glob("**/manifest.json")):
            rel = m.parent.relative_to(run_dir)
            if rel.parts and rel.parts[0] in ("report",) or "cache" in rel.parts:
                continue
            try:
                secs = json.loads(m.read_text()).get("seconds")
            except (OSError, ValueError):
                continue
            if isinstance(secs, int | float):
                key = "_".join(rel.parts).replace("-", "_").replace(".", "_")
                r(f"pipe_stage_{key}_s", float(secs))
                if rel.parts[0] in ("prepare", "extract", "vocab_map", "align", "train", "eval"):
                    total += float(secs)
        r("pipe_stages_total_s", total)
        for label, secs in re.findall(r"^\s+(\S+) done in ([0-9.]+) s$", out, re.M):
            r(f"pipe_log_{label.replace('/', '_').replace('-', '_')}_s", float(secs))
        # Training loop seconds: the last "step N/N ... (Xs)" line of each training, in graph order.
        loops = [float(x) for n, tot, x in re.findall(r"step (\d+)/(\d+) .*?\(([0-9.]+)s\)", out)
                 if n == tot]
        for i, kind in enumerate(("fused", "clm")):
            d = run_dir / "train" / kind
            recs = []
            if (d / "log.jsonl").exists():
                for line in (d / "log.jsonl").read_text().splitlines():
                    with contextlib.suppress(ValueError):
                        recs.append(json.loads(line))
            steps = [x for x in recs if "loss" in x]
            losses = [x["loss"] for x in steps]
            evals = [x["eval_loss"] for x in recs if "eval_loss" in x]
            toks = sum(int(x.get("tokens", 0)) for x in steps)
            r(f"pipe_train_{kind}_steps", len(steps))
            r(f"pipe_train_{kind}_tokens", toks)
            ok = bool(losses) and all(isinstance(v, int | float) and math.isfinite(v)
                                      for v in losses + evals)
            r(f"pipe_train_{kind}_losses_finite", ok)
            if losses:
                r(f"pipe_train_{kind}_first_loss", float(losses[0]))
                r(f"pipe_train_{kind}_last_loss", float(losses[-1]))
            if evals:
                r(f"pipe_train_{kind}_eval_loss", float(evals[-1]))
            secs = self.res.get(f"pipe_stage_train_{kind}_s")
            if toks and isinstance(secs, float) and secs > 0:
                r(f"pipe_train_{kind}_tok_per_s_incl_load_save", toks / secs)
            if toks and i < len(loops) and loops[i] > 0:
                r(f"pipe_train_{kind}_loop_s", loops[i])
                r(f"pipe_train_{kind}_tok_per_s", toks / loops[i])
        res_path = run_dir / "eval" / "results.json"
        if res_path.exists():
            doc = json.loads(res_path.read_text())
            finite = True
            tokens = secs = 0.0
            for label, rec in doc.get("models", {}).items():
                o = rec.get("overall", {})
                bpb = o.get("bpb")
                good = (isinstance(bpb, int | float) and math.isfinite(bpb)
                        and not rec.get("non_finite"))
                finite &= good
                key = label.replace("-", "_")
                r(f"pipe_eval_{key}_bpb", bpb if good else "non-finite")
                if rec.get("seconds"):
                    r(f"pipe_eval_{key}_tok_per_s", o.get("tokens", 0) / rec["seconds"])
                    tokens += o.get("tokens", 0)
                    secs += rec["seconds"]
            r("pipe_eval_blocks", doc.get("blocks", 0))
            r("pipe_eval_models", len(doc.get("models", {})))
            r("pipe_eval_all_finite", finite and bool(doc.get("models")))
            if secs:
                r("pipe_eval_tok_per_s_incl_load", tokens / secs)
        else:
            r("pipe_eval_all_finite", False)
        rep = run_dir / "report" / "report.md"
        r("pipe_report_written", rep.exists())

    # 3. extraction kernels against the bare forward
    def extract(self) -> None:
        sz = self.sz
        for label, a, V in (("big", sz.big, sz.big_vocab), ("small", sz.small, sz.small_vocab)):
            model = build_model(a, V, self.dev, "bfloat16", seed=0).eval()
            try:
                self.extract_one(model, V, label)
                self.shard(model, V)
            finally:
                del model
                free_gpu()

    def extract_one(self, model, V: int, label: str) -> None:
        import torch

        from lmfuse.extract import topk_from_logits

        sz, dev = self.sz, self.dev
        B, T = sz.ext_batch, sz.ext_seq
        self.put(f"extract_v{V}_params_m", n_params(model) / 1e6)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, V, (B, T), generator=g).to(dev)
        mask = torch.ones_like(ids)
        out = {}

        def fwd():
            with torch.inference_mode():
                out["logits"] = model(input_ids=ids, attention_mask=mask).logits

        def topk(k, chunk=None):
            kw = {} if chunk is None else {"chunk": chunk}

            def go():
                fwd()
                with torch.inference_mode():
                    for r in range(B):
                        topk_from_logits(out["logits"][r], ids[r], k, **kw)
            return go

        variants = {"forward": fwd, "topk_k10": topk(10), "topk_k64": topk(64),
                    "topk_k10_chunk64": topk(10, 64), "topk_k10_chunkall": topk(10, T)}
        t = bench(variants, dev, sz.reps, sz.warmup)
        n_tok = B * T
        self.put(f"extract_v{V}_tokens", n_tok)
        self.put(f"extract_v{V}_logits_dtype", str(out["logits"].dtype))
        self.put(f"extract_v{V}_forward_ms", 1e3 * t["forward"])
        self.put(f"extract_v{V}_forward_tok_per_s", n_tok / t["forward"])
        for k, s in t.items():
            if k != "forward":
                self.put(f"extract_v{V}_{k}_ms", 1e3 * s)
                self.put(f"extract_v{V}_{k}_over_forward", s / t["forward"])
        self.put(f"extract_over_forward_v{V}", t["topk_k10"] / t["forward"])
        log(f"V={V} ({label}): forward {1e3 * t['forward']:.2f} ms for {n_tok} tokens; "
            + ", ".join(f"{k} x{s / t['forward']:.3f}" for k, s in t.items() if k != "forward"))
        # The stored log-probs against a plain log_softmax + topk of the same logits.
        with torch.inference_mode():
            lg = out["logits"][0]
            lp = topk_from_logits(lg, ids[0], 10)[1]
            ref = torch.log_softmax(lg.float(), -1).topk(10, -1).values
            err = (lp - ref).abs().max().item()
        out.clear()
        self.put(f"extract_v{V}_topk_max_abs_err", err)
        if not err < 1e-3:
            raise AssertionError(f"topk_from_logits differs from log_softmax + topk by {err}")

    def shard(self, model, V: int) -> None:
        """`extract_shard` (topk and sampled) against tokenizing + a bare forward, same batches."""
        import torch

        from lmfuse.config import ExtractConfig
        from lmfuse.extract import extract_shard

        sz, dev = self.sz, self.dev
        tok = self.toks.get("bpe")
        if tok is None:
            raise RuntimeError("setup failed: no tokenizer")
        texts = cut_texts(tok, self.texts, sz.ext_seq, 2 * sz.ext_batch)
        bs = sz.ext_batch

        def bare():
            enc = tok(texts)["input_ids"]
            for b in range(0, len(enc), bs):
                rows = sorted(enc[b:b + bs], key=len, reverse=True)
                ids = torch.zeros((len(rows), len(rows[0])), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, x in enumerate(rows):
                    ids[j, :len(x)] = torch.tensor(x)
                    mask[j, :len(x)] = 1
                with torch.inference_mode():
                    model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.sum().item()

        opts = {"topk": ExtractConfig(distribution="topk", top_k=10, batch_size=bs),
                "sampled": ExtractConfig(distribution="sampled", samples=64, batch_size=bs)}
        ids = list(range(len(texts)))
        fns = {"bare": bare}
        for name, o in opts.items():
            fns[name] = lambda o=o: extract_shard(model, tok, ids, texts, o, dev)
        t = bench(fns, dev, max(2, sz.reps // 2), 1)
        n_tok = sum(len(x) for x in tok(texts)["input_ids"])
        for name in opts:
            self.put(f"extract_shard_{name}_over_forward_v{V}", t[name] / t["bare"])
            self.put(f"extract_shard_{name}_v{V}_tok_per_s", n_tok / t[name])
        self.put(f"extract_shard_bare_v{V}_tok_per_s", n_tok / t["bare"])
        log(f"extract_shard V={V}: {n_tok} tokens; bare {n_tok / t['bare']:.0f} tok/s; "
            + ", ".join(f"{k} x{t[k] / t['bare']:.3f}" for k in opts))

    # 4. a training step: memory and time
    def train_step(self) -> None:
        import torch
        import torch.nn.functional as F

        from lmfuse.loss import fused_clm_loss

        sz, dev = self.sz, self.dev
        cuda = dev.startswith("cuda")
        V, B, T = sz.big_vocab, 1, sz.train_seq
        model = build_model(sz.big, V, dev, "float32", seed=0)  # fp32 master weights, bf16 autocast
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, V, (B, T), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)
        mask = labels != -100
        tid, tp, rest = sparse_targets(labels, V, M=40, g=g)
        ids, labels, mask, tid, tp, rest = (x.to(dev) for x in (ids, labels, mask, tid, tp, rest))
        self.put("train_seq", T)
        self.put("train_vocab", V)
        self.put("train_params_m", n_params(model) / 1e6)
        self.put("train_logits_bf16_mib", B * T * V * 2 / 2**20)
        self.put("train_targets_per_pos", tid.shape[-1])
        losses: dict[str, float] = {}

        def step(variant):
            def go():
                with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16):
                    logits = model(input_ids=ids).logits
                    if variant == "clm":
                        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                               ignore_index=-100)
                    elif variant == "lmfuse_clm":
                        loss = fused_clm_loss(logits, labels, None, None, mask, 1.0, "ce", None)[0]
                    else:
                        chunk = sz.chunk if variant == "fused_chunked" else None
                        loss = fused_clm_loss(logits, labels, tid, tp, mask, 0.5, "ce", chunk,
                                              target_rest=rest)[0]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses[variant] = float(loss.detach())
                self.put("train_logits_dtype", str(logits.dtype))
            return go

        variants = ["clm", "lmfuse_clm", "fused", "fused_chunked"]
        for v in variants:  # warm-up: the optimizer state, autotuning
            for _ in range(sz.warmup):
                timed(step(v), dev)
        static = torch.cuda.memory_allocated() if cuda else 0
        self.put("train_static_mib", static / 2**20)
        res = {}
        for v in variants:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = [timed(step(v), dev) for _ in range(sz.reps)]
            peak = torch.cuda.max_memory_allocated() if cuda else 0
            res[v] = (statistics.median(times), peak)
            if not math.isfinite(losses[v]):
                raise AssertionError(f"{v}: loss {losses[v]}")
        base_t, base_m = res["clm"]
        log(f"seq {T}, vocab {V}, {n_params(model) / 1e6:.0f}M params; "
            f"static {static / 2**20:.0f} MiB")
        log(f"{'variant':>14} {'step ms':>9} {'time x':>7} {'peak MiB':>9} {'mem x':>6} "
            f"{'over static':>11}")
        for v, (s, peak) in res.items():
            self.put(f"train_{v}_step_ms", 1e3 * s)
            self.put(f"train_{v}_tok_per_s", B * T / s)
            self.put(f"train_{v}_time_ratio", s / base_t)
            self.put(f"train_{v}_loss", losses[v])
            if cuda:
                self.put(f"train_{v}_peak_mib", peak / 2**20)
                self.put(f"train_{v}_mem_ratio", peak / base_m)
                self.put(f"train_{v}_over_static_mib", (peak - static) / 2**20)
            mx = f"{peak / base_m:6.3f}" if cuda else "     -"
            log(f"{v:>14} {1e3 * s:9.2f} {s / base_t:7.3f} {peak / 2**20:9.0f} {mx} "
                f"{(peak - static) / 2**20:11.0f}")
        # lambda = 1 through lmfuse equals plain cross-entropy on the same logits
        with torch.no_grad(), torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
            a = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            b = fused_clm_loss(logits, labels, None, None, mask, 1.0, "ce", None)[0]
            c = fused_clm_loss(logits, labels, tid, tp, mask, 0.5, "ce", None, target_rest=rest)[0]
            d = fused_clm_loss(logits, labels, tid, tp, mask, 0.5, "ce", sz.chunk,
                               target_rest=rest)[0]
        self.put("train_clm_vs_lmfuse_abs_diff", abs(float(a) - float(b)))
        self.put("train_fused_vs_chunked_abs_diff", abs(float(c) - float(d)))
        if abs(float(a) - float(b)) > 1e-3 or abs(float(c) - float(d)) > 1e-3:
            raise AssertionError(f"loss mismatch: CE {float(a)} vs lmfuse {float(b)}; "
                                 f"fused {float(c)} vs chunked {float(d)}")

    # 5. eval throughput
    def eval(self) -> None:
        import torch

        from lmfuse.evaluate import block_nll

        sz, dev = self.sz, self.dev
        tok = self.toks.get("bpe")
        if tok is None:
            raise RuntimeError("setup failed: no tokenizer")
        V = sz.big_vocab
        model = build_model(sz.big, V, dev, "bfloat16", seed=0).eval()
        texts = cut_texts(tok, self.texts, sz.ext_seq, sz.eval_blocks)
        bs = sz.eval_batch
        enc = tok(texts)["input_ids"]
        n_tok = sum(len(x) for x in enc)
        order = sorted(range(len(texts)), key=lambda i: -len(enc[i]))
        rows_out = {}

        def bare():
            e = tok(texts)["input_ids"]
            for b in range(0, len(order), bs):
                rows = [e[i] for i in order[b:b + bs]]
                ids = torch.zeros((len(rows), len(rows[0])), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, x in enumerate(rows):
                    ids[j, :len(x)] = torch.tensor(x)
                    mask[j, :len(x)] = 1
                with torch.inference_mode():
                    model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.sum().item()

        def nll():
            rows_out["rows"] = block_nll(model, tok, texts, bs, dev)

        t = bench({"bare": bare, "block_nll": nll}, dev, max(2, sz.reps // 2), 1)
        rows = rows_out["rows"]
        finite = all(math.isfinite(r[0]) for r in rows)
        nats = sum(r[0] for r in rows) / max(1, sum(r[1] for r in rows))
        self.put("eval_vocab", V)
        self.put("eval_blocks", len(texts))
        self.put("eval_tokens", n_tok)
        self.put("eval_forward_tok_per_s", n_tok / t["bare"])
        self.put("eval_block_nll_tok_per_s", n_tok / t["block_nll"])
        self.put("eval_over_forward", t["block_nll"] / t["bare"])
        self.put("eval_nll_per_token", nats)
        self.put("eval_nll_finite", finite)
        log(f"block_nll V={V}: {n_tok} tokens; bare forward {n_tok / t['bare']:.0f} tok/s, "
            f"block_nll "
            f"{n_tok / t['block_nll']:.0f} tok/s (x{t['block_nll'] / t['bare']:.3f}); "
            f"NLL/token {nats:.3f} (ln V = {math.log(V):.3f})")
        if not finite:
            raise AssertionError("block_nll returned a non-finite NLL")

    def summary(self) -> None:
        big, small = self.sz.big_vocab, self.sz.small_vocab
        tgt = next((k for k in self.res if k.startswith("pipe_stage_extract_tgt")), "")
        rows = [
            ("pipeline wall (lmfuse run)", "pipe_wall_s", "s"),
            ("pipeline stages total", "pipe_stages_total_s", "s"),
            ("  extract (target)", tgt, "s"),
            ("  align (all sources)", "", "s"),
            ("  train fused", "pipe_stage_train_fused_s", "s"),
            ("  train control", "pipe_stage_train_clm_s", "s"),
            ("  eval", "pipe_stage_eval_s", "s"),
            ("train fused tokens/s (loop)", "pipe_train_fused_tok_per_s", ""),
            ("train control tokens/s (loop)", "pipe_train_clm_tok_per_s", ""),
            ("eval tokens/s (incl. load)", "pipe_eval_tok_per_s_incl_load", ""),
            ("pipeline CUDA peak", "pipe_cuda_peak_mib", "MiB"),
            (f"extract/forward V={big}", f"extract_over_forward_v{big}", "x"),
            (f"extract/forward V={small}", f"extract_over_forward_v{small}", "x"),
            (f"extract/forward V={big}, one chunk",
             f"extract_v{big}_topk_k10_chunkall_over_forward", "x"),
            (f"extract_shard topk/bare V={big}", f"extract_shard_topk_over_forward_v{big}", "x"),
            (f"extract_shard sampled/bare V={big}", f"extract_shard_sampled_over_forward_v{big}",
             "x"),
            ("train step fused/clm time", "train_fused_time_ratio", "x"),
            ("train step fused/clm memory", "train_fused_mem_ratio", "x"),
            ("train step chunked/clm memory", "train_fused_chunked_mem_ratio", "x"),
            ("train step clm peak", "train_clm_peak_mib", "MiB"),
            ("eval block_nll/forward", "eval_over_forward", "x"),
        ]
        align = sum(v for k, v in self.res.items()
                    if k.startswith("pipe_stage_align_") and isinstance(v, float))
        log("\n=== summary ===")
        log(f"device: {self.res.get('device_name', self.dev)}; torch {self.res.get('torch')}, "
            f"transformers {self.res.get('transformers')}")
        for name, key, unit in rows:
            v = align if name.strip().startswith("align") else self.res.get(key, "-")
            if isinstance(v, float):
                v = f"{v:.3f}" if unit == "x" else f"{v:.1f}"
            log(f"{name:40} {v!s:>12} {unit}")
        log(f"failed parts: {', '.join(self.failed) or 'none'}")


def sparse_targets(labels, V: int, M: int, g):
    """Fused sparse targets [B, T, M]: distinct ids per position (the gold one first, -1 padding),
    their probabilities, and the teacher's mass outside them (`outside_topk: rest`)."""
    import torch

    B, T = labels.shape
    steps = torch.randint(1, max(2, V // (M + 1)), (B, T, M - 1), generator=g)
    offs = torch.cat([torch.zeros((B, T, 1), dtype=torch.long), steps.cumsum(-1)], -1)
    tid = (labels.clamp_min(0)[..., None] + offs) % V  # increasing offsets < V: distinct ids
    n = torch.randint(M // 2, M + 1, (B, T, 1), generator=g)  # candidates per position
    pad = torch.arange(M)[None, None, :] >= n
    tid[pad] = -1
    w = -torch.log(torch.rand((B, T, M), generator=g).clamp_min(1e-9))
    w[pad] = 0
    rest = torch.rand((B, T), generator=g) * 0.3
    tp = w / w.sum(-1, keepdim=True) * (1 - rest)[..., None]
    return tid, tp, rest


def cut_texts(tok, texts: list[str], n_tokens: int, n: int) -> list[str]:
    """`n` pieces of the corpus of about `n_tokens` tokens each (cut at a token's end)."""
    out = []
    for t in texts:
        i = 0
        while len(out) < n and i < len(t):
            enc = tok(t[i:i + 12 * n_tokens], return_offsets_mapping=True, add_special_tokens=False)
            offs = enc["offset_mapping"]
            if len(offs) < n_tokens:
                break
            end = offs[n_tokens - 1][1]
            out.append(t[i:i + end])
            i += end
        if len(out) >= n:
            break
    if not out:
        raise RuntimeError("corpus too small for the requested blocks")
    while len(out) < n:
        out.append(out[len(out) % len(out)])
    return out


def run_streaming(cmd: list[str], env: dict, timeout: float, cwd: str) -> tuple[int, str, float]:
    """Run, echoing output lines as they come; kill after `timeout` s. (rc, output, seconds)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, errors="replace", bufsize=1)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    lines = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line)
            if PROGRESS.search(line) and "100%" not in line or not line.strip():
                continue  # progress bars: each update is a line here
            print("  | " + line.rstrip("\n")[:400], flush=True)
        rc = p.wait()
    finally:
        timer.cancel()
        if p.poll() is None:
            p.kill()
    return rc, "".join(lines), time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny models and corpus: a smoke run of the same code paths "
                         "(CPU: < 3 min)")
    ap.add_argument("--json", help="write a flat {name: value} object here (after every part)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--out", help="work folder: models, corpus, config and the pipeline's run "
                                  "(RUN = OUT/run); default: a temporary folder")
    ap.add_argument("--parts", default="env,pipeline,extract,train_step,eval",
                    help="comma-separated subset of env,pipeline,extract,train_step,eval")
    a = ap.parse_args(argv)
    import torch

    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        log("--device cuda but no GPU is visible: using the CPU")
        a.device = "cpu"
    if not a.device.startswith("cuda"):
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    sz = QUICK if a.quick else FULL
    if not a.quick and not a.device.startswith("cuda"):
        log("warning: full sizes on a CPU take hours; --quick is the CPU smoke run")
    b = Bench(a, sz)
    t0 = time.perf_counter()
    log(f"bench_gpu: device {a.device}, {'quick' if a.quick else 'full'} sizes, "
        f"work folder {b.work}")
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    if "env" in parts:
        b.part("env", b.env)
    b.part("setup", b.setup)
    for name in ("pipeline", "extract", "train_step", "eval"):
        if name in parts:
            b.part(name, getattr(b, name))
    b.put("total_seconds", time.perf_counter() - t0)
    b.put("failed_parts", ",".join(b.failed))
    b.save()
    b.summary()
    log(f"total {time.perf_counter() - t0:.1f} s")
    if not a.out:
        shutil.rmtree(b.work, ignore_errors=True)
    return 1 if b.failed else 0


if __name__ == "__main__":
    sys.exit(main())
