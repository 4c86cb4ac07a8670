"""`extract`: run one model over the blocks and store its sparse next-token distributions.

Per block: token ids, character offsets, a sparse next-token distribution per position and
the cross-entropy of each gold next token. The distribution is one of (`extract.distribution`):

- `topk`: the k most probable ids of the log-softmax over the full vocabulary, with their
  log-probs. Biased: the mass outside the top-k is lost.
- `sampled`: `samples` ids drawn i.i.d. from the full softmax, stored once each with their
  counts. count / samples is an unbiased estimate of the model's distribution.

Both use one CSR layout per block (`dist_len` entries per position, ids ascending within a
position); `dist_arrays` is the one reader. Shard i always holds the same blocks and the draws
depend only on (seed, block, position), so a killed run resumes, and a data-parallel run
(`accelerate launch`) writes the same bytes as one process.

Only ids the tokenizer knows are stored. A model wider than its tokenizer (every Qwen model:
151,936 output rows, 151,646 tokens) has padded output ids that stand for no text: `topk`
takes the k most probable of the tokenizer's ids (the log-probs still cover every output id,
so the padded ids' mass lies outside the stored ids, like the rest of the tail, for
`train.outside_topk`); `sampled` draws from the softmax over the tokenizer's ids (a sampled
distribution keeps no mass outside its ids). The mass on padded ids is reported (`padded_mass`).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pyarrow as pa

from lmfuse.artifacts import load_complete
from lmfuse.batches import padded_batches
from lmfuse.errors import LmfuseError
from lmfuse.fingerprint import model_fingerprint
from lmfuse.hashing import hash_obj
from lmfuse.parallel import device, rank_world
from lmfuse.stage import Build, Stage


def id_type(vocab_size: int) -> pa.DataType:
    """The narrowest Arrow type for token ids of a vocabulary (readers convert to int64)."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.int32()


def count_type(samples: int) -> pa.DataType:
    """The narrowest Arrow type for per-id draw counts out of `samples` draws."""
    return pa.uint8() if samples <= 255 else pa.uint16()


def extract_schema(distribution: str = "topk", ids: pa.DataType = pa.int32(),
                   counts: pa.DataType = pa.uint16()) -> pa.Schema:
    """The columns of one extraction shard (docs/extract.md).

    Args:
        distribution: `topk` (stores `dist_logprobs`) or `sampled` (stores `dist_counts`).
        ids: type of `dist_ids` (see `id_type`).
        counts: type of `dist_counts` (see `count_type`); unused for topk.
    """
    value = ("dist_logprobs", pa.list_(pa.float16())) if distribution == "topk" else ("dist_counts", pa.list_(counts))
    return pa.schema([
        ("block_id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("offset_start", pa.list_(pa.int32())),
        ("offset_end", pa.list_(pa.int32())),
        ("dist_len", pa.list_(pa.uint16())),  # [T] entries at each position
        ("dist_ids", pa.list_(ids)),  # [sum(dist_len)] ascending within a position
        value,  # [sum(dist_len)]
        ("token_ce", pa.list_(pa.float32())),
        ("seq_ce", pa.float32()),
        ("nll_sum", pa.float64()),
        ("scored_bytes", pa.int64()),
    ])


SCHEMA = extract_schema("topk")


def topk_from_logits(logits, input_ids, k: int, chunk: int = 8, n_ids: int | None = None):
    """Top-k log-probabilities and gold-token cross-entropy from raw logits.

    The log-softmax is taken over the full vocabulary in fp32 (whatever the logits' dtype)
    before the top-k, so the stored log-probs are true log-probabilities. Positions are done
    `chunk` at a time so that the fp32 copy stays in cache: at a 262k vocabulary this is about
    1.7x faster than one pass over the whole `[T, V]` block.

    Args:
        logits: [T, V] logits of one sequence (any float dtype).
        input_ids: [T] token ids of the sequence.
        k: how many entries to keep per position.
        chunk: positions per step.
        n_ids: the top-k is taken among ids < n_ids only (the tokenizer's ids of a model whose
            output is wider); the log-softmax still covers all V. None = all ids.

    Returns:
        topk_ids [T, k] int32, topk_logprobs [T, k] float32, token_ce [T-1] float32
        (token_ce[i] = -log p(input_ids[i+1] | ..i)), and lse [T] float32 (the log-partition,
        non-finite exactly when the position's logits hold a NaN or +inf, or are all -inf).
    """
    import torch

    T = logits.shape[0]
    n = logits.shape[-1] if n_ids is None else min(int(n_ids), logits.shape[-1])
    k = min(k, n)
    dev = logits.device
    ids = torch.empty((T, k), dtype=torch.int32, device=dev)
    lps = torch.empty((T, k), dtype=torch.float32, device=dev)
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    gold_logit = torch.empty(max(T - 1, 0), dtype=torch.float32, device=dev)
    nxt = input_ids[1:].long().to(dev)
    for s in range(0, T, chunk):
        f = logits[s:s + chunk].float()  # (c, V)
        z = torch.logsumexp(f, dim=-1)
        val, idx = torch.topk(f[:, :n], k=k, dim=-1)
        lse[s:s + chunk] = z
        ids[s:s + chunk] = idx.to(torch.int32)
        lps[s:s + chunk] = val - z[:, None]
        e = min(s + chunk, T - 1)
        if e > s:
            gold_logit[s:e] = f[: e - s].gather(-1, nxt[s:e, None]).squeeze(-1)
    token_ce = lse[:-1] - gold_logit
    return ids, lps, token_ce, lse


def sampling_uniforms(seed: int, block_id: int, T: int, n: int) -> np.ndarray:
    """The uniforms behind a block's draws, sorted within each position.

    Row t is the stream's values t*n .. (t+1)*n - 1 of `default_rng([seed, block_id])`, so
    it depends on (seed, block, position) only, never on T, batching or sharding.

    Returns:
        float64 [T, n] in [0, 1), ascending along each row (sorted draws come out as
        ascending ids, already grouped for counting).
    """
    u = np.random.default_rng([seed, block_id]).random((T, n))
    u.sort(axis=1)
    return u


def sample_from_logits(logits, input_ids, uniforms, chunk: int | None = None, block: int = 64,
                       n_ids: int | None = None):
    """Draw ids from the full softmax by inverse CDF; also the gold-token cross-entropy.

    Two-level inverse CDF, `chunk` positions at a time (a [T, V] fp32 copy never exists
    whole): the fp32 copy of the logits becomes, in place, exp(logit - max); its sums over
    `block` consecutive ids give a short CDF over blocks (float64) whose total yields the
    log-partition (no separate logsumexp pass); a draw u picks the block holding u * total,
    then the id within that block by a cumulative sum of that block alone. This avoids a
    sequential cumulative sum over all V ids (1.3x faster at V = 49k, 1.6x at 262k on CPU;
    16 positions and 64-id blocks were fastest at both), and resolves the residual within a
    block relative to the block's mass rather than the total's, so ids far below fp32's
    resolution of the total are still drawn at their rate. Ids of zero probability are never
    drawn (their CDF step is empty).

    Args:
        logits: [T, V] logits of one sequence (any float dtype; not modified).
        input_ids: [T] token ids of the sequence.
        uniforms: [T, n] float64 in [0, 1) (see `sampling_uniforms`), ascending per row.
        chunk: positions per step; default 16, or more for a small vocabulary (about 2^20
            logits per step) so that per-step overhead does not dominate.
        block: ids per block of the first level.
        n_ids: draw only ids < n_ids (the tokenizer's ids of a model whose output is wider),
            from the softmax over them; the log-partition still covers all V. None = all ids.

    Returns:
        draws [T, n] int64 (non-decreasing per row when the uniforms are), token_ce [T-1]
        float32, lse [T] float32 (non-finite exactly when the position's logits hold a NaN
        or +inf, or are all -inf; the draws of such a position are meaningless but in range).
    """
    import torch

    T, width = logits.shape
    V = width if n_ids is None else min(int(n_ids), width)  # the ids that may be drawn
    chunk = chunk or max(16, (1 << 20) // max(V, 1))
    dev = logits.device
    u = torch.as_tensor(uniforms, dtype=torch.float64).to(dev)
    n = u.shape[1]
    nb = -(-V // block)
    draws = torch.empty((T, n), dtype=torch.int64, device=dev)
    lse = torch.empty(T, dtype=torch.float32, device=dev)
    nxt = input_ids[1:].long().to(dev)
    gold_logit = logits[:-1].gather(-1, nxt[:, None]).squeeze(-1).float() if T > 1 else lse[:0]
    # One reused buffer; ids past V (padding to whole blocks) stay at probability 0.
    buf = torch.zeros((min(chunk, T), nb * block), dtype=torch.float32, device=dev)
    rows = torch.arange(min(chunk, T), device=dev)[:, None]
    for s in range(0, T, chunk):
        c = min(chunk, T - s)
        e = buf[:c, :V]
        e.copy_(logits[s:s + c, :V])
        m = e.amax(dim=-1, keepdim=True)  # NaN propagates
        e.sub_(m).exp_()
        eb = buf[:c].view(c, nb, block)
        cdf = eb.sum(dim=-1).double().cumsum_(dim=-1)  # (c, nb) over blocks
        total = cdf[:, -1:]
        lse[s:s + c] = (m + total.log().float()).squeeze(-1)
        if width > V:  # the ids that are never drawn still count in the log-partition
            lse[s:s + c] = torch.logaddexp(lse[s:s + c], torch.logsumexp(logits[s:s + c, V:].float(), dim=-1))
        x = u[s:s + c] * total  # (c, n) float64
        # Rounding must not push a draw onto the total itself (that would fall past the last id).
        x = torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))
        blk = torch.searchsorted(cdf, x, right=True).clamp_(max=nb - 1)  # (c, n)
        base = torch.where(blk > 0, cdf.gather(-1, (blk - 1).clamp(min=0)), torch.zeros_like(x))
        local = eb[rows[:c], blk].cumsum_(dim=-1)  # (c, n, block): each drawn block's own CDF
        # x >= base, so the residual is >= 0; fp32 sums may round the block's total below it.
        r = torch.minimum((x - base).float(), torch.nextafter(local[..., -1], torch.zeros_like(local[..., -1])))
        within = torch.searchsorted(local, r[..., None], right=True).squeeze(-1).clamp_(max=block - 1)
        draws[s:s + c] = (blk * block + within).clamp_(max=V - 1)  # only a NaN row can point past V
    token_ce = lse[:-1] - gold_logit
    return draws, token_ce, lse


def count_draws(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted draws per position -> the distinct ids and how often each was drawn (CSR).

    Args:
        draws: int [T, n], non-decreasing along each row.

    Returns:
        dist_len [T] int64 (distinct ids per position), ids [N] int64 (ascending within a
        position) and counts [N] int64, N = dist_len.sum().
    """
    T, n = draws.shape
    new = np.ones((T, n), dtype=bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]  # a run of equal ids never crosses a row
    starts = np.flatnonzero(new.ravel())
    counts = np.diff(np.append(starts, T * n))
    return new.sum(axis=1), draws.ravel()[starts].astype(np.int64), counts


def position_diagnostics(logits, lse, ids, gold):
    """How much of the model's distribution the stored ids keep, per position.

    Args:
        logits: [T, V] raw logits (any float dtype).
        lse: [T] float32 log-partition of each position.
        ids: [T, K] int stored ids; -1 = padding; repeated ids count once.
        gold: [T] int gold next token; -1 where there is none (the last position).

    Returns:
        mass [T] float32 (sum of the exact model probabilities of the distinct stored ids),
        gold_in [T] bool (the gold token is among them; False where gold is -1) and
        entries [T] int64 (distinct stored ids).
    """
    import torch

    srt = ids.long().sort(dim=-1).values
    valid = srt >= 0
    valid[:, 1:] &= srt[:, 1:] != srt[:, :-1]
    lp = logits.gather(-1, srt.clamp(min=0)).float() - lse[:, None]
    mass = torch.where(valid, lp.exp(), torch.zeros_like(lp)).sum(-1)
    gold_in = ((srt == gold[:, None].long()) & valid).any(-1) & (gold >= 0)
    return mass, gold_in, valid.sum(-1)


def dist_arrays(row: dict, T: int) -> tuple[np.ndarray, np.ndarray]:
    """One extracted block's stored next-token distributions as padded arrays.

    The one reader of the stored distribution columns, so `align` and `train` do not depend on
    how `extract` stores them. For `sampled` the log-prob of an id is log(count / draws at
    its position), the empirical distribution (sums to 1, unbiased for the model's).

    Args:
        row: one block of an extraction (column name -> array or list).
        T: the block's number of positions (tokens).

    Returns:
        ids int64 [T, K] (-1 = padding) and logprobs float32 [T, K] (-inf at padding);
        K = the most entries at one position of this block.
    """
    where = f"block {row.get('block_id', '?')}"
    fix = "rerun `lmfuse extract` with --overwrite"
    if "dist_len" not in row:
        if "topk_ids" in row:  # fixed-k layout of earlier versions: [T*k] each
            ids = np.asarray(row["topk_ids"], dtype=np.int64)
            lp = np.asarray(row["topk_logprobs"], dtype=np.float32)
            if T <= 0 or len(ids) % T or len(lp) != len(ids):
                raise LmfuseError(f"distribution arrays of length {len(ids)}/{len(lp)} do not fit {T} positions",
                                  where=where, fix=fix)
            return ids.reshape(T, -1), lp.reshape(T, -1)
        raise LmfuseError("the row holds no stored distribution (no `dist_len` column)", where=where, fix=fix)
    n = np.asarray(row["dist_len"], dtype=np.int64)
    ids = np.asarray(row["dist_ids"], dtype=np.int64)
    counts = "dist_counts" in row
    vals = np.asarray(row["dist_counts" if counts else "dist_logprobs"], dtype=np.float64 if counts else np.float32)
    if len(n) != T or int(n.sum()) != len(ids) or len(vals) != len(ids):
        raise LmfuseError(f"distribution arrays ({len(n)} lengths summing to {int(n.sum())}, {len(ids)} ids, "
                          f"{len(vals)} values) do not fit {T} positions", where=where, fix=fix)
    K = int(n.max()) if T else 0
    pos = np.repeat(np.arange(T), n)  # [N] position of each entry
    col = np.arange(len(ids)) - np.repeat(np.cumsum(n) - n, n)  # [N] its slot within the position
    out_ids = np.full((T, K), -1, dtype=np.int64)
    out_lp = np.full((T, K), -np.inf, dtype=np.float32)
    out_ids[pos, col] = ids
    if counts:
        draws = np.bincount(pos, weights=vals, minlength=T)
        out_lp[pos, col] = np.log(vals / draws[pos])
    else:
        out_lp[pos, col] = vals
    return out_ids, out_lp


def encode_blocks(tok, texts: list[str]) -> list[dict]:
    """Tokenize blocks with the tokenizer's own special tokens and normalized offsets.

    Special-token strings in the text (`<|endoftext|>`, ...) are split as plain text, never stored
    as control ids. Special tokens the tokenizer adds (BOS, EOS, ...) get the offset `(e, e)` of
    the text end before them, so `offset_end` never decreases; `special` says which they are
    (the tokenizer's special-tokens mask, not stored: `align.added_special` finds them again from
    the ids and offsets).
    """
    from lmfuse.models import encode_text

    # Special-token strings written in the text are text (`models.encode_text`), as `prepare` measured them.
    enc = encode_text(tok, texts, return_offsets_mapping=True, return_special_tokens_mask=True)
    out = []
    for ids, offs, special in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]):
        starts, ends, e = [], [], 0
        for (s, t), sp in zip(offs, special):
            if sp:
                s = t = e
            starts.append(s)
            ends.append(t)
            e = max(e, t)
        out.append({"input_ids": ids, "offset_start": starts, "offset_end": ends, "special": list(special)})
    return out


def text_predictions(special) -> np.ndarray:
    """bool [T-1]: which next-token predictions of a block predict text.

    Prediction i predicts token i+1; it counts (in `nll_sum`, `seq_ce`, eval's bits per byte) only
    when that token is text, not a special token the tokenizer added (EOS after the text, ...).
    Corpus text is encoded with its special-token strings split (`models.encode_text`), so every
    special token in a block's ids was added by the tokenizer.

    Args:
        special: [T] the tokenizer's special-tokens mask of the block (1 = added special token).
    """
    return np.asarray(special, dtype=bool)[1:] == 0


def appends_special_token(tok) -> bool:
    """Whether the tokenizer adds a special token after the text (EOS, SEP, ...).

    Only for such a tokenizer does counting text predictions only (`text_predictions`) change
    what `extract` stores, so only its extraction key names the rule (`ExtractStage.config_hash`).
    """
    from lmfuse.models import encode_text

    mask = encode_text(tok, ["a"], return_special_tokens_mask=True)["special_tokens_mask"][0]
    return len(mask) > 0 and bool(mask[-1])


# Named in the extraction key of a model whose tokenizer adds a special token after the text: its
# `nll_sum` and `seq_ce` count text predictions only (issue 26); extractions made before count the
# prediction of that token too and must not be reused. Other models' keys do not change.
TEXT_ONLY_RULE = "nll over text predictions only"
_APPENDS: dict[str, bool] = {}


def tokenizer_appends_special(spec) -> bool:
    """`appends_special_token` of a model entry's tokenizer, probed once per tokenizer.

    Keys are computed by every command, and loading a large tokenizer takes seconds (Gemma-3's:
    about 5 s on 2 CPU cores), so the answer is remembered by the content fingerprint of the
    tokenizer's files and the `transformers`/`tokenizers` versions: in memory, and for local
    files under `$LMFUSE_HOME/tokenizer_probes/` (a hub id has no local files to fingerprint: in
    memory only). A tokenizer that cannot be loaded (a hub model offline, a path that is gone)
    counts as one that does not append: no extraction can be made then, and the model's
    fingerprint changed anyway.
    """
    import os
    from importlib.metadata import version
    from pathlib import Path

    from lmfuse.hashing import cache_home

    local = spec.path.startswith("pull:") or Path(spec.path).expanduser().exists()
    key = hash_obj(["appends special", model_fingerprint(spec, tokenizer_only=True), spec.trust_remote_code,
                    version("transformers"), version("tokenizers")] + ([] if local else [spec.path, spec.revision]))
    if key in _APPENDS:
        return _APPENDS[key]
    entry = cache_home() / "tokenizer_probes" / f"{key}.txt"
    if local:
        try:
            _APPENDS[key] = {"1": True, "0": False}[entry.read_text().strip()]
            return _APPENDS[key]
        except (OSError, KeyError):
            pass
    from lmfuse.models import load_tokenizer

    try:
        found = appends_special_token(load_tokenizer(spec))
    except Exception:  # noqa: BLE001 (see the docstring)
        return False
    _APPENDS[key] = found
    if local:
        try:  # it only saves time: a cache that cannot be written is skipped
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
            tmp.write_text("1\n" if found else "0\n")
            os.replace(tmp, entry)
        except OSError:
            pass
    return found


def list_array(rows: list[np.ndarray], typ) -> pa.Array:
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(rows) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ))


STAT_KEYS = ("positions", "gold_positions", "mass", "gold_in", "entries", "padded_mass")


def _add_stats(acc: dict, other: dict) -> None:
    for key in STAT_KEYS:
        acc[key] = acc.get(key, 0) + other.get(key, 0)
    acc["max_entries"] = max(acc.get("max_entries", 0), other.get("max_entries", 0))


def summarize_stats(st: dict) -> dict:
    """Summed per-position diagnostics -> means: mass kept, share of gold tokens stored, entries,
    mass on padded output ids (past the tokenizer; never stored)."""
    return {
        "mass_kept": round(st.get("mass", 0.0) / max(st.get("positions", 0), 1), 6),
        "padded_mass": round(st.get("padded_mass", 0.0) / max(st.get("positions", 0), 1), 6),
        "gold_in_stored_fraction": round(st.get("gold_in", 0) / max(st.get("gold_positions", 0), 1), 6),
        "entries_per_position": round(st.get("entries", 0) / max(st.get("positions", 0), 1), 3),
        "positions": int(st.get("positions", 0)),
    }


def extract_shard(model, tok, block_ids: list[int], texts: list[str], opts, dev: str, model_name: str = "model",
                  on_tokens=None, domains: list[str] | None = None, n_ids: int | None = None) -> tuple[pa.Table, dict]:
    """Extract one shard of blocks; rows in the order of `block_ids`.

    Args:
        opts: the `ExtractConfig` (distribution, top_k / samples and seed, batch_size).
        domains: each block's domain, for the per-domain diagnostics.
        n_ids: only ids < n_ids are stored; default `len(tok)`: a model's padded output ids
            (past its tokenizer) stand for no text (module docstring).

    `token_ce` holds the CE of every next token; `nll_sum` and `seq_ce` (the block's sum and mean)
    count the predictions of text only (`text_predictions`: not of an EOS the tokenizer appended).

    Returns:
        The shard's table (`extract_schema`) and its diagnostics: sums over positions of the
        stored probability mass, gold tokens among the stored ids, entries and the mass on
        padded ids (`STAT_KEYS`), the largest entry count, and the same per domain under
        `domains`, plus `nll_sum` and `scored_bytes`.
    """
    import torch

    sampled = opts.distribution == "sampled"
    encs = encode_blocks(tok, texts)
    results: dict[int, dict] = {}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_tok = len(tok)
    n_ids = n_tok if n_ids is None else n_ids
    vocab = 0
    for idx, lens, ids, mask in padded_batches([e["input_ids"] for e in encs], opts.batch_size, pad):
        with torch.inference_mode():
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        vocab = logits.shape[-1]
        for r, i in enumerate(idx):
            lg, seq = logits[r, : lens[r]], ids[r, : lens[r]]
            if sampled:
                u = sampling_uniforms(opts.seed, int(block_ids[i]), lens[r], opts.samples)
                stored, ce, lse = sample_from_logits(lg, seq, u, n_ids=n_ids)
            else:
                stored, lps, ce, lse = topk_from_logits(lg, seq, opts.top_k, n_ids=n_ids)
            if not torch.isfinite(lse).all():
                bad = int((~torch.isfinite(lse)).nonzero()[0])
                raise LmfuseError(f"non-finite logits (NaN/inf) at token position {bad}",
                                  where=f"model {model_name}, block {block_ids[i]}",
                                  fix="run this model in float32 (dtype: float32) or check its weights")
            gold = torch.cat([seq[1:], seq.new_full((1,), -1)]).to(lg.device)
            mass, gold_in, entries = position_diagnostics(lg, lse, stored, gold)
            padded = 0.0
            if vocab > n_tok:  # the model's mass on its padded output ids
                padded = float(torch.exp(torch.logsumexp(lg[:, n_tok:].float(), dim=-1) - lse).double().sum())
            if sampled:
                n, dist_ids, counts = count_draws(stored.cpu().numpy())
                values = counts
            else:
                srt, perm = stored.long().sort(dim=-1)  # ids ascending within a position: compresses better
                n = np.full(lens[r], srt.shape[1], dtype=np.int64)
                dist_ids = srt.cpu().numpy().reshape(-1)
                values = lps.gather(-1, perm).cpu().numpy().astype(np.float16).reshape(-1)
            ce = ce.cpu().numpy().astype(np.float32)
            e0 = encs[i]["offset_end"][0]
            # The model's NLL of the text: predictions of tokens the tokenizer added (EOS) left out;
            # token_ce keeps every position's true CE.
            text_ce = ce[text_predictions(encs[i]["special"])]
            results[i] = {
                "dist_len": n, "dist_ids": dist_ids, "values": values, "token_ce": ce,
                "nll_sum": float(text_ce.astype(np.float64).sum()),
                "seq_ce": text_ce.mean() if len(text_ce) else 0.0,
                "scored_bytes": len(texts[i][e0:].encode("utf-8")),
                "stats": {"positions": lens[r], "gold_positions": lens[r] - 1,
                          "mass": float(mass.double().sum()), "gold_in": int(gold_in.sum()),
                          "entries": int(entries.sum()), "max_entries": int(n.max()), "padded_mass": padded},
            }
        if on_tokens:
            on_tokens(sum(lens))
    rows = range(len(texts))
    schema = extract_schema(opts.distribution, id_type(vocab), count_type(opts.samples))
    value_col = schema.names[6]
    cols = {
        "block_id": pa.array(block_ids, pa.int64()),
        "input_ids": list_array([np.asarray(encs[i]["input_ids"], np.int32) for i in rows], pa.int32()),
        "offset_start": list_array([np.asarray(encs[i]["offset_start"], np.int32) for i in rows], pa.int32()),
        "offset_end": list_array([np.asarray(encs[i]["offset_end"], np.int32) for i in rows], pa.int32()),
        "dist_len": list_array([results[i]["dist_len"] for i in rows], pa.uint16()),
        "dist_ids": list_array([results[i]["dist_ids"] for i in rows], schema.field("dist_ids").type.value_type),
        value_col: list_array([results[i]["values"] for i in rows], schema.field(value_col).type.value_type),
        "token_ce": list_array([results[i]["token_ce"] for i in rows], pa.float32()),
        "seq_ce": pa.array([results[i]["seq_ce"] for i in rows], pa.float32()),
        "nll_sum": pa.array([results[i]["nll_sum"] for i in rows], pa.float64()),
        "scored_bytes": pa.array([results[i]["scored_bytes"] for i in rows], pa.int64()),
    }
    stats: dict = {"nll_sum": 0.0, "scored_bytes": 0, "domains": {}}
    for i in rows:
        _add_stats(stats, results[i]["stats"])
        stats["nll_sum"] += results[i]["nll_sum"]
        stats["scored_bytes"] += results[i]["scored_bytes"]
        if domains is not None:
            _add_stats(stats["domains"].setdefault(str(domains[i]), {}), results[i]["stats"])
    return pa.table(cols, schema=schema), stats


class ExtractStage(Stage):
    """`extract/<model>`: one model's next-token distributions over every prepared block.

    Its hash covers the model entry, the contents of the model's weight, config and tokenizer
    files (new weights at the same path rerun it), the extract options and, for a tokenizer that
    adds a special token after the text, `TEXT_ONLY_RULE` (its `nll_sum`/`seq_ce` leave that
    token's prediction out since issue 26; every other model's key is as before); its input is
    `prepare`. Shard i holds blocks [i*shard_size, (i+1)*shard_size), whatever the number of
    processes; each shard's diagnostics are kept beside it and summed in the manifest.
    """

    kind = "extract"
    compression = "zstd"  # extract shards are the largest artifact (per-token distributions); docs/extract.md
    shard_stats = True

    def __init__(self, cfg, model_name: str, progress: bool = True):
        super().__init__(f"extract/{model_name}")
        self.cfg, self.model_name, self.progress = cfg, model_name, progress
        self.spec = cfg.model(model_name)

    def inputs(self) -> dict[str, str]:
        return {"prepare": "prepare"}

    def config_hash(self) -> str:
        parts = ["extract", self.spec.model_dump(exclude={"name"}), model_fingerprint(self.spec),
                 self.cfg.extract.model_dump()]
        if tokenizer_appends_special(self.spec):  # only its nll_sum/seq_ce changed (issue 26)
            parts.append(TEXT_ONLY_RULE)
        return hash_obj(parts)

    def derived_keys(self, key: str, input_keys: dict[str, str]) -> dict[str, str]:
        """`tokens`: the key of the token ids (and the model) behind this extraction.

        It covers what the extraction key covers except the extract options (`top_k`,
        `distribution`, ...), which change only the stored distributions. The control (λ = 1)
        reads only the target's token ids and starts from its weights, so it is keyed on this,
        and a new `top_k` leaves it current.
        """
        return {"tokens": hash_obj(["tokens", self.spec.model_dump(exclude={"name"}), model_fingerprint(self.spec),
                                    input_keys])}

    def n_shards(self, b: Build) -> int:
        b.state.update(blocks=load_complete(b.inputs["prepare"], "prepare"), t0=time.time(), n_tok=0)
        return math.ceil(len(b.state["blocks"]) / self.cfg.extract.shard_size)

    def write(self, b: Build, todo: list[int]):
        from tqdm.auto import tqdm

        from lmfuse.models import load_model, load_tokenizer

        opts, st, blocks = self.cfg.extract, b.state, b.state["blocks"]
        k, S = opts.top_k, opts.shard_size
        tok = load_tokenizer(self.spec)
        dev = device()
        model = load_model(self.spec, device=dev)
        if opts.distribution != "sampled" and k > len(tok):
            raise LmfuseError(f"top_k {k} exceeds the vocabulary size {len(tok)}", where="extract.top_k",
                              fix=f"set extract.top_k to at most {len(tok)}")
        rank = " [rank {}/{}]".format(*rank_world()) if rank_world()[1] > 1 else ""
        bar = tqdm(total=sum(min(S, len(blocks) - i * S) for i in todo), unit="block", disable=not self.progress,
                   desc=f"extract {self.model_name}{rank}")

        def on_tokens(n):
            st["n_tok"] += n
            bar.set_postfix_str(f"{st['n_tok'] / max(time.time() - st['t0'], 1e-9):,.0f} tok/s")

        for i in todo:
            rows = blocks[i * S: (i + 1) * S]
            table, stats = extract_shard(model, tok, rows["block_id"], rows["text"], opts, dev, self.model_name,
                                         on_tokens, rows["domain"])
            yield i, table, stats
            bar.update(len(rows["block_id"]))
        bar.close()

    def summary(self, b: Build, stats: list[dict]) -> dict:
        from lmfuse.models import load_tokenizer, tokenizer_fingerprint

        opts, spec, st = self.cfg.extract, self.spec, b.state
        total: dict = {}
        domains: dict[str, dict] = {}
        nll_sum, scored_bytes = 0.0, 0
        for s in stats:
            _add_stats(total, s)
            nll_sum += s.get("nll_sum", 0.0)
            scored_bytes += s.get("scored_bytes", 0)
            for d, dst in s.get("domains", {}).items():
                _add_stats(domains.setdefault(d, {}), dst)
        tok = load_tokenizer(spec)
        n_tokens = int(total.get("positions", 0))
        size = sum(p.stat().st_size for p in b.art.shard_paths())
        elapsed = time.time() - st["t0"]
        sampled = opts.distribution == "sampled"
        form = {"samples": opts.samples, "seed": opts.seed} if sampled else {"top_k": opts.top_k}
        diag = summarize_stats(total)
        return dict(
            model=self.model_name, model_path=spec.path, dtype=spec.dtype, distribution=opts.distribution, **form,
            max_entries=int(total.get("max_entries", 0)), shard_size=opts.shard_size, n_shards=len(stats),
            n_blocks=len(st["blocks"]), n_tokens=n_tokens, bytes_per_token=round(size / max(n_tokens, 1), 2),
            tokenizer_fingerprint=tokenizer_fingerprint(tok), vocab_size=len(tok),
            tokens_per_second=round(st["n_tok"] / elapsed, 1) if st["n_tok"] else None,
            mean_nll_per_byte=float(nll_sum / max(scored_bytes, 1)),
            mass_kept=diag["mass_kept"], padded_mass=diag["padded_mass"],
            gold_in_stored_fraction=diag["gold_in_stored_fraction"],
            entries_per_position=diag["entries_per_position"],
            diagnostics_per_domain={d: summarize_stats(s) for d, s in sorted(domains.items())},
        )

    def after_finish(self, b: Build, manifest: dict) -> None:
        opts = self.cfg.extract
        what = f"{opts.samples} draws" if opts.distribution == "sampled" else f"top-{opts.top_k}"
        b.log(f"extract {self.model_name} ({what}): {manifest['n_blocks']} blocks, {manifest['n_tokens']} tokens, "
              f"{manifest['bytes_per_token']} bytes on disk per token, {manifest['entries_per_position']} "
              f"entries/position keeping {manifest['mass_kept']:.1%} of the probability mass, gold token stored at "
              f"{manifest['gold_in_stored_fraction']:.1%} of positions -> {b.art.path}")
        if manifest.get("padded_mass"):
            how = "draws come from the tokenizer's ids" if opts.distribution == "sampled" else "it lies outside the top-k"
            b.log(f"  {manifest['padded_mass']:.1%} of the mass is on padded output ids past the tokenizer's "
                  f"{manifest['vocab_size']} ids: they stand for no text and are never stored ({how})")
        b.log("  per domain (mass kept, gold stored, entries/position): " + json.dumps(
            {d: [s["mass_kept"], s["gold_in_stored_fraction"], s["entries_per_position"]]
             for d, s in manifest["diagnostics_per_domain"].items()}))

