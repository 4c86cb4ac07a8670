"""One pydantic config for a whole fusion, loaded from YAML.

`validate_config` reports every problem at once, each with its location in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmfuse.errors import LmfuseError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Dtype = Literal["float32", "bfloat16", "float16"]


class ConfigError(LmfuseError):
    """A config that does not validate (`lmfuse validate` lists the same problems; the CLI exits 1)."""

    def __init__(self, problems: list[str], where: str, subject: str = "the config",
                 fix: str = "correct the fields named above (`lmfuse validate` lists them)"):
        self.problems = list(problems)
        super().__init__(f"{len(problems)} problem(s) in {subject}:\n" + "\n".join(f"  - {p}" for p in problems),
                         where=where, fix=fix)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Section):
    """One model: a local HF directory or `.gguf` file (relative to the config file), `pull:NAME`, or
    `hub:ORG/NAME` (a Hugging Face Hub id). A path without a prefix is always local."""

    name: str = Field(pattern=NAME_PATTERN, description="unique name used for artifact folders")
    path: str = Field(description="local HF model dir or .gguf file, `pull:NAME` (see `lmfuse models list`), or "
                                  "`hub:ORG/NAME` (a Hugging Face Hub id)")
    dtype: Dtype = "bfloat16"
    trust_remote_code: bool = False
    revision: str | None = None


class CorpusConfig(_Section):
    path: str = Field(description=".txt file or folder of them, .jsonl, .parquet, or a saved HF dataset dir")
    text_field: str = "text"
    domain_field: str = "domain"
    split_field: str | None = Field(None, description="field giving each document's split (train|validation); "
                                                      "None = split by document with prepare.validation_fraction")
    max_docs_per_domain: int | None = Field(None, ge=1)
    domains: list[str] | None = Field(None, min_length=1, description="read only these domains (default: all)")


class PrepareConfig(_Section):
    block_size: int = Field(512, ge=2, description="max tokens per block, for every model")
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    min_validation_blocks: int = Field(1, ge=0, description="per domain")
    max_blocks_per_domain: int | None = Field(None, ge=1)
    min_block_chars: int = Field(16, ge=1, description="blocks with fewer non-blank characters are dropped "
                                                       "(counted per domain in prepare's manifest; prepare refuses "
                                                       "to drop more than 2% of a domain's text)")
    seed: int = 0


class ExtractConfig(_Section):
    distribution: Literal["topk", "sampled"] = Field(
        "topk", description="what is stored per position: `topk` (the k most probable ids and their log-probs) "
                            "or `sampled` (ids drawn from the full softmax with their counts: an unbiased "
                            "estimate of the whole distribution)")
    top_k: int = Field(10, ge=1, le=1024, description="entries kept per position (distribution: topk)")
    samples: int = Field(64, ge=1, le=65535,
                         description="draws per position from the full softmax (distribution: sampled)")
    seed: int = Field(0, ge=0, description="seed of the draws (sampled); they depend only on (seed, block, "
                                           "position), not on batching, sharding or the number of processes")
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(64, ge=1, description="blocks per shard (the unit of resume)")


class VocabMapConfig(_Section):
    method: str = "retokenize"
    workers: int = Field(-1, description="processes for `mined` (-1 = all cores)")


class AlignConfig(_Section):
    method: str = "offsets"
    dtw_band: int = Field(64, ge=1, description="band half-width for `dtw`")
    token_rule: Literal["map", "consistent"] = Field(
        "map", description="`map`: every source candidate goes to its mapped target token; `consistent`: a "
                           "candidate that agrees with the text that follows goes to the gold target token, and "
                           "one mapped to a token the target would not write there is dropped (docs/alignment.md)")


class TrainConfig(_Section):
    fusion: str = "minCE"
    level: Literal["sequence", "token"] = "sequence"
    quality: Literal["nll_per_byte", "ce_per_token"] = "nll_per_byte"
    include_target: bool = True
    outside_topk: Literal["renormalize", "gold", "rest"] = Field(
        "renormalize", description="mass outside the stored ids: renormalize (paper) | gold (on the gold token) | "
                                   "rest (a bucket matched by the student's mass outside the stored ids)")
    temperature: float = Field(1.0, gt=0)
    clm_weight: float = Field(0.9, description="λ: weight of the plain LM loss; 1 - λ goes to fusion")
    clm_weight_schedule: Literal["constant", "linear"] = "constant"
    loss: Literal["ce", "kl"] = "ce"
    span_weight: float = Field(0.0, ge=0, description="μ: weight of the span-likelihood term (0 = off)")
    avgce_weighting: Literal["softmax_exp_neg", "softmax_neg"] = Field(
        "softmax_exp_neg", description="avgCE weights: softmax over exp(-quality) (reference code) or over -quality")
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1, description="per device")
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Dtype = "bfloat16"
    gradient_checkpointing: bool = False
    logits_chunk_size: int | None = Field(None, ge=1)
    eval_every: int = Field(0, ge=0, description="steps; 0 = only at the end")
    save_every: int = Field(0, ge=0, description="steps; 0 = only at the end")
    keep_best: bool = Field(False, description="also keep the weights with the lowest validation loss (evaluated "
                                               "every `eval_every` steps) in `best/`")
    seed: int = 0
    control: bool = Field(True, description="also train the λ = 1 control on the same data")
    tensorboard: bool = False

    @field_validator("clm_weight")
    @classmethod
    def _unit(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"λ (clm_weight) must lie in [0, 1], got {v}")
        return v


class EvalConfig(_Section):
    batch_size: int = Field(8, ge=1)
    split: Literal["validation", "train", "all"] = "validation"
    dtype: Dtype | None = Field(None, description="dtype for every evaluated model (None: each model's own)")


class BaselinesConfig(_Section):
    ensemble: list[list[str]] = Field(default_factory=list, description="groups of model names sharing a tokenizer")
    merge: list[dict[str, Any]] = Field(
        default_factory=list,
        description="each {models: [names], weights: [floats] (default equal), method: linear|task_arithmetic, "
                    "base: name (task_arithmetic), name: label (optional)}; names may also be `fused`/`clm`")

    @field_validator("ensemble")
    @classmethod
    def _groups(cls, v: list[list[str]]) -> list[list[str]]:
        for i, g in enumerate(v):
            if len(g) < 2 or len(set(g)) != len(g):
                raise ValueError(f"ensemble[{i}] needs two or more distinct model names, got {g}")
        return v

    @field_validator("merge")
    @classmethod
    def _merges(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keys = {"models", "weights", "method", "base", "name"}
        for i, m in enumerate(v):
            extra = sorted(set(m) - keys)
            if extra:
                raise ValueError(f"merge[{i}]: unknown key(s) {extra}; allowed: {sorted(keys)}")
            models = m.get("models")
            if not isinstance(models, list) or not models or not all(isinstance(x, str) for x in models):
                raise ValueError(f"merge[{i}].models must be a non-empty list of model names")
            method = m.get("method", "linear")
            if method not in ("linear", "task_arithmetic"):
                raise ValueError(f"merge[{i}].method must be linear or task_arithmetic, got {method!r}")
            if method == "task_arithmetic" and not isinstance(m.get("base"), str):
                raise ValueError(f"merge[{i}]: task_arithmetic needs `base: MODEL_NAME`")
            w = m.get("weights")
            if w is not None and (not isinstance(w, list) or len(w) != len(models)
                                  or not all(isinstance(x, int | float) for x in w)):
                raise ValueError(f"merge[{i}].weights must be a list of {len(models)} numbers (one per model)")
        return v


class FuseConfig(_Section):
    """A whole fusion: models, corpus and every stage's options."""

    output_dir: str
    target: ModelSpec
    # No sources: a CLM-only run (prepare, the target's extraction and `train/clm`, the target
    # continually trained with λ = 1, whatever `train.control` says), as a domain expert is made.
    sources: list[ModelSpec] = Field(default_factory=list)
    corpus: CorpusConfig
    prepare: PrepareConfig = PrepareConfig()
    extract: ExtractConfig = ExtractConfig()
    vocab_map: VocabMapConfig = VocabMapConfig()
    align: AlignConfig = AlignConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    baselines: BaselinesConfig = BaselinesConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> FuseConfig:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dup)}")
        return self

    @property
    def models(self) -> list[ModelSpec]:
        return [self.target, *self.sources]

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise LmfuseError(f"no model named {name!r} in the config",
                          fix=f"choose one of: {', '.join(m.name for m in self.models)}")

    @property
    def fuses(self) -> bool:
        """Whether the run trains a fused model (it has sources); without, only the control."""
        return bool(self.sources)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


PLUGINS = [("vocab_map", "method", "vocabmap", "METHODS"), ("align", "method", "align", "METHODS"),
           ("train", "fusion", "fusion", "FUSIONS")]


def _plugin_problems(data: dict) -> list[str]:
    """Plugin names (in a raw config dict) that no plugin registered (plugins register on import)."""
    import importlib

    problems = []
    for section, field, mod, attr in PLUGINS:
        sec = data.get(section)
        name = sec.get(field) if isinstance(sec, dict) else None
        if not isinstance(name, str):
            continue
        reg = getattr(importlib.import_module(f"lmfuse.{mod}"), attr)
        if name not in reg:
            problems.append(f"{section}.{field}: unknown {reg.kind} {name!r}; choose one of: {', '.join(reg.names())}")
    return problems


def _path_problems(cfg: FuseConfig, base: Path) -> list[str]:
    """Paths that do not exist, in a config as written (relative paths not yet rebased)."""
    from lmfuse.models import model_path_problem

    problems = []
    corpus = _resolve(cfg.corpus.path, base)
    if not corpus.exists():
        problems.append(f"corpus.path: {cfg.corpus.path!r} does not exist")
    elif corpus.is_dir():
        problem = _output_in_corpus(cfg, corpus, _resolve(cfg.output_dir, base))
        if problem:
            problems.append(problem)
    for i, m in enumerate(cfg.models):
        loc = "target" if i == 0 else f"sources[{i - 1}]"
        p = model_path_problem(m, base)
        if p:
            problems.append(f"{loc}.path: {p}")
    return problems


def _output_in_corpus(cfg: FuseConfig, corpus: Path, output_dir: Path) -> str | None:
    """Why an `output_dir` inside a folder corpus is refused, or None.

    The corpus's fingerprint (in prepare's key) covers every file under the folder, so the run's
    own files would change it on every run and every stage would be rebuilt each time. Refused
    rather than left out of the reading and the fingerprint: leaving out this run's directory
    would not leave out the other runs of a sweep (and its shared store) placed there too, nor
    another config's run, and text read from a folder that runs write into is open to mistakes.
    """
    try:
        real, out = corpus.resolve(), output_dir.resolve()
    except (OSError, RuntimeError, ValueError):  # a NUL or a symlink loop: the run directory says what is wrong
        return None
    if out != real and real not in out.parents:
        return None
    return (f"output_dir: {cfg.output_dir!r} is inside the corpus folder {cfg.corpus.path!r} ({real}): the run's "
            "own files would change the corpus's fingerprint, so every run would rebuild every stage; put "
            f"output_dir outside it, e.g. {real}-run")


def _raw_path_problems(data: dict, base: Path) -> list[str]:
    """Path problems in a config that failed type validation, so one run reports them all."""
    from lmfuse.models import model_path_problem

    problems = []
    corpus = data.get("corpus")
    if (isinstance(corpus, dict) and isinstance(corpus.get("path"), str) and _home_problem(corpus["path"]) is None
            and not _resolve(corpus["path"], base).exists()):
        problems.append(f"corpus.path: {corpus['path']!r} does not exist")
    entries = [("target", data.get("target"))]
    if isinstance(data.get("sources"), list):
        entries += [(f"sources[{i}]", m) for i, m in enumerate(data["sources"])]
    for loc, m in entries:
        if (isinstance(m, dict) and isinstance(m.get("path"), str) and isinstance(m.get("name"), str)
                and _home_problem(m["path"]) is None):
            problem = model_path_problem(ModelSpec.model_construct(**m), base)
            if problem:
                problems.append(f"{loc}.path: {problem}")
    return problems


def _rebase_path(p: str, base: Path) -> str:
    """A model path as the stages use it: prefixed names as they are, local paths absolute."""
    from lmfuse.models import HUB_PREFIX, PULL_PREFIX

    return p if p.startswith((PULL_PREFIX, HUB_PREFIX)) else str(_resolve(p, base))


def _resolve(p: str, base: Path) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else base / path


def _home_problem(p: str) -> str | None:
    """Why `~user/...` cannot be expanded (no such user, or no home directory), or None."""
    if not p.startswith("~"):
        return None
    try:
        Path(p).expanduser()
    except RuntimeError:  # what Path.expanduser raises for an unknown user
        user = p[1:].split("/", 1)[0]
        who = f"user {user!r}" if user else "you ($HOME is not set)"
        return f"{p!r}: cannot expand {p.split('/', 1)[0]!r}: no home directory for {who}; write the path in full"
    return None


def _home_problems(data: dict) -> list[str]:
    """`~user/...` paths that cannot be expanded, located (`Path.expanduser` would raise)."""
    fields = [("output_dir", data.get("output_dir"))]
    for loc in ("corpus", "target"):
        if isinstance(data.get(loc), dict):
            fields.append((f"{loc}.path", data[loc].get("path")))
    if isinstance(data.get("sources"), list):
        fields += [(f"sources[{i}].path", m.get("path")) for i, m in enumerate(data["sources"]) if isinstance(m, dict)]
    return [f"{loc}: {problem}" for loc, p in fields if isinstance(p, str) and (problem := _home_problem(p))]


def _format_pydantic(e: ValidationError) -> list[str]:
    out = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg}")
    return out


def parse_config(data: dict, base: Path | None = None) -> tuple[FuseConfig | None, list[str]]:
    """Build a config from a dict; return it (or None) and every problem found."""
    base = base or Path.cwd()
    homes = _home_problems(data)
    try:
        cfg = FuseConfig.model_validate(data)
    except ValidationError as e:
        return None, _format_pydantic(e) + homes + _plugin_problems(data) + _raw_path_problems(data, base)
    if homes:  # such a path cannot be resolved, so no config can be built
        return None, homes + _plugin_problems(data) + _raw_path_problems(data, base)
    problems = _plugin_problems(data) + _path_problems(cfg, base)
    # Paths in the config are relative to the config file's folder.
    return _rebase(cfg, base), problems


def _rebase(cfg: FuseConfig, base: Path) -> FuseConfig:
    models = [m.model_copy(update={"path": _rebase_path(m.path, base)}) for m in cfg.models]
    return cfg.model_copy(update={
        "output_dir": str(_resolve(cfg.output_dir, base)),
        "corpus": cfg.corpus.model_copy(update={"path": str(_resolve(cfg.corpus.path, base))}),
        "target": models[0],
        "sources": models[1:],
    })


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise LmfuseError(f"config file {path} does not exist", fix="check the path")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmfuseError(f"config file is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset "
                          f"{e.start}: {e.reason})", where=str(path),
                          fix="save the config as UTF-8 (any editor's 'UTF-8' encoding), then rerun") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LmfuseError(f"config file is not valid YAML: {e}", where=str(path)) from e
    if not isinstance(data, dict):
        raise LmfuseError("config file must hold a mapping at the top level", where=str(path))
    return data


def validate_config(path: str | Path) -> list[str]:
    """Every problem in a config file, each as `field.path: message`."""
    _, problems = parse_config(read_yaml(path), Path(path).resolve().parent)
    return problems


def load_config(path: str | Path) -> FuseConfig:
    """Load and fully validate a config; raise one error listing every problem."""
    cfg, problems = parse_config(read_yaml(path), Path(path).resolve().parent)
    if problems:
        raise ConfigError(problems, str(path))
    return cfg
