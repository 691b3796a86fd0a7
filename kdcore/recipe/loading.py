"""Recipes: loading, overrides and validation (the schema is :mod:`kdcore.recipe.schema`, the checks
beyond it :mod:`kdcore.recipe.checks`).

A recipe is a YAML file whose keys follow :class:`Recipe`. ``load_recipe`` merges dotlist
overrides (``train.lr=1e-4``), then checks everything at once — unknown keys (with the nearest
valid key), wrong types, bad choices and ranges, unknown algorithms (with the installed names)
and each chosen algorithm's options against its options dataclass — and raises one
:class:`RecipeError` listing every problem.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdcore.infra.exceptions import clip
from kdcore.recipe.secret import check_secrets, hold_secrets

# The schema and the checks live in their own modules; their public names are importable from
# here too, since recipes, tests and plugins know kdcore.recipe.loading as the recipe's home.
from kdcore.recipe.checks import (check_teachers_form, check_algorithm_options, check_engines, check_evaluators,
                                  check_loggers, check_paths, check_teacher_entries, recipe_warnings,
                                  teacher_entries)
from kdcore.recipe.schema import (RANGES, CheckpointConfig, DataConfig, DistillConfig, EvalConfig, LoggingConfig,
                           LoraConfig, Recipe, RemoteTeacherConfig, RolloutConfig, SGLangConfig, StudentConfig, TeacherConfig,
                           TeacherEntry, TrainConfig, check_section, get_dotted)


ERROR_CHARS = 1000  # one problem's line: room for a key, a clipped value and the valid choices


class RecipeError(ValueError):
    """Every problem found in a recipe, one per line."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        # each problem cut to a readable length: one may quote a value of any size (kdcore.infra.exceptions.clip)
        self.errors = [clip(e, ERROR_CHARS) for e in errors]
        errors = self.errors
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(f"  - {e}" for e in errors))


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: ./recipes, then the recipes shipped beside kdcore."""
    here = Path(__file__).resolve().parents[2] / "recipes"  # kdcore/recipe/loading.py -> the repository
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


def _apply_override(cfg, override: str, source: str) -> None:
    """One ``key=value`` onto the loaded recipe. ``OmegaConf.update`` rather than merging a dotlist:
    a merged dotlist turns ``teachers.1.weight`` into a mapping that cannot merge into the list."""
    key, _, text = override.partition("=")
    value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]  # YAML typing, as a dotlist
    try:
        OmegaConf.update(cfg, key.strip(), value, merge=True)
    except Exception as exc:  # a list index past the end, a key below a scalar, ...
        raise RecipeError(source, [f"override '{override}': {type(exc).__name__}: {exc}".splitlines()[0]]) from exc


COMMAND_LINE = "the command line"


def blame_overrides(source: str, errors: list[str], overrides: list[str] | None,
                    setup: str | None = None) -> tuple[str, list[str]]:
    """Say which problems the command line's overrides made, so a typo in ``train.lrr=3`` is not
    reported against the recipe file. Each such line gets ``[command line: <override>]``; when
    every problem is the command line's, so is the source. A missing file the recipe itself names
    also gets the recipe's ``setup`` command (``bash scripts/get_gemma.sh``): what makes it."""
    keys = [(o, o.partition("=")[0].strip()) for o in overrides or [] if "=" in o]
    setup = setup if isinstance(setup, str) and setup else None
    marked, from_cli = [], 0
    for e in errors:
        key = e.split(":", 1)[0]
        hit = next((o for o, k in reversed(keys)
                    if key == k or key.startswith(k + ".") or k.startswith(key + ".")), None)
        if setup and hit is None and ("no such file or folder" in e or "no file or folder" in e):
            e = f"{e} (made by: {setup})"
        from_cli += hit is not None
        marked.append(f"{e} [command line: {hit}]" if hit else e)
    if errors and from_cli == len(errors):
        source = f"{COMMAND_LINE} (recipe {source})"
    return source, marked


def load_raw(path_or_name: str, overrides: list[str] | None = None) -> tuple[Path, dict]:
    path = resolve_recipe(path_or_name)
    try:
        cfg = OmegaConf.load(path)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise RecipeError(COMMAND_LINE, [f"override '{o}' must look like key=value" for o in bad])
            for override in overrides:
                _apply_override(cfg, override, COMMAND_LINE)
        raw = OmegaConf.to_container(cfg, resolve=True)
    except RecipeError:
        raise
    except Exception as exc:
        raise RecipeError(str(path), [f"cannot read recipe: {type(exc).__name__}: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise RecipeError(str(path), ["a recipe must be a mapping of sections"])
    hold_secrets(raw)  # from here on the recipe holds a mask where a token was given
    expand_home(raw)
    _resolve_model_paths(raw, path.parent)
    return path, raw


def validate_raw(raw: dict, registry=None, recipe_dir: Path | None = None) -> list[str]:
    """All problems in a raw recipe mapping (empty list when valid). With ``recipe_dir``,
    local paths (data, models, tokenizers) are checked too (:func:`check_paths`)."""
    errors: list[str] = []
    raw = check_teachers_form(raw, errors)
    check_section(raw, Recipe, "", errors)
    for key, pred, msg in RANGES:
        v = get_dotted(raw, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not pred(v):
            errors.append(f"{key}: {msg}, got {v!r}")
    s = raw.get("student") or {}
    if isinstance(s, dict) and s.get("init") == "truncate" and not s.get("num_layers"):
        errors.append("student.num_layers: required when student.init is 'truncate'")
    if registry is None:
        from kdcore.plugin_system.manager import load_registry

        registry = load_registry()
    check_engines(raw, registry, errors)
    check_algorithm_options(raw, registry, errors)
    check_evaluators(raw, registry, errors)
    if recipe_dir is not None:
        check_paths(raw, recipe_dir, errors)
    check_loggers(raw, registry, errors)
    check_teacher_entries(raw, registry, errors)
    check_secrets(raw, errors)
    return errors


def load_recipe(path_or_name: str, overrides: list[str] | None = None, registry=None) -> DictConfig:
    """Load, override and validate a recipe; return a read-only typed config.

    Raises :class:`RecipeError` with every problem at once.
    """
    path, raw = load_raw(path_or_name, overrides)
    errors = validate_raw(raw, registry, recipe_dir=path.parent)
    if errors:
        source, errors = blame_overrides(str(path), errors, overrides, raw.get("setup"))
        raise RecipeError(source, errors)
    _resolve_data_paths(raw, path.parent)
    resolve_auto_dtypes(raw)
    if raw.get("teachers"):  # cfg.teacher is the first entry, for the parts that read one teacher
        first = raw["teachers"][0]
        raw["teacher"] = {k: v for k, v in first.items() if k in TeacherConfig.__dataclass_fields__}
    cfg = OmegaConf.merge(OmegaConf.structured(Recipe), raw)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def resolve_auto_dtypes(raw: dict) -> dict[str, tuple[str, str]]:
    """Replace ``dtype: auto`` in the teacher section(s) of ``raw`` (in place) with the dtype it
    means on that teacher's device (:func:`kdcore.modeling.models.auto_dtype`), so every command and the
    run folder's recipe.yaml see the value used. Returns ``{section: (dtype, why)}``."""
    from kdcore.modeling.models import auto_dtype

    done = {}
    teachers = raw.get("teachers") if isinstance(raw.get("teachers"), list) else []
    for name, section in [("teacher", raw.get("teacher"))] + [(f"teachers[{i}]", t) for i, t in enumerate(teachers)]:
        if isinstance(section, dict) and section.get("dtype") == "auto":
            dtype, why = auto_dtype(str(section.get("device") or "auto"))
            section["dtype"] = dtype
            done[name] = (dtype, why)
    return done


# every key that names a file or folder on this machine: a leading ~ means the home folder there,
# as in a shell (not a folder named "~" in the working directory)
PATH_KEYS = ("train.output_dir", "data.train", "data.eval", "student.path", "student.tokenizer")
TEACHER_PATH_KEYS = ("path", "tokenizer", "cache", "remote.token_file")


def expand_home(raw: dict) -> None:
    """Expand a leading ``~`` in every path of ``raw`` (in place), the teachers' included."""
    def expand(section: Any, dotted: str) -> None:
        *parents, leaf = dotted.split(".")
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict) and isinstance(section.get(leaf), str) and section[leaf].startswith("~"):
            section[leaf] = os.path.expanduser(section[leaf])

    for key in PATH_KEYS:
        expand(raw, key)
    teachers = raw.get("teachers") if isinstance(raw.get("teachers"), list) else []
    for section in [raw.get("teacher")] + list(teachers):
        for key in TEACHER_PATH_KEYS:
            expand(section, key)


def _resolve_model_paths(raw: dict, recipe_dir: Path) -> None:
    """A relative model folder that exists beside the recipe is that one (as for data), so a
    recipe can ship or generate its models next to it; anything else is left as written."""
    for section in ("teacher", "student"):
        sec = raw.get(section)
        value = sec.get("path") if isinstance(sec, dict) else None
        if isinstance(value, str) and "://" not in value and not Path(value).expanduser().is_absolute() \
                and not Path(value).exists() and (recipe_dir / value).is_dir():
            sec["path"] = str((recipe_dir / value).resolve())


def _resolve_data_paths(raw: dict, recipe_dir: Path) -> None:
    """Relative data paths name files beside the recipe first, then in the working directory,
    so shipped recipes run from any folder."""
    data = raw.get("data") or {}
    for key in ("train", "eval"):
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (recipe_dir / value).exists():
            data[key] = str((recipe_dir / value).resolve())




__all__ = [
    "RecipeError", "load_recipe", "load_raw", "validate_raw", "blame_overrides", "resolve_recipe", "recipe_dirs",
    # re-exported from kdcore.recipe.schema and kdcore.recipe.checks
    "Recipe", "TeacherConfig", "TeacherEntry", "RemoteTeacherConfig", "SGLangConfig", "StudentConfig", "DataConfig",
    "DistillConfig", "LoraConfig", "RolloutConfig", "TrainConfig", "CheckpointConfig", "LoggingConfig", "EvalConfig",
    "RANGES",
    "check_algorithm_options", "check_engines", "check_evaluators", "check_loggers", "check_paths",
    "check_teacher_entries", "recipe_warnings", "teacher_entries",
]
