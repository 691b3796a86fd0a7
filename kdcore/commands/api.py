"""The Python API beside the command line: ``kdcore.train``, ``kdcore.evaluate``, ``kdcore.cache_teacher``.

Each takes what its command takes (a recipe path or shipped name, dotlist overrides, the
command's options as keywords), does what the command does, and returns the folder it wrote
with its final figures instead of printing them::

    import kdcore

    run = kdcore.train("quickstart", ["train.max_steps=10", "train.output_dir=outputs/try"])
    run.run_dir, run.figures["eval_teacher_kl"]          # the last held-out evaluation
    report = kdcore.evaluate(run.run_dir)                # kdcore eval outputs/try
    report.figures["rouge_l_vs_reference"]

Errors are the command's, raised instead of printed (``kdcore.RecipeError`` for a bad recipe or
override, ``EvalInputError``, ``TrainingError``, ...). Plugins registered in-process with
``kdcore.register_plugin`` are seen, as by the commands (docs/api.md has a worked example).
``import kdcore`` stays light: this module is loaded on the first call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence


@dataclass
class TrainRun:
    """What :func:`train` wrote: the run folder and its last held-out figures."""

    run_dir: Path
    steps: int  # optimizer steps done (the last one's number)
    figures: dict[str, float]  # the last evaluation's record (eval_teacher_kl, eval_ppl, ...; {} when none ran)
    evals: list[dict] = field(repr=False)  # every evaluation's record, step 0 first
    metrics_file: Path = field(repr=False)
    export_dir: Optional[Path] = None  # <run>/hf, the student as a Hugging Face folder


@dataclass
class EvalReport:
    """What :func:`evaluate` measured: ``kdcore eval``'s figures and its JSON report."""

    run_dir: Optional[Path]  # the run folder evaluated (None for a bare --student export)
    figures: dict[str, float]  # token metrics and the evaluators' (rouge_l_vs_reference, ...)
    report: dict = field(repr=False)  # the whole JSON report (samples, training step 0 -> last)
    json_path: Path = field(repr=False)


@dataclass
class TeacherCache:
    """What :func:`cache_teacher` built: the cache folder and its size."""

    folder: Path
    figures: dict[str, float]  # samples, rows, bytes, shards, built_shards, seconds, bytes_per_row


def _registry(registry):
    from kdcore.plugin_system.manager import load_registry

    return registry if registry is not None else load_registry()


def _overrides(overrides: Optional[Sequence[str]]) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, (str, bytes)):  # "a=1" would otherwise be read as ["a", "=", "1"]
        raise TypeError("overrides: a list of 'key=value' strings, not one string")
    return [str(o) for o in overrides]


def train(recipe: str | os.PathLike, overrides: Optional[Sequence[str]] = None, *, resume: bool = False,
          overwrite: bool = False, allow_data_change: bool = False, registry=None) -> TrainRun:
    """``kdcore train RECIPE [overrides]``: run it, return the run folder and its last figures."""
    from kdcore.recipe.loading import load_recipe
    from kdcore.storage.run_folder import RunFolderError

    if resume and overwrite:
        raise RunFolderError("resume and overwrite contradict each other: pick one")
    registry = _registry(registry)
    cfg = load_recipe(str(recipe), _overrides(overrides), registry=registry)
    from kdcore.infra import distributed as kdist
    from kdcore.training import train as run_training

    result = run_training(cfg, registry=registry, resume=resume, overwrite=overwrite,
                          allow_data_change=allow_data_change)
    kdist.teardown()  # as the command does after success: no process group left for the next call
    last = dict(result.evals[-1]) if result.evals else {}
    last.pop("step", None)
    return TrainRun(run_dir=Path(result.output_dir), steps=result.steps, figures=last, evals=list(result.evals),
                    metrics_file=Path(result.metrics_file),
                    export_dir=Path(result.export_dir) if result.export_dir else None)


def evaluate(run: str | os.PathLike, overrides: Optional[Sequence[str]] = None, *, student: Optional[str] = None,
             against: Optional[str | os.PathLike] = None, json_out: Optional[str | os.PathLike] = None,
             max_new_tokens: Optional[int] = None, samples: Optional[int] = None, registry=None,
             say=None) -> EvalReport:
    """``kdcore eval RUN [overrides]``: score a run's student (or ``student=``, with a recipe),
    write the JSON report (``<run>/eval.json`` by default), return its figures."""
    from kdcore.recipe.loading import load_recipe
    from kdcore.commands.evaluate import EvalInputError, resolve_target, write_report
    from kdcore.commands.evaluate import evaluate as run_eval
    from kdcore.commands.run_summary import run_folder_of, summary

    registry = _registry(registry)
    overrides = _overrides(overrides)
    if max_new_tokens is not None:
        overrides.append(f"eval.max_new_tokens={int(max_new_tokens)}")
    if samples is not None:
        overrides.append(f"eval.samples={int(samples)}")
    target = resolve_target(os.fspath(run), student=student, json_out=None if json_out is None else os.fspath(json_out),
                            overrides=overrides)
    cfg = load_recipe(target.recipe, overrides, registry=registry)
    other = Path(against) if against is not None else None
    if other is not None and not (other / "metrics.jsonl").is_file():
        raise EvalInputError(f"against={other}: no metrics.jsonl there (give another run's train.output_dir)")
    report = run_eval(cfg, target.student, registry=registry, say=say or (lambda *a, **k: None))
    run_dir = run_folder_of(Path(target.student))
    before_after = summary(run_dir, other) if run_dir is not None else None
    if before_after is not None:
        report["training"] = before_after
    write_report(report, target.json_path)
    figures = {k: v for k, v in report["metrics"].items() if isinstance(v, (int, float))}
    return EvalReport(run_dir=run_dir, figures=figures, report=report, json_path=target.json_path)


def cache_teacher(recipe: str | os.PathLike, out: str | os.PathLike, overrides: Optional[Sequence[str]] = None, *,
                  dtype: str = "bfloat16", shard_mb: float = 64.0, batch_size: Optional[int] = None,
                  engine: Optional[str] = None, progress: Optional[bool] = None, registry=None) -> TeacherCache:
    """``kdcore cache-teacher RECIPE --out OUT [overrides]``: store the teacher's hidden states
    once (an interrupted build in ``out`` is continued), return the folder and its size."""
    from kdcore.commands.cache_teacher import build_teacher_cache, live_engine_overrides
    from kdcore.recipe.loading import load_raw, load_recipe

    registry = _registry(registry)
    given = _overrides(overrides)
    every = given + live_engine_overrides(str(recipe), given, registry, engine)
    _, raw = load_raw(str(recipe), every)
    cfg = load_recipe(str(recipe), every, registry=registry)
    done = build_teacher_cache(cfg, raw, os.fspath(out), registry=registry, dtype=dtype, shard_mb=shard_mb,
                               batch_size=batch_size,
                               progress=cfg.logging.progress if progress is None else progress)
    figures: dict[str, Any] = {k: getattr(done, k) for k in ("samples", "rows", "bytes", "shards", "built_shards",
                                                              "seconds", "bytes_per_row")}
    return TeacherCache(folder=Path(done.folder), figures=figures)


__all__ = ["train", "evaluate", "cache_teacher", "TrainRun", "EvalReport", "TeacherCache"]
