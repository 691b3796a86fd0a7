"""JSON-lines data is read without ``datasets`` (whose import keeps ~90 MB resident in the
student process for the whole run), into the same rows ``datasets`` gives."""

from __future__ import annotations

import json
import subprocess
import sys

from kdcore.data.reading import read_rows

ROWS = [{"prompt": "a", "completion": "b", "n": 1},
        {"completion": "d", "prompt": "c"},  # a missing column and another key order
        {"prompt": "é ✓", "completion": "", "n": 3, "extra": [1, 2]}]


def test_jsonl_rows_are_the_rows_datasets_gives(tmp_path):
    import datasets

    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS) + "\n", encoding="utf-8")
    src = read_rows(str(p))
    ref = datasets.load_dataset("json", data_files=str(p), split="train")
    assert src.columns == list(ref.column_names)
    assert src.rows == ref.to_list()


def test_reading_jsonl_does_not_import_datasets(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    code = ("import sys; from kdcore.data.reading import read_rows; "
            f"src = read_rows({str(p)!r}); print(len(src.rows), 'datasets' in sys.modules, 'pyarrow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["3", "False", "False"]
