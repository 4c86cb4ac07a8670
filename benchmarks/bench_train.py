"""Step time and peak memory of a fused training step vs a plain CLM step (and a dense target).

Each variant runs in a fresh subprocess (peak memory = `resource.getrusage` max RSS on CPU,
`torch.cuda.max_memory_allocated` on GPU), on SmolLM2-135M-Instruct with synthetic inputs:
- `clm`: forward + `F.cross_entropy` on the logits (what a plain CLM trainer does) + AdamW step;
- `fused`: `fused_clm_loss` with the fused sparse targets of 3 sources × top-10 + the target
  itself (built by `lmfuse.fusion.fuse`, timed separately as `collate_s`);
- `fused_kl`: the same with the KL form of the fusion term;
- `fused_rest`: stored probabilities kept as they are, the leftover mass as a `rest` bucket
  matched by the student's mass outside the stored ids (`outside_topk: rest`);
- `fused_span`: `fused` plus the span-likelihood term (`span_weight: 0.5`);
- `fused_chunked`: `fused` with `logits_chunk_size=128`;
- `dense`: the same targets expanded to a [B, T, V] tensor, loss −Σ P log Q (the reference
  code's approach).

    python benchmarks/bench_train.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("clm", "fused", "fused_kl", "fused_rest", "fused_span", "fused_chunked", "dense")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _targets(input_ids, vocab: int, n_sources: int = 3, k: int = 10, seed: int = 0, rule: str = "renormalize"):
    """Fused sparse targets [B, T, M], rest [B, T] and span [B, T] from n_sources + target candidates."""
    import numpy as np
    import torch

    from lmfuse.fusion import FusionOptions, fuse

    rng = np.random.default_rng(seed)
    B, T = input_ids.shape
    N = n_sources + 1
    out = []
    for b in range(B):
        gold = np.append(input_ids[b, 1:].numpy(), -1)
        ids = rng.integers(0, vocab, size=(N, T, k))
        ids[:, :, 0] = np.maximum(gold, 0)
        lp = np.log(np.sort(rng.dirichlet(np.ones(k + 1), size=(N, T))[..., :k], axis=-1)[..., ::-1])
        aligned = rng.uniform(size=(N, T)) < 0.9
        span_ll = np.where(rng.uniform(size=(N, T)) < 0.8, np.log(rng.uniform(0.05, 0.9, size=(N, T))), np.nan)
        out.append(fuse(ids, lp, aligned, rng.uniform(0.5, 1.5, size=N), gold, "avgCE",
                        FusionOptions(outside_topk=rule), span_ll))
    M = max(o.ids.shape[1] for o in out)
    tid = torch.full((B, T, M), -1, dtype=torch.long)
    tp = torch.zeros((B, T, M))
    rest = torch.zeros((B, T))
    span = torch.zeros((B, T))
    for b, o in enumerate(out):
        tid[b, :, : o.ids.shape[1]] = torch.from_numpy(o.ids)
        tp[b, :, : o.probs.shape[1]] = torch.from_numpy(o.probs)
        rest[b] = torch.from_numpy(o.rest)
        span[b] = torch.from_numpy(o.span)
    return tid, tp, rest, span


def run_variant(variant: str, model_dir: str, batch: int, seq: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from lmfuse.loss import fused_clm_loss

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    model.train()
    V = model.get_output_embeddings().weight.shape[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    input_ids = torch.randint(0, V, (batch, seq))
    labels = torch.cat([input_ids[:, 1:], torch.full((batch, 1), -100)], 1)
    mask = labels != -100
    t0 = time.perf_counter()
    rule = "rest" if variant == "fused_rest" else "renormalize"
    tid, tp, rest, span = _targets(input_ids, V, rule=rule) if variant != "clm" else (None,) * 4
    collate_s = time.perf_counter() - t0
    input_ids, labels, mask = input_ids.to(dev), labels.to(dev), mask.to(dev)
    if tid is not None:
        tid, tp, rest, span = tid.to(dev), tp.to(dev), rest.to(dev), span.to(dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            logits = model(input_ids=input_ids).logits
            if variant == "clm":
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            elif variant.startswith("fused"):
                loss, _, _, _ = fused_clm_loss(
                    logits, labels, tid, tp, mask, 0.9, "kl" if variant == "fused_kl" else "ce",
                    128 if variant == "fused_chunked" else None,
                    target_rest=rest if variant == "fused_rest" else None,
                    span_target=span if variant == "fused_span" else None,
                    span_weight=0.5 if variant == "fused_span" else 0.0)
            else:  # dense [B, T, V] target, as the reference code builds it
                dense = torch.zeros(logits.shape, dtype=torch.float32, device=dev)
                dense.scatter_add_(-1, tid.clamp_min(0), tp * (tid >= 0))
                logp = torch.log_softmax(logits.float(), -1)
                clm = F.nll_loss(logp.flatten(0, 1), labels.flatten(), ignore_index=-100)
                fus = -(dense * logp).sum(-1)[mask].mean()
                loss = 0.9 * clm + 0.1 * fus
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: allocates the optimizer state
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mib()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else _rss_mib()
    return {"variant": variant, "device": dev, "step_s": statistics.median(times), "peak_mib": peak,
            "rss_before_mib": rss0, "collate_s": collate_s, "targets_per_pos": 0 if tid is None else tid.shape[-1]}


def loss_only(seq: int, vocab: int = 49152, reps: int = 10) -> dict[str, float]:
    """Seconds for the loss alone (forward + backward on fixed fp32 logits [1, seq, vocab]), median of `reps`.

    The whole training step is dominated by the model (and noisy on a shared machine); this
    isolates what each loss adds over `F.cross_entropy`.
    """
    import torch
    import torch.nn.functional as F

    from lmfuse.loss import fused_clm_loss

    torch.manual_seed(0)
    base = torch.randn(1, seq, vocab)
    input_ids = torch.randint(0, vocab, (1, seq))
    labels = torch.cat([input_ids[:, 1:], torch.full((1, 1), -100)], 1)
    mask = labels != -100
    out = {}
    for v in VARIANTS:
        if v == "dense":
            continue
        tid, tp, rest, span = _targets(input_ids, vocab, rule="rest" if v == "fused_rest" else "renormalize") \
            if v != "clm" else (None,) * 4
        times = []
        for _ in range(reps + 1):
            x = base.clone().requires_grad_(True)
            t = time.perf_counter()
            if v == "clm":
                loss = F.cross_entropy(x.flatten(0, 1), labels.flatten(), ignore_index=-100)
            else:
                loss = fused_clm_loss(x, labels, tid, tp, mask, 0.9, "kl" if v == "fused_kl" else "ce",
                                      128 if v == "fused_chunked" else None,
                                      target_rest=rest if v == "fused_rest" else None,
                                      span_target=span if v == "fused_span" else None,
                                      span_weight=0.5 if v == "fused_span" else 0.0)[0]
            loss.backward()
            times.append(time.perf_counter() - t)
        out[v] = statistics.median(times[1:])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short sequences, 2 timed steps")
    ap.add_argument("--json", help="write a flat {name: value} object here")
    ap.add_argument("--model", help="HF model dir (default: pull smollm2-135m-instruct)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    seq = a.seq or (128 if a.quick else 512)
    steps = a.steps or (2 if a.quick else 5)
    if a.model is None:
        from lmfuse.models import pull

        a.model = str(pull("smollm2-135m-instruct"))
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.model, a.batch, seq, steps)))
        return
    res = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", v, "--model", a.model, "--batch", str(a.batch),
               "--seq", str(seq), "--steps", str(steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        res[v] = json.loads(out.strip().splitlines()[-1])
    base = res["clm"]
    flat = {"device": base["device"], "batch": a.batch, "seq": seq, "steps": steps,
            "clm_step_s": base["step_s"], "clm_peak_mib": base["peak_mib"]}
    print(f"SmolLM2-135M, B={a.batch}, T={seq}, device={base['device']}, median of {steps} steps")
    print(f"{'variant':>14} {'step s':>8} {'time x':>7} {'peak MiB':>9} {'mem x':>6} {'collate s':>9}")
    for v in VARIANTS:
        r = res[v]
        tx, mx = r["step_s"] / base["step_s"], r["peak_mib"] / base["peak_mib"]
        print(f"{v:>14} {r['step_s']:8.3f} {tx:7.3f} {r['peak_mib']:9.0f} {mx:6.3f} {r['collate_s']:9.3f}")
        if v != "clm":
            flat.update({f"{v}_step_s": r["step_s"], f"{v}_peak_mib": r["peak_mib"], f"{v}_time_ratio": tx,
                         f"{v}_mem_ratio": mx, f"{v}_collate_s": r["collate_s"]})
    lo = loss_only(seq, reps=4 if a.quick else 10)
    print(f"\nloss alone (forward + backward on fixed logits [1, {seq}, 49152]), median:")
    print(f"{'variant':>14} {'loss s':>8} {'time x':>7}")
    for v, t in lo.items():
        print(f"{v:>14} {t:8.4f} {t / lo['clm']:7.3f}")
        flat[f"loss_only_{v}_s"] = t
        flat[f"loss_only_{v}_ratio"] = t / lo["clm"]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(flat, f, indent=2)


if __name__ == "__main__":
    main()
