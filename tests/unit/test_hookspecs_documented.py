"""datasette's rule: a hook without a test or without plugin-author docs fails the suite."""

from __future__ import annotations

import inspect
from pathlib import Path

from kdcore.plugin_system import hookspecs

ROOT = Path(__file__).resolve().parents[2]
HOOKS = [name for name, fn in vars(hookspecs).items()
         if inspect.isfunction(fn) and hasattr(fn, "kdcore_spec")]


def test_there_are_hooks():
    assert set(HOOKS) == {"register_losses", "register_aligners", "register_rollouts", "register_engines",
                          "register_evaluators", "register_loggers"}


def test_every_hook_fills_a_registry_kind():
    from kdcore.plugin_system.registry import HOOK_OF_KIND, KINDS

    assert set(HOOK_OF_KIND.values()) == set(HOOKS) and set(HOOK_OF_KIND) == set(KINDS)


def test_every_hook_has_a_docstring_contract():
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc.splitlines()) >= 3, f"hookspec {name} lacks plugin-author docs"


def test_every_hook_has_a_section_in_contributing():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    for name in HOOKS:
        assert any(name in h for h in headings), f"CONTRIBUTING.md has no section for {name}"


def test_every_hook_is_exercised_by_a_test():
    this = Path(__file__).name
    sources = {p.name: p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.name != this}
    for name in HOOKS:
        users = [f for f, src in sources.items() if f"{name}(register)" in src or f"{name}=" in src]
        assert users, f"no test registers a plugin through {name}"
