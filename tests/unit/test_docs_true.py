"""The newcomer's documents stay true: paths they name exist, the file they call the schema is
the schema, and CONTRIBUTING's plugin ``pyproject.toml`` installs as written (issue 28: it did
not, "project must contain ['version'] properties")."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# README.md's former sections live in docs/ pages now (issue 28: README <= 200 lines)
MOVED = ("docs/quickstart.md", "docs/cli.md", "docs/evaluation.md", "docs/runs.md", "docs/recipe_guide.md",
         "docs/vision.md", "docs/performance.md", "docs/quality.md", "docs/status.md", "docs/api.md")
DOCS = ("README.md", "CONTRIBUTING.md", "Makefile", "bench/README.md", "docs/architecture.md", *MOVED)
README_MAX_LINES = 200
# a repository path as the documents write it (not part of a longer path such as <dir>/tests/x)
REPO_PATH = re.compile(r"(?<![\w./<>-])((?:kdcore|algorithms|tests|bench|checks|recipes|scripts|docs|plugins|examples|\.ci)/[\w./-]*[\w/])")


def _named_paths(text: str) -> list[str]:
    return [m.group(1) for m in REPO_PATH.finditer(text)]


def test_paths_named_in_the_docs_exist():
    missing = [f"{doc}: {p}" for doc in DOCS for p in _named_paths((ROOT / doc).read_text())
               if not (ROOT / p).exists()]
    assert not missing, "documents name paths that do not exist: " + "; ".join(missing)


def test_readme_stays_short_and_its_links_resolve():
    """A newcomer's page: what it is, the two commands, what you get, then links (issue 28: it was
    711 lines, ~140 of them benchmark log). Every relative link of README and the moved pages
    must point at a file."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, (
        f"README.md has {len(text.splitlines())} lines (at most {README_MAX_LINES}): move details to a docs/ page")
    broken = []
    for doc in ("README.md", *MOVED):
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", (ROOT / doc).read_text()):
            if not ((ROOT / doc).parent / target).exists():
                broken.append(f"{doc}: {target}")
    assert not broken, "links to nothing: " + "; ".join(broken)


def test_path_scan_sees_a_stale_pointer():
    # the Makefile's old example: the scan must catch it, or the test above proves nothing
    assert _named_paths('make test TESTS="-x tests/test_config.py"') == ["tests/test_config.py"]
    assert not (ROOT / "tests/test_config.py").exists()


def test_the_file_called_the_schema_holds_the_recipe_schema():
    text = (ROOT / "README.md").read_text()
    named = re.findall(r"`([\w/]+\.py)` is the schema", text)
    assert named, "README no longer says which file is the schema"
    for path in named:
        assert "class Recipe:" in (ROOT / path).read_text(), f"README calls {path} the schema"


def test_several_teachers_sits_in_the_plugin_guide():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    assert text.index("## Writing a plugin") < text.index("### Several teachers")


def _snippet(text: str, lang: str, after: str) -> str:
    start = text.index(after)
    return re.search(rf"```{lang}\n(.*?)```", text[start:], re.S).group(1)


def test_contributing_plugin_snippet_installs_and_is_listed(tmp_path):
    """pip-installs exactly CONTRIBUTING's pyproject.toml (and its hook module) offline, then
    `kdcore plugins` must list the plugin."""
    pytest.importorskip("setuptools")
    text = (ROOT / "CONTRIBUTING.md").read_text()
    toml = _snippet(text, "toml", "## Writing a plugin")
    module = _snippet(text, "python", "The module defines hook implementations")
    name = re.search(r'^name = "([^"]+)"', toml, re.M).group(1)
    entry = re.search(r'^\[project\.entry-points\.kdcore\]\n(\w+) = "(\w+)"', toml, re.M)
    src = tmp_path / "src"
    (src / entry.group(2)).mkdir(parents=True)
    (src / "pyproject.toml").write_text(toml)
    (src / entry.group(2) / "__init__.py").write_text(module)
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"CONTRIBUTING's plugin snippet does not install: {done.stderr[-2000:]}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    listed = subprocess.run([sys.executable, "-m", "kdcore", "plugins", "--json"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert listed.returncode == 0, listed.stderr
    plugins = {p["distribution"]: p for p in json.loads(listed.stdout)}
    assert name in plugins, f"{name} installed but not listed: {sorted(plugins)}"
    assert plugins[name]["error"] is None, plugins[name]["error"]
    assert "register_losses" in plugins[name]["hooks"]


def _architecture_tree() -> list[str]:
    """The paths of docs/architecture.md's tree (the code block under "## The parts"): two
    spaces of indent per level, a name first; lines indented further continue a description."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"## The parts\n.*?```\n(.*?)```", text, re.S).group(1)
    stack: list[str] = []
    paths = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent >= 20:
            continue
        level = indent // 2
        stack[level:] = [line.split()[0]]
        paths.append("".join(stack))
    return paths


def test_the_architecture_tree_names_what_exists_and_all_of_kdcore():
    paths = _architecture_tree()
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"
    # every package of kdcore and every module of kdcore/ and of its layer packages is on the map
    # (an engine package's own files are described on its line)
    core = ROOT / "kdcore"
    wanted = {f"kdcore/{p.relative_to(core)}" + ("/" if p.is_dir() else "")
              for p in list(core.glob("*.py")) + list(core.glob("*/*.py")) + list(core.glob("*/*/"))
              if p.name != "__pycache__" and not (p.name == "__init__.py" and p.parent != core)
              and (p.is_file() or (p / "__init__.py").exists())}
    absent = sorted(w for w in wanted if w not in set(paths))
    assert not absent, f"docs/architecture.md's tree leaves out: {absent}"


def test_the_tree_parser_sees_a_stale_entry():
    # a renamed module must show up as missing, or the test above proves nothing
    assert "kdcore/recipe/loading.py" in _architecture_tree()
    assert not (ROOT / "kdcore" / "config.py").exists()
