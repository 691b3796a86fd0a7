"""Reading a data spec into rows: local files (jsonl/json/parquet/arrow/csv), ``save_to_disk``
folders, folders of data files, hub names; a row that cannot be read is a :class:`BadRow`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcore.data.common import BadRow, DataError
from kdcore.paths import PKG_SCHEME, looks_local, resolve


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
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as exc:
        if builder == "json":
            # Arrow needs one type per column; rows of mixed types (or broken lines) are read one
            # by one so that each bad row is reported with its number instead of failing the file.
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
    text = p.read_text(encoding="utf-8")
    rows: list[Any] = []
    stripped = text.lstrip()
    if p.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"cannot parse JSON file '{p}': {exc}") from exc
        rows = list(data)
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                rows.append(BadRow(f"line {lineno} is not valid JSON ({exc.msg})"))
    columns: list[str] = []
    for r in rows:
        if isinstance(r, dict):
            columns.extend(k for k in r if k not in columns)
    return RowSource(path=str(p), rows=rows, columns=columns)
