"""Reading a data spec into rows: local files (jsonl/json/parquet/arrow/csv), ``save_to_disk``
folders, folders of data files, hub names; a row that cannot be read is a :class:`BadRow`."""

from __future__ import annotations

import codecs
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcore.data.common import BadRow, DataError
from kdcore.modeling.paths import PKG_SCHEME, looks_local, resolve


@dataclass
class RowSource:
    """Rows read from one data spec. ``rows[i]`` is row ``i``; a row that could not even be
    parsed (a broken JSON line) is a :class:`BadRow` instead of a mapping."""

    path: str
    rows: list[Any]
    columns: list[str]


def resolve_data_path(spec: str, base_dir: str | os.PathLike | None = None) -> str:
    """A data spec as a path: ``pkg://`` resolved, ``~`` expanded, relative paths looked up
    first under ``base_dir`` (the recipe's folder) then the working directory. Specs that are
    no existing path are returned unchanged (hub names)."""
    if spec.startswith(PKG_SCHEME):
        return resolve(spec)
    p = Path(os.path.expanduser(spec))
    if not p.is_absolute() and base_dir is not None and (Path(base_dir) / p).exists():
        return str(Path(base_dir) / p)
    return str(p) if p.exists() or looks_local(spec, _FILE_BUILDERS) else spec


_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


def read_rows(spec: str, *, base_dir: str | os.PathLike | None = None, limit: int | None = None) -> RowSource:
    """Read a data set: a jsonl/json/parquet/arrow/csv file, a ``save_to_disk`` folder, a folder
    of data files, or (with network) a hub name. Raises :class:`DataError` naming the path
    when it is missing or empty."""
    path = resolve_data_path(spec, base_dir)
    p = Path(path)
    if p.exists():
        ds = _load_local(p)
    elif looks_local(spec, _FILE_BUILDERS):
        where = f" (looked in {base_dir} and {os.getcwd()})" if base_dir is not None else ""
        raise DataError(f"data file not found: '{spec}'{where}")
    else:
        ds = _load_hub(spec)
    if isinstance(ds, RowSource):
        src = ds
    else:
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        src = RowSource(path=path, rows=ds.to_list(), columns=list(ds.column_names))
    if limit is not None:
        src.rows = src.rows[:limit]
    if not src.rows:
        raise DataError(f"data set is empty: '{path}'")
    return src


def _load_local(p: Path):
    if p.is_file() and p.suffix.lower() == ".jsonl" and p.stat().st_size:
        # JSON lines need no Arrow: read here, `datasets` (and pyarrow, ~90 MB resident in the
        # student process for the whole run) is not imported for the commonest data file.
        return _arrow_shaped(_read_json_rows(p))
    import datasets

    datasets.disable_progress_bars()  # the trainer prints its own report
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            try:
                ds = datasets.load_from_disk(str(p))
            except Exception as exc:
                raise DataError(f"cannot read save_to_disk folder '{p}': {type(exc).__name__}: {exc}") from exc
            return _one_split(ds, str(p))
        try:
            return _one_split(datasets.load_dataset(str(p)), str(p))
        except Exception as exc:
            raise DataError(f"cannot read data folder '{p}': {type(exc).__name__}: {exc}") from exc
    suffix = p.suffix.lower()
    builder = _FILE_BUILDERS.get(suffix)
    if builder is None:
        raise DataError(f"unknown data file type '{p}': expected {', '.join(_FILE_BUILDERS)} or a save_to_disk folder")
    if p.stat().st_size == 0:
        raise DataError(f"data set is empty: '{p}'")
    if builder in ("json", "csv") and not _is_utf8(p):
        # datasets stops at the first undecodable byte (CSV) or keeps it and fails later (JSON);
        # reading such a file ourselves makes only the rows that hold one bad.
        return _read_json_rows(p) if builder == "json" else _read_csv_rows(p)
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as exc:
        if builder == "json":
            # Arrow needs one type per column and valid UTF-8; rows of mixed types, broken lines
            # or undecodable bytes are read one by one so that each bad row is reported with its
            # number instead of failing the file.
            return _read_json_rows(p)
        raise DataError(f"cannot read data file '{p}': {type(exc).__name__}: {exc}") from exc


def _load_hub(spec: str):
    import datasets

    datasets.disable_progress_bars()
    try:
        return _one_split(datasets.load_dataset(spec), spec)
    except Exception as exc:
        raise DataError(f"cannot load data set '{spec}' (not a local path; tried the hub): "
                        f"{type(exc).__name__}: {exc}") from exc


def _one_split(ds, name: str):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            return ds["train"]
        if len(ds) == 1:
            return next(iter(ds.values()))
        raise DataError(f"'{name}' has several splits ({', '.join(ds)}) and none is called 'train'")
    return ds


def _read_json_rows(p: Path) -> RowSource:
    data = p.read_bytes()
    if p.suffix.lower() == ".json" and data.lstrip().startswith(b"["):
        rows = _read_json_array(p, data)
    else:
        rows = []
        for lineno, raw in enumerate(data.splitlines(), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                rows.append(BadRow(f"line {lineno} is not valid UTF-8 "
                                   f"(byte 0x{exc.object[exc.start]:02x} at byte {exc.start + 1} of the line)"))
                continue
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                rows.append(BadRow(f"line {lineno} is not valid JSON ({exc.msg})"))
    return RowSource(path=str(p), rows=rows, columns=_columns(rows))


def _arrow_shaped(src: RowSource) -> RowSource:
    """Rows as ``datasets`` hands them out: every row has every column (``None`` where it has
    none), in the order the columns first appear."""
    src.rows = [{c: r.get(c) for c in src.columns} if isinstance(r, dict) else r for r in src.rows]
    return src


def _read_json_array(p: Path, data: bytes) -> list[Any]:
    # A JSON array has no lines to blame, so undecodable bytes are marked in the text and the
    # items that hold a mark are the bad rows.
    try:
        items = list(json.loads(_decode_marking_bad_bytes(data)))
    except json.JSONDecodeError as exc:
        raise DataError(f"cannot parse JSON file '{p}': {exc}") from exc
    return [_marked_as_bad(item) for item in items]


def _read_csv_rows(p: Path) -> RowSource:
    """A CSV file with undecodable bytes, parsed as ``datasets`` parses CSV (pandas, empty cells
    as None) from its text with those bytes marked; the rows that hold a mark are bad."""
    import pandas as pd

    try:
        frame = pd.read_csv(io.StringIO(_decode_marking_bad_bytes(p.read_bytes())))
    except Exception as exc:
        raise DataError(f"cannot read data file '{p}': {type(exc).__name__}: {exc}") from exc
    records = frame.to_dict(orient="records")
    rows = [_marked_as_bad({k: None if _is_missing(v) else v for k, v in rec.items()}) for rec in records]
    return RowSource(path=str(p), rows=rows, columns=[str(c) for c in frame.columns])


def _is_missing(value: Any) -> bool:
    return isinstance(value, float) and value != value  # NaN: pandas' empty cell


def _is_utf8(p: Path, chunk: int = 1 << 20) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(p, "rb") as f:
        try:
            while block := f.read(chunk):  # in chunks: data files can be larger than memory allows twice
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


# An undecodable byte b becomes this mark (private-use code points, which text does not use this
# way), so the text can be parsed whole and each mark traced back to its row.
_BAD_BYTE = "\U0010fffd{:02x}\U0010fffd"
_BAD_BYTE_RE = re.compile("\U0010fffd([0-9a-f]{2})\U0010fffd")


def _mark_bad_bytes(exc: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(_BAD_BYTE.format(b) for b in exc.object[exc.start:exc.end]), exc.end


def _decode_marking_bad_bytes(data: bytes) -> str:
    codecs.register_error("kdflow.mark_bad_bytes", _mark_bad_bytes)  # idempotent
    return data.decode("utf-8", errors="kdflow.mark_bad_bytes")


def _marked_as_bad(row: Any) -> Any:
    """``row`` itself, or a :class:`BadRow` naming a byte in it that was not UTF-8."""
    stack = [row]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and (m := _BAD_BYTE_RE.search(value)):
            shown = _BAD_BYTE_RE.sub("\ufffd", value)
            at = len(_BAD_BYTE_RE.sub("\ufffd", value[:m.start()]))
            return BadRow(f"not valid UTF-8 (byte 0x{m.group(1)} at character {at + 1} of {shown[:60]!r})")
    return row


def _columns(rows: list[Any]) -> list[str]:
    columns: list[str] = []
    for r in rows:
        if isinstance(r, dict):
            columns.extend(k for k in r if k not in columns)
    return columns
