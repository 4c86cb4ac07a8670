"""Numerals and the token rule (issue 26, item 6), the measurement: where does the source's mass go at
positions whose next target token holds a digit, under `align.token_rule: map` and `consistent`?

Runs, for each pair of OUT/configs (written by data.py), prepare → extract (target, source) →
vocab-map → align with the `map` config, then align again with the `consistent` config (its run
directory links the `map` run's prepare, extractions and vocab map: same keys, nothing recomputed).
No training. Then reads the align artifacts, the target's extracted token ids and the prepared
blocks and gives per domain (`all` = every domain):

- `digit positions`: positions whose gold next target token contains an ASCII digit, as a share of
  all positions with a gold next token; `multi-digit gold`: of those, the share whose gold token
  holds two digits or more (what a digit-packing tokenizer writes);
- at aligned digit positions: the share of the stored (mapped) source mass on a token other than
  the gold token (`off-gold mass`), the part of it on a proper prefix of the gold token's text
  (`on a prefix of gold`: e.g. `2` where the target writes ` 2024`), and the share of positions
  whose most probable mapped candidate is not the gold token (`top-1 ≠ gold`);
- the same two shares at non-digit positions, as a baseline;
- align's own `not_target_token_mass` per domain (its manifest; all positions, before the rule).

    python experiments/numerals/measure.py --out runs/numerals     # --no-run: only read the artifacts

Writes OUT/numerals.json, OUT/numerals.md and OUT/measure.log (the stages' log and timings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

RULES = ("map", "consistent")
PAIRS = {
    "A": "A: Gemma-3 → SmolLM2 (both split digits)",
    "B": "B: SmolLM2 → GPT-2 tokenizer (packs digits)",
}
TINY_PAIRS = {
    "A": "A: tiny SPM → tiny BPE",
    "B": "B: tiny BPE → GPT-2 tokenizer (packs digits)",
}
ACC_KEYS = ("positions", "aligned", "mass", "off_gold", "prefix", "gold_mass", "top1_miss", "gold_stored",
            "span_n", "span_p", "span_gold")
CATS = ("digit", "multi", "nondigit")


class Log:
    """Lines to stdout and to OUT/measure.log, with the time."""

    def __init__(self, path: Path):
        self.f = path.open("a", encoding="utf-8")

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


# -- the stages ---------------------------------------------------------------------------------------
def link(path: Path, target: Path) -> None:
    """`path` a relative symbolic link to the directory `target` (a real directory there is kept)."""
    if path.exists() and not path.is_symlink():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, path.parent)
    if path.is_symlink() and os.readlink(path) == rel:
        return
    path.unlink(missing_ok=True)
    os.symlink(rel, path)


def run_stages(configs: dict[str, dict[str, Path]], log: Log) -> dict:
    """Every pair's stages through lmfuse's Python API; {pair: {stage: seconds its artifact took}}."""
    from lmfuse.config import load_config
    from lmfuse.pipeline import run_align, run_extract, run_prepare, run_vocab_map

    times: dict[str, dict[str, float]] = {}
    for pair, by_rule in configs.items():
        cfg = load_config(by_rule["map"])
        tgt, src = cfg.target.name, cfg.sources[0].name
        t = times.setdefault(pair, {})

        def timed(name: str, fn, *a, t=t, pair=pair, **kw):
            # The artifact's build time from its manifest (the same when a rerun skips it).
            t0 = time.time()
            man = fn(*a, log=log, **kw)
            t[name] = man.get("seconds", round(time.time() - t0, 1))
            log(f"pair {pair}: {name}: built in {t[name]} s (this call {time.time() - t0:.1f} s)")
            return man

        timed("prepare", run_prepare, cfg)
        for name in (tgt, src):
            man = timed(f"extract/{name}", run_extract, cfg, name, progress=False)
            log(f"pair {pair}: extract/{name}: {man.get('n_tokens', '?')} tokens")
        timed(f"vocab_map/{src}", run_vocab_map, cfg, src)
        timed("align (map)", run_align, cfg, src)
        cons = load_config(by_rule["consistent"])
        for label in ("prepare", f"extract/{tgt}", f"extract/{src}", f"vocab_map/{src}"):
            link(cons.run_dir / label, cfg.run_dir / label)
        timed("align (consistent)", run_align, cons, src)
    return times


# -- the measurement -----------------------------------------------------------------------------------
def digit_counts(cfg) -> tuple[np.ndarray, list[bytes]]:
    """int [V]: ASCII digits in each target token's bytes; and the token bytes."""
    from lmfuse.models import load_tokenizer
    from lmfuse.tokentext import token_table

    tb = token_table(load_tokenizer(cfg.target)).bytes
    return np.array([sum(48 <= c <= 57 for c in b) for b in tb], dtype=np.int64), list(tb)


def rows(cfg, label: str, columns: list[str]) -> dict[int, dict]:
    """{block_id: {column: numpy array}} of one complete artifact."""
    from lmfuse.pipeline import artifact

    ds = artifact(cfg, label).load().select_columns(["block_id", *columns]).with_format("numpy")
    return {int(r["block_id"]): r for r in ds}


def measure_run(cfg, ndig: np.ndarray, tbytes: list[bytes]) -> tuple[dict, dict]:
    """Sums of ACC_KEYS per domain and category (digit / multi / nondigit), and the align manifest."""
    from lmfuse.artifacts import read_manifest
    from lmfuse.pipeline import artifact

    src = cfg.sources[0].name
    blocks = rows(cfg, "prepare", ["domain"])
    tgt = rows(cfg, f"extract/{cfg.target.name}", ["input_ids"])
    al = rows(cfg, f"align/{src}", ["aligned", "topk_ids", "topk_logprobs", "span_nll", "span_exact"])
    manifest = read_manifest(artifact(cfg, f"align/{src}").path)
    prefix_cache: dict[tuple[int, int], bool] = {}

    def is_prefix(g: int, c: int) -> bool:
        key = (g, c)
        if key not in prefix_cache:
            gb, cb = tbytes[g], tbytes[c]
            prefix_cache[key] = 0 < len(cb) < len(gb) and gb.startswith(cb)
        return prefix_cache[key]

    acc: dict[str, dict[str, dict[str, float]]] = {}
    for bid, a in al.items():
        dom = str(blocks[bid]["domain"])
        ids_in = np.asarray(tgt[bid]["input_ids"], dtype=np.int64)
        T = len(a["aligned"])
        if len(ids_in) != T:
            raise SystemExit(f"block {bid}: align has {T} positions, the target's extraction {len(ids_in)}")
        P = T - 1
        if P <= 0:
            continue
        flat = np.asarray(a["topk_ids"], dtype=np.int64)
        k = len(flat) // T if T else 0
        ids = flat.reshape(T, k)[:P]
        lp = np.asarray(a["topk_logprobs"], dtype=np.float64).reshape(T, k)[:P]
        gold = ids_in[1:]
        aligned = np.asarray(a["aligned"], dtype=bool)[:P]
        p = np.where(ids >= 0, np.exp(np.where(ids >= 0, lp, 0.0)), 0.0)
        mass = p.sum(1)
        on_gold = ids == gold[:, None]
        gmass = (p * on_gold).sum(1)
        top1 = ids[:, 0] if k else np.full(P, -1)
        pre = np.zeros(P)
        for t in np.flatnonzero(aligned):
            g = int(gold[t])
            for r in range(k):
                c = int(ids[t, r])
                if c >= 0 and c != g and is_prefix(g, c):
                    pre[t] += p[t, r]
        sp = np.asarray(a["span_nll"], dtype=np.float64)[:P]
        se = np.asarray(a["span_exact"], dtype=bool)[:P] & np.isfinite(sp) & aligned
        nd = ndig[gold]
        for cat, sel in (("digit", nd > 0), ("multi", nd > 1), ("nondigit", nd == 0)):
            s = acc.setdefault(dom, {}).setdefault(cat, dict.fromkeys(ACC_KEYS, 0.0))
            sa = sel & aligned
            ss = sel & se
            s["positions"] += int(sel.sum())
            s["aligned"] += int(sa.sum())
            s["mass"] += float(mass[sa].sum())
            s["off_gold"] += float((mass - gmass)[sa].sum())
            s["prefix"] += float(pre[sa].sum())
            s["gold_mass"] += float(gmass[sa].sum())
            s["top1_miss"] += int((top1[sa] != gold[sa]).sum())
            s["gold_stored"] += int(on_gold[sa].any(1).sum())
            s["span_n"] += int(ss.sum())
            s["span_p"] += float(np.exp(-sp[ss]).sum())
            s["span_gold"] += float(gmass[ss].sum())
    total: dict[str, dict[str, float]] = {}
    for dom in acc.values():
        for cat, s in dom.items():
            t = total.setdefault(cat, dict.fromkeys(ACC_KEYS, 0.0))
            for key in ACC_KEYS:
                t[key] += s[key]
    acc["all"] = total
    return acc, manifest


def share(a: float, b: float) -> float:
    return a / b if b else math.nan


def figures(acc: dict, manifest: dict) -> dict:
    """The table's figures per domain from the sums."""
    out = {}
    diag_dom = {**manifest.get("diagnostics_per_domain", {}), "all": manifest.get("diagnostics", {})}
    for dom, c in acc.items():
        d, m, n = c["digit"], c["multi"], c["nondigit"]
        diag = diag_dom.get(dom, {})
        out[dom] = {
            "positions": int(d["positions"] + n["positions"]),
            "digit_positions": int(d["positions"]),
            "digit_share": share(d["positions"], d["positions"] + n["positions"]),
            "multi_digit_share": share(m["positions"], d["positions"]),
            "digit_aligned": share(d["aligned"], d["positions"]),
            "digit_off_gold_mass": share(d["off_gold"], d["mass"]),
            "digit_prefix_mass": share(d["prefix"], d["mass"]),
            "digit_top1_not_gold": share(d["top1_miss"], d["aligned"]),
            "digit_gold_stored": share(d["gold_stored"], d["aligned"]),
            "multi_off_gold_mass": share(m["off_gold"], m["mass"]),
            "multi_top1_not_gold": share(m["top1_miss"], m["aligned"]),
            "nondigit_aligned": share(n["aligned"], n["positions"]),
            "nondigit_off_gold_mass": share(n["off_gold"], n["mass"]),
            "nondigit_top1_not_gold": share(n["top1_miss"], n["aligned"]),
            "digit_span_exact_positions": int(d["span_n"]),
            "digit_mean_gold_mass_span_exact": share(d["span_gold"], d["span_n"]),
            "digit_mean_source_p_gold_text": share(d["span_p"], d["span_n"]),
            "not_target_token_mass": diag.get("not_target_token_mass", math.nan),
            "to_gold_mass": diag.get("to_gold_mass", math.nan),
            "dropped_mass": diag.get("dropped_mass", math.nan),
            "sums": c,
        }
    return out


def no_nan(obj):
    """NaN (a share of nothing) as JSON null."""
    if isinstance(obj, dict):
        return {k: no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [no_nan(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def pct(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def markdown(res: dict, names: dict[str, str]) -> str:
    doms = [d for d in next(iter(next(iter(res.values())).values())) if d != "all"] + ["all"]
    lines = [
        "| pair | rule | domain | positions | digit positions | multi-digit gold | aligned (digit) | "
        "off-gold mass (digit) | on a prefix of gold (digit) | top-1 ≠ gold (digit) | off-gold mass (non-digit) | "
        "top-1 ≠ gold (non-digit) | `not_target_token_mass` (align, all positions) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pair, by_rule in res.items():
        for rule, by_dom in by_rule.items():
            for dom in doms:
                f = by_dom[dom]
                lines.append(
                    f"| {names.get(pair, pair)} | `{rule}` | {'**all**' if dom == 'all' else dom} | {f['positions']:,} | "
                    f"{pct(f['digit_share'])} | {pct(f['multi_digit_share'])} | {pct(f['digit_aligned'])} | "
                    f"{pct(f['digit_off_gold_mass'])} | {pct(f['digit_prefix_mass'])} | {pct(f['digit_top1_not_gold'])} | "
                    f"{pct(f['nondigit_off_gold_mass'])} | {pct(f['nondigit_top1_not_gold'])} | "
                    f"{pct(f['not_target_token_mass'])} |")
    pairs = list(res)
    head = " | ".join(f"{names.get(pair, pair).split(':')[0]} `{rule}`" for pair in pairs for rule in res[pair])
    lines += [
        "",
        "Digit positions where the source scored exactly the gold token's text (`span_exact`): the mean "
        "mapped mass on the gold token under each rule, and the source's own probability of the gold "
        "token's whole text, exp(−`span_nll`), the product over its digit tokens:",
        "",
        f"| domain | positions ({' / '.join(pairs)}) | {head} | "
        + " | ".join(f"{pair}: source's P(gold text)" for pair in pairs) + " |",
        "|---|---:|" + "---:|" * (sum(len(res[p]) for p in pairs) + len(pairs)),
    ]
    for dom in doms:
        first = {pair: next(iter(res[pair].values()))[dom] for pair in pairs}
        lines.append(
            f"| {'**all**' if dom == 'all' else dom} | "
            + " / ".join(f"{first[p]['digit_span_exact_positions']:,}" for p in pairs) + " | "
            + " | ".join(f"{res[p][r][dom]['digit_mean_gold_mass_span_exact']:.3f}" for p in pairs for r in res[p])
            + " | " + " | ".join(f"{first[p]['digit_mean_source_p_gold_text']:.3f}" for p in pairs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="data.py's output directory")
    p.add_argument("--no-run", action="store_true", help="only measure the artifacts already there")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lmfuse.config import load_config

    out = args.out.resolve()
    configs: dict[str, dict[str, Path]] = {}
    for pair in PAIRS:
        configs[pair] = {rule: out / "configs" / f"{pair}-{rule}.yaml" for rule in RULES}
        missing = [str(c) for c in configs[pair].values() if not c.exists()]
        if missing:
            print(f"error: {', '.join(missing)} missing: run experiments/numerals/data.py --out {out} first",
                  file=sys.stderr)
            return 2
    stats = json.loads((out / "data" / "stats.json").read_text())
    names = TINY_PAIRS if stats["settings"].get("models") == "tiny" else PAIRS
    log = Log(out / "measure.log")
    t0 = time.time()
    times = {} if args.no_run else run_stages(configs, log)
    t_stages = time.time() - t0
    before = out / "numerals.json"
    if args.no_run and before.exists():  # keep the build times of the artifacts
        times = json.loads(before.read_text()).get("stage_seconds", {})
    res: dict = {}
    for pair, by_rule in configs.items():
        cfg_map = load_config(by_rule["map"])
        ndig, tbytes = digit_counts(cfg_map)
        for rule, path in by_rule.items():
            acc, manifest = measure_run(load_config(path), ndig, tbytes)
            res.setdefault(pair, {})[rule] = figures(acc, manifest)
    md = markdown(res, names)
    data = {"pairs": names, "data": stats, "stage_seconds": times,
            "stage_seconds_sum": round(sum(v for t in times.values() for v in t.values()), 1),
            "this_call": {"stages_wall_seconds": round(t_stages, 1),
                          "measure_seconds": round(time.time() - t0 - t_stages, 1)},
            "results": res}
    (out / "numerals.json").write_text(json.dumps(no_nan(data), indent=2) + "\n")
    (out / "numerals.md").write_text(md)
    log(f"stages {t_stages:.1f} s, measurement {data['this_call']['measure_seconds']} s; table -> {out / 'numerals.md'}, "
        f"figures -> {out / 'numerals.json'}")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
