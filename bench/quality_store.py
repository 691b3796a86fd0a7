"""The quality benchmark's finished runs, kept in a JSONL file (``--store``) so that a benchmark
interrupted after hours resumes where it stopped and sections run in separate invocations render
into one report.

A run is found again by its **key** (the exact command: recipe name, overrides, seed, steps, and
the warm start's overrides), or by what it trained (a run under another command whose recipe
resolves to the same values, with the same seed, steps and warm start), and trusted only while
its **recipe** still resolves as it did: each run keeps the recipe ``kdcore`` resolved for it
(every default included, each data file replaced by the hash of its content), and a stored run
whose recipe now resolves to other values is *stale*: it is trained again, and a report rendered
from the store leaves it out and says how many. So editing ``recipes/quickstart.yaml``, changing a default in the recipe schema or the
training data retires the runs it affects and no others. A field added to the schema after a run
was stored is taken to have kept that run's behaviour while it holds its default (the rule every
new field follows); set to anything else, the run is stale.

Changes to the code that trains (a loss, the driver) do not retire a run: most leave the figures
as they were (a refactor, a new option at its default), and a render cannot tell which do not.
Each run keeps a **fingerprint of that code** (:func:`code_fingerprint`: the Python files under
``kdcore/`` and ``algorithms/``), and the report counts the runs shown whose fingerprint differs
from the checkout's; rerun a section without ``--store`` to check them, or delete the store.
Runs stored before recipes were kept (2026-12-07) carry none and are trusted as before, as are
runs whose recipe does not resolve on the machine rendering them; the report counts them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence


@dataclass
class Run:
    row: str
    seed: int
    ok: bool = False
    final: dict = field(default_factory=dict)  # the last evaluation record
    initial: dict = field(default_factory=dict)  # the step-0 evaluation record (the student at init)
    steps: int = 0
    tokens: int = 0  # training loss tokens summed over the steps (equal work: the same for every row)
    wall_s: float = 0.0
    error: str = ""
    curve: list = field(default_factory=list)  # every evaluation record (warm starts, sections with curves)
    recipe: dict = field(default_factory=dict)  # resolved_recipe() of the row when it was trained
    code: str = ""  # code_fingerprint() when it was trained ("" before fingerprints were kept)


# the folders whose Python trains and scores a run (the core and the built-in algorithms)
CODE_DIRS = ("kdcore", "algorithms")
REPO_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=None)
def code_fingerprint(root: Path = REPO_ROOT) -> str:
    """A hash of every ``*.py`` under :data:`CODE_DIRS` of ``root`` (paths and contents), read
    once per process: runs trained by the same code share it."""
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def code_counts(runs: Sequence[Run]) -> tuple[int, int]:
    """(runs stored without a fingerprint, runs whose fingerprint is not this checkout's)."""
    now = code_fingerprint()
    return sum(not r.code for r in runs), sum(bool(r.code) and r.code != now for r in runs)


# the keys of a resolved recipe that name data files: their content, not their path, is what a
# run learned from (the path differs between checkouts of the same commit)
DATA_KEYS = ("train", "eval")


def content_of_data(resolved: dict) -> dict:
    resolved = json.loads(json.dumps(resolved))  # a copy: the data paths are replaced below
    data = resolved.get("data") or {}
    for key in DATA_KEYS:
        value = data.get(key)
        if isinstance(value, str) and Path(value).is_file():
            data[key] = "sha256:" + hashlib.sha256(Path(value).read_bytes()).hexdigest()
    return resolved


@lru_cache(maxsize=None)
def _resolved(recipe: str, overrides: tuple[str, ...]) -> str:
    """The resolved recipe as JSON, or "" where it does not resolve (cached too: a render asks for
    each row's recipe once per stored run)."""
    from omegaconf import OmegaConf

    from kdcore.recipe.loading import RecipeError, load_recipe

    try:
        cfg = load_recipe(recipe, list(overrides))
    except RecipeError:
        return ""
    return json.dumps(content_of_data(OmegaConf.to_container(cfg, resolve=True)))


def resolved_recipe(recipe: str, overrides: Sequence[str]) -> dict | None:
    """``recipe`` with ``overrides`` as ``kdcore`` resolves them now, data files by content; None
    where it does not resolve on this machine (say a teacher file its setup script writes is
    missing): its stored runs can then be shown but not checked."""
    text = _resolved(recipe, tuple(overrides))
    return json.loads(text) if text else None


@lru_cache(maxsize=None)
def _schema_defaults() -> dict:
    """The schema's defaults by dotted key (built once: a render compares hundreds of recipes;
    read only)."""
    from omegaconf import OmegaConf

    from kdcore.recipe.schema import Recipe

    return _flat(OmegaConf.to_container(OmegaConf.structured(Recipe), resolve=True))


def _flat(tree: dict, prefix: str = "") -> dict:
    """Dotted keys to leaves (a list is a leaf)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# values that change where a run computes, not what: the hf and inline teacher engines load one
# TeacherModel class (tests/integration/test_teacher_inline.py: equal hidden states and equal
# training losses), so a run stored under one stands for the other
SAME_NUMBERS = {"teacher.engine": frozenset({"hf", "inline"})}


# settings that only say which training rows get a KD pair: a CE-only run (distill.kd_ratio 0)
# pairs none, so they cannot change it (the held-out evaluation pairs every row whatever they say)
KD_PAIRING = frozenset({"distill.kd_at_stop", "distill.kd_at_opening"})


def recipe_changes(then: dict, now: dict) -> list[str]:
    """The dotted keys whose value differs between a stored run's recipe and today's, a key the
    stored recipe lacks counting only where today's value is not the schema default, a change
    within one :data:`SAME_NUMBERS` group not counting, nor a :data:`KD_PAIRING` change between
    two CE-only recipes."""
    then_flat, now_flat, defaults = _flat(then), _flat(now), _schema_defaults()
    ce_only = then_flat.get("distill.kd_ratio") == now_flat.get("distill.kd_ratio") == 0

    def same(key: str, a, b) -> bool:
        return a == b or (key in SAME_NUMBERS and {a, b} <= SAME_NUMBERS[key]) or (ce_only and key in KD_PAIRING)

    changed = [k for k in then_flat if not same(k, now_flat.get(k, "<absent>"), then_flat[k])]
    return changed + [k for k in now_flat if k not in then_flat and not same(k, now_flat[k], defaults.get(k, "<absent>"))]


class RunStore:
    """Finished runs by key; a run whose recipe no longer resolves as it did is stale (see the
    module's docstring): :meth:`current` and :meth:`get` do not return it."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.done: dict[str, Run] = {}
        self.reused = 0  # runs this invocation took from the file
        self.stale: dict[str, list[str]] = {}  # key -> what changed, for stored runs left out
        self.unchecked: set[str] = set()  # keys of runs found that were stored without their recipe
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    key = rec.pop("key")  # before Run(**rec): the right side is evaluated first
                    self.done[key] = Run(**rec)

    @staticmethod
    def key(section, row, seed: int, steps: int | None, extra: Sequence[str] = ()) -> str:
        return json.dumps([section.recipe, list(row.overrides), seed, steps] + ([list(extra)] if extra else []))

    def current(self, key: str, recipe: dict | None) -> Run | None:
        """The stored run of ``key`` if its recipe is still ``recipe`` (:func:`resolved_recipe`;
        None: not resolvable here, the run is taken unchecked); else :meth:`same_training`'s."""
        run = self.done.get(key)
        if run is None:
            return self.same_training(key, recipe)
        if not run.recipe or recipe is None:
            self.unchecked.add(key)
        elif changed := recipe_changes(run.recipe, recipe):
            if (other := self.same_training(key, recipe)) is not None:
                return other
            self.stale[key] = changed
            return None
        return run

    def same_training(self, key: str, recipe: dict | None) -> Run | None:
        """A run stored under another command that trained exactly ``recipe`` (its stored recipe
        resolves to the same values) with the same seed, steps and warm start: a row spelled
        otherwise (another section's overrides, a recipe file renamed) reuses it."""
        if recipe is None:
            return None
        seed_steps_warm = json.loads(key)[2:]
        for other, run in self.done.items():
            o = json.loads(other)  # a warm start's own key is ["warm start", recipe, overrides, seed]
            if (other != key and o[0] != "warm start" and o[2:] == seed_steps_warm and run.recipe
                    and not recipe_changes(run.recipe, recipe)):
                return run
        return None

    def get(self, key: str, recipe: dict | None) -> Run | None:
        """As :meth:`current`, counted as a run this invocation reused."""
        run = self.current(key, recipe)
        self.reused += run is not None
        return run

    def put(self, key: str, run: Run, recipe: dict | None) -> None:
        run.recipe = recipe or {}  # (its code fingerprint is the trainer's to set: a run stored again keeps its own)
        if self.path is None or not run.ok:
            return
        self.done[key] = run
        self.stale.pop(key, None)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, **run.__dict__}) + "\n")
