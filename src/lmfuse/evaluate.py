"""Held-out evaluation: perplexity per domain and bits-per-byte, the fair metric across tokenizers.

Perplexity per token depends on the tokenizer (longer tokens, fewer and harder tokens), so models
with different tokenizers are compared by bits per byte: the summed NLL of a block divided by
`ln 2` times the UTF-8 bytes of the text that NLL scores. The scored text follows the extract
stage's convention (ARCHITECTURE.md, `nll_sum`/`scored_bytes`): the tokenizer's own special tokens
are kept (BOS included), position 0 predicts token 1, so the scored text is `text[offset_end[0]:]`;
only predictions of text count, not that of a special token the tokenizer appends (EOS).

`block_nll` and `summarize` are pure; `run_eval` does the I/O and caches each model's result
under `RUN/eval/cache/`, keyed by the model's fingerprint and the data's hash, so adding one
model to a finished evaluation evaluates only that model. Each model's record keeps its
per-block figures (`per_block`: block ids, domains, NLL, tokens, bytes) so that two models can
be compared block by block (`lmfuse.stats.paired_bootstrap`, used by the report).

Figures are never taken on trust: the trained models are checked against their manifest's
checksums (`best/` included) before anything reads them; each cache entry carries the checksum
of its own fields (`CACHE_HASH`), and one that does not match is scored again; and eval's
manifest, written last, records the sha256 of `results.json`, `results.md` and every cache entry
it used, so `lmfuse verify` and the report (`load_results`) find an edited figure.

A broken model never stops the evaluation (`model_problem`): one whose NLL is NaN or infinite on
some block is "not finite" (its figures are null in results.json), one whose mean NLL is above
`MAX_MEAN_NLL` nats per token on some domain has "diverged" (its perplexity overflows: written ∞
in the table, null in results.json). Its row says so, every other model is scored and written,
and the report's verdict names it.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmfuse import __version__, baselines
from lmfuse.artifacts import (
    MANIFEST,
    SELF_HASH,
    atomic_write_bytes,
    atomic_write_json,
    check_artifact,
    file_records,
    manifest_hash,
    read_json,
    record_hash,
)
from lmfuse.batches import padded_batches
from lmfuse.config import FuseConfig, ModelSpec
from lmfuse.errors import LmfuseError
from lmfuse.evalmodel import EvalModel, dir_spec, hf_model_dir, safe_name
from lmfuse.fingerprint import model_fingerprint
from lmfuse.hashing import hash_obj
from lmfuse.stats import bits_per_byte

CONTROL = "control (λ = 1)"  # how tables and plots name the `clm` model
BEST = "@best"  # label suffix of a model at its best validation checkpoint (`train.keep_best`)
CACHE_HASH = "record_sha256"  # a cache entry's checksum of its own other fields
MAX_MEAN_NLL = math.log(sys.float_info.max)  # ≈ 709.78 nats/token: exp of a larger mean NLL overflows
# What `block_nll` counts, named in every eval cache key: a cached figure scored under another rule
# is never read. 2 = the predictions of text tokens only (issue 26: an EOS the tokenizer appends
# counted before); the key of every model changed with it, so each is scored once again.
SCORING_RULE = "text-predictions/2"


# -- pure functions ----------------------------------------------------------------------------
def end_offsets(offsets: Sequence[tuple[int, int]], special: Sequence[int]) -> list[int]:
    """Character end offset of every token, special tokens placed at the previous token's end.

    Args:
        offsets: `[T]` (start, end) pairs from a fast tokenizer.
        special: `[T]` 1 where the token is a special token (its offsets are meaningless).

    Returns:
        `[T]` non-decreasing end offsets (a leading BOS gets 0).
    """
    out, prev = [], 0
    for (_, e), s in zip(offsets, special, strict=True):
        if s:
            e = prev
        out.append(e)
        prev = max(prev, e)  # as extract.encode_blocks: the text end reached so far
    return out


def scored_bytes(text: str, offsets: Sequence[tuple[int, int]], special: Sequence[int]) -> int:
    """UTF-8 bytes of `text[offset_end[0]:]`, the text the NLL of a block scores.

    Args:
        text: The block's text.
        offsets: `[T]` (start, end) character offsets.
        special: `[T]` special-token mask.
    """
    if not offsets:
        return 0
    return len(text[end_offsets(offsets, special)[0]:].encode("utf-8"))


def block_nll(model, tokenizer, texts: Sequence[str], batch_size: int = 8, device: str | None = None,
              progress: bool | str = False) -> list[tuple[float, int, int]]:
    """Summed next-token NLL of the text of each block under a causal LM.

    Texts are tokenized with the tokenizer's own special tokens, batched longest first with right
    padding and an attention mask, and scored in float32 whatever the model's dtype. Only
    predictions of text count (`SCORING_RULE`): the prediction of a special token the tokenizer
    added (an EOS after the text) is left out of the NLL and the token count, so a model scores
    the same whether or not its tokenizer appends one.

    Args:
        model: Causal LM already on `device`; `model(input_ids=[B, T], attention_mask=[B, T]).logits`
            is `[B, T, V]` (unnormalized logits or log-probabilities).
        tokenizer: Its fast tokenizer (character offsets are needed for the byte count).
        texts: `N` block texts.
        batch_size: Blocks per forward pass.
        device: Where the inputs go (`None`: the model's device).
        progress: Show a tqdm bar (a string is used as its label).

    Returns:
        `N` tuples `(nll_sum, n_tokens, scored_bytes)` in the order of `texts`: NLL in nats summed
        over the predictions of text tokens (of the `T - 1` predictions, those whose next token is
        not a special token the tokenizer added), their number, and the UTF-8 bytes of the scored
        text.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise LmfuseError(f"batch_size must be ≥ 1, got {batch_size}", fix="set eval.batch_size ≥ 1")
    if device is None:
        device = next(model.parameters()).device
    from lmfuse.extract import text_predictions
    from lmfuse.models import encode_text

    # Special-token strings written in the text are text, as prepare and extract read them.
    enc = encode_text(tokenizer, list(texts), return_offsets_mapping=True, return_special_tokens_mask=True)
    ids = enc["input_ids"]
    results: list[tuple[float, int, int] | None] = [None] * len(ids)
    for i, text in enumerate(texts):
        if len(ids[i]) < 2:  # nothing to predict
            results[i] = (0.0, 0, scored_bytes(text, enc["offset_mapping"][i], enc["special_tokens_mask"][i]))
    todo = sorted((i for i in range(len(ids)) if results[i] is None), key=lambda i: -len(ids[i]))
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if todo and max_pos and len(ids[todo[0]]) > max_pos:
        raise LmfuseError(f"a block has {len(ids[todo[0]])} tokens, more than the model's "
                          f"{max_pos} positions", where=f"text {todo[0]}",
                          fix="lower prepare.block_size so every model's tokenization fits")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(todo), desc=progress if isinstance(progress, str) else "eval", unit="block",
               disable=not progress, leave=False)
    with torch.inference_mode():
        for batch, _, input_ids, mask in padded_batches(ids, batch_size, pad, todo):
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, T, V)
            for r, i in enumerate(batch):
                n = len(ids[i])
                # One row at a time in float32: a [B, T, V] float32 copy is large at 262k vocabularies.
                lp = torch.log_softmax(logits[r, :n - 1].float(), dim=-1)  # (T-1, V)
                nll = -lp.gather(-1, input_ids[r, 1:n, None]).squeeze(-1)  # (T-1,)
                text = torch.from_numpy(text_predictions(enc["special_tokens_mask"][i])).to(nll.device)
                nll = nll[text]  # an appended EOS is not text: its prediction does not count
                results[i] = (float(nll.double().sum()), int(text.sum()),
                              scored_bytes(texts[i], enc["offset_mapping"][i], enc["special_tokens_mask"][i]))
            del logits
            bar.update(len(batch))
    bar.close()
    return results  # type: ignore[return-value]


def perplexity(nll: float, tokens: int) -> float:
    """exp(nll / tokens); inf when that overflows (a diverged model), NaN without tokens."""
    if not tokens:
        return float("nan")
    try:
        return math.exp(nll / tokens)
    except OverflowError:
        return math.inf


def _metrics(nll: float, tokens: int, nbytes: int, blocks: int) -> dict[str, float | int]:
    return {
        "bpb": bits_per_byte(nll, nbytes),
        "ppl": perplexity(nll, tokens),
        "nll": nll, "tokens": tokens, "bytes": nbytes, "blocks": blocks,
    }


def summarize(rows: Sequence[tuple[float, int, int]], domains: Sequence[str]) -> dict[str, Any]:
    """Per-domain and overall perplexity and bits per byte.

    Sums are pooled over blocks (not averages of per-block ratios), so long blocks weigh more.

    Args:
        rows: `N` tuples `(nll_sum, n_tokens, scored_bytes)` from `block_nll`.
        domains: `N` domain names.

    Returns:
        `{"domains": {name: metrics}, "overall": metrics}`; metrics are `bpb` (Σ nll / (ln 2 · Σ
        bytes)), `ppl` (exp(Σ nll / Σ tokens)), `nll`, `tokens`, `bytes`, `blocks`.
    """
    if len(rows) != len(domains):
        raise ValueError(f"{len(rows)} rows but {len(domains)} domains")
    sums: dict[str, list] = {}
    for (nll, tok, nb), d in zip(rows, domains, strict=True):
        s = sums.setdefault(d, [0.0, 0, 0, 0])
        s[0] += nll
        s[1] += tok
        s[2] += nb
        s[3] += 1
    total = [sum(s[j] for s in sums.values()) for j in range(4)]
    return {"domains": {d: _metrics(*sums[d]) for d in sorted(sums)}, "overall": _metrics(*total)}


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _mean_nll(m: dict) -> float:
    """Mean NLL per token of a summary (`overall` or a domain); NaN when it cannot be told."""
    nll, tokens = m.get("nll"), m.get("tokens")
    return nll / tokens if _finite(nll) and _finite(tokens) and tokens > 0 else math.nan


def model_problem(rec: dict) -> tuple[str, str] | None:
    """What is wrong with a model's eval record: None, or `(what, detail)`.

    `what` is `not finite` (its NLL is NaN or infinite on some blocks: `non_finite`, or no finite
    bits per byte) or `diverged` (finite, but a mean NLL above `MAX_MEAN_NLL` nats per token
    overall or on some domain, so its perplexity is infinite). Records read back from
    results.json (non-finite numbers are null there) and records in memory give the same answer.
    """
    o = rec.get("overall") or {}
    if rec.get("non_finite") or not _finite(o.get("bpb")):
        return "not finite", "its NLL is NaN or infinite on some held-out blocks"
    # Overall first; else the domain with the highest mean NLL.
    for group, m in [("overall", o), *sorted((rec.get("domains") or {}).items(), key=lambda g: -_mean_nll(g[1]))]:
        mean = _mean_nll(m)
        if math.isfinite(mean) and mean > MAX_MEAN_NLL:
            where = "" if group == "overall" else f" on {group}"
            return "diverged", f"a mean NLL of {mean:.4g} nats/token{where}, so its perplexity is infinite"
    return None


def problem_fix(kind: str | None) -> str:
    """What to do about a broken model of a kind (the trained ones: a lower learning rate)."""
    if kind in ("fused", "clm"):
        return "lower train.learning_rate (try 10× lower) and train it again"
    return "check the model's weights"


def ppl_text(m: dict | None) -> str:
    """A summary's perplexity for a table: `12.34`, `∞` when it overflows, `–` when there is none."""
    if not m:
        return "–"
    ppl = m.get("ppl")
    if _finite(ppl):
        return f"{ppl:.2f}"
    if ppl == math.inf or _mean_nll(m) > MAX_MEAN_NLL:  # inf in memory, null once written
        return "∞"
    return "–"


# -- models to evaluate ------------------------------------------------------------------------
def check_trained(cfg: FuseConfig) -> None:
    """Check every finished training artifact's files (weights, config, tokenizer, `best/`)
    against its manifest's checksums, before eval or a merge reads them.

    Raises:
        LmfuseError: a file is missing or changed, or the manifest was edited (the error names
            the file and the command that rebuilds the model).
    """
    for kind in ("fused", "clm"):
        path = cfg.run_dir / "train" / kind
        if (path / MANIFEST).exists():
            check_artifact(path, "train", full=True)


def default_models(cfg: FuseConfig) -> list[EvalModel]:
    """Target, every source, `train/fused`, `train/clm` (when present; `@best` too with
    `train.keep_best`), and configured baselines. Their files are not read here: `check_trained`
    checks the trained ones first."""
    run = cfg.run_dir
    out = [EvalModel(cfg.target.name, "target", cfg.target)]
    out += [EvalModel(s.name, "source", s) for s in cfg.sources]
    for kind in ("fused", "clm"):
        # Only a finished training (manifest written after the weights) counts.
        d = hf_model_dir(run / "train" / kind) if (run / "train" / kind / "manifest.json").exists() else None
        if d is not None:
            out.append(EvalModel(kind, kind, dir_spec(kind, d)))
    for kind in ("fused", "clm"):
        # `train.keep_best`: the weights at the lowest validation loss, scored beside the final ones.
        best = run / "train" / kind / "best"
        if (run / "train" / kind / "manifest.json").exists() and hf_model_dir(best) is not None:
            out.append(EvalModel(f"{kind}{BEST}", kind, dir_spec(f"{kind}-best", best)))
    out += baselines.eval_models(cfg)
    return out


def _as_eval_models(models: Sequence[EvalModel | tuple[str, Any]]) -> list[EvalModel]:
    out = []
    for m in models:
        if isinstance(m, EvalModel):
            out.append(m)
            continue
        label, what = m
        if isinstance(what, ModelSpec):
            out.append(EvalModel(label, "model", what))
        else:
            out.append(EvalModel(label, "model", dir_spec(safe_name(label), what)))
    labels = [m.label for m in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise LmfuseError(f"model labels must be unique; repeated: {', '.join(dup)}",
                          fix="give each evaluated model its own label")
    return out


# -- data --------------------------------------------------------------------------------------
def load_blocks(cfg: FuseConfig) -> tuple[list[dict], str]:
    """All prepared blocks as dicts (block_id, doc_id, domain, split, text), and the data hash."""
    from lmfuse.artifacts import open_artifact

    path = cfg.run_dir / "prepare"
    manifest, ds = open_artifact(path, "prepare")
    if ds is None:
        raise LmfuseError("the prepare artifact holds no blocks", where=str(path),
                          fix="check the corpus path and rerun `lmfuse prepare`")
    cols = ["block_id", "domain", "split", "text"]
    blocks = [dict(zip(cols, vals, strict=True)) for vals in zip(*(ds[c] for c in cols), strict=True)]
    return blocks, manifest.get("config_hash") or hash_obj([b["text"] for b in blocks])


def select_blocks(blocks: Sequence[dict], split: str) -> list[dict]:
    """The blocks to evaluate; refuse when a domain has none of them.

    Args:
        blocks: All prepared blocks (dicts with `domain`, `split`, `text`).
        split: `validation`, `train` or `all`.
    """
    chosen = [b for b in blocks if split == "all" or b["split"] == split]
    empty = sorted({b["domain"] for b in blocks} - {b["domain"] for b in chosen})
    if empty:
        raise LmfuseError(
            f"domain(s) {', '.join(map(repr, empty))} have no {split} blocks to evaluate on",
            where="prepare artifact",
            fix="raise prepare.min_validation_blocks (per domain) or prepare.validation_fraction, "
                "add text for those domains, then rerun `lmfuse prepare`",
        )
    if not chosen:
        raise LmfuseError(f"no {split} blocks to evaluate on", where="prepare artifact",
                          fix="raise prepare.validation_fraction and rerun `lmfuse prepare`")
    return chosen


# -- loading -----------------------------------------------------------------------------------
def check_loadable(models: Sequence[EvalModel]) -> None:
    """Fail before any evaluation if a model's path, config or tokenizer cannot be loaded."""
    from transformers import AutoConfig

    from lmfuse.models import load_tokenizer, model_path_problem, resolve_model

    problems = []
    for m in models:
        for spec in m.specs():
            p = model_path_problem(spec)
            if p:
                problems.append(f"{m.label}: {p}")
                continue
            try:
                load_tokenizer(spec)
                path = resolve_model(spec)
                AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
                if Path(path).is_dir() and not list(Path(path).glob("*.safetensors")):
                    problems.append(f"{m.label}: no .safetensors weights in {path} (lmfuse loads no pickles)")
            except Exception as e:  # collect every problem, then raise once
                problems.append(f"{m.label}: {str(e).splitlines()[0]}")
    if problems:
        raise LmfuseError(f"{len(problems)} model(s) cannot be loaded:\n" + "\n".join(f"  - {p}" for p in problems),
                          fix="fix the model paths in the config (nothing was evaluated)")


def load_eval_model(m: EvalModel, dtype: str | None, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) ready for `block_nll`."""
    from lmfuse.models import load_model, load_tokenizer

    if m.kind == "ensemble":
        return baselines.load_ensemble(m.members, dtype=dtype, device=device), load_tokenizer(m.members[0])
    return load_model(m.spec, dtype=dtype, device=device), load_tokenizer(m.spec)


# -- the cache and the artifact ------------------------------------------------------------------
def cache_key(m: EvalModel, data_hash: str, split: str, dtype: str | None, block_ids: Sequence[int]) -> str:
    """The key of a model's cache entry: the scoring rule (`SCORING_RULE`), each of its models'
    dtype and fingerprint (`model_fingerprint`), the data's hash, the split, `eval.dtype` and the
    block ids."""
    return hash_obj([SCORING_RULE, [[s.dtype, model_fingerprint(s)] for s in m.specs()], data_hash, split, dtype,
                     list(block_ids)])


def read_cached(path: Path) -> tuple[dict | None, str | None]:
    """A cache entry whose checksum of its own fields holds, or (None, why it cannot be used).

    An entry that is missing gives (None, None); one that is unreadable, edited, or written by an
    older lmfuse (no checksum, or no per-block figures) gives its reason, and is scored again.
    """
    try:
        rec = read_json(path)
    except LmfuseError as e:
        return None, f"unreadable ({e.what})"
    if rec is None:
        return None, None
    if not isinstance(rec, dict) or CACHE_HASH not in rec:
        return None, "cached without a checksum (by an older lmfuse)"
    if rec[CACHE_HASH] != record_hash(rec, CACHE_HASH):
        return None, "edited after it was written (its checksum of its own fields differs)"
    if "per_block" not in rec:
        return None, "cached without per-block figures"
    return rec, None


def remove_temp_files(out_dir: Path) -> None:
    """Remove the temp files a killed eval left in `eval/` and `eval/cache/` (under the run lock,
    no other eval of this run is writing them)."""
    for d in (out_dir, out_dir / "cache"):
        for tmp in d.glob(".*.tmp") if d.is_dir() else ():
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def load_results(run_dir: str | Path) -> dict | None:
    """`RUN/eval/results.json` once eval's files check out against its manifest, or None when eval
    has not run (the report, the sweep and the experiments read it).

    Raises:
        LmfuseError: eval did not finish (results without a manifest), or a file it vouches for
            (results, a cache entry) or the manifest itself was changed; the error names the file.
    """
    path = Path(run_dir) / "eval"
    if not (path / "results.json").exists() and not (path / MANIFEST).exists():
        return None
    check_artifact(path, "eval", full=True)  # a manifest of an older lmfuse records no files: read as it is
    return read_json(path / "results.json")


# -- run ---------------------------------------------------------------------------------------
def per_block(rows: Sequence[tuple[float, int, int]], blocks: Sequence[dict]) -> dict[str, list]:
    """Per-block figures of one model, column-wise, in the order of `blocks`.

    Args:
        rows: `N` tuples `(nll_sum, n_tokens, scored_bytes)` from `block_nll`.
        blocks: The `N` blocks scored (dicts with `block_id` and `domain`).

    Returns:
        `{"block_id": [N], "domain": [N], "nll": [N], "tokens": [N], "bytes": [N]}`.
    """
    return {"block_id": [int(b["block_id"]) for b in blocks], "domain": [b["domain"] for b in blocks],
            "nll": [float(r[0]) for r in rows], "tokens": [int(r[1]) for r in rows],
            "bytes": [int(r[2]) for r in rows]}


def corpus_config(cfg: FuseConfig, corpus: str | Path) -> FuseConfig:
    """The config that prepares another corpus for evaluation, under `RUN/eval_corpora/<name>/`.

    Every block of it is scored (no split, no caps), cut for the same tokenizers and block size.

    Raises:
        LmfuseError: When the corpus does not exist (blamed on `--corpus`, not the config).
    """
    given = corpus
    corpus = Path(corpus).expanduser().resolve()
    if not corpus.exists():
        raise LmfuseError(f"corpus {given} does not exist", where="--corpus",
                          fix="pass a .txt file, a folder of .txt files, a .jsonl or .parquet file, "
                              "or a saved HF dataset folder")
    name = f"{corpus.stem}-{hash_obj(str(corpus))[:8]}"
    return cfg.model_copy(update={
        "output_dir": str(cfg.run_dir / "eval_corpora" / name),
        "corpus": cfg.corpus.model_copy(update={"path": str(corpus), "max_docs_per_domain": None}),
        "prepare": cfg.prepare.model_copy(update={"min_validation_blocks": 0, "max_blocks_per_domain": None}),
        "eval": cfg.eval.model_copy(update={"split": "all"}),
    })


def run_eval(cfg: FuseConfig, models: Sequence[tuple[str, Any]] | None = None, overwrite: bool = False,
             device: str | None = None, extra: Sequence[tuple[str, Any]] = (),
             corpus: str | Path | None = None, log: Callable[[str], Any] = print) -> dict:
    """Evaluate models on the held-out blocks; write `RUN/eval/results.json` and `results.md`.

    The runner (`runner.evaluate`) calls it under the run's lock, once the trained models are
    checked and the merges built.

    Args:
        cfg: The `FuseConfig`.
        models: `(label, ModelSpec or HF dir)` pairs; default: target, sources, fused, clm, baselines.
        overwrite: Ignore cached per-model results.
        device: Torch device (default: CUDA when available).
        extra: More `(label, ModelSpec or HF dir)` pairs evaluated next to the default ones.
        corpus: Score every block of this corpus instead of the run's held-out blocks; it is
            prepared (once) and the results go to `RUN/eval_corpora/<name>/eval/`.
        log: Where progress lines go (a stage header, one line per model, "done in").

    Returns:
        The results object written to `results.json`.
    """
    from lmfuse.parallel import device as default_device

    t0 = time.time()
    device = device or default_device()
    data_cfg = cfg
    if corpus is not None:
        data_cfg = corpus_config(cfg, corpus)  # prepared by the runner (`runner.evaluate`)
    split = data_cfg.eval.split
    blocks, data_hash = load_blocks(data_cfg)
    chosen = select_blocks(blocks, split)
    if models is None:
        entries = _as_eval_models([*default_models(cfg), *extra])
    else:
        entries = _as_eval_models(models)
    check_loadable(entries)
    baselines.check_ensembles([m for m in entries if m.kind == "ensemble"])

    out_dir = data_cfg.run_dir / "eval"
    cache_dir = out_dir / "cache"
    remove_temp_files(out_dir)
    texts = [b["text"] for b in chosen]
    domains = [b["domain"] for b in chosen]
    log(f"eval: {len(entries)} model(s) on {len(chosen)} {'' if split == 'all' else split + ' '}blocks "
        f"({len(set(domains))} domain(s)) on {device} -> {out_dir}")
    results: dict[str, Any] = {}
    used: list[Path] = []  # the cache entries behind the results, recorded in the manifest
    for m in entries:
        key = cache_key(m, data_hash, split, cfg.eval.dtype, [int(b["block_id"]) for b in chosen])
        cache = cache_dir / f"{safe_name(m.label)}-{key}.json"
        rec, why = (None, None) if overwrite else read_cached(cache)
        if why:
            log(f"  {m.label}: cache entry {cache.name} {why}: scoring it again")
        cached = rec is not None
        if rec is None:
            t = time.time()
            model, tok = load_eval_model(m, cfg.eval.dtype, device)
            rows = block_nll(model, tok, texts, cfg.eval.batch_size, device, progress=m.label)
            del model
            gc.collect()
            rec = {**summarize(rows, domains), "kind": m.kind, "seconds": round(time.time() - t, 3),
                   "path": [str(s.path) for s in m.specs()], "per_block": per_block(rows, chosen)}
            if not all(math.isfinite(r[0]) for r in rows):
                # NaN/inf weights or logits: flagged, and written as null (results.json stays valid JSON).
                rec["non_finite"] = True
            rec[CACHE_HASH] = record_hash(rec, CACHE_HASH)
            atomic_write_json(cache, rec)
        used.append(cache)
        rec = {k: v for k, v in rec.items() if k != CACHE_HASH}
        bpb = rec["overall"].get("bpb")
        took = "(cached)" if cached else f"({rec['seconds']:.1f} s)"
        problem = model_problem(rec)
        if problem and problem[0] == "not finite":
            log(f"  {m.label}: NOT FINITE: its NLL is NaN or infinite on some blocks (check the model's weights; "
                "its figures are null in results.json)")
        elif problem:
            log(f"  {m.label}: {bpb:.4f} bits/byte, DIVERGED: {problem[1]} ({problem_fix(m.kind)}) {took}")
        else:
            log(f"  {m.label}: {bpb:.4f} bits/byte {took}")
        results[m.label] = rec

    doc = {"split": split, "corpus": str(data_cfg.corpus.path), "data_hash": data_hash, "blocks": len(chosen),
           "domains": sorted(set(domains)), "models": results}
    # The old manifest goes first: killed from here on, no manifest vouches for half-replaced results.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    atomic_write_json(out_dir / "results.json", doc)
    table = results_table(doc)
    atomic_write_bytes(out_dir / "results.md", (table + "\n").encode())
    manifest = {
        "stage": "eval", "lmfuse_version": __version__, "seconds": round(time.time() - t0, 3),
        "model_seconds": sum(r.get("seconds", 0.0) for r in results.values()),
        "models": list(results), "data_hash": data_hash, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": file_records(out_dir, ["results.json", "results.md",
                                        *sorted({str(c.relative_to(out_dir)) for c in used})]),
    }
    manifest[SELF_HASH] = manifest_hash(manifest)
    atomic_write_json(out_dir / MANIFEST, manifest)
    log(table)
    log(f"eval done in {time.time() - t0:.1f} s -> {out_dir / 'results.json'}")
    return doc


def display_label(label: str, kind: str | None) -> str:
    """How a model is named in tables and plots: the λ = 1 control says what it is."""
    if kind == "clm":
        return CONTROL if label == "clm" else f"{label} ({CONTROL})"
    return label


def _cell(m: dict | None) -> str:
    if not m:
        return "–"
    return f"{m['bpb']:.4f} ({ppl_text(m)})" if _finite(m.get("bpb")) else "not finite"


def results_table(doc: dict) -> str:
    """A Markdown table: bits per byte per domain and overall (perplexity per token in brackets);
    the best overall value of the sound models in bold. A broken model (`model_problem`) keeps its
    row, which says what is wrong with it, and a note under the table says what to do."""
    domains = doc["domains"]
    head = ["model", *domains, "overall"]
    lines = [
        f"Bits per byte on {doc['split']} blocks (lower is better; per-token perplexity in brackets, "
        "comparable only between models that share a tokenizer).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    problems = {label: model_problem(rec) for label, rec in doc["models"].items()}
    best = min((rec["overall"]["bpb"] for label, rec in doc["models"].items() if problems[label] is None),
               default=None)
    notes = []
    for label, rec in doc["models"].items():
        name = display_label(label, rec.get("kind"))
        problem = problems[label]
        cells = [f"{name}: {problem[0]}" if problem else name]
        cells += [_cell(rec["domains"].get(d)) for d in domains]
        o = rec["overall"]
        cells.append(f"**{o['bpb']:.4f}** ({ppl_text(o)})" if problem is None and o["bpb"] == best else _cell(o))
        lines.append("| " + " | ".join(cells) + " |")
        if problem:
            notes.append(f"- {name}: {problem[0]}: {problem[1]}; {problem_fix(rec.get('kind'))}.")
    return "\n".join(lines + ([""] + notes if notes else []))
