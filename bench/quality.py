"""Distillation quality at equal work: does KD beat plain fine-tuning on held-out data?

``python -m bench quality`` → ``bench/quality.md``. Every row is one recipe plus dotlist
overrides, trained through the command line a user runs (``python -m kdcore train RECIPE
key=value ...``) in a fresh process per run and seed, and read from the final evaluation record
of that run's ``metrics.jsonl``. Each section compares its rows with a **CE-only twin**
(``distill.kd_ratio=0``): the same recipe, steps, batches (so the same tokens), schedule and
seed, with the learning rate that is best for CE in the same grid (the section says which).

What each section measures (the rows, their twins, the metrics): :mod:`bench.quality_sections`;
the report: :mod:`bench.quality_report`.

Options: ``--quick`` (the losses section's twin and two rows, one seed: 3 runs, about 11 minutes
by the committed run's own times; with ``--sections`` the named sections' quick rows), ``--seeds`` (seeds of the headline rows and the twin), ``--other-seeds`` (seeds of
the remaining rows), ``--rows`` (a subset by name; the twin always runs), ``--steps`` (override
every row's ``train.max_steps``), ``--note`` (a line for the header, e.g. that the machine was
shared), ``--store FILE`` (finished runs kept and reused: resume an interrupted benchmark, or run
sections in separate invocations and render them into one report; a stored run whose recipe
resolves differently now is trained again, see :mod:`bench.quality_store`), ``--out``, ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.quality_report import WARM_RESULTS, findings_table, header, render_section  # noqa: E402
from bench.quality_sections import SECTIONS, Row, Section  # noqa: E402
from bench.quality_store import (Run, RunStore, code_counts, code_fingerprint, content_of_data,  # noqa: E402
                                 recipe_changes, resolved_recipe)

# ----------------------------------------------------------------------------- running


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def train_command(recipe: str, overrides: Sequence[str], seed: int, output_dir: str, steps: int | None,
                  export: bool = False) -> list[str]:
    """The command a user runs, plus what makes the run a bench run (its own folder, no extra files)."""
    cmd = [sys.executable, "-m", "kdcore", "train", recipe, *overrides, f"train.seed={seed}",
           f"train.output_dir={output_dir}", "logging.progress=false", "logging.log_every=1",
           "checkpoint.every=0", f"checkpoint.export_hf={str(export).lower()}"]
    if steps is not None:
        cmd.append(f"train.max_steps={steps}")
    return cmd


def run_one(section: Section, row: Row, seed: int, steps: int | None, timeout: float,
            extra: Sequence[str] = ()) -> Run:
    """One row and seed in a fresh ``kdcore train`` process; its first and last evaluation.
    ``extra``: overrides after the row's own (the warm start's student)."""
    res = Run(row=row.name, seed=seed, code=code_fingerprint())  # the code its subprocesses import
    row = Row(row.name, (*row.overrides, *extra), row.headline, row.eval_overrides)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="kdflow-quality-") as tmp:
        out = Path(tmp) / "out"
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(train_command(section.recipe, row.overrides, seed, str(out), steps, section.generation),
                                  cwd=str(common.REPO_ROOT), env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode == 0 and section.generation:  # the user's own command on the run folder
                proc = subprocess.run([sys.executable, "-m", "kdcore", "eval", str(out), *row.eval_overrides,
                                       "--json", str(out / "eval.json")],
                                      cwd=str(common.REPO_ROOT), env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            res.error = f"still running after {timeout:.0f} s"
            return res
        res.wall_s = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            res.error = f"{' '.join(proc.args[2:4])} exited {proc.returncode}: {tail[-1][:300] if tail else '(no output)'}"
            return res
        records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        generated = json.loads((out / "eval.json").read_text())["metrics"] if section.generation else {}
    train = [r for r in records if "loss" in r and "step" in r]
    evals = [r for r in records if "eval_teacher_kl" in r or any(k.startswith("eval_") for k in r if k != "step")]
    res.steps = max((r["step"] for r in train), default=0)
    res.tokens = sum(int(r.get("tokens", 0)) for r in train)
    if not evals or evals[-1]["step"] != res.steps:
        res.error = f"no evaluation after the last step ({res.steps}) in metrics.jsonl"
        return res
    # the training's own final evaluation wins where kdcore eval measured the same key again
    res.final, res.initial = {**generated, **evals[-1]}, evals[0] if evals[0]["step"] == 0 else {}
    res.curve = evals if section.curves else []
    res.ok = True
    return res



def warm_key(section: Section, seed: int) -> str:
    """The store's key of a section's warm start (never a row's key: a row's key starts with its recipe)."""
    return json.dumps(["warm start", section.recipe, list(section.warm.overrides), seed])


def warm_start(section: Section, seed: int, args, store: "RunStore | None" = None) -> tuple[list[str], dict, str]:
    """Train and export the section's warm start for ``seed`` (kept in ``--warm-dir``, reused
    while the same command finished there and its recipe resolves as it did then); the overrides
    that load it, the recipe it was trained with, or an error. Its evaluation curve goes to
    ``store`` so that the report renders it without the warm dir."""
    import hashlib

    import yaml

    warm = section.warm
    cmd_key = json.dumps([section.recipe, list(warm.overrides), seed])
    out = Path(args.warm_dir) / f"{section.name}-seed{seed}-{hashlib.sha1(cmd_key.encode()).hexdigest()[:10]}"
    export = out / "hf"
    t0 = time.perf_counter()
    cmd = train_command(section.recipe, warm.overrides, seed, str(out), None, export=True)
    recipe = resolved_recipe(section.recipe, cmd[cmd.index(section.recipe) + 1:])
    # a folder without its recipe.yaml (not one kdcore wrote) is taken as it is
    trained_with = (content_of_data(yaml.safe_load((out / "recipe.yaml").read_text()))
                    if (out / "recipe.yaml").is_file() else {})
    changed = recipe_changes(trained_with, recipe) if trained_with and recipe is not None else []
    if (export / "config.json").is_file() and changed:
        log(f"{section.name} | warm start | seed {seed}: its recipe changed ({', '.join(changed[:5])}), training again")
    trained_now = not (export / "config.json").is_file() or bool(changed)
    if trained_now:
        log(f"{section.name} | warm start | seed {seed}: training {' '.join(warm.overrides)}")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        try:
            proc = subprocess.run(cmd + ["--overwrite"], cwd=str(common.REPO_ROOT), env=env, capture_output=True,
                                  text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return [], {}, f"warm start still running after {args.timeout:.0f} s"
        if proc.returncode != 0 or not (export / "config.json").is_file():
            tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            return [], {}, f"warm start exited {proc.returncode}: {tail[-1][:300] if tail else '(no output)'}"
        if store:  # the curve and the rows stored from the export it replaced are retired
            extra = [f"student.path={export}", "student.init=pretrained"]
            for key in [k for k in store.done if k == warm_key(section, seed) or json.loads(k)[4:] == [extra]]:
                store.stale[key] = ["the warm start, trained again"]
                del store.done[key]
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [r for r in records if "eval_teacher_kl" in r]
    store = store or RunStore(None)
    if (run := store.done.get(warm_key(section, seed))) is not None and not run.recipe and trained_with:
        store.put(warm_key(section, seed), run, recipe)  # stored before runs kept recipes; checked above
    if run is None and evals:
        train = [r for r in records if "loss" in r and "step" in r]
        run = Run(row="warm start", seed=seed, ok=True, final=evals[-1], initial=evals[0], curve=evals,
                  code=code_fingerprint() if trained_now else "",  # a folder kept from earlier: code unknown
                  steps=max((r["step"] for r in train), default=0), tokens=sum(int(r.get("tokens", 0)) for r in train),
                  # the run folder's own span (its recipe written at the start, the export at the end):
                  # right also when an earlier invocation trained it into the warm dir
                  wall_s=max((export / "config.json").stat().st_mtime - (out / "recipe.yaml").stat().st_mtime, 0.0)
                  if (out / "recipe.yaml").is_file() else time.perf_counter() - t0)
        store.put(warm_key(section, seed), run, recipe)
    if run is not None:
        WARM_RESULTS[(section.name, seed)] = run
    return [f"student.path={export}", "student.init=pretrained"], recipe, ""


def plan(section: Section, args) -> list[tuple[Row, list[int]]]:
    """(row, seeds) in run order: the twin first, then the section's rows as selected."""
    rows = [r for r in section.rows if (not args.rows or r.name in args.rows)
            and (not args.quick or r.name in section.quick_rows)]
    return [(r, args.seeds if r.headline else args.other_seeds) for r in [section.baseline, *rows]]


def row_recipe(section: Section, row: Row, warm: dict | None, steps: int | None = None) -> dict | None:
    """The recipe a row's stored run is checked against: its own, resolved now (with ``--steps``
    where a run was given them, as its command appends them), plus the warm start's it continued
    from (a warm start trained anew then retires the row)."""
    overrides = [*row.overrides, f"train.max_steps={steps}"] if steps is not None else row.overrides
    recipe = resolved_recipe(section.recipe, overrides)
    return {**recipe, "warm_start": warm} if recipe is not None and warm else recipe


def run_section(section: Section, args, on_run: Callable[[dict[str, list[Run]]], None] = lambda runs: None,
                store: RunStore | None = None) -> dict[str, list[Run]]:
    """Every planned run, seed by seed (each seed's rows together, so an interrupted run still holds
    complete pairs with the twin); ``on_run`` sees the runs so far after each one."""
    runs: dict[str, list[Run]] = {}
    store = store or RunStore(None)
    planned = plan(section, args)
    seeds_in_order = list(dict.fromkeys(s for _, seeds in planned for s in seeds))
    for seed in seeds_in_order:
        extra, warm, failed = warm_start(section, seed, args, store) if section.warm is not None else ([], {}, "")
        for row in [row for row, seeds in planned if seed in seeds]:
            key = store.key(section, row, seed, args.steps, extra)
            recipe = row_recipe(section, row, warm, args.steps)
            if failed:
                r = Run(row=row.name, seed=seed, error=failed)
            elif (r := store.get(key, recipe)) is None:
                if key in store.stale:
                    log(f"{section.name} | {row.name} | seed {seed}: stored run's recipe changed "
                        f"({', '.join(store.stale[key][:5])}), training again")
                r = run_one(section, row, seed, args.steps, args.timeout, extra)
                store.put(key, r, recipe)
            else:
                r.row = row.name
                log(f"{section.name} | {row.name} | seed {seed}: from {store.path}")
            runs.setdefault(row.name, []).append(r)
            on_run(runs)
            if r.ok:
                figures = ", ".join(f"{m.key}={m.fmt.format(m.read(r.final))}" for m in section.metrics
                                    if m.read(r.final) is not None)
                log(f"{section.name} | {row.name} | seed {seed}: {figures} ({r.wall_s / 60:.1f} min)")
            else:
                log(f"{section.name} | {row.name} | seed {seed}: FAILED {r.error}")
    return runs


def stored_runs(section: Section, store: "RunStore") -> dict[str, list[Run]]:
    """A section's runs as the store holds them, every seed, without training (a section this
    invocation does not run still renders from the runs earlier invocations left); the warm
    start's record goes to WARM_RESULTS. A run whose recipe has changed since is left out (the
    store counts it); a warm section's rows are checked against the warm start's stored recipe."""
    runs: dict[str, list[Run]] = {}
    warm: dict[int, dict] = {}
    for key, run in store.done.items():
        k = json.loads(key)
        if section.warm is not None and k[0] == "warm start" and k[1:3] == [section.recipe, list(section.warm.overrides)]:
            WARM_RESULTS[(section.name, k[3])] = run
            warm[k[3]] = run.recipe
    # a warm section's rows carry the warm start's overrides (extra); the others carry none
    mine = [(key, k, run) for key, run in store.done.items()
            if (k := json.loads(key))[0] != "warm start" and (len(k) == 5) == (section.warm is not None)]
    for row in (section.baseline, *section.rows):
        by_seed: dict[int, Run] = {}
        for key, k, run in mine:  # the row's own command first, then a run of the same training
            # (a run given --steps trained other steps than its row's: found below by what it trained)
            if k[0] == section.recipe and k[1] == list(row.overrides) and k[3] is None:
                # the run current() returns: a stale run's place goes to the run of the same training
                if (found := store.current(key, row_recipe(section, row, warm.get(k[2])))) is not None:
                    by_seed.setdefault(k[2], found)
        for key, k, run in mine:
            want = row_recipe(section, row, warm.get(k[2]))
            if k[2] not in by_seed and run.recipe and want is not None and not recipe_changes(run.recipe, want):
                by_seed[k[2]] = run
        if by_seed:
            runs[row.name] = [Run(**{**by_seed[s].__dict__, "row": row.name}) for s in sorted(by_seed)]
    order = [r.name for r in (section.baseline, *section.rows)]
    return {name: runs[name] for name in order if name in runs}



# ----------------------------------------------------------------------------- the command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=None, help=f"comma-separated subset of {', '.join(SECTIONS)} "
                   "(default: all; with --quick: losses)")
    p.add_argument("--rows", default="", help="comma-separated row names (the CE-only twin always runs)")
    p.add_argument("--seeds", default="0,1", help="seeds of the headline rows and the CE-only twin")
    p.add_argument("--other-seeds", default="0", help="seeds of the other rows")
    p.add_argument("--steps", type=int, default=None, help="train.max_steps of every run (default: the recipe's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before one run is abandoned")
    p.add_argument("--quick", action="store_true", help="each section's quick rows, first seed only (~15 min)")
    p.add_argument("--note", default="", help="a line for the report header (partial run, shared machine, ...)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "quality.md"))
    p.add_argument("--no-write", action="store_true", help="print only; leave --out untouched")
    p.add_argument("--warm-dir", default=str(Path(tempfile.gettempdir()) / "kdflow-quality-warm"),
                   help="where warm starts are trained and exported (reused while the same command finished there)")
    p.add_argument("--render-only", action="store_true", help="train nothing: render every section from the "
                   "runs --store holds (a partial section shows the rows it has)")
    p.add_argument("--store", default="", help="JSONL of finished runs: reused when the same command runs again "
                   "and its recipe resolves as it did (resume an interrupted benchmark; run sections "
                   "separately into one report)")
    raw = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(raw)
    args.argv = raw
    # --quick stays within ~15 min on a quiet 2-core machine: one section (the twin and two rows),
    # since each xtok or rollouts run alone takes 4-5 min
    chosen = args.sections if args.sections is not None else ("losses" if args.quick else ",".join(SECTIONS))
    args.sections = [s.strip() for s in chosen.split(",") if s.strip()]
    if bad := [s for s in args.sections if s not in SECTIONS]:
        p.error(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS)}")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    known = {r.name for s in args.sections for r in SECTIONS[s]().rows}
    if bad := [r for r in args.rows if r not in known]:
        p.error(f"--rows: unknown {bad}; rows are: {'; '.join(sorted(known))}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.other_seeds = [int(s) for s in args.other_seeds.split(",") if s.strip()]
    except ValueError:
        p.error("--seeds/--other-seeds: comma-separated integers")
    if not args.seeds or not args.other_seeds:
        p.error("--seeds/--other-seeds: at least one seed each")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.render_only and not args.store:
        p.error("--render-only needs --store (the runs to render)")
    if args.quick:
        args.seeds, args.other_seeds = args.seeds[:1], args.seeds[:1]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load0 = common.load_average()
    sections = [SECTIONS[name]() for name in args.sections]
    total = sum(len(seeds) for s in sections for _, seeds in plan(s, args))
    done: dict[str, dict[str, list[Run]]] = {}
    store = RunStore(args.store or None)
    # the sections not run now but held by the store: rendered too, so that running one section
    # into the committed report does not discard the others
    kept = {name: runs for name in SECTIONS if name not in args.sections or args.render_only
            for runs in [stored_runs(SECTIONS[name](), store)] if runs or (args.render_only and name in args.sections)}
    n_kept = sum(len(v) for runs in kept.values() for v in runs.values())

    def report(final: bool) -> str:
        n_runs = sum(len(v) for runs in done.values() for v in runs.values())
        minutes = (time.perf_counter() - t0) / 60
        progress = "" if final else f"**Partial: {n_runs} of {total} planned runs so far** (rewritten after each run)."
        if store.reused:
            trained = sum(r.wall_s for runs in done.values() for rr in runs.values() for r in rr) / 60
            progress = (progress + " " if progress else "") + (
                f"{store.reused} of the {n_runs} runs were read from `{store.path.name}` (trained by earlier "
                f"invocations with the same commands); the {n_runs} runs' own times add up to {trained:.1f} min.")
        if kept:
            names = ", ".join(f"`{name}`" for name in kept)
            progress = (progress + " " if progress else "") + (
                f"Sections {names} were not trained by this invocation: they are rendered from the {n_kept} runs "
                f"`{store.path.name}` holds for them (their seeds, steps and times are those runs' own).")
        if store.stale:
            keys = sorted({k for ch in store.stale.values() for k in ch})
            progress += (f" {len(store.stale)} stored runs are left out: their recipe resolves differently now "
                         f"({', '.join(keys[:6])}{', …' if len(keys) > 6 else ''}).")
        if store.unchecked:
            progress += (f" {len(store.unchecked)} of the runs shown are taken on trust: they were stored before "
                         "each run kept its recipe (2026-12-07), or their recipe does not resolve on the machine "
                         "rendering this report (a warm start's folder or a model missing), so a recipe change since "
                         "would not show.")
        shown = [r for runs in (*done.values(), *kept.values()) for rr in runs.values() for r in rr]
        unrecorded, other_code = code_counts(shown)
        if unrecorded or other_code:
            progress += (f" Of the {len(shown)} runs shown, {unrecorded} were stored before runs kept a fingerprint "
                         f"of the code that trains them (the Python under kdcore/ and algorithms/, 2026-12-07) and "
                         f"{other_code} were trained by code that differs from this checkout's; a code change does "
                         "not retire a stored run (most leave the figures as they were), so these stand on the "
                         "recipe check alone.")
        progress = progress.strip()
        # every section in SECTIONS order, the ones this invocation ran and the ones kept from the store
        bodies = [render_section(SECTIONS[name](), done.get(name) or kept[name]) for name in SECTIONS
                  if name in done or name in kept]
        findings = findings_table({name: done.get(name) or kept.get(name) or {} for name in SECTIONS})
        return (header(args, started, load0, minutes, n_runs, progress) + "\n\n" + findings + "\n\n"
                + "\n\n".join(bodies) + "\n")

    def save_partial(section: Section, runs: dict[str, list[Run]]) -> None:
        done[section.name] = runs
        if not args.no_write:  # an interrupted benchmark still leaves what it measured
            Path(args.out).write_text(report(final=False))

    for section in [] if args.render_only else sections:
        done[section.name] = run_section(section, args, on_run=lambda runs, s=section: save_partial(s, runs),
                                         store=store)
    text = report(final=True)
    if not args.no_write:
        Path(args.out).write_text(text)
        log(f"wrote {args.out} ({(time.perf_counter() - t0) / 60:.1f} min)")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
