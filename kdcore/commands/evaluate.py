"""``kdcore eval``: score a trained student against its teacher on the recipe's held-out set.

Two kinds of numbers, both from the weights of an exported student (``<run>/hf``):

- **Token level**, by the trainer's own evaluation (:func:`kdcore.training.evaluation.frozen_evaluator`):
  per-token forward KL teacher→student (through the recipe's aligner when the tokenizers
  differ), perplexity of the references, top-1 agreement (same vocabulary only), and the
  recipe's own loss, over the same ``train.eval_batches`` held-out micro-batches that
  training evaluates, so they compare with the run's ``metrics.jsonl``.
- **Generation**: greedy answers of the student (in this process) and of the teacher (its
  engine's ``generate``) to the prompts of those held-out samples, scored by the evaluators
  that ``eval.evaluators`` names (registered through ``register_evaluators``, see
  :mod:`kdcore.plugin_system.hookspecs`).

Imports nothing heavy at module level (``kdcore.commands.cli`` imports it lazily anyway).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from kdcore.data.rollout_samples import prompt_of, render_prompt, stop_ids, with_prompt_context
from kdcore.engines.greedy import batch_rows, greedy_answers
from kdcore.engines.hf_rollout import HFRolloutEngine, TeacherRolloutEngine
from kdcore.infra import distributed as kdist
from kdcore.infra.phases import phase
from kdcore.modeling.models import locate, _quiet_transformers
from kdcore.modeling.paths import ModelNotFoundError
from kdcore.modeling.student import _transformers_dtype_kw
from kdcore.modeling.tokenizers import load_tokenizer, same_tokenizer, pad_token_id
from kdcore.recipe.loading import load_raw, teacher_entries
from kdcore.storage.aligner_export import ALIGNERS_DIR, load_aligner
from kdcore.storage.checkpoint_files import CheckpointError
from kdcore.training.evaluation import frozen_evaluator
from kdcore.training.run_parts import student_tokenizer_spec, RunParts
from kdcore.training.teachers import trains_aligner
from kdcore.training.weight_sync import full_weights

RUN_RECIPE = "recipe.yaml"  # what a run folder keeps of the recipe it ran
RUN_EXPORT = "hf"  # where a run exports its student (kdcore.training.trainer.Trainer.export)
_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # like registry names: safe as JSON keys and table rows


class EvalInputError(ValueError):
    """A bad input to ``kdcore eval`` (one line naming the culprit)."""


class EvaluatorError(RuntimeError):
    """A registered evaluator returned something other than named finite floats."""


@dataclass
class Generations:
    """What every evaluator receives: one entry per held-out prompt, in the same order in
    every list (see ``register_evaluators`` in :mod:`kdcore.plugin_system.hookspecs`)."""

    prompts: list[str]
    references: list[str]
    student: list[str]
    teacher: list[str]
    student_ids: list[list[int]] = field(repr=False)
    teacher_ids: list[list[int]] = field(repr=False)
    student_tokenizer: Any = field(repr=False)
    teacher_tokenizer: Any = field(repr=False)
    # the ids each side was asked to continue (chat template and generation prompt included),
    # and the student itself: for evaluators that score the student on the teacher's answers
    # (draft acceptance); absent (empty / None) where a caller builds generations by hand
    student_prompt_ids: list[list[int]] = field(default_factory=list, repr=False)
    teacher_prompt_ids: list[list[int]] = field(default_factory=list, repr=False)
    student_model: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class EvalTarget:
    """What to evaluate: a recipe (path or shipped name), a student export, where the JSON goes."""

    recipe: str
    student: Path
    json_path: Path


# ------------------------------------------------------------------------------ inputs


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_target(recipe_or_run: str, *, student: Optional[str] = None, json_out: Optional[str] = None,
                   overrides: Optional[list[str]] = None) -> EvalTarget:
    """From the command line's arguments: a run folder (its ``hf/`` and ``recipe.yaml``), or a
    recipe (whose ``train.output_dir``/hf is the default student). Raises :class:`EvalInputError`."""
    given = Path(recipe_or_run)
    if given.is_dir():
        if is_model_folder(given) and not (given / RUN_RECIPE).is_file():
            raise EvalInputError(f"'{given}' is a model folder, not a run folder: give the recipe and the model, "
                                 f"e.g. kdcore eval RECIPE --student {given}")
        recipe = given / RUN_RECIPE
        if not recipe.is_file():
            raise EvalInputError(f"run folder '{given}' has no {RUN_RECIPE}: give the recipe instead, "
                                 f"e.g. kdcore eval RECIPE --student {given / RUN_EXPORT}")
        student_dir = Path(student) if student else given / RUN_EXPORT
        recipe_spec = str(recipe)
    else:
        recipe_spec = recipe_or_run
        if student:
            student_dir = Path(student)
        else:
            _, raw = load_raw(recipe_spec, overrides)  # RecipeError for a missing recipe, named
            out = ((raw.get("train") or {}).get("output_dir")) or "outputs/run"
            student_dir = Path(out) / RUN_EXPORT
    check_student_folder(student_dir)
    json_path = Path(json_out) if json_out else student_dir.parent / "eval.json"
    return EvalTarget(recipe_spec, student_dir, json_path)


def check_student_folder(path: Path) -> None:
    if not path.exists():
        raise EvalInputError(f"student '{path}' does not exist (a run exports it to <output_dir>/{RUN_EXPORT})")
    if not is_model_folder(path):
        raise EvalInputError(f"student '{path}' is not a model folder (no config.json): give a Hugging Face "
                             f"export such as <run>/{RUN_EXPORT}")


def check_recipe_for_eval(cfg) -> None:
    """The problems a valid recipe can still have for ``kdcore eval``: no held-out data, no teacher."""
    if cfg.data.eval is None and not cfg.data.eval_size:
        raise EvalInputError("the recipe has no held-out data: set data.eval (a file) or data.eval_size > 0")
    for i, section in enumerate(list(cfg.teachers) or [cfg.teacher]):
        try:
            locate(section.path)
        except ModelNotFoundError as exc:
            raise EvalInputError(f"{f'teachers[{i}]' if cfg.teachers else 'teacher'}.path: {exc}") from None


# ------------------------------------------------------------------------------ the run


def evaluate(cfg, student_dir: Path, *, registry, say=print) -> dict:
    """The report of ``kdcore eval``: ``{"student", "teacher", "teachers", "aligner", "metrics",
    "samples"}``; with several teachers the token metrics have a column per teacher
    (``eval_teacher_kl/<name>``, ...) beside the weighted totals, as in training."""
    check_recipe_for_eval(cfg)
    if kdist.under_torchrun():
        raise EvalInputError("kdcore eval runs in one process: start it without torchrun")
    env = kdist.init_distributed(cfg.train.device)  # a one-rank group, so the evaluator's collectives are no-ops
    try:
        with phase(f"loading {student_dir}, the teachers' tokenizers and heads, and the held-out data"):
            parts = _EvalParts.build(cfg, student_dir, registry=registry, env=env)
        return parts.run_eval(say)
    finally:
        kdist.teardown()


@dataclass
class _EvalParts:
    """Everything one evaluation needs: the run's parts (as training builds them) and the export."""

    cfg: Any
    student_dir: Path
    env: Any
    run: Any  # kdcore.training.run_parts.RunParts: tokenizers, aligners, heads (engines once started)
    held_out: list
    model: Any

    @classmethod
    def build(cls, cfg, student_dir: Path, *, registry, env) -> "_EvalParts":
        run = RunParts.from_recipe(cfg, registry)
        check_export_tokenizer(student_dir, run.student_tok, cfg)
        data = run.prepare_data()
        if not data.eval:
            raise EvalInputError("the recipe's held-out split is empty after preparation (every row dropped?): "
                                 "check data.eval / data.eval_size")
        model = load_student(student_dir, env.device)
        run.setup_heads(model, env.device)  # seeded as training sets them up

        for part, entry in zip(run.teachers, teacher_entries(cfg)):
            trained = trains_aligner(part)
            try:
                restored = trained and load_aligner(part.aligner, student_dir, part.name)
            except CheckpointError as exc:
                raise EvalInputError(str(exc)) from exc
            if trained and not restored:
                raise EvalInputError(f"aligner '{entry['aligner']}' trains its own parameters, and {student_dir} "
                                     f"holds none for teacher '{part.name}' ({ALIGNERS_DIR}/{part.name}.safetensors, "
                                     f"written by kdcore train's export): kdcore eval cannot score it")
            part.aligner.to(env.device)
            part.aligner.check_heads(int(model.get_output_embeddings().weight.shape[0]), int(part.head.shape[0]))
        return cls(cfg, student_dir, env, run, data.eval, model)

    def run_eval(self, say) -> dict:
        cfg, run = self.cfg, self.run
        loss = run.registry.get("loss", cfg.distill.loss)
        loss_options = dict(cfg.distill.loss_options or {})
        loss.make_options(loss_options)  # same checks as validate, in case cfg was built by hand
        cores = kdist.default_threads(1)
        kdist.setup_threads(cfg.train.threads or cores)
        mbs = max(cfg.train.micro_batch_size, 1)  # the evaluator batches by micro_batch_size
        try:
            run.start_engines(max_rows_for=lambda part: mbs * run.longest_input(part, self.held_out),
                              threads_default=cores)

            evaluator = frozen_evaluator(cfg, model=self.model, samples=self.held_out, parts=run.teachers,
                                         loss_fn=loss.fn, loss_options=loss_options,
                                         pad_id=pad_token_id(run.student_tok), env=self.env, kdist=kdist)
            evaluator.progress_label = "held-out batches (teacher-KL, perplexity, top-1)"
            chosen = [self.held_out[i] for batch in evaluator.held_out_batches() for i in batch]
            say(f"scoring {self.student_dir} on {len(chosen)} held-out samples")
            metrics = {k: v for k, v in evaluator.evaluate(0).items() if k != "step"}
            samples: list[dict] = []
            first = run.teachers[0]  # the generation metrics compare with the first teacher's answers
            if list(cfg.eval.evaluators):
                gens = generate_answers(cfg, chosen, self.model, TeacherRolloutEngine(first.engine), run.student_tok,
                                        first.tokenizer, device=self.env.device)
                if gens is None:
                    say("no held-out sample has a prompt and an answer (plain text rows): generation metrics skipped")
                else:
                    metrics.update(run_evaluators(cfg, run.registry, gens))
                    samples = [{"prompt": p, "teacher": t, "student": s, "reference": r} for p, t, s, r in
                               zip(gens.prompts, gens.teacher, gens.student, gens.references)][: cfg.eval.samples]
        finally:
            run.close()
        return {"student": str(self.student_dir), "teacher": str(first.section.path),
                "teachers": {p.name: str(p.section.path) for p in run.teachers},
                "aligner": cfg.distill.aligner, "metrics": metrics, "samples": samples}


def check_export_tokenizer(student_dir: Path, recipe_tok, cfg) -> None:
    """The export must speak the tokenizer the recipe's data is tokenized with."""
    if not any((student_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return  # an export without a tokenizer is scored with the recipe's (export_hf always writes one)
    exported = load_tokenizer(str(student_dir))
    if not same_tokenizer(exported, recipe_tok):
        raise EvalInputError(f"the tokenizer of student '{student_dir}' differs from the recipe's "
                             f"('{student_tokenizer_spec(cfg)}'): evaluate with the recipe the student was trained with")


def load_student(student_dir: Path, device):
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()  # no stray "Loading weights" bar between kdcore's own lines (issue 28)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(student_dir), **_transformers_dtype_kw(torch.float32))
    except Exception as exc:
        raise EvalInputError(f"student '{student_dir}' cannot be loaded as a causal LM: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return model.to(device).eval()


# ------------------------------------------------------------------------------ generation


def reference_of(sample) -> Optional[str]:
    """The data set's answer to a sample's prompt: its final trained assistant turn, or its completion."""
    norm = sample.source or {}
    if "messages" in norm:
        trained = [m for m, t in zip(norm["messages"], norm["train"]) if t and m["role"] == "assistant"]
        return trained[-1]["content"] if trained else None
    return norm.get("completion")


def generate_answers(cfg, samples, model, teacher_rollout, student_tok, teacher_tok, *, device) -> Optional[Generations]:
    """Greedy answers of both models to the samples' prompts (None when no sample has one).

    Both sides decode many prompts at once with a KV cache (:mod:`kdcore.engines.greedy`): the
    student here, on ``model`` itself; the teacher in its engine's process (its ``generate``,
    which decodes greedy requests the same way). Prompts go in batches of similar lengths."""
    chosen = [(s, p) for s in samples if (p := prompt_of(s)) is not None and reference_of(s) is not None]
    if not chosen:
        return None
    prompts = [p for _, p in chosen]
    # the teacher answers what it read in training: with data.teacher_context, the context too
    teacher_prompts = [with_prompt_context(p, s.context) for s, p in chosen]
    n = cfg.eval.max_new_tokens
    mbs = max(cfg.train.micro_batch_size, 1)

    def prompt_ids(asked, tok) -> list[list[int]]:
        return [list(render_prompt(p, tok).input_ids) for p in asked]

    def answers(ids: list[list[int]], generate, who: str) -> list[list[int]]:
        # similar lengths together (less padding); several micro-batches' worth of rows at once,
        # since a decoding step of these models is mostly fixed cost (issue 28)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        rows = batch_rows([len(x) for x in ids], n, at_least=mbs)
        out: list[list[int]] = [[] for _ in ids]
        # prompts done / total and tokens/s: generation is most of kdcore eval's time (issue 28)
        with phase(f"{who}'s greedy answers (up to {n} tokens each)", total=len(ids)) as advance:
            for i in range(0, len(order), rows):
                chunk = order[i:i + rows]
                new = generate([ids[j] for j in chunk])
                for j, x in zip(chunk, new):
                    out[j] = list(x)
                advance(len(new), tokens=sum(len(x) for x in new))
        return out

    s_prompts, t_prompts = prompt_ids(prompts, student_tok), prompt_ids(teacher_prompts, teacher_tok)
    s_eos = stop_ids(student_tok, _model_eos(model))
    s_ids = answers(s_prompts, lambda chunk: greedy_answers(model, chunk, max_new_tokens=n, eos_ids=s_eos,
                                                            rows=len(chunk), pad_id=pad_token_id(student_tok),
                                                            device=device), "student")
    t_eos = stop_ids(teacher_tok, [])  # its tokenizer's EOS and end-of-turn token
    t_ids = answers(t_prompts, lambda chunk: [g.token_ids for g in teacher_rollout.generate(
        chunk, max_new_tokens=n, temperature=0.0, eos_ids=t_eos)], "teacher")
    return Generations(
        prompts=[p.content for p in prompts], references=[reference_of(s) for s, _ in chosen],
        student=[student_tok.decode(x, skip_special_tokens=True) for x in s_ids],
        teacher=[teacher_tok.decode(x, skip_special_tokens=True) for x in t_ids],
        student_ids=s_ids, teacher_ids=t_ids, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok,
        student_prompt_ids=s_prompts, teacher_prompt_ids=t_prompts, student_model=model)


def _model_eos(model) -> list[int]:
    """The model's own stop ids (its generation config may list several)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


def run_evaluators(cfg, registry, generations: Generations) -> dict[str, float]:
    """Every evaluator of ``eval.evaluators`` on the same generations, keys prefixed by its name."""
    out: dict[str, float] = {}
    for name in cfg.eval.evaluators:
        entry = registry.get("evaluator", name)
        options = entry.make_options(dict((cfg.eval.options or {}).get(name) or {}))
        result = entry.fn(generations, options)
        if not isinstance(result, dict):
            raise EvaluatorError(f"evaluator '{name}' returned {type(result).__name__}, not a dict of named floats")
        for key, value in result.items():
            if not isinstance(key, str) or not _METRIC_NAME.match(key):
                raise EvaluatorError(f"evaluator '{name}': metric name {key!r} must match [a-z][a-z0-9_]*")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise EvaluatorError(f"evaluator '{name}': metric '{key}' is {value!r}, not a finite float")
            out[f"{name}_{key}"] = float(value)
    return out


# ------------------------------------------------------------------------------ output


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def print_report(report: dict, console) -> None:
    """The metrics table, then the side-by-side answers (teacher / student / reference)."""
    from rich.table import Table

    table = Table(title=f"{report['student']} vs teacher {report['teacher']}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report["metrics"].items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    for i, s in enumerate(report["samples"]):
        sample = Table(title=f"sample {i + 1}: {s['prompt'][:200]}", title_justify="left", show_lines=True)
        for col in ("teacher", "student", "reference"):
            sample.add_column(col, overflow="fold", ratio=1)
        sample.add_row(s["teacher"], s["student"], s["reference"])
        console.print(sample)
