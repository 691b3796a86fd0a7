"""``prepare_data``: read, check, split off a held-out set, tokenize, apply the max-length policy."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

from kdcore.data.common import BadRow, DataError, OverlongRow, Sample, _cfg
from kdcore.data.formats import detect_format, normalize_row
from kdcore.data.reading import RowSource, read_rows
from kdcore.data.images import resolve_image_paths, tokenize_side
from kdcore.data.rendering import _finish, _truncate_at_char
from kdcore.data.report import DataReport, SplitReport
from kdcore.data.teacher_views import row_context, row_route, tokenize_views
from kdcore.modeling.tokenizers import same_tokenizer


@dataclass
class PreparedData:
    train: list[Sample]
    eval: list[Sample]
    report: DataReport


def split_eval(n: int, eval_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic held-out split of ``n`` items: (train indices, eval indices), each sorted.
    ``eval_size`` < 1 is a fraction (rounded, at least one item when > 0), >= 1 a count."""
    if eval_size <= 0 or n == 0:
        return list(range(n)), []
    k = int(eval_size) if eval_size >= 1 else max(1, int(round(eval_size * n)))
    if k >= n:
        raise DataError(f"data.eval_size={eval_size} leaves no training rows out of {n}; lower it or set data.eval")
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return sorted(perm[k:]), sorted(perm[:k])


def prepare_data(data_cfg: Any, student_tokenizer, teacher_tokenizer=None, *, seed: int = 0,
                 base_dir: str | os.PathLike | None = None, views: dict | None = None,
                 teacher_names: tuple[str, ...] = ()) -> PreparedData:
    """Load, check, split and tokenize the recipe's ``data`` section.

    ``data_cfg`` is a :class:`kdcore.recipe.loading.DataConfig` (or any object/dict with its fields);
    ``seed`` is ``train.seed`` (held-out split); ``base_dir`` is the recipe's folder, where
    relative data paths are looked up first. Returns the train and eval samples and a
    :class:`DataReport`. Raises :class:`DataError` for a missing or empty data set, columns
    that fit no format, a bad row under ``bad_rows: error``, or nothing left to train on.

    Several teachers / context distillation (:mod:`kdcore.data.teacher_views`): ``views`` maps
    teacher names to the :class:`~kdcore.data.teacher_views.TeacherView` whose tokenization
    goes to ``Sample.teachers[name]``; ``teacher_names`` are the names ``data.teacher_column``
    may use (``Sample.route``). Without them, nothing changes.
    """
    fmt_req = _cfg(data_cfg, "format", "auto")
    max_length = _cfg(data_cfg, "max_length", 512)
    overlong = _cfg(data_cfg, "overlong", "truncate")
    bad_policy = _cfg(data_cfg, "bad_rows", "skip")
    limit = _cfg(data_cfg, "limit", None)
    eval_spec = _cfg(data_cfg, "eval", None)
    eval_size = _cfg(data_cfg, "eval_size", 0.05)
    if overlong not in ("truncate", "drop"):
        raise DataError(f"data.overlong must be truncate or drop, got {overlong!r}")
    if bad_policy not in ("skip", "error"):
        raise DataError(f"data.bad_rows must be skip or error, got {bad_policy!r}")

    cross = teacher_tokenizer is not None and not same_tokenizer(student_tokenizer, teacher_tokenizer)
    train_src = read_rows(_cfg(data_cfg, "train", None), base_dir=base_dir, limit=limit)
    fmt = detect_format(train_src.columns, fmt_req, train_src.path)
    report = DataReport(format=fmt, max_length=max_length, overlong_policy=overlong, cross_tokenizer=cross)
    report.train.source, report.train.rows = train_src.path, len(train_src.rows)
    train_rows = _normalize_all(train_src, fmt, report.train, bad_policy)

    if eval_spec:
        eval_src = read_rows(eval_spec, base_dir=base_dir)
        detect_format(eval_src.columns, fmt, eval_src.path)  # same format as train, checked
        report.eval.source, report.eval.rows = eval_src.path, len(eval_src.rows)
        eval_rows = _normalize_all(eval_src, fmt, report.eval, bad_policy)
        report.eval_from = "file"
    else:
        tr, ev = split_eval(len(train_rows), eval_size, seed)
        eval_rows = [train_rows[i] for i in ev]
        train_rows = [train_rows[i] for i in tr]
        report.eval.source = f"{train_src.path} (held out: {len(eval_rows)} rows, seed {seed})" if ev else ""
        report.eval.rows = len(eval_rows)
        report.eval_from = "split" if ev else "none"

    kw = dict(max_length=max_length, overlong=overlong, bad_policy=bad_policy)
    ttok = teacher_tokenizer if cross else None
    if views or teacher_names:
        extra = dict(views=views or {}, names=tuple(teacher_names), context=_cfg(data_cfg, "teacher_context", None),
                     column=_cfg(data_cfg, "teacher_column", None))
        train = _tokenize_split_views(train_rows, train_src, student_tokenizer, report.train, train_src.path,
                                      **kw, **extra)
        evals = _tokenize_split_views(eval_rows, eval_src if eval_spec else train_src, student_tokenizer,
                                      report.eval, report.eval.source, **kw, **extra)
    else:
        train = _tokenize_split(train_rows, student_tokenizer, ttok, report.train, train_src.path, **kw)
        evals = _tokenize_split(eval_rows, student_tokenizer, ttok, report.eval, report.eval.source, **kw)
    if not train:
        raise DataError(f"no training samples left in '{train_src.path}' ({report.train.rows} rows, "
                        f"{report.train.bad_rows} bad, {report.train.dropped_overlong} dropped by max_length)")
    return PreparedData(train=train, eval=evals, report=report)


def _normalize_all(src: RowSource, fmt: str, rep: SplitReport, bad_policy: str) -> list[tuple[int, dict]]:
    out = []
    base = os.path.dirname(src.path) if os.path.isfile(src.path) else src.path if os.path.isdir(src.path) else None
    for i, row in enumerate(src.rows):
        try:
            out.append((i, resolve_image_paths(normalize_row(row, fmt), base)))
        except BadRow as exc:
            _bad(rep, i, exc.reason, bad_policy, src.path)
    return out


def _bad(rep: SplitReport, row: int, reason: str, policy: str, path: str) -> None:
    if policy == "error":
        raise DataError(f"'{path}' row {row}: {reason} "
                        "(data.bad_rows=error; set it to skip to count and skip bad rows)")
    rep.count_bad(row, reason)


def _finish_or_count(rep: SplitReport, row: int, norm: dict, s, t, bad, path: str, *, max_length, overlong: str,
                     bad_policy: str):
    """The row's ``(sample, truncated)``, or None when it is a bad row or dropped as overlong
    (counted in ``rep`` either way)."""
    if bad is not None:
        _bad(rep, row, bad.reason, bad_policy, path)
        return None
    if max_length is not None and len(s.input_ids) > max_length:
        rep.overlong += 1
    try:
        return _finish(norm, row, s, t, max_length, overlong)
    except OverlongRow:
        rep.dropped_overlong += 1
        return None


def _tokenize_split(rows: list[tuple[int, dict]], stok, ttok, rep: SplitReport, path: str, *,
                    max_length: int, overlong: str, bad_policy: str) -> list[Sample]:
    norms = [n for _, n in rows]
    s_tok = tokenize_side(norms, stok)
    t_tok = tokenize_side(norms, ttok) if ttok is not None else [None] * len(norms)
    samples = []
    for (row, norm), s, t in zip(rows, s_tok, t_tok):
        bad = s if isinstance(s, BadRow) else t if isinstance(t, BadRow) else None
        done = _finish_or_count(rep, row, norm, s, t, bad, path, max_length=max_length, overlong=overlong,
                                bad_policy=bad_policy)
        if done is None:
            continue
        sample, truncated = done
        rep.truncated += truncated
        rep.add(sample)
        samples.append(sample)
    return samples


def _tokenize_split_views(rows: list[tuple[int, dict]], src: RowSource, stok, rep: SplitReport, path: str, *,
                          views: dict, names: tuple[str, ...], context, column, max_length: int, overlong: str,
                          bad_policy: str) -> list[Sample]:
    """:func:`_tokenize_split` with each teacher's own tokenization (``Sample.teachers``) and
    each row's route (``Sample.route``), see :mod:`kdcore.data.teacher_views`."""
    kept, contexts, routes = [], [], []
    for row, norm in rows:
        try:
            ctx, route = row_context(src.rows[row], context), row_route(src.rows[row], column, names)
        except BadRow as exc:
            _bad(rep, row, exc.reason, bad_policy, path)
            continue
        kept.append((row, norm))
        contexts.append(ctx)
        routes.append(route)
    norms = [n for _, n in kept]
    s_tok = tokenize_side(norms, stok)
    own_tok = tokenize_views(norms, contexts, views)
    samples = []
    for k, ((row, norm), s) in enumerate(zip(kept, s_tok)):
        own = {name: toks[k] for name, toks in own_tok.items()}
        bad = s if isinstance(s, BadRow) else next((t for t in own.values() if isinstance(t, BadRow)), None)
        done = _finish_or_count(rep, row, norm, s, None, bad, path, max_length=max_length, overlong=overlong,
                                bad_policy=bad_policy)
        if done is None:
            continue
        sample, truncated = done
        if truncated:  # the teachers read as far as the student does
            end = max(b for _, b in sample.student.offsets)
            own = {name: _truncate_at_char(t, end) for name, t in own.items()}
        sample.teachers, sample.route, sample.context = own, routes[k], contexts[k]
        rep.truncated += truncated
        rep.add(sample)
        samples.append(sample)
    return samples
