"""Build the quickstart's Q&A data set from Python standard-library docstrings.

Each row asks what a function, method or class does and answers with the first paragraph of
its docstring (whitespace collapsed, at most ~400 characters, cut at a sentence end):

    {"messages": [{"role": "user", "content": "What does `json.dumps` do in Python?"},
                  {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."}]}

The docstrings are part of CPython (PSF License Agreement). The output is deterministic for a
given Python version (docstrings change between versions): rows sorted by name, the held-out
rows drawn with a fixed seed.

    python scripts/make_pydoc_dataset.py            # writes recipes/data/pydoc_qa{,_eval}.jsonl
    python scripts/make_pydoc_dataset.py --out DIR
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import sys
import warnings
import zlib
from pathlib import Path

# Modules with well-written docstrings that import everywhere without side effects.
MODULES = [
    "builtins", "abc", "argparse", "array", "ast", "base64", "bisect", "calendar", "cmath", "codecs",
    "collections", "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "enum", "filecmp", "fnmatch", "fractions", "functools", "gc", "getpass", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html", "inspect", "io", "ipaddress", "itertools", "json", "keyword",
    "linecache", "locale", "logging", "math", "mimetypes", "operator", "os", "os.path", "pathlib",
    "pickle", "platform", "pprint", "queue", "random", "re", "secrets", "shlex", "shutil", "signal",
    "socket", "statistics", "string", "struct", "subprocess", "sys", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "traceback", "types", "typing", "unicodedata",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib",
]
# Classes whose public methods get their own questions (``module.Class.method``).
METHOD_CLASSES = {
    "builtins": ["str", "bytes", "list", "dict", "set", "frozenset", "int", "float", "tuple"],
    "collections": ["Counter", "OrderedDict", "deque", "defaultdict"],
    "pathlib": ["Path", "PurePath"],
    "datetime": ["datetime", "date", "timedelta"],
    "decimal": ["Decimal"],
    "fractions": ["Fraction"],
    "logging": ["Logger", "Handler"],
    "random": ["Random"],
    "threading": ["Thread", "Event"],
    "zipfile": ["ZipFile"],
    "argparse": ["ArgumentParser"],
    "string": ["Template", "Formatter"],
    "io": ["StringIO", "BytesIO"],
    "ipaddress": ["IPv4Address", "IPv4Network"],
    "queue": ["Queue"],
    "re": ["Pattern", "Match"],
}
QUESTIONS = [
    "What does `{}` do in Python?",
    "In Python, what is `{}` used for?",
    "Explain what `{}` does in Python.",
    "What is the purpose of `{}` in Python?",
]
CLASS_QUESTIONS = ["What is `{}` in Python?", "Describe the Python class `{}`."]
MAX_CHARS = 400  # keeps most answers under ~100 tokens: a CPU quickstart stays fast
MIN_CHARS = 30  # shorter first paragraphs ("Return self.") teach nothing
N_EVAL = 64
SEED = 20240601

_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->\s*.*)?$")


def first_paragraph(doc: str) -> str | None:
    """The first prose paragraph of a docstring, whitespace collapsed, cut at a sentence end."""
    for para in re.split(r"\n\s*\n", doc.strip()):
        text = " ".join(para.split())
        if not text or _SIGNATURE.match(text) or text.startswith((">>>", "..", ":")):
            continue
        break
    else:
        return None
    if len(text) > MAX_CHARS:
        cut = max(text.rfind(". ", 0, MAX_CHARS), text.rfind("; ", 0, MAX_CHARS))
        if cut < MIN_CHARS:
            return None
        text = text[: cut + 1]
    if len(text) < MIN_CHARS or "deprecated" in text.lower():
        return None
    return text


def _public(names):
    return sorted(n for n in names if not n.startswith("_"))


def collect() -> dict[str, tuple[str, bool]]:
    """qualified name -> (answer, is_class), first name wins for objects reachable twice."""
    out: dict[str, tuple[str, bool]] = {}
    seen_obj: set[int] = set()
    seen_answer: set[str] = set()

    def add(name: str, obj, is_class: bool) -> None:
        if id(obj) in seen_obj:
            return
        seen_obj.add(id(obj))
        doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        if not doc:
            return
        answer = first_paragraph(inspect.cleandoc(doc))
        if answer is None or answer in seen_answer:
            return
        seen_answer.add(answer)
        out[name] = (answer, is_class)

    for modname in MODULES:
        mod = importlib.import_module(modname)
        prefix = "" if modname == "builtins" else modname + "."
        for attr in _public(dir(mod)):
            obj = getattr(mod, attr, None)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            # Only objects the module defines (or its C accelerator / platform module defines).
            owner = getattr(obj, "__module__", None) or ""
            base = modname.split(".")[0]
            if modname != "builtins" and not (owner.lstrip("_").startswith(base) or modname == "os.path"):
                continue
            add(prefix + attr, obj, inspect.isclass(obj))
        for cls_name in METHOD_CLASSES.get(modname, []):
            cls = getattr(mod, cls_name)
            for meth in _public(vars(cls)):
                obj = vars(cls)[meth]
                fn = getattr(obj, "__func__", obj)
                if callable(fn) or isinstance(obj, (classmethod, staticmethod)):
                    add(f"{prefix}{cls_name}.{meth}", fn, False)
    return out


def make_rows(items: dict[str, tuple[str, bool]]) -> list[dict]:
    rows = []
    for name in sorted(items):
        answer, is_class = items[name]
        pool = CLASS_QUESTIONS if is_class else QUESTIONS
        question = pool[zlib.crc32(name.encode()) % len(pool)].format(name)
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def main(argv: list[str] | None = None) -> None:
    warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn when touched
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "recipes" / "data"))
    args = ap.parse_args(argv)
    rows = make_rows(collect())
    held = set(random.Random(SEED).sample(range(len(rows)), N_EVAL))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for fname, part in (("pydoc_qa.jsonl", [r for i, r in enumerate(rows) if i not in held]),
                        ("pydoc_qa_eval.jsonl", [r for i, r in enumerate(rows) if i in held])):
        with open(out / fname, "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{out / fname}: {len(part)} rows")
    print(f"python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
