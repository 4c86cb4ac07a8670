"""Models wider than their tokenizers (issue 26, item 1).

Every Qwen model has more output rows than tokens (`config.vocab_size` 151,936, 151,646 tokens):
the padded ids stand for no text. Here a tiny model is padded the same way, with some padded
ids given the highest logits so that they surely enter a top-k or a sampled draw.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmfuse.artifacts import read_manifest
from lmfuse.config import load_config
from lmfuse.errors import LmfuseError
from lmfuse.extract import dist_arrays
from lmfuse.pipeline import artifact, run_align, run_extract, run_prepare, run_vocab_map

QUIET = {"log": lambda *a: None}
PAD = 37  # padded output rows past the tokenizer
HIGH = 3  # of them with the highest logits
SAMPLED = {"extract.distribution": "sampled", "extract.samples": 64}


def make_padded(src, out):
    """A copy of a tiny GPT-2 / GPT-NeoX model whose output is PAD ids wider than its tokenizer.

    The final layer norm's first hidden unit is made constant (weight 0, bias 1), so an output
    row (6, 0, 0, ...) gives its id a logit of 6 at every position, far above the random logits
    (about ±0.3) of the real tokens: the first HIGH padded ids lead every distribution, the others
    (zero rows, logit 0) sit among the real tokens.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    V = len(tok)
    model.resize_token_embeddings(V + PAD)
    base = getattr(model, model.base_model_prefix)
    norm = getattr(base, "ln_f", None) or base.final_layer_norm
    with torch.no_grad():
        norm.weight[0] = 0.0
        norm.bias[0] = 1.0
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            emb.weight[V:] = 0.0
        model.get_output_embeddings().weight[V:V + HIGH, 0] = 6.0
    assert model.get_output_embeddings().weight.shape[0] == V + PAD
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def padded_models(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("padded")
    return {k: str(make_padded(tiny_models[k], root / k)) for k in ("bpe", "wordpiece")}


def _config(make_config, tiny_models, padded_models, target_padded=False, source_padded=True, overrides=None):
    return load_config(make_config({
        "target.path": str(padded_models["bpe"] if target_padded else tiny_models["bpe"]),
        "sources": [{"name": "src_wp", "path": str(padded_models["wordpiece"] if source_padded
                                                   else tiny_models["wordpiece"]), "dtype": "float32"}],
        **(overrides or {})}))


def _vocab(path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(path))


def _stored_ids(cfg, name):
    ds = artifact(cfg, f"extract/{name}").load()
    return np.concatenate([np.asarray(r["dist_ids"], np.int64) for r in ds])


def _aligned_ids(cfg, name):
    ds = artifact(cfg, f"align/{name}").load()
    return np.concatenate([np.asarray(r["topk_ids"], np.int64) for r in ds])


def _write_wide_extraction(cfg, name):
    """extract/<name> as lmfuse wrote it before padded ids were left out: the distributions
    over the model's whole output (top-k and draws hold padded ids)."""
    from lmfuse.artifacts import load_complete
    from lmfuse.extract import extract_shard
    from lmfuse.models import load_model, load_tokenizer, tokenizer_fingerprint

    spec, opts = cfg.model(name), cfg.extract
    tok, model = load_tokenizer(spec), load_model(spec, device="cpu")
    width = model.get_output_embeddings().weight.shape[0]
    blocks = load_complete(cfg.run_dir / "prepare", "prepare")
    S = opts.shard_size
    n_shards = -(-len(blocks) // S)
    art = artifact(cfg, f"extract/{name}")
    art.begin(log=QUIET["log"])
    for i in range(n_shards):
        rows = blocks[i * S:(i + 1) * S]
        table, _ = extract_shard(model, tok, rows["block_id"], rows["text"], opts, "cpu", name,
                                 domains=rows["domain"], n_ids=width)
        art.write_shard(i, table)
    form = {"samples": opts.samples, "seed": opts.seed} if opts.distribution == "sampled" else {"top_k": opts.top_k}
    art.finish(distribution=opts.distribution, **form, shard_size=S, n_shards=n_shards, n_blocks=len(blocks),
               tokenizer_fingerprint=tokenizer_fingerprint(tok), vocab_size=len(tok))


@pytest.mark.parametrize("overrides", [{}, SAMPLED], ids=["topk", "sampled"])
def test_padded_source_aligns(make_config, tiny_models, padded_models, overrides):
    """Before the fix: IndexError in `align` (a padded id indexed the source-sized `exact` array)."""
    cfg = _config(make_config, tiny_models, padded_models, overrides=overrides)
    V_src, V_tgt = _vocab(padded_models["wordpiece"]), _vocab(tiny_models["bpe"])
    run_prepare(cfg, **QUIET)
    ext = {n: run_extract(cfg, n, progress=False, **QUIET) for n in ("tgt", "src_wp")}
    run_vocab_map(cfg, "src_wp", **QUIET)
    logs = []
    m = run_align(cfg, "src_wp", log=logs.append)
    # The extraction stores only ids the tokenizer knows, and says how much mass the rest had.
    assert _stored_ids(cfg, "src_wp").max() < V_src
    assert ext["src_wp"]["padded_mass"] > 0.5 and ext["tgt"]["padded_mass"] == 0
    assert ext["src_wp"]["mass_kept"] < 1 - ext["src_wp"]["padded_mass"] + 1e-3
    assert ext["src_wp"]["diagnostics_per_domain"]["prose"]["padded_mass"] > 0.5
    ids = _aligned_ids(cfg, "src_wp")
    assert 0 <= ids.max() < V_tgt
    assert m["source_padded_mass"] == ext["src_wp"]["padded_mass"]
    assert m["diagnostics"]["padded_candidates"] == 0 and m["padded_mass_fraction"] == 0  # nothing padded stored
    assert any("padded output ids" in line and "left out" in line for line in logs)


@pytest.mark.parametrize("overrides", [{}, SAMPLED], ids=["topk", "sampled"])
def test_padded_ids_stored_in_an_extraction_are_mass_on_no_token(make_config, tiny_models, padded_models,
                                                                  overrides):
    """An extraction that holds padded ids (made before they were left out): align drops them like
    unmapped ids (their mass stays outside the stored candidates, for `train.outside_topk`) and
    counts them."""
    cfg = _config(make_config, tiny_models, padded_models, overrides=overrides)
    V_src, V_tgt = _vocab(padded_models["wordpiece"]), _vocab(tiny_models["bpe"])
    run_prepare(cfg, **QUIET)
    run_extract(cfg, "tgt", progress=False, **QUIET)
    _write_wide_extraction(cfg, "src_wp")
    stored = _stored_ids(cfg, "src_wp")
    assert (stored >= V_src).mean() > 0.2  # padded ids lead the distributions
    run_vocab_map(cfg, "src_wp", **QUIET)
    logs = []
    m = run_align(cfg, "src_wp", log=logs.append)
    d = m["diagnostics"]
    assert d["padded_candidates"] > 0 and 0.5 < d["padded_mass"] < 1
    assert d["mapped_mass"] <= 1 - d["padded_mass"] + 1e-6  # padded mass is never mapped
    assert m["padded_candidates"] == d["padded_candidates"] and m["padded_mass_fraction"] == d["padded_mass"]
    assert all("padded_mass" in v for v in m["diagnostics_per_domain"].values())
    assert any("padded" in line and "candidates" in line for line in logs)
    ids = _aligned_ids(cfg, "src_wp")
    assert ids.max() < V_tgt
    # Not renormalised: at each aligned position the mapped mass is at most the non-padded mass.
    al, ext = artifact(cfg, "align/src_wp").load(), artifact(cfg, "extract/src_wp").load()
    for a in al:
        T = len(a["aligned"])
        p = np.exp(np.asarray(a["topk_logprobs"], np.float64).reshape(T, -1))
        assert np.all(p.sum(1) <= 1 - 0.5 + 1e-2)  # the HIGH padded ids alone hold > 0.5 everywhere
    assert len(al) == len(ext)


@pytest.mark.parametrize("overrides", [{}, SAMPLED], ids=["topk", "sampled"])
def test_padded_target(make_config, tiny_models, padded_models, overrides):
    """A padded target: its own distribution (a candidate with `train.include_target`) and the
    vocab map's range hold only ids its tokenizer knows."""
    from lmfuse.fusion import FusionOptions
    from lmfuse.traindata import BlockData, FusedCollator
    from lmfuse.vocabmap import load_vocab_map

    cfg = _config(make_config, tiny_models, padded_models, target_padded=True,
                  overrides={**overrides, "train.include_target": True, "train.outside_topk": "rest"})
    V_tgt = _vocab(padded_models["bpe"])
    run_prepare(cfg, **QUIET)
    ext = run_extract(cfg, "tgt", progress=False, **QUIET)
    run_extract(cfg, "src_wp", progress=False, **QUIET)
    assert _stored_ids(cfg, "tgt").max() < V_tgt and ext["padded_mass"] > 0.5
    run_vocab_map(cfg, "src_wp", **QUIET)
    vmap, _, _ = load_vocab_map(cfg, "src_wp")
    assert vmap.max() < V_tgt
    run_align(cfg, "src_wp", **QUIET)
    assert _aligned_ids(cfg, "src_wp").max() < V_tgt
    data = BlockData(cfg, control=False)
    width = V_tgt + PAD
    collate = FusedCollator("minCE", FusionOptions(outside_topk="rest"), vocab_size=width)
    items = [data.block(b) for b in data.train_ids[:4]]
    for it in items:
        own = it["candidates"][0]  # the target's own distribution comes first
        T = len(it["input_ids"])
        ids, lps = dist_arrays(artifact(cfg, "extract/tgt").load()[data.tgt_rows[it["block_id"]]], T)
        assert own.ids.max() < V_tgt and np.array_equal(own.ids, ids)
    batch = collate(items)
    assert int(batch["target_ids"].max()) < V_tgt
    if not overrides:  # topk: the padded mass stays outside the stored ids (the `rest` bucket)
        assert float(batch["target_rest"].max()) > 0.5


def test_load_vocab_map_refuses_target_ids_outside_the_target_tokenizer(make_config, tiny_models, padded_models):
    from lmfuse.vocabmap import load_vocab_map

    cfg = _config(make_config, tiny_models, padded_models)
    run_vocab_map(cfg, "src_wp", **QUIET)
    path = cfg.run_dir / "vocab_map" / "src_wp"
    with np.load(path / "map.npz") as z:
        tgt_id, how = z["tgt_id"].copy(), z["how"]
    tgt_id[5] = read_manifest(path)["target_vocab_size"] + 3  # a padded target id
    np.savez(path / "map.npz", tgt_id=tgt_id, how=how)
    with pytest.raises(LmfuseError, match="outside the target's vocabulary"):
        load_vocab_map(cfg, "src_wp")


def test_map_topk_drops_and_counts_ids_past_the_vocab_map():
    from lmfuse.align import PADDED_STAT, map_topk

    vmap = np.array([10, 11, -1], dtype=np.int32)
    ids = np.array([[0, 3, 1, 2], [7, 0, -1, -1]])
    lp = np.log(np.array([[0.4, 0.3, 0.2, 0.1], [0.5, 0.2, 1.0, 1.0]]))
    lp[1, 2:] = -np.inf
    out_ids, out_lp, st = map_topk(ids, lp, np.array([0, 1]), vmap)
    assert out_ids.tolist() == [[10, 11, -1, -1], [10, -1, -1, -1]]
    p = np.exp(out_lp.astype(np.float64))
    assert np.allclose(p[0, :2], [0.4, 0.2], atol=2e-3) and np.allclose(p[1, 0], 0.2, atol=2e-3)  # not renormalised
    assert np.allclose(st[:, 0], [1.0, 0.7]) and np.allclose(st[:, 1], [0.6, 0.2])  # stored, mapped
    assert np.allclose(st[:, PADDED_STAT], [0.3, 0.5])


def test_extraction_functions_leave_padded_ids_out_of_the_stored_ids_but_not_of_the_log_partition():
    from lmfuse.extract import sample_from_logits, sampling_uniforms, topk_from_logits

    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[:, 40:43] += 6.0  # ids 40..49 are padded, three of them lead
    ids = torch.arange(6)
    lse_full = torch.logsumexp(logits, -1)
    top, lp, ce, lse = topk_from_logits(logits, ids, 4, n_ids=40)
    ref_lp, ref_ids = torch.log_softmax(logits, -1)[:, :40].topk(4)
    assert torch.equal(top.long(), ref_ids) and torch.allclose(lp, ref_lp, atol=1e-6)  # log-probs over all 50
    assert torch.allclose(lse, lse_full)
    u = sampling_uniforms(0, 0, 6, 500)
    masked = logits.clone()
    masked[:, 40:] = -torch.inf
    for block in (8, 7):
        draws, ce2, lse2 = sample_from_logits(logits, ids, u, block=block, n_ids=40)
        # The draws are those from the softmax over the 40 tokens, the log-partition is over all 50.
        assert torch.equal(draws, sample_from_logits(masked, ids, u, block=block)[0])
        assert int(draws.max()) < 40
        assert torch.allclose(lse2, lse_full, atol=1e-5) and torch.allclose(ce2, ce, atol=1e-5)


def test_padded_ids_in_an_earlier_target_extraction_never_reach_training(make_config, tiny_models, padded_models):
    """A padded target extracted before padded ids were left out: its own candidate (with
    `train.include_target`) drops them, as align drops a source's."""
    from lmfuse.traindata import BlockData

    cfg = _config(make_config, tiny_models, padded_models, target_padded=True,
                  overrides={"train.include_target": True})
    V_tgt = _vocab(padded_models["bpe"])
    run_prepare(cfg, **QUIET)
    _write_wide_extraction(cfg, "tgt")
    assert _stored_ids(cfg, "tgt").max() >= V_tgt  # padded ids are in the stored distributions
    run_extract(cfg, "src_wp", progress=False, **QUIET)
    run_vocab_map(cfg, "src_wp", **QUIET)
    run_align(cfg, "src_wp", **QUIET)
    data = BlockData(cfg, control=False)
    own = [data.block(b)["candidates"][0] for b in data.train_ids[:4]]
    assert all(c.ids.max() < V_tgt and np.isneginf(c.logprobs[c.ids < 0]).all() for c in own)
    assert any((c.ids >= 0).sum(1).min() > 0 for c in own)  # the tokenizer's ids are kept
