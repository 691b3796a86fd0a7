"""The recipe reference, from the schema itself: ``docs/recipes.md`` is generated from the
dataclasses of :mod:`kdcore.recipe.schema` (each key, its type, its default and the comment beside it
that gives the reason), the row formats of :mod:`kdcore.data`'s docstring and the file kinds
:mod:`kdcore.data.reading` accepts, so the page cannot say what the code does not do
(tests/unit/test_recipe_doc.py regenerates it and compares). Also the text ``kdcore config``
prints: a recipe resolved with every default.

    python -m kdcore.recipe.doc            # rewrite docs/recipes.md
    python -m kdcore.recipe.doc --check    # exit 1 when docs/recipes.md is stale

Sources are read as text (``ast`` and ``tokenize``), never imported beyond the schema, so this
stays as light as recipe validation.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any
from kdcore import data
from kdcore.data import reading
from kdcore.engines.remote import config as remote_config
from kdcore.engines.sglang import config as sglang_config
from kdcore.recipe import schema
from kdcore.recipe.schema import Recipe, TeacherConfig, TeacherEntry

# the repository root: this file is kdcore/recipe/doc.py
ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "recipes.md"


# ------------------------------------------------------------------ comments beside the fields
def _field_comments(path: Path) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comments above the field and on its lines, joined."""
    source = path.read_text()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):  # a comment block right above
                above.insert(0, comments[line])
                line -= 1
            beside = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
            out[(node.name, stmt.target.id)] = "; ".join(" ".join(part) for part in (above, beside) if part)
    return out


def _comments() -> dict[tuple[str, str], str]:
    return {**_field_comments(Path(schema.__file__)), **_field_comments(Path(sglang_config.__file__)),
            **_field_comments(Path(remote_config.__file__))}


# ------------------------------------------------------------------ defaults and types
def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if value is dataclasses.MISSING or value == "???":
        return "**required**"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    if isinstance(value, (list, dict)) and not value:
        return "`[]`" if isinstance(value, list) else "`{}`"
    return f"`{value}`"


def _type_text(tp: Any) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    text = text or str(tp).replace("typing.", "")
    return text.replace("NoneType", "null").replace("Optional[", "").rstrip("]") + " or null" \
        if str(tp).startswith("typing.Optional[") else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section_table(cls: type, prefix: str, comments: dict, nested: list) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | what it is, and why this default |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{prefix}.{f.name}"))
            continue
        choices = f.metadata.get("choices")
        type_text = " or ".join(f"`{c}`" for c in choices) if choices else _type_text(tp)
        owner = next(c.__name__ for c in cls.__mro__ if f.name in getattr(c, "__annotations__", {}))
        rows.append(f"| `{prefix}.{f.name}` | {_cell(type_text)} | {_cell(_show(_default(f)))} | "
                    f"{_cell(comments.get((owner, f.name), ''))} |")
    return rows


# ------------------------------------------------------------------ data: formats and file kinds
def _data_formats() -> str:
    doc = ast.get_docstring(ast.parse(Path(data.__file__).read_text())) or ""
    start = doc.index("Row formats")
    end = doc.index("**Canonical text")
    return doc[start:end].strip().replace("``", "`")


def _file_kinds() -> list[str]:
    tree = ast.parse(Path(reading.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name) and target.id == "_FILE_BUILDERS":
                return sorted(ast.literal_eval(node.value))
    raise RuntimeError("kdcore/data/reading.py: _FILE_BUILDERS not found")


# ------------------------------------------------------------------ the page
def render() -> str:
    comments = _comments()
    out = [
        "# Recipes and data",
        "",
        "<!-- generated by `python -m kdcore.recipe.doc` from kdcore/recipe/schema.py, kdcore/data/__init__.py",
        "     and kdcore/data/reading.py; edit those, not this page (a test compares them) -->",
        "",
        "A recipe is a YAML file of the sections below; every key has a default except the ones marked",
        "**required**. Override any key on the command line (`kdcore train quickstart train.lr=3e-4`),",
        "see a recipe with every default filled in with `kdcore config RECIPE [overrides]`, and check",
        "one with `kdcore validate RECIPE [overrides]` (every error at once, with the nearest valid key).",
        "An algorithm's options (`distill.loss_options`, ...) are its plugin's options dataclass:",
        "`kdcore list-algorithms` lists them with their defaults.",
        "",
        "## Data",
        "",
        "`data.train` and `data.eval` accept a local file of one of the kinds "
        + ", ".join(f"`{k}`" for k in _file_kinds())
        + ", a `save_to_disk` folder, or a hub data set name (relative paths are read beside the recipe"
        " first, then from the working directory).",
        "",
        _data_formats(),
        "",
    ]
    nested: list = []
    recipe_hints = typing.get_type_hints(Recipe)
    scalars = [f for f in dataclasses.fields(Recipe) if typing.get_origin(recipe_hints[f.name]) is not list
               and not dataclasses.is_dataclass(recipe_hints[f.name])]
    if scalars:  # keys of the recipe itself, not of a section
        out += ["## top-level keys", "", "| key | type | default | what it is, and why this default |", "|---|---|---|---|"]
        out += [f"| `{f.name}` | {_cell(_type_text(recipe_hints[f.name]))} | {_cell(_show(_default(f)))} | "
                f"{_cell(comments.get(('Recipe', f.name), ''))} |" for f in scalars]
        out.append("")
    for f in dataclasses.fields(Recipe):
        tp = recipe_hints[f.name]
        if f in scalars:
            continue
        if f.name == "teachers":
            out += ["## teachers", "",
                    "Several teachers: a list of `teacher` sections (every key of `teacher` above), each with "
                    "these keys besides (`teachers[i].<key>`). Give either `teacher:` or `teachers:`.", ""]
            own = [x for x in dataclasses.fields(TeacherEntry) if x.name not in TeacherConfig.__dataclass_fields__]
            out += ["| key | type | default | what it is, and why this default |", "|---|---|---|---|"]
            hints = typing.get_type_hints(TeacherEntry)
            for x in own:
                out.append(f"| `teachers[i].{x.name}` | {_cell(_type_text(hints[x.name]))} | {_cell(_show(_default(x)))} | "
                           f"{_cell(comments.get(('TeacherEntry', x.name), ''))} |")
            out.append("")
            continue
        out += [f"## {f.name}", ""]
        intro = " ".join(filter(None, [comments.get(("Recipe", f.name), ""), (tp.__doc__ or "").strip()
                                       if not (tp.__doc__ or "").startswith(tp.__name__ + "(") else ""]))
        if intro:
            out += [" ".join(intro.split()), ""]
        nested = []
        out += _section_table(tp, f.name, comments, nested)
        out.append("")
        while nested:
            cls, prefix = nested.pop(0)
            out += [f"### {prefix}", ""]
            doc = (cls.__doc__ or "").strip()
            if doc and not doc.startswith(cls.__name__ + "("):
                out += [" ".join(doc.split()), ""]
            out += _section_table(cls, prefix, comments, nested)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def resolved_yaml(cfg) -> str:
    """A loaded recipe (``load_recipe``) as YAML with every default: the short ``teacher:`` form
    alone, or ``teachers:`` alone, as the recipe was written."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    if plain.get("teachers"):
        plain.pop("teacher", None)  # load_recipe's copy of the first entry, for single-teacher code
    else:
        plain.pop("teachers", None)
    return OmegaConf.to_yaml(OmegaConf.create(plain))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE} is stale: run python -m kdcore.recipe.doc", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
