"""Recipe checks beyond the schema: algorithm, engine, evaluator and logger names and options
against the registry, the paths a run would open, several teachers, and warnings for settings
that are valid but almost surely wrong. Each appends one line per problem to ``errors``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdcore.engines.factory import DEFAULT_TEACHER_ENGINE
from kdcore.infra.exceptions import clip
from kdcore.recipe.schema import (DistillConfig, EvalConfig, RolloutConfig, TeacherConfig, TeacherEntry, check_section,
                           get_dotted)
def check_algorithm_options(raw: dict, registry, errors: list[str]) -> None:
    """Check distill.{loss,aligner,rollout} names and their *_options against the registry."""
    from kdcore.plugin_system.registry import UnknownAlgorithmError

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
        check_section(opts, entry.options, f"distill.{kind}_options", errors)
        if len(errors) == before:
            try:  # the dataclass may check value ranges itself (__post_init__)
                entry.options(**opts)
            except Exception as exc:
                errors.append(f"distill.{kind}_options: {kind} '{name}' rejects {opts}: {exc}")


def check_engines(raw: dict, registry, errors: list[str]) -> None:
    """Check teacher.engine and rollout.engine against the registry's engines, then let each
    chosen engine check its own section (e.g. sglang's ``<section>.sglang``)."""
    from kdcore.plugin_system.registry import UnknownAlgorithmError

    for role, schema in (("teacher", TeacherConfig), ("rollout", RolloutConfig)):
        section = raw.get(role)
        section = section if isinstance(section, dict) else {}
        name = section.get("engine", schema.__dataclass_fields__["engine"].default)
        if not isinstance(name, str):
            continue  # type error already reported
        try:
            entry = registry.get("engine", name)
        except UnknownAlgorithmError as exc:
            errors.append(f"{role}.engine: {exc}")
            continue
        spec = entry.fn
        if role not in spec.roles:
            errors.append(f"{role}.engine: engine '{name}' cannot serve as a {role} engine "
                          f"(it serves: {', '.join(spec.roles)})")
            continue
        check_engine_options(entry, section.get("engine_options"), f"{role}.engine_options", errors)
        check = getattr(spec, "check_recipe", None)
        if check is not None:
            errors.extend(check(section, role))
        check_run = getattr(spec, "check_run", None)  # an engine's checks across sections
        if check_run is not None:
            errors.extend(check_run(raw, registry, role))


def check_engine_options(entry, opts, key: str, errors: list[str]) -> None:
    """Check an engine's ``engine_options`` against the options dataclass its plugin registered,
    as loss options are checked: a built-in engine and a plugin's are checked the same way."""
    if opts is None or not isinstance(opts, dict):
        return  # absent, or a type error already reported
    check_registered_options(entry, opts, key, "engine", errors)


def check_registered_options(entry, opts: dict, key: str, kind: str, errors: list[str]) -> None:
    """``opts`` against the options dataclass ``entry`` was registered with (none: no option
    allowed), then the dataclass's own range checks (``__post_init__``)."""
    if entry.options is None:
        if opts:
            errors.append(f"{key}: {kind} '{entry.name}' takes no options, got {', '.join(map(str, opts))}")
        return
    before = len(errors)
    check_section(opts, entry.options, key, errors)
    if len(errors) == before:
        try:  # the dataclass may check value ranges itself (__post_init__)
            entry.options(**opts)
        except Exception as exc:
            errors.append(f"{key}: {kind} '{entry.name}' rejects {opts}: {exc}")


def check_evaluators(raw: dict, registry, errors: list[str]) -> None:
    """Check eval.evaluators against the registry and eval.options against their dataclasses."""
    from kdcore.plugin_system.registry import UnknownAlgorithmError

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
        check_registered_options(registry.get("evaluator", name), opts, key, "evaluator", errors)


def check_loggers(raw: dict, registry, errors: list[str]) -> None:
    """Check logging.backends names against the registry's loggers."""
    from kdcore.plugin_system.registry import ALWAYS_ON_LOGGER, UnknownAlgorithmError

    section = raw.get("logging")
    backends = section.get("backends") if isinstance(section, dict) else None
    for i, name in enumerate(backends if isinstance(backends, list) else []):  # a non-list is a type error already
        if not isinstance(name, str):
            errors.append(f"logging.backends[{i}]: expected a logger name, got {type(name).__name__} {name!r}")
            continue
        if name == ALWAYS_ON_LOGGER:
            continue  # metrics.jsonl is written whatever the list says; naming it is harmless
        try:
            registry.get("logger", name)
        except UnknownAlgorithmError as exc:
            errors.append(f"logging.backends: {exc}")


# --------------------------------------------------------------------------------------------
# checks of what the recipe points at, and warnings for settings that make no sense

_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".txt")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(_DATA_SUFFIXES)


def _unreadable(path: Path) -> bool:
    target = path / "config.json" if path.is_dir() else path
    return target.exists() and not os.access(target, os.R_OK)


def check_paths(raw: dict, recipe_dir: Path, errors: list[str]) -> None:
    """Everything train would open first, checked without loading it: the output folder
    (:func:`kdcore.storage.run_folder.output_dir_problem`), data files (beside the
    recipe or in the working directory; hub dataset names are left to the loader), model
    folders and ``.gguf`` files, ``pkg://`` specs, tokenizer paths, and read permission."""
    from kdcore.modeling.models import locate
    from kdcore.modeling.paths import ModelNotFoundError, resolve
    from kdcore.storage.run_folder import output_dir_problem

    out = get_dotted(raw, "train.output_dir")
    problem = output_dir_problem(out) if isinstance(out, str) else None
    if problem:
        errors.append(problem)
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
                errors.append(f"data.{key}: no file or folder '{clip(spec)}' (looked beside the recipe in "
                              f"'{recipe_dir}' and in the working directory)")
        elif _unreadable(found):
            errors.append(f"data.{key}: '{found}' is not readable (permission denied)")
    entries = raw.get("teachers") if isinstance(raw.get("teachers"), list) else []
    models = [(f"teachers[{i}]", e) for i, e in enumerate(entries) if isinstance(e, dict)] or [("teacher", raw.get("teacher"))]
    for section, sec in models + [("student", raw.get("student"))]:
        spec = (sec or {}).get("path")
        if not isinstance(spec, str) or not spec:
            continue
        try:
            kind, where = locate(spec)
        except ModelNotFoundError as exc:
            errors.append(f"{section}.path: {exc}")
            continue
        from kdcore.recipe.hub_cache import offline_hub_problem

        if kind == "hub" and (problem := offline_hub_problem(where)):
            errors.append(f"{section}.path: {problem}")
        if kind != "hub" and _unreadable(Path(where)):
            errors.append(f"{section}.path: '{where}' is not readable (permission denied)")
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
            errors.append(f"{section}.tokenizer: no such file or folder '{clip(spec)}'")
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
        v = get_dotted(raw, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and absurd(v):
            out.append(f"{key}={v!r}: {why}")
    from kdcore.recipe.switches import switched_off_warnings

    return out + switched_off_warnings(raw)


# ------------------------------------------------------------------ several teachers
_TEACHER_NAME = "^[A-Za-z0-9_.-]+$"  # it becomes part of metric keys (kd_loss/<name>)


def check_teachers_form(raw: dict, errors: list[str]) -> dict:
    """``teacher:`` xor ``teachers:``; with ``teachers:`` the schema check sees a placeholder
    ``teacher`` (each entry is checked by :func:`check_teacher_entries`, as ``teachers[i]``)."""
    if "teachers" not in raw:
        return raw
    if "teacher" in raw:
        errors.append("teachers: give either teacher: (one teacher) or teachers: (several), not both")
    entries = raw.get("teachers")
    if not isinstance(entries, list) or not entries:
        errors.append(f"teachers: expected a non-empty list of teacher sections, got {entries!r}")
    first = entries[0] if isinstance(entries, list) and entries and isinstance(entries[0], dict) else {}
    path = first.get("path") if isinstance(first.get("path"), str) else "(teachers)"
    return {**raw, "teachers": entries if isinstance(entries, list) else [], "teacher": {"path": path}}


def check_teacher_entries(raw: dict, registry, errors: list[str]) -> None:
    """Every ``teachers:`` entry at once (errors ``teachers[i].<key>: ...``), the data settings
    that name teachers, and the EMA keys of the short form."""
    import re

    from kdcore.plugin_system.registry import UnknownAlgorithmError

    entries = raw.get("teachers") or []
    names: list[str] = []
    for i, entry in enumerate(entries):
        where = f"teachers[{i}]"
        if not isinstance(entry, dict):
            errors.append(f"{where}: expected a teacher section (mapping), got {type(entry).__name__} {entry!r}")
            continue
        check_section(entry, TeacherEntry, where, errors)
        name = entry.get("name")
        if isinstance(name, str):
            if not re.match(_TEACHER_NAME, name):
                errors.append(f"{where}.name: '{name}' must be letters, digits, '_', '-' or '.' (it names metrics)")
            elif name in names:
                errors.append(f"{where}.name: '{name}' is used by teachers[{names.index(name)}] already")
            names.append(name)
        for key, pred, msg in (("weight", lambda v: v >= 0, "must be >= 0"), ("threads", lambda v: v >= 0, "must be >= 0"),
                               ("temperature", lambda v: v > 0, "must be > 0")):
            v = entry.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not pred(v):
                errors.append(f"{where}.{key}: {msg}, got {v!r}")
        for key in ("self_distill_every", "ema"):
            if entry.get(key):
                errors.append(f"{where}.{key}: self-distillation teaches with one teacher; use the teacher: form")
        engine = entry.get("engine", DEFAULT_TEACHER_ENGINE)
        if isinstance(engine, str):
            try:
                entry_of_engine = registry.get("engine", engine)
            except UnknownAlgorithmError as exc:
                errors.append(f"{where}.engine: {exc}")
            else:
                spec = entry_of_engine.fn
                check_engine_options(entry_of_engine, entry.get("engine_options"), f"{where}.engine_options", errors)
                check = getattr(spec, "check_recipe", None)
                if check is not None:
                    errors.extend(e.replace("teacher.", f"{where}.", 1) for e in check(entry, "teacher"))
        aligner = entry.get("aligner")
        if isinstance(aligner, str) or isinstance(entry.get("aligner_options"), dict):
            distill = dict(raw.get("distill") or {})
            one = {"aligner": aligner or distill.get("aligner", DistillConfig.aligner),
                   "aligner_options": entry.get("aligner_options") if entry.get("aligner_options") is not None
                   else distill.get("aligner_options") or {}}
            found: list[str] = []
            check_algorithm_options({"distill": one}, registry, found)
            errors.extend(e.replace("distill.aligner", f"{where}.aligner", 1) for e in found
                          if e.startswith("distill.aligner"))
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    context = data.get("teacher_context")
    if isinstance(context, dict) and context:
        if sorted(context) not in (["text"], ["column"]) or not isinstance(next(iter(context.values())), str):
            errors.append(f"data.teacher_context: expected {{text: \"...\"}} or {{column: NAME}}, got {context!r}")
    teacher = raw.get("teacher") if isinstance(raw.get("teacher"), dict) else {}
    if teacher.get("ema") and teacher.get("self_distill_every"):
        errors.append("teacher.ema: choose one of teacher.ema (an averaged student) and teacher.self_distill_every "
                      "(a copied student)")


def teacher_entries(cfg) -> list[dict]:
    """The recipe's teachers as one list of plain dicts, each with ``name``, its engine section,
    ``aligner``/``aligner_options``, ``weight`` and ``temperature`` filled in; the short form
    ``teacher:`` is one entry named ``teacher`` with distill's aligner and temperature."""
    d = cfg.distill
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dataclasses.asdict(cfg)
    listed = raw.get("teachers") or [dict(raw["teacher"], name="teacher")]
    out = []
    for entry in listed:
        e = dict(entry)
        e["aligner"] = e.get("aligner") or d.aligner
        e["aligner_options"] = dict(e["aligner_options"] if e.get("aligner_options") is not None else d.aligner_options or {})
        e["weight"] = float(e.get("weight", 1.0))
        e["temperature"] = float(e["temperature"] if e.get("temperature") is not None else d.temperature)
        out.append(e)
    return out
