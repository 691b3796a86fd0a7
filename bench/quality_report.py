"""The report of ``python -m bench quality``: each section's table against its CE-only twin, the
runs behind it, the warm start's and the repair's held-out curves, the published findings
checked here, and the header. Rendering only: nothing here trains (:mod:`bench.quality` runs).
"""

from __future__ import annotations

import shlex
import statistics
from dataclasses import dataclass
from typing import Sequence

from bench import common
from bench.common import md_table
from bench.quality_sections import (KL_SMOLLM2, PPL, REPEATS, ROUGE_REF, ROUGE_TEACHER, TEACHER_KL, TOP1, WORDS, Metric,
                                    Section)
from bench.quality_store import Run

# filled by bench.quality's warm_start and stored_runs, rendered by warm_text
WARM_RESULTS: dict[tuple[str, int], "Run"] = {}  # (section, seed) -> the warm start (its evaluations in .curve)


def shown(overrides) -> str:
    """Overrides as one line of the report (a context's newlines written as \\n, as typed in a shell)."""
    return " ".join(o.replace("\n", "\\n") for o in overrides)


def mean_range(values: Sequence[float], fmt: str) -> str:
    """``"mean (min–max)"`` over seeds, or the value alone for one seed; ``"—"`` for none."""
    if not values:
        return "—"
    text = fmt.format(statistics.fmean(values))
    if len(values) > 1:
        text += f" ({fmt.format(min(values))}–{fmt.format(max(values))})"
    return text


def values_of(runs: list[Run], metric: Metric) -> list[float]:
    return [v for r in runs if r.ok for v in [metric.read(r.final)] if v is not None]


def same_seeds(runs: list[Run], base: list[Run]) -> list[Run]:
    """The twin's runs of the seeds the row has (all of the twin's when it has none of them): a
    row of seeds 0,1 is compared with the twin's 0,1, not with a mean over seeds it never ran."""
    seeds = {r.seed for r in runs if r.ok}
    return [r for r in base if r.ok and r.seed in seeds] or base


def beats(runs: list[Run], base: list[Run], metric: Metric) -> str:
    """Whether the row's mean beats the twin's over the same seeds; ``every seed`` when each seed
    beats its own twin."""
    mine, theirs = values_of(runs, metric), values_of(same_seeds(runs, base), metric)
    if not metric.judged or not mine or not theirs or not metric.better(statistics.fmean(mine), statistics.fmean(theirs)):
        return ""
    twin = {r.seed: metric.read(r.final) for r in base if r.ok}
    paired = [(metric.read(r.final), twin[r.seed]) for r in runs if r.ok and r.seed in twin]
    every = len(paired) > 1 and all(metric.better(a, b) for a, b in paired)
    return metric.label.split(" ")[0] + (" (every seed)" if every else "")


def section_table(section: Section, runs: dict[str, list[Run]]) -> str:
    base = runs.get(section.baseline.name, [])
    headers = ["row", "overrides", "seeds"] + [m.label for m in section.metrics] \
        + [f"{m.label.split(' ')[0]} ÷ CE" for m in section.metrics] + ["beats CE-only on", "min/run"]
    table = []
    for row, _ in [(section.baseline, None)] + [(r, None) for r in section.rows]:
        rr = runs.get(row.name)
        if not rr:
            continue
        good = [r for r in rr if r.ok]
        if not good:
            table.append([row.name, shown(row.overrides) or "—", "—"] + ["—"] * (2 * len(section.metrics))
                         + [f"failed: {rr[-1].error[:100]}", "—"])
            continue
        cells = [mean_range(values_of(good, m), m.fmt) for m in section.metrics]
        ratios = []
        for m in section.metrics:
            a, b = values_of(good, m), values_of(same_seeds(good, base), m)
            ratios.append(f"{statistics.fmean(a) / statistics.fmean(b):.2f}×" if a and b and statistics.fmean(b) else "—")
        won = "—" if row is section.baseline else (", ".join(x for x in (beats(good, base, m) for m in section.metrics) if x) or "none")
        table.append([row.name, shown(row.overrides) or "—", ",".join(str(r.seed) for r in good)] + cells + ratios
                     + [won, f"{statistics.fmean(r.wall_s for r in good) / 60:.1f}"])
    return md_table(headers, table, "ll" + "r" * (len(headers) - 3) + "r")


def runs_table(section: Section, runs: dict[str, list[Run]]) -> str:
    """Every run: the per-seed figures behind the means, and the work each did (equal by design)."""
    headers = ["row", "seed", "steps", "loss tokens"] + [m.label for m in section.metrics] + ["min"]
    rows = []
    for name, rr in runs.items():
        for r in rr:
            if not r.ok:
                rows.append([name, r.seed, "—", "—"] + ["—"] * len(section.metrics) + [f"failed: {r.error[:80]}"])
                continue
            rows.append([name, r.seed, r.steps, r.tokens]
                        + [m.fmt.format(v) if (v := m.read(r.final)) is not None else "—" for m in section.metrics]
                        + [f"{r.wall_s / 60:.1f}"])
    return md_table(headers, rows, "lrrr" + "r" * len(section.metrics) + "r")


def initial_line(section: Section, runs: dict[str, list[Run]]) -> str:
    """The student before any training (step-0 evaluation of the twin), for scale."""
    init = next((r.initial for r in runs.get(section.baseline.name, []) if r.ok and r.initial), None)
    if not init:
        return ""
    figures = ", ".join(f"{m.label.split(' ')[0]} {m.fmt.format(v)}" for m in section.metrics
                        if (v := m.read(init)) is not None)
    return f"Student at initialisation (step 0): {figures}."


def rank_correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's ρ: Pearson's correlation of the ranks (ties take their mean rank)."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in order[i:j + 1]:
                r[k] = (i + j) / 2
            i = j + 1
        return r
    return statistics.correlation(ranks(list(xs)), ranks(list(ys)))


def _one_or_range(values: Sequence[float], fmt: str) -> str:
    """A figure every run agrees on (to its printed digits) once, else :func:`mean_range`."""
    return fmt.format(values[0]) if len({fmt.format(v) for v in values}) == 1 else mean_range(values, fmt)


def length_line(section: Section, runs: dict[str, list[Run]]) -> str:
    """How the two answer criteria of the generation bar move with answer length over the
    section's runs (every row and seed), and the teacher's and the references' own answers scored
    the same way: ROUGE-L against the teacher's long answers and loops are read beside words per
    answer (kdcore eval's ``answer_words`` and ``repetition`` of each side)."""
    triples = [(w, t, p) for rs in runs.values() for r in rs if r.ok
               for w, t, p in [(WORDS.read(r.final), ROUGE_TEACHER.read(r.final), REPEATS.read(r.final))]
               if None not in (w, t, p)]
    if len(triples) < 8:
        return ""
    words, rouge, loops = zip(*triples)
    line = (f"Over this section's {len(triples)} runs with answers (every row and seed), the rank correlation "
            f"(Spearman) of words per answer with ROUGE-L against the teacher's answers is "
            f"{rank_correlation(words, rouge):.2f}, and with repeated 4-grams {rank_correlation(words, loops):.2f}.")
    own = {side: [(r.final[f"repetition_{side}"], r.final[f"answer_words_{side}"]) for rs in runs.values()
                  for r in rs if r.ok and f"repetition_{side}" in r.final and f"answer_words_{side}" in r.final]
           for side in ("teacher", "reference")}
    if own["teacher"] and own["reference"]:
        whose = {"teacher": "the teacher's", "reference": "the references'"}
        line += " Scored the same way, " + " and ".join(
            f"{whose[side]} own answers repeat {_one_or_range([x[0] for x in own[side]], '{:.3f}')} of their 4-grams "
            f"at {_one_or_range([x[1] for x in own[side]], '{:.1f}')} words" for side in ("teacher", "reference")) + "."
    return line


def render_section(section: Section, runs: dict[str, list[Run]]) -> str:
    parts = [f"## {section.title}", "", section.about, "",
             f"Recipe `{section.recipe}`; the twin is `{shown(section.baseline.overrides)}`. Cells: mean "
             "(min–max) over seeds of the final held-out evaluation; `÷ CE` = the row's mean ÷ the twin's over the same seeds; "
             "`beats CE-only on` names the metrics whose mean is better than the twin's, `(every seed)` when each "
             "seed also beats the twin of the same seed.", "", section_table(section, runs)]
    if section.warm is not None:
        parts += ["", warm_text(section)]
    if section.curves and (curves := curves_table(section, runs)):
        parts += ["", curves]
    if line := initial_line(section, runs):
        parts += ["", line]
    if section.generation and (line := length_line(section, runs)):
        parts += ["", line]
    parts += ["", "<details><summary>Every run</summary>", "", runs_table(section, runs), "", "</details>"]
    return "\n".join(parts)


def curves_table(section: Section, runs: dict[str, list[Run]]) -> str:
    """Each row's held-out teacher-KL and perplexity at every evaluation (mean over its seeds): where
    the rows part, and whether the curves have flattened by the last step."""
    shown = [m for m in section.metrics if m in (TEACHER_KL, PPL)]
    rows_with = [(name, good) for name, rr in runs.items() if (good := [r for r in rr if r.ok and r.curve])]
    if not rows_with:
        return ""
    # (row, step) -> that step's evaluation record of each seed
    at: dict[tuple[str, int], list[dict]] = {}
    for name, rr in rows_with:
        for r in rr:
            for rec in r.curve:
                at.setdefault((name, rec["step"]), []).append(rec)
    table = []
    for step in sorted({step for _, step in at}):
        line = [step]
        for name, _ in rows_with:
            for m in shown:
                vals = [v for rec in at.get((name, step), []) if (v := m.read(rec)) is not None]
                line.append(m.fmt.format(statistics.fmean(vals)) if vals else "—")
        table.append(line)
    headers = ["step"] + [f"{name}: {m.label}" for name, _ in rows_with for m in shown]
    seeds = "; ".join(f"{name} {','.join(str(r.seed) for r in rr)}" for name, rr in rows_with)
    return (f"Held-out curves, mean over seeds ({seeds}):\n\n"
            + md_table(headers, table, "r" * len(headers)))


def warm_text(section: Section) -> str:
    """The warm start's command, its final held-out figures and its curve (where it flattens)."""
    done = {seed: run for (name, seed), run in WARM_RESULTS.items() if name == section.name}
    curve_metrics = [m for m in section.metrics if m in (TEACHER_KL, PPL, TOP1)]
    figures = "; ".join(f"seed {seed}: " + ", ".join(f"{m.label.split(' ')[0]} {m.fmt.format(v)}"
                                                      for m in curve_metrics if (v := m.read(run.final)) is not None)
                        for seed, run in sorted(done.items()))
    text = (f"Warm start: `{shown(section.warm.overrides)}` on recipe `{section.recipe}`, exported once per seed"
            + (f"; its final held-out evaluation: {figures}." if figures else "."))
    for seed, run in sorted(done.items()):
        rows = [[r["step"]] + [m.fmt.format(v) if (v := m.read(r)) is not None else "—" for m in curve_metrics]
                for r in run.curve]
        text += (f"\n\nWarm start, seed {seed}, held-out curve ({run.wall_s / 60:.1f} min):\n\n"
                 + md_table(["step"] + [m.label for m in curve_metrics], rows, "r" * (1 + len(curve_metrics))))
    return text


@dataclass(frozen=True)
class Finding:
    """A published direction checked here: row ``a`` (the paper's method) against row ``b`` (what
    it improves on) of one section, judged on that section's ``primary`` metrics."""

    paper: str
    claim: str
    section: str
    a: str
    b: str
    primary: tuple[Metric, ...]


FINDINGS = (
    Finding("GKD (Agarwal et al. 2024)", "on-policy ≥ off-policy on generated text, from a fine-tuned student",
            "warm", "on_policy", "quickstart, KD at stop targets", (ROUGE_REF, ROUGE_TEACHER)),
    Finding("DistiLLM (Ko et al. 2024)", "skew KL ≥ KL", "warm", "skl kd_ratio=1", "fkl kd_ratio=1",
            (ROUGE_REF, ROUGE_TEACHER)),
    Finding("DistiLLM (Ko et al. 2024)", "skew reverse KL ≥ reverse KL", "warm", "srkl kd_ratio=1", "rkl kd_ratio=1",
            (ROUGE_REF, ROUGE_TEACHER)),
    Finding("AKL (Wu et al. 2024)", "adaptive KL ≥ forward KL", "warm", "akl kd_ratio=1", "fkl kd_ratio=1",
            (ROUGE_REF, ROUGE_TEACHER)),
    Finding("AKL (Wu et al. 2024)", "adaptive KL ≥ reverse KL", "warm", "akl kd_ratio=1", "rkl kd_ratio=1",
            (ROUGE_REF, ROUGE_TEACHER)),
    Finding("DistiLLM, cold start", "skew KL ≥ KL", "losses", "skl kd_ratio=1", "fkl kd_ratio=1", (TEACHER_KL, PPL)),
    Finding("DistiLLM, cold start", "skew reverse KL ≥ reverse KL", "losses", "srkl kd_ratio=1", "rkl kd_ratio=1",
            (TEACHER_KL, PPL)),
    Finding("AKL, cold start", "adaptive KL ≥ forward KL", "losses", "akl kd_ratio=1", "fkl kd_ratio=1",
            (TEACHER_KL, PPL)),
    Finding("AKL, cold start", "adaptive KL ≥ reverse KL", "losses", "akl kd_ratio=1", "rkl kd_ratio=1",
            (TEACHER_KL, PPL)),
    Finding("DSKD (Zhang et al. 2024)", "dual-space KD ≥ ULD across tokenizers", "xtok", "gemma alone, dskd",
            "gemma alone, uld", (KL_SMOLLM2, PPL)),
    Finding("DSKD (Zhang et al. 2024)", "dual-space KD ≥ MinED across tokenizers", "xtok", "gemma alone, dskd",
            "gemma alone, mined", (KL_SMOLLM2, PPL)),
    Finding("Minitron (Muralidharan et al. 2024)", "a pruned student repaired with KD beats one repaired with CE at "
            "equal tokens", "repair", "KD repair, pure fkl", "CE repair", (TEACHER_KL, PPL)),
    Finding("Minitron, kdflow's mix", "a pruned student repaired with KD beats one repaired with CE at "
            "equal tokens", "repair", "KD repair (quickstart mix)", "CE repair", (TEACHER_KL, PPL)),
)


def findings_table(all_runs: dict[str, dict[str, list[Run]]]) -> str:
    """Each published direction against the rows that test it: figures (mean over the seeds both
    rows have), and whether the paper's method is ahead on every primary metric."""
    rows = []
    for f in FINDINGS:
        runs = all_runs.get(f.section, {})
        a, b = runs.get(f.a, []), runs.get(f.b, [])
        shared = {r.seed for r in a if r.ok} & {r.seed for r in b if r.ok}  # paired seeds only
        a, b = [r for r in a if r.seed in shared], [r for r in b if r.seed in shared]
        cells = []
        ahead = 0
        for m in f.primary:
            va, vb = values_of(a, m), values_of(b, m)
            if not va or not vb:
                break
            ma, mb = statistics.fmean(va), statistics.fmean(vb)
            ahead += m.better(ma, mb)
            cells.append(f"{m.label.split(' ')[0]} {m.fmt.format(ma)} vs {m.fmt.format(mb)}")
        if len(cells) < len(f.primary):
            rows.append([f.paper, f.claim, f"`{f.section}`: {f.a} vs {f.b}", "—", "not run"])
            continue
        seeds = ",".join(str(r.seed) for r in a if r.ok)
        verdict = ("reproduced" if ahead == len(f.primary) else "not reproduced" if ahead == 0
                   else f"mixed ({ahead} of {len(f.primary)})")
        rows.append([f.paper, f.claim, f"`{f.section}`: {f.a} vs {f.b} (seeds {seeds})", "; ".join(cells), verdict])
    return ("## Published finding → here\n\nEach row: the paper's method against what it improves on, in one "
            "section of this report, on that section's primary metrics (warm: ROUGE-L of greedy answers against the "
            "references and the teacher's answers; losses: held-out teacher-KL and perplexity; xtok: KL to SmolLM2 and "
            "perplexity, the yardsticks every aligner shares). `reproduced`: ahead on every primary metric. The "
            "measured reasons are in the sections below and in the note above.\n\n"
            + md_table(["paper", "published", "here", "figures (paper's method vs other)", "verdict"], rows, "lllll"))


def header(args, started: str, load0, minutes: float, n_runs: int, progress: str = "") -> str:
    info = common.machine_info()
    load1 = common.load_average()
    # the note is printed below the command: the command names it without repeating it
    argv = [("<the note below>" if i and args.argv[i - 1] == "--note" else a) for i, a in enumerate(args.argv)]
    argv = [a if not a.startswith("--note=") else "--note=<the note below>" for a in argv]
    cmd = "python -m bench quality" + (" " + shlex.join(argv) if argv else "")
    lines = [
        "# kdflow distillation quality",
        "",
        f"Command: `{cmd}` — started {started}, {n_runs} runs, took {minutes:.1f} min."
        + (" **Quick run** (`--quick`: fewer rows, one seed)." if args.quick else ""),
        "",
        f"Machine: {info.get('cpu', '?')}, {info.get('cpus_available')} CPUs available, {info.get('memory_gb')} GiB; "
        f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}. Load average "
        f"(1/5/15 min) at start {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, at end "
        f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f}. The figures do not depend on the load (same seed, same "
        "numbers); the `min/run` times do.",
        "",
        f"Seeds: headline rows and the CE-only twin {','.join(map(str, args.seeds))}; other rows "
        f"{','.join(map(str, args.other_seeds))}. Steps: {args.steps if args.steps else 'each recipe’s own'}.",
    ]
    if progress:
        lines += ["", progress]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)
