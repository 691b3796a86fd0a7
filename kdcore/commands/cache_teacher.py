"""``kdcore cache-teacher``: run a recipe's live teacher once over its data and store the rows.

The samples go through the trainer's own preparation — ``prepare_data`` for the splits,
:meth:`kdcore.training.steps.StepPreparer.micro_batch` for padding and the aligner's teacher
positions, :meth:`kdcore.training.teacher_schedule.TeacherSchedule.submit` for the
:class:`HiddenRequest` — so the cache holds exactly what a training run will ask for. Samples
are taken in fixed batches (train split, then eval, in order), two requests in flight.

Shards close at batch boundaries once they reach ``shard_mb``; each is written to a temporary
name, renamed, and then recorded (size, sha256) in ``manifest.json`` (itself replaced
atomically), which says ``complete: false`` until the end. An interrupted build run again
with the same settings keeps the recorded shards whose checksums still match, removes the
rest, and continues from the batch after the last kept one: the same batches as an
uninterrupted build, so the same bytes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from kdcore.engines.cache.format import (FORMAT_VERSION, MANIFEST, SPLITS, CacheError, check_shard_files, recipe_identity,
                                  sample_keys, sha256_file)
from kdcore.data import DataError
from kdcore.engines import create_teacher_engine
from kdcore.engines.factory import DEFAULT_TEACHER_ENGINE
from kdcore.engines.cache.spec import CacheEngine
from kdcore.engines.protocol import TeacherError
from kdcore.infra.channel import ChannelError
from kdcore.modeling.paths import ModelNotFoundError
from kdcore.modeling.tokenizers import tokenizer_fingerprint
from kdcore.modeling.vocab import VocabMismatchError
from kdcore.recipe.loading import load_raw, teacher_entries
from kdcore.training.run_parts import RunParts
import kdcore

CACHE_DTYPES = ("bfloat16", "float32", "float16")
DEFAULT_SHARD_MB = 64  # big enough that per-file overhead is nil, small enough to rewrite on resume


@dataclass
class BuildSummary:
    folder: Path
    samples: int
    rows: int
    bytes: int
    shards: int
    built_shards: int  # computed by this call (the rest were kept from an interrupted build)
    seconds: float

    @property
    def bytes_per_row(self) -> float:
        return self.bytes / max(self.rows, 1)


class _Recorder:
    """The live engine, remembering the last request the schedule built (its keys are the
    cache's: they come from the very request a training run sends)."""

    # the cache keys rows by token ids alone, so rows with images (same ids, other pixels)
    # cannot be stored: the schedule refuses them with a one-line error
    accepts_vision = False

    def __init__(self, engine):
        self.engine, self.last = engine, None

    def submit(self, request):
        self.last = request
        return self.engine.submit(request)

    def result(self, ticket, timeout=None):
        return self.engine.result(ticket, timeout)

    def release(self, ticket):
        self.engine.release(ticket)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


def data_fingerprint(splits: Mapping[str, list]) -> str:
    """The prepared samples' token ids and loss positions, every tokenization, in order."""
    import hashlib

    h = hashlib.sha256()
    for name, samples in splits.items():
        h.update(f"{name}:{len(samples)};".encode())
        for s in samples:
            # each teacher's own tokenization too (several teachers); none on the short form's path
            for tok in (s.student, s.teacher, *(s.teachers[n] for n in sorted(s.teachers))):
                if tok is not None:
                    h.update(torch.as_tensor(list(tok.input_ids), dtype=torch.int64).numpy().tobytes() + b"|")
                    h.update(torch.as_tensor(list(tok.loss_positions), dtype=torch.int64).numpy().tobytes() + b";")
    return h.hexdigest()[:16]


class CacheBuilder:
    """One build (or the rest of an interrupted one) of a recipe's teacher cache."""

    def __init__(self, cfg, raw: Mapping[str, Any], out: str | os.PathLike, *, registry, dtype: str = "bfloat16",
                 shard_mb: float = DEFAULT_SHARD_MB, batch_size: Optional[int] = None, progress: bool = True):
        if dtype not in CACHE_DTYPES:
            raise CacheError(f"--dtype: '{dtype}' is not one of {', '.join(CACHE_DTYPES)}")
        if shard_mb <= 0:
            raise CacheError(f"--shard-mb must be > 0, got {shard_mb}")
        self.cfg, self.raw, self.registry = cfg, raw, registry
        self.out = Path(out)
        self.dtype = dtype
        self.shard_bytes = int(shard_mb * (1 << 20))
        self.batch_size = int(batch_size or cfg.train.micro_batch_size)
        self.progress = progress

    # ------------------------------------------------------------------ the parts the trainer uses too
    def _prepare(self):
        """The run's parts as training builds them (kdcore.training.run_parts); one cache per teacher."""
        self.run = RunParts.from_recipe(self.cfg, self.registry)
        data = self.run.prepare_data()
        self.splits = {"train": list(data.train), "eval": list(data.eval)}
        data_print = data_fingerprint(self.splits)
        self.fingerprints = {p.name: {"teacher tokenizer": tokenizer_fingerprint(p.tokenizer),
                                      "student tokenizer": tokenizer_fingerprint(self.run.student_tok),
                                      "data": data_print} for p in self.run.teachers}

    def folder(self, part) -> Path:
        """Where a teacher's cache goes: ``--out`` itself for one teacher, ``--out/<name>`` for each of several."""
        return self.out if len(self.run.teachers) == 1 else self.out / part.name

    def _batches(self) -> list[tuple[int, int, list[int]]]:
        """(split code, batch number, sample indices) for every batch, in build order."""
        out = []
        for code, name in enumerate(SPLITS):
            n = len(self.splits[name])
            for k, lo in enumerate(range(0, n, self.batch_size)):
                out.append((code, k, list(range(lo, min(lo + self.batch_size, n)))))
        return out

    def _settings(self, part, entry: dict) -> dict:
        """What makes two builds the same build (an interrupted one is resumed only if equal)."""
        section = part.section
        raw = self.raw
        if raw.get("teachers"):  # the identity of this teacher's cache: its entry as the recipe's teacher
            i = [p.name for p in self.run.teachers].index(part.name)
            raw = {**raw, "teacher": raw["teachers"][i],
                   "distill": {**(raw.get("distill") or {}), "aligner": entry["aligner"],
                               "aligner_options": dict(entry["aligner_options"])}}
        settings = {"format": FORMAT_VERSION, "identity": recipe_identity(raw),
                    "fingerprints": self.fingerprints[part.name], "dtype": self.dtype, "batch_size": self.batch_size,
                    "shard_bytes": self.shard_bytes, "teacher_path": str(section.path),
                    "teacher_dtype": str(section.dtype),
                    "aligner": {"name": entry["aligner"], "options": dict(entry["aligner_options"])},
                    "kdflow_version": getattr(kdcore, "__version__", "unknown")}
        return json.loads(json.dumps(settings))  # as a manifest reads back (tuples are lists there)

    # ------------------------------------------------------------------ resume
    def _earlier(self, out: Path, settings: dict) -> tuple[dict, list[dict]]:
        """An earlier build's manifest with these settings (empty when none) and its shards
        that still verify, in order up to the first that does not."""
        path = out / MANIFEST
        if not path.is_file():
            return {}, []
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in settings} != settings:
            differs = ", ".join(k for k in settings if old.get(k) != settings[k])
            raise CacheError(f"--out {out}: holds a cache built with other settings ({differs}); "
                             f"use another folder or remove it")
        kept = []
        for s in old.get("shards", []):
            f = out / s["file"]
            if f.is_file() and f.stat().st_size == s["bytes"] and sha256_file(f) == s["sha256"]:
                kept.append(s)
            else:
                break
        return old, kept

    @staticmethod
    def _clean(out: Path, kept: list[dict]) -> None:
        keep = {s["file"] for s in kept}
        for f in out.glob("shard-*"):
            if f.name not in keep:
                f.unlink()

    # ------------------------------------------------------------------ the build
    def run(self) -> BuildSummary:
        """Every teacher's cache in turn; the summary adds them up (``folder``: ``--out``)."""
        t0 = time.perf_counter()
        self._prepare()
        built = [self._build(part, entry) for part, entry in zip(self.run.teachers, teacher_entries(self.cfg))]
        return BuildSummary(self.out, *(sum(b[k] for b in built) for k in range(5)), time.perf_counter() - t0)

    def _build(self, part, entry: dict) -> tuple[int, int, int, int, int]:
        """One teacher's cache: (samples, rows, bytes, shards, shards built now)."""
        out = self.folder(part)
        out.mkdir(parents=True, exist_ok=True)
        settings = self._settings(part, entry)
        old, kept = self._earlier(out, settings)
        self._clean(out, kept)
        manifest = dict(settings, complete=False, shards=list(kept))
        for k in ("hidden_size", "vocab_size"):
            if k in old:
                manifest[k] = old[k]
        batches = self._batches()
        start = kept[-1]["end_batch"] if kept else 0
        if start < len(batches):
            self._compute(part, out, manifest, batches, start)
        check_shard_files(out, manifest, checksums=True)
        manifest["complete"] = True
        _write_json(out / MANIFEST, manifest)
        s = manifest["shards"]
        return (sum(x["samples"] for x in s), sum(x["rows"] for x in s), sum(x["bytes"] for x in s), len(s),
                len(s) - len(kept))

    def _compute(self, part, out: Path, manifest: dict, batches: list, start: int) -> None:
        samples = self.splits["train"] + self.splits["eval"]
        longest = self.run.longest_input(part, samples)
        engine = create_teacher_engine(part.section, registry=self.registry, max_rows=self.batch_size * longest,
                                       threads=part.section.threads or None)
        preparer = self.run.preparer(parts=[part])  # this teacher's share of each batch, as training builds it
        with engine:
            recorder = _Recorder(engine)
            manifest["hidden_size"], manifest["vocab_size"] = int(engine.hidden_size), int(engine.vocab_size)
            schedule = self.run.schedule({part.name: recorder})
            writer = _ShardWriter(out, manifest, self.shard_bytes, getattr(torch, self.dtype))
            todo = batches[start:]
            tokens = sum(len(self.splits[SPLITS[c]][i].student.input_ids) for c, _, idx in todo for i in idx)
            label = "teacher cache" if out == self.out else f"teacher cache '{part.name}'"
            with _progress(self.progress, tokens, label) as advance:
                pending = None  # (batch number, split code, indices, pmb, request): two in flight
                for number, (code, k, idx) in enumerate(todo, start):
                    pmb = preparer.micro_batch(k, 0, True, [self.splits[SPLITS[code]][i] for i in idx])
                    recorder.last = None
                    schedule.submit(pmb)
                    current = (number, code, idx, pmb, part.name, recorder.last)
                    if pending is not None:
                        advance(self._store(schedule, writer, *pending))
                    pending = current
                if pending is not None:
                    advance(self._store(schedule, writer, *pending))
            writer.flush()

    def _store(self, schedule, writer: "_ShardWriter", number: int, code: int, idx: list, pmb, name: str,
               request) -> int:
        share = pmb.teachers.get(name)
        if request is not None and share is not None:
            rows = schedule.hidden(pmb, name, timed=False)
            # the request's rows: the share's rows that asked for a position (the schedule sends no other)
            sent = [r for r, p in zip(share.rows, share.teacher_positions) if p]
            keys = sample_keys(request.input_ids, request.attention_mask, request.positions)
            lo = 0
            for r, key, pos in zip(sent, keys, request.positions):
                writer.add(rows[lo:lo + len(pos)], key, code, idx[r])
                lo += len(pos)
        schedule.release(pmb)
        writer.end_batch(number + 1)
        return sum(len(self.splits[SPLITS[code]][i].student.input_ids) for i in idx)


class _ShardWriter:
    """Collects samples' rows; at a batch boundary past ``shard_bytes`` writes one shard."""

    def __init__(self, folder: Path, manifest: dict, shard_bytes: int, dtype):
        self.folder, self.manifest, self.shard_bytes, self.dtype = folder, manifest, shard_bytes, dtype
        self._reset()
        self.end = 0

    def _reset(self):
        self.hidden, self.keys, self.ids, self.lengths, self.nbytes = [], [], [], [], 0

    def add(self, rows: torch.Tensor, key: bytes, split: int, index: int) -> None:
        self.hidden.append(rows.to(self.dtype, copy=True))  # the slot is reused after release
        self.keys.append(key)
        self.ids.append((split, index))
        self.lengths.append(rows.shape[0])
        self.nbytes += self.hidden[-1].numel() * self.hidden[-1].element_size()

    def end_batch(self, end: int) -> None:
        self.end = end
        if self.nbytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        from safetensors.torch import save_file

        offsets = torch.zeros(len(self.lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(self.lengths, dtype=torch.int64).cumsum(0)
        tensors = {"hidden": torch.cat(self.hidden).contiguous(),
                   "keys": torch.frombuffer(bytearray(b"".join(self.keys)), dtype=torch.uint8).reshape(len(self.keys), -1),
                   "offsets": offsets, "sample_ids": torch.tensor(self.ids, dtype=torch.int64)}
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        tmp = self.folder / (name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.folder / name)
        self.manifest["shards"].append({
            "file": name, "bytes": (self.folder / name).stat().st_size, "sha256": sha256_file(self.folder / name),
            "samples": len(self.keys), "rows": int(offsets[-1]), "rows_per_sample": list(self.lengths),
            "end_batch": self.end})
        _write_json(self.folder / MANIFEST, self.manifest)  # recorded only once the shard is in place
        self._reset()


class _progress:
    """A rich bar over tokens (tokens/s, ETA); a no-op without ``show``."""

    def __init__(self, show: bool, total: int, label: str = "teacher cache"):
        self.show, self.total, self.label = show, total, label

    def __enter__(self):
        if not self.show:
            return lambda n: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                            TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task("tokens", total=self.total, tps="-")
        self.t0, self.done = time.perf_counter(), 0

        def advance(n: int) -> None:
            self.done += n
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=n, tps=f"{rate:,.0f}")

        return advance

    def __exit__(self, *exc):
        if self.show:
            self.bar.stop()


def live_engine_overrides(recipe: str, overrides, registry, engine: Optional[str]) -> list[str]:
    """Overrides that make the recipe's teachers live ones: ``engine`` when given, else ``hf`` for
    each teacher that names the cache engine itself (a recipe may be built and trained as one
    file). The ``teachers:`` form gets one pair per entry (``teachers.1.engine=hf``, ...)."""

    def is_cache(section: Any) -> bool:
        name = (section.get("engine") if isinstance(section, Mapping) else None) or DEFAULT_TEACHER_ENGINE
        try:
            return isinstance(registry.get("engine", str(name)).fn, CacheEngine)
        except Exception:  # an unknown engine is reported by the recipe checks
            return False

    _, raw = load_raw(recipe, list(overrides))
    entries = raw.get("teachers")
    keys = [f"teachers.{i}" for i in range(len(entries))] if isinstance(entries, list) and entries else ["teacher"]
    sections = entries if keys[0] != "teacher" else [raw.get("teacher") or {}]
    return [o for key, section in zip(keys, sections) if engine is not None or is_cache(section)
            for o in (f"{key}.engine={engine or 'hf'}", f"{key}.cache=null")]


def _build_errors() -> tuple:
    return (TeacherError, ChannelError, DataError, ModelNotFoundError, VocabMismatchError)


BUILD_ERRORS = _build_errors()


def build_teacher_cache(cfg, raw: Mapping[str, Any], out: str | os.PathLike, *, registry, **kwargs) -> BuildSummary:
    """Build (or finish) the cache of a validated recipe ``cfg`` (``raw``: its mapping, for the
    identity the manifest records); see :class:`CacheBuilder` for the keywords."""
    return CacheBuilder(cfg, raw, out, registry=registry, **kwargs).run()


__all__ = ["build_teacher_cache", "CacheBuilder", "BuildSummary", "CACHE_DTYPES", "data_fingerprint"]
