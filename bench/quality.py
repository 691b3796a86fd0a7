"""Distillation quality at equal work: does KD beat plain fine-tuning on held-out data?

``python -m bench quality`` → ``bench/quality.md``. Every row is one recipe plus dotlist
overrides, trained through the command line a user runs (``python -m kdcore train RECIPE
key=value ...``) in a fresh process per run and seed, and read from the final evaluation record
of that run's ``metrics.jsonl``. Each section compares its rows with a **CE-only twin**
(``distill.kd_ratio=0``): the same recipe, steps, batches (so the same tokens), schedule and
seed, with the learning rate that is best for CE in the same grid (the section says which).

Sections (``--sections``):

- ``losses``: the quickstart pair (SmolLM2-135M-Instruct teacher, 4 of its 30 layers as the
  student), every built-in loss at ``kd_ratio=1`` and CE/KD mixes, against CE-only. Metrics:
  held-out teacher-KL (forward KL teacher→student, the trainer's ``eval_teacher_kl``),
  perplexity of the held-out references (``eval_ppl``) and top-1 agreement with the teacher
  (``eval_top1_agreement``).
- ``xtok``: both sides pretrained across tokenizers — Gemma 3 270M and SmolLM2-135M-Instruct
  teaching 8 of SmolLM2's layers, alone (every aligner for Gemma) and together (recipe
  ``multi_teacher_gemma``; needs ``bash scripts/get_gemma.sh``), scored against both teachers.
- ``rollouts``: the five rollout policies on the quickstart pair, scored on greedy answers by
  ``kdcore eval`` (ROUGE-L against the references and the teacher's answers, repeated 4-grams,
  draft acceptance, answer length).
- ``warm``: the papers' protocol: the quickstart student trained with CE and exported once per
  seed (:class:`WarmStart`, kept in ``--warm-dir``), then every loss and rollout policy and the
  CE continuation twin run the same steps from it, scored on greedy answers too (ROUGE-L,
  repeated 4-grams, draft acceptance).
- ``repair``: Minitron's protocol: the pruned quickstart student repaired for 200 steps (past the
  CE curve's free fall, measured) by CE, by the quickstart's KD mix and by pure logit KD, with
  the held-out curves side by side and the greedy answers scored as in ``warm``.
- ``answers``: the quickstart as shipped and its CE-only twin scored on greedy answers too (the
  issue's generation bar), beside the one-change candidates measured for answers that loop less.

A new section (say cross-tokenizer aligners with another teacher, or rollout policies judged by
a generation metric) is a function returning a :class:`Section` — its recipe, its CE-only
twin, its rows and the :class:`Metric` list it is judged on (a metric reads one value from the
final evaluation record, so a new evaluation key needs only a new ``Metric``) — added to
:data:`SECTIONS`. Running, aggregation and the report are shared.

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
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import md_table  # noqa: E402
from bench.quality_store import Run, RunStore, content_of_data, recipe_changes, resolved_recipe  # noqa: E402

# ----------------------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class Metric:
    """One figure read from a run's final evaluation record."""

    key: str  # the evaluation record's key
    label: str
    fmt: str
    higher_is_better: bool
    judged: bool = True  # False: shown for context (answer length), never counted as a win

    def read(self, record: dict) -> float | None:
        v = record.get(self.key)
        return None if v is None else float(v)

    def better(self, value: float, baseline: float) -> bool:
        return value > baseline if self.higher_is_better else value < baseline


TEACHER_KL = Metric("eval_teacher_kl", "teacher-KL ↓", "{:.3f}", higher_is_better=False)
PPL = Metric("eval_ppl", "ppl ↓", "{:.1f}", higher_is_better=False)
TOP1 = Metric("eval_top1_agreement", "top-1 ↑", "{:.3f}", higher_is_better=True)
SAME_VOCAB_METRICS = (TEACHER_KL, PPL, TOP1)

ROUGE_REF = Metric("rouge_l_vs_reference", "ROUGE-ref ↑", "{:.3f}", higher_is_better=True)
ROUGE_TEACHER = Metric("rouge_l_vs_teacher", "ROUGE-teacher ↑", "{:.3f}", higher_is_better=True)
EMPTY = Metric("answer_words_student_empty", "empty answers ↓", "{:.2f}", higher_is_better=False)
WORDS = Metric("answer_words_student", "words/answer", "{:.1f}", higher_is_better=True, judged=False)


# every generation metric kdcore eval has, for the sections that score greedy answers
GENERATION_EVALUATORS = "eval.evaluators=[rouge_l,answer_words,repetition,draft]"
# the overrides that score a run's greedy answers: at most 32 tokens (the median reference is 14)
SCORED = ("eval.max_new_tokens=32", GENERATION_EVALUATORS)
REPEATS = Metric("repetition_student", "repeated 4-grams ↓", "{:.3f}", higher_is_better=False)
DRAFT = Metric("draft_accepted_per_block", "drafts accepted/4 ↑", "{:.2f}", higher_is_better=True)
# token-level figures and the answers' scores, for the sections judged on both
TOKENS_AND_ANSWERS = (TEACHER_KL, PPL, TOP1, ROUGE_REF, ROUGE_TEACHER, REPEATS, DRAFT, EMPTY, WORDS)


@dataclass(frozen=True)
class Row:
    """A recipe variant: dotlist overrides on top of the section's recipe."""

    name: str
    overrides: tuple[str, ...]
    headline: bool = False  # runs every --seeds seed; the others run --other-seeds
    eval_overrides: tuple[str, ...] = ()  # for `kdcore eval` only (sections with generation)


@dataclass(frozen=True)
class Section:
    name: str  # the --sections key
    title: str
    recipe: str  # a shipped recipe name or a path
    baseline: Row  # the CE-only twin every row is compared with
    rows: tuple[Row, ...]
    metrics: tuple[Metric, ...]
    quick_rows: tuple[str, ...]  # row names run by --quick (the twin always runs)
    about: str  # what the section holds and how its twin was chosen
    generation: bool = False  # export each student and score greedy answers with `kdcore eval` (ROUGE-L)
    warm: "WarmStart | None" = None  # every row (the twin too) continues from this CE pre-training
    curves: bool = False  # keep every evaluation of each run and render the held-out curves side by side


@dataclass(frozen=True)
class WarmStart:
    """The papers' protocol (GKD, DistiLLM, MiniLLM fine-tune the student first): the section's
    recipe with these overrides, trained by ``kdcore train`` and exported once per seed, then every
    row runs ``student.path=<that run>/hf student.init=pretrained`` on top of its own overrides."""

    overrides: tuple[str, ...]


def kd_at_stop(*overrides: str) -> tuple[str, ...]:
    """A quickstart row that mixes in KD, with KD at the stop targets as it was measured: the
    quickstart leaves the stop targets to CE since 2026-12-06 (``distill.kd_at_stop false``), and
    the rows measured before (every pure-KD row among them: with ``kd_ratio 1`` a stop target
    without KD learns nothing) keep KD there, as they were measured on 2026-12-01."""
    return (*overrides, "distill.kd_at_stop=true")


def losses_section() -> Section:
    """The quickstart pair: every built-in loss, and CE/KD mixes, against CE-only."""
    pure = ("fkl", "rkl", "js", "skl", "srkl", "tvd", "akl")
    # every run is also judged on its greedy answers (SCORED); the twin's and the quickstart's
    # commands are the answers section's, so their runs are shared
    rows = [Row("quickstart (as shipped)", SCORED, headline=True),
            Row("quickstart, KD at stop targets", ("distill.kd_at_stop=true", *SCORED), headline=True),
            # the evidence `teacher.dtype: auto` needs before it may become the default (bf16 where
            # the CPU or GPU multiplies bf16 natively): within 0.5% of the fp32 teacher's row
            Row("quickstart with a bf16 teacher", ("teacher.dtype=bfloat16", *SCORED), headline=True)]
    rows += [Row(f"{loss} kd_ratio=1", (*kd_at_stop(f"distill.loss={loss}", "distill.kd_ratio=1"), *SCORED))
             for loss in pure]
    rows += [Row(f"{loss} kd_ratio={r}", (*kd_at_stop(f"distill.loss={loss}", f"distill.kd_ratio={r}"), *SCORED))
             for loss, r in (("fkl", 0.25), ("fkl", 0.75), ("js", 0.5), ("rkl", 0.5), ("skl", 0.5))]
    return Section(
        name="losses",
        title="Losses on the quickstart pair (same vocabulary)",
        recipe="quickstart",
        baseline=Row("CE only", ("distill.kd_ratio=0", *SCORED), headline=True),
        rows=tuple(rows),
        metrics=TOKENS_AND_ANSWERS,
        quick_rows=("quickstart (as shipped)", "fkl kd_ratio=1"),
        generation=True,
        about=("SmolLM2-135M-Instruct (GGUF) teacher, student = 4 evenly spaced of its 30 layers, Python "
               "docstring Q&A, held-out split `recipes/data/pydoc_qa_eval.jsonl`. Every row and the CE-only twin "
               "share the recipe's learning rate, schedule, batches and steps; the learning rate is the best "
               "for CE-only in the grid of the issue's sweep (see README, Quality). The shipped quickstart leaves the "
               "stop targets (end of turn, EOS) to CE (`distill.kd_at_stop false`, since 2026-12-06); every other KD "
               "row keeps KD there (`distill.kd_at_stop=true`), as it was measured on 2026-12-01. After training, "
               "`kdcore eval` answers the 64 held-out prompts greedily (at most 32 tokens), scored as in the warm "
               "section (the twin's and the quickstart's runs are the answers section's: the same commands)."),
    )


KL_GEMMA = Metric("eval_teacher_kl/gemma", "KL→gemma ↓", "{:.3f}", higher_is_better=False)
KL_SMOLLM2 = Metric("eval_teacher_kl/smollm2", "KL→smollm2 ↓", "{:.3f}", higher_is_better=False)
TOP1_SMOLLM2 = Metric("eval_top1_agreement/smollm2", "top-1(smollm2) ↑", "{:.3f}", higher_is_better=True)


def xtok_section() -> Section:
    """Both sides pretrained across tokenizers: Gemma 3 270M and SmolLM2 teaching 8 of SmolLM2's layers.

    Every row runs recipe ``multi_teacher_gemma`` (both teachers evaluated in every run) and sets
    the weights: a teacher of weight 0 is evaluated but never in the gradient, so "gemma alone"
    is single-teacher cross-tokenizer KD that is still scored against SmolLM2, and the CE-only
    twin is scored against both."""
    gemma_alone = ("teachers.0.weight=1", "teachers.1.weight=0", *SCORED)
    rows = [Row("gemma alone, overlap", gemma_alone, headline=True)]
    # kdcore eval cannot restore DSKD's trained projectors from a Hugging Face export; greedy
    # answers do not involve the aligner, so its answers are scored with overlap in its place
    # (the row's token figures are its training's own final evaluation, as for every row)
    rows += [Row(f"gemma alone, {a}", (*gemma_alone, f"teachers.0.aligner={a}"),
                 eval_overrides=("teachers.0.aligner=overlap",) if a == "dskd" else ()) for a in ("dskd", "uld", "mined")]
    rows += [Row("smollm2 alone (same vocab)", ("teachers.0.weight=0", "teachers.1.weight=1", *SCORED), headline=True),
             Row("gemma + smollm2 (as shipped)", SCORED, headline=True)]
    return Section(
        name="xtok",
        title="Across tokenizers, both sides pretrained: Gemma 3 270M and SmolLM2 teachers",
        recipe="multi_teacher_gemma",
        baseline=Row("CE only", ("distill.kd_ratio=0", *SCORED), headline=True),
        rows=tuple(rows),
        metrics=(KL_GEMMA, KL_SMOLLM2, PPL, TOP1_SMOLLM2, ROUGE_REF, ROUGE_TEACHER, REPEATS, DRAFT, EMPTY, WORDS),
        quick_rows=("gemma alone, overlap", "gemma + smollm2 (as shipped)"),
        generation=True,
        about=("Teachers: Gemma 3 270M base (Q4_K_M GGUF from PyPI, SentencePiece vocabulary of 262,144, no chat "
               "template) and SmolLM2-135M-Instruct (Q4_1 GGUF, the student's own 49,152-token vocabulary). Student: "
               "8 evenly spaced of SmolLM2-135M-Instruct's 30 layers. Data: the Python docstring Q&A as plain "
               "`Question: … Answer: …` text (`recipes/data/pydoc_qa_plain*.jsonl`), held-out split of 64 rows. "
               "On those held-out answers the two teachers are close: 1.054 (Gemma) and 1.122 (SmolLM2) bits per "
               "character. Every run is recipe `multi_teacher_gemma` with both teachers evaluated; a weight-0 "
               "teacher is scored but never in the gradient. KD is mixed half and half with CE (`kd_ratio 0.5`, "
               "as in the quickstart), lr 1e-3 as the quickstart's truncated student, 80 steps of 8 rows. "
               "`KL→gemma` is the held-out forward KL through that row's aligner for Gemma (overlap unless named), "
               "so only the overlap rows and the twin share a yardstick: for `dskd` it is DSKD's own objective "
               "(the projector's CE plus its two KL terms), for `uld` ULD's sorted-probability distance, for "
               "`mined` the KL under its vocabulary map. `KL→smollm2`, `top-1(smollm2)` and `ppl` (the student's "
               "own tokens) compare across every row. After training, `kdcore eval` answers the 64 held-out prompts "
               "greedily (at most 32 tokens), scored against the references and against Gemma's answers (the first "
               "teacher's); `drafts accepted/4` is empty here: a student cannot draft tokens for a teacher whose "
               "vocabulary is another (the draft evaluator says n/a)."),
    )


def rollouts_section() -> Section:
    """The rollout policies on the quickstart pair, judged on greedy answers (ROUGE-L, `kdcore eval`)."""
    # 30 steps, 32 held-out prompts and 32-token answers (the median reference is 14 tokens): six
    # runs with generation fit beside the other sections on 2 cores
    short = ("train.max_steps=30", "train.eval_every=30", "train.eval_batches=4", "rollout.max_new_tokens=32",
             *SCORED)
    policies = ("off_policy", "on_policy", "mixed", "seqkd", "adaptive")
    return Section(
        name="rollouts",
        title="Rollout policies on the quickstart pair, judged on generated answers",
        recipe="quickstart",
        baseline=Row("CE only", (*short, "distill.kd_ratio=0")),
        rows=tuple(Row(p, kd_at_stop(*short, f"distill.rollout={p}")) for p in policies),
        metrics=(ROUGE_REF, ROUGE_TEACHER, REPEATS, DRAFT, EMPTY, WORDS, TEACHER_KL, PPL),
        quick_rows=("off_policy", "on_policy"),
        generation=True,
        about=("The quickstart recipe (fkl, `kd_ratio 0.5`, lr 1e-3) shortened to 30 steps so that five sampling "
               "policies fit the budget; sampled sequences are at most 32 new tokens (the policies' own default "
               "options otherwise); teacher-KL and perplexity are on the same 32 held-out rows. After training, "
               "`kdcore eval RUN` greedily answers 32 held-out prompts (at most 32 tokens) with the exported student "
               "and with the teacher: `ROUGE-ref` is ROUGE-L of the student's answers against the references, "
               "`ROUGE-teacher` against the teacher's own answers (the `rouge-score` package, "
               "ROUGE-L F1), and as in the warm section the repeated 4-grams and draft tokens accepted. The CE-only "
               "twin is trained off-policy on the references."),
    )


def warm_section() -> Section:
    """Every loss and rollout policy continuing from a CE-trained student (the papers' protocol)."""
    # continuation: 40 steps at lr 1e-4, 64 held-out rows, answers of at most 32 tokens: the
    # settings of the first look, where lr 1e-3 with a fresh optimizer undid the warm start
    cont = ("train.max_steps=40", "train.eval_every=40", "train.eval_batches=8", "train.lr=1e-4",
            "rollout.max_new_tokens=32", *SCORED)
    rows = [Row("quickstart (as shipped)", cont, headline=True),
            Row("quickstart, KD at stop targets", kd_at_stop(*cont), headline=True)]
    rows += [Row(p, kd_at_stop(*cont, f"distill.rollout={p}"), headline=p == "on_policy")
             for p in ("on_policy", "mixed", "seqkd", "adaptive")]
    rows += [Row(f"{loss} kd_ratio=1", kd_at_stop(*cont, f"distill.loss={loss}", "distill.kd_ratio=1"))
             for loss in ("fkl", "rkl", "skl", "srkl", "akl")]
    return Section(
        name="warm",
        title="From a warm start: every method continuing from the same CE-trained student",
        recipe="quickstart",
        baseline=Row("CE continuation", (*cont, "distill.kd_ratio=0"), headline=True),
        rows=tuple(rows),
        metrics=(ROUGE_REF, ROUGE_TEACHER, REPEATS, DRAFT, EMPTY, WORDS, TEACHER_KL, PPL, TOP1),
        quick_rows=("quickstart (as shipped)", "on_policy"),
        generation=True,
        # 200 CE steps at the quickstart's lr 1e-3, evaluated every 25 so that the report shows the
        # curve and where it flattens (the first look stopped at 150, held-out ppl 104)
        warm=WarmStart(("distill.kd_ratio=0", "train.max_steps=200", "train.eval_every=25", "train.eval_batches=8")),
        about=("The quickstart pair. Warm start: the quickstart recipe trained with CE only (`distill.kd_ratio=0`) "
               "for 200 steps and exported by `kdcore train`, once per seed; every row, the CE continuation twin "
               "included, then runs 40 more steps from that export (`student.path=<warm>/hf "
               "student.init=pretrained`) at lr 1e-4, and `kdcore eval` answers 64 held-out prompts greedily (at "
               "most 32 tokens). `repeated 4-grams` is the share of word 4-grams of a student answer that repeat an "
               "earlier one (0: no loops); `drafts accepted/4` is the mean number of the student's 4 greedy draft "
               "tokens the teacher accepts per block of speculative decoding. Step 0 of every row is the warm "
               "start. Why KD answers loop here: the teacher answers at about twice the references' length (21.7 "
               "words against 11.5) and, where a reference ends, puts 0.036 on stopping (median 0.015; 0.075 on 64 "
               "training rows), against 0.80 for the CE warm start, so KD at the stop targets teaches the student "
               "not to stop; `quickstart (as shipped)` leaves those targets to CE (`distill.kd_at_stop false`), "
               "every other KD row keeps KD there (`distill.kd_at_stop=true`)."),
    )


def repair_section() -> Section:
    """Minitron's protocol: the pruned student repaired by KD and by CE at equal tokens, long
    enough that the comparison is not taken while both still fall fast."""
    # 200 steps of 8 rows (~100k loss tokens), evaluated every 25: the CE warm start's measured
    # curve (warm section) falls 383 → 153 ppl in the first 100 steps and 98.6 → 86.9 in the last
    # 50, so step 200 is where CE has flattened; the same command as the warm start, whose runs
    # are therefore this section's CE twin
    budget = ("train.max_steps=200", "train.eval_every=25", "train.eval_batches=8", *SCORED)
    return Section(
        name="repair",
        title="Repairing the pruned student: KD against CE at equal tokens (Minitron's protocol)",
        recipe="quickstart",
        baseline=Row("CE repair", ("distill.kd_ratio=0", *budget), headline=True),
        rows=(Row("KD repair (quickstart as shipped)", budget, headline=True),
              Row("KD repair, pure fkl", kd_at_stop(*budget, "distill.loss=fkl", "distill.kd_ratio=1"))),
        metrics=TOKENS_AND_ANSWERS,
        quick_rows=("KD repair (quickstart as shipped)",),
        generation=True,
        curves=True,
        about=("The quickstart's pruned start (4 evenly spaced of SmolLM2-135M-Instruct's 30 layers, held-out ppl "
               "1.65e7 at step 0), repaired for 200 steps of 8 rows at the quickstart's lr 1e-3: with CE only (the "
               "twin), with the quickstart's mix (fkl + CE, `kd_ratio 0.5`, no KD at the stop targets) and with "
               "pure logit KD (fkl, `kd_ratio 1`, KD at the stop targets: Minitron's repair uses the teacher's "
               "logits alone). The budget was chosen from the CE twin's own held-out curve (below): it has "
               "flattened by step 200 (ppl 98.6 → 86.9 over the last 50 steps against 383 → 153 over the first "
               "100), so the comparison is not taken in the first free fall. After training, `kdcore eval` answers "
               "the 64 held-out prompts greedily (at most 32 tokens), scored as in the warm section."),
    )


def answers_section() -> Section:
    """The quickstart as shipped, judged on its greedy answers as well (the issue's generation bar)."""
    # the recipe's own 60 steps; answers of at most 32 tokens to all 64 held-out prompts. Rows: the
    # candidates measured for answers that loop no more than the twin's (sampled rollouts keep the CE
    # half on the references; a smaller KD share)
    return Section(
        name="answers",
        title="The quickstart as shipped, judged on its answers too",
        recipe="quickstart",
        baseline=Row("CE only", ("distill.kd_ratio=0", *SCORED), headline=True),
        rows=(Row("quickstart (as shipped)", SCORED, headline=True),
              Row("on_policy", (*SCORED, "distill.rollout=on_policy", "rollout.max_new_tokens=32")),
              Row("mixed", (*SCORED, "distill.rollout=mixed", "rollout.max_new_tokens=32")),
              Row("kd_ratio=0.25", (*SCORED, "distill.kd_ratio=0.25")),
              # the losses section's row of the same command (its runs shared): a smaller KD share
              # with KD at the stop targets too, the closest to the generation bar measured
              Row("kd_ratio=0.25, KD at stop targets",
                  (*kd_at_stop("distill.loss=fkl", "distill.kd_ratio=0.25"), *SCORED))),
        metrics=TOKENS_AND_ANSWERS,
        quick_rows=("quickstart (as shipped)",),
        generation=True,
        about=("The quickstart recipe as shipped (60 steps, fkl + CE at `kd_ratio 0.5`, no KD at the stop "
               "targets) and its CE-only twin, then `kdcore eval` on each run: greedy answers (at most 32 tokens) "
               "to the 64 held-out prompts, scored as in the warm section. The other rows change one thing each: "
               "student-sampled rollouts (`on_policy`, and `mixed` at λ 0.5; the CE half stays on the "
               "references, samples of at most 32 tokens) or a smaller KD share (`kd_ratio 0.25`), and the last "
               "two: a smaller KD share with KD at the stop targets too (the losses section's `fkl kd_ratio=0.25` "
               "row, the same runs, and two more seeds)."),
    )


# a new section: a function returning a Section, registered here
SECTIONS: dict[str, Callable[[], Section]] = {"losses": losses_section, "xtok": xtok_section,
                                            "rollouts": rollouts_section, "warm": warm_section,
                                            "repair": repair_section, "answers": answers_section}

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
    res = Run(row=row.name, seed=seed)
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


WARM_RESULTS: dict[tuple[str, int], "Run"] = {}  # (section, seed) -> the warm start (its evaluations in .curve)


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
    if not (export / "config.json").is_file() or changed:
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


def row_recipe(section: Section, row: Row, warm: dict | None) -> dict | None:
    """The recipe a row's stored run is checked against: its own, resolved now, plus the warm
    start's it continued from (a warm start trained anew then retires the row)."""
    recipe = resolved_recipe(section.recipe, row.overrides)
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
            recipe = row_recipe(section, row, warm)
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


# ----------------------------------------------------------------------------- report


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
            table.append([row.name, " ".join(row.overrides) or "—", "—"] + ["—"] * (2 * len(section.metrics))
                         + [f"failed: {rr[-1].error[:100]}", "—"])
            continue
        cells = [mean_range(values_of(good, m), m.fmt) for m in section.metrics]
        ratios = []
        for m in section.metrics:
            a, b = values_of(good, m), values_of(same_seeds(good, base), m)
            ratios.append(f"{statistics.fmean(a) / statistics.fmean(b):.2f}×" if a and b and statistics.fmean(b) else "—")
        won = "—" if row is section.baseline else (", ".join(x for x in (beats(good, base, m) for m in section.metrics) if x) or "none")
        table.append([row.name, " ".join(row.overrides) or "—", ",".join(str(r.seed) for r in good)] + cells + ratios
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


def render_section(section: Section, runs: dict[str, list[Run]]) -> str:
    parts = [f"## {section.title}", "", section.about, "",
             f"Recipe `{section.recipe}`; the twin is `{' '.join(section.baseline.overrides)}`. Cells: mean "
             "(min–max) over seeds of the final held-out evaluation; `÷ CE` = the row's mean ÷ the twin's over the same seeds; "
             "`beats CE-only on` names the metrics whose mean is better than the twin's, `(every seed)` when each "
             "seed also beats the twin of the same seed.", "", section_table(section, runs)]
    if section.warm is not None:
        parts += ["", warm_text(section)]
    if section.curves and (curves := curves_table(section, runs)):
        parts += ["", curves]
    if line := initial_line(section, runs):
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
    text = (f"Warm start: `{' '.join(section.warm.overrides)}` on recipe `{section.recipe}`, exported once per seed"
            + (f"; its final held-out evaluation: {figures}." if figures else "."))
    for seed, run in sorted(done.items()):
        rows = [[r["step"]] + [m.fmt.format(v) if (v := m.read(r)) is not None else "—" for m in curve_metrics]
                for r in run.curve]
        text += (f"\n\nWarm start, seed {seed}, held-out curve ({run.wall_s / 60:.1f} min):\n\n"
                 + md_table(["step"] + [m.label for m in curve_metrics], rows, "r" * (1 + len(curve_metrics))))
    return text


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
    for key, run in store.done.items():
        k = json.loads(key)
        for row in (section.baseline, *section.rows):
            # a warm section's rows carry the warm start's overrides (extra); the others carry none
            if k[0] == section.recipe and k[1] == list(row.overrides) and (len(k) == 5) == (section.warm is not None):
                if store.current(key, row_recipe(section, row, warm.get(k[2]))) is not None:
                    runs.setdefault(row.name, []).append(Run(**{**run.__dict__, "row": row.name}))
    for rr in runs.values():
        rr.sort(key=lambda r: r.seed)
    order = [r.name for r in (section.baseline, *section.rows)]
    return {name: runs[name] for name in order if name in runs}


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
            "equal tokens", "repair", "KD repair (quickstart as shipped)", "CE repair", (TEACHER_KL, PPL)),
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
            progress += (f" {len(store.unchecked)} of the runs shown were stored before each run kept its recipe "
                         "(2026-12-07), so a recipe change since would not show: they are taken on trust.")
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
