#!/usr/bin/env bash
# The one GPU check (benchmarks/bench_gpu.py), to run on a lent GPU machine from the repo root:
#
#     bash benchmarks/gpu_check.sh            # $OUT: where the log, JSON and reports go
#
# The GPU image lacks some of lmfuse's dependencies: they travel as wheels in .whl/ (ignored by
# git; carry it) and are installed into /tmp/site, never into the image. lmfuse itself is not
# installed: it runs from src/. Where there is no nvidia-smi the install is skipped (set
# BENCH_GPU_INSTALL=1 to force it, 0 to skip it), so the script also runs on a CPU machine:
#
#     OUT=$(mktemp -d) bash benchmarks/gpu_check.sh --quick
#
# Arguments are passed to bench_gpu.py. Exit status: bench_gpu.py's (1 if any part failed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
RUN=${BENCH_GPU_RUN:-/tmp/gpurun}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== $(date -u +%FT%TZ) $(uname -m) $(python3 --version 2>&1) at $(command -v python3)"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi || true
else
  echo "no nvidia-smi: no GPU here"
fi

install=${BENCH_GPU_INSTALL:-auto}
if [ "$install" = auto ]; then
  if command -v nvidia-smi >/dev/null; then install=1; else install=0; fi
fi
if [ "$install" = 1 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    # By name from .whl/ (it holds cp311 and cp312 builds of the compiled ones: pip takes the
    # one for this Python). typing_extensions only where the image's is older than pydantic needs.
    names=$(ls .whl/*.whl | xargs -n1 basename | sed 's/-.*//' | sort -u \
      | grep -vx typing_extensions)
    if ! python3 -c 'import sys, importlib.metadata as m
v = tuple(int(x) for x in m.version("typing_extensions").split(".")[:3])
sys.exit(v < (4, 14, 1))' 2>/dev/null; then
      names="$names typing_extensions"
    fi
    echo "== installing into /tmp/site: $(echo $names)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site --find-links .whl $names || echo "!! the wheel install failed"
  else
    echo "!! no .whl/ here: the packages the image lacks will be missing"
  fi
fi
pp=$PWD/src
[ "$install" = 1 ] && pp=/tmp/site:$pp  # the wheels first, then lmfuse from this checkout
export PYTHONPATH=$pp${PYTHONPATH:+:$PYTHONPATH}

echo "== versions"
python3 - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib, importlib.metadata as m
dists, bad = {"yaml": "PyYAML"}, []
for name in ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "huggingface_hub",
             "datasets", "pyarrow", "fsspec", "dill", "multiprocess", "xxhash", "pydantic",
             "pydantic_core", "typing_extensions", "numba", "numpy", "pandas", "typer", "yaml",
             "tqdm", "rapidfuzz", "sentencepiece", "matplotlib", "gguf"):
    try:
        mod = importlib.import_module(name)
        try:
            v = m.version(dists.get(name, name))
        except Exception:
            v = getattr(mod, "__version__", "?")
        print(f"{name:18} {v:12} {getattr(mod, '__file__', '')}")
    except Exception as e:
        print(f"{name:18} IMPORT FAILED: {type(e).__name__}: {e}")
for mod in ("lmfuse.cli", "lmfuse.config", "lmfuse.pipeline", "lmfuse.extract", "lmfuse.align",
            "lmfuse.vocabmap", "lmfuse.train", "lmfuse.evaluate", "lmfuse.report",
            "lmfuse.artifacts"):
    try:
        importlib.import_module(mod)
    except Exception as e:
        bad.append(mod)
        print(f"{mod:18} IMPORT FAILED: {type(e).__name__}: {e}")
try:
    from datasets import Dataset, concatenate_datasets, load_from_disk  # noqa: F401
except Exception as e:
    bad.append("datasets")
    print(f"datasets names IMPORT FAILED: {e}")
print("lmfuse imports: " + (f"FAILED: {', '.join(bad)}" if bad else "ok"))
EOF

echo "== bench_gpu.py $*"
python3 benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json" --out "$RUN" "$@" 2>&1 \
  | tee "$OUT/bench_gpu.log"
rc=${PIPESTATUS[0]}

# At most 8 files come back from $OUT: bench_gpu.json, bench_gpu.log, versions.txt and these.
for pair in "report/report.md:report.md" "eval/results.json:eval_results.json" \
            "eval/results.md:eval_results.md" "fuse.yaml:fuse.yaml"; do
  src=${pair%%:*}; dst=${pair##*:}
  [ "$src" = fuse.yaml ] && f="$RUN/$src" || f="$RUN/run/$src"
  [ -f "$f" ] && cp "$f" "$OUT/$dst"
done
ls -la "$OUT"
echo "== bench_gpu.py exit status $rc"
exit "$rc"
