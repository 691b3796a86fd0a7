"""`kdcore cache-teacher` on a recipe that already reads caches: which teachers it makes live.

A recipe may be built and trained as one file, in either form: a `teacher:` or a `teachers:`
entry naming `engine: cache` is computed live (hf, or `--engine`) for the build. The build
itself, per teacher, is tested end to end in tests/integration/test_multi_teacher.py (long)."""

from __future__ import annotations

import yaml

from kdcore.commands.cache_teacher import live_engine_overrides
from kdcore.recipe.loading import load_raw, validate_raw
from kdcore.plugin_system.manager import load_registry


def write(tmp_path, **sections):
    recipe = {"student": {"path": "student"}, "data": {"train": "train.jsonl"}, **sections}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_cache_entries_of_teachers_are_built_live_and_the_others_left_alone(tmp_path):
    registry = load_registry()
    recipe = write(tmp_path, teachers=[{"name": "a", "path": "ta", "engine": "cache", "cache": "cache/a"},
                                       {"name": "b", "path": "tb"},
                                       {"name": "c", "path": "tc", "engine": "cache", "cache": "cache/c"}])
    got = live_engine_overrides(recipe, [], registry, None)
    assert got == ["teachers.0.engine=hf", "teachers.0.cache=null", "teachers.2.engine=hf", "teachers.2.cache=null"]
    _, raw = load_raw(recipe, got)
    assert [(t.get("engine"), t.get("cache")) for t in raw["teachers"]] == [("hf", None), (None, None), ("hf", None)]
    assert not validate_raw(raw, registry), validate_raw(raw, registry)
    # --engine makes every teacher that engine; an override on the command line is seen first
    assert live_engine_overrides(recipe, [], registry, "remote")[::2] == [f"teachers.{i}.engine=remote"
                                                                          for i in range(3)]
    assert live_engine_overrides(recipe, ["teachers.0.engine=hf"], registry, None) == \
        ["teachers.2.engine=hf", "teachers.2.cache=null"]


def test_the_one_teacher_form_is_unchanged(tmp_path):
    registry = load_registry()
    cached = write(tmp_path, teacher={"path": "t", "engine": "cache", "cache": "c"})
    assert live_engine_overrides(cached, [], registry, None) == ["teacher.engine=hf", "teacher.cache=null"]
    live = write(tmp_path, teacher={"path": "t"})
    assert live_engine_overrides(live, [], registry, None) == []
    assert live_engine_overrides(live, [], registry, "remote") == ["teacher.engine=remote", "teacher.cache=null"]
