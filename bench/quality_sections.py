"""What ``python -m bench quality`` measures: the metrics, the rows and the sections.

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
- ``context`` and ``brief``: the quickstart with its teacher asked to answer briefly, at 60 and
  110 steps. ``longer``: the quickstart as shipped and its twin at 110 steps.

A new section (say cross-tokenizer aligners with another teacher, or rollout policies judged by
a generation metric) is a function returning a :class:`Section` — its recipe, its CE-only
twin, its rows and the :class:`Metric` list it is judged on (a metric reads one value from the
final evaluation record, so a new evaluation key needs only a new ``Metric``) — added to
:data:`SECTIONS`. Running (:mod:`bench.quality`) and the report (:mod:`bench.quality_report`)
are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


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


# the quickstart leaves answers' first tokens to CE since 2026-12-07 (distill.kd_at_opening false);
# a quickstart row measured before keeps KD there, as its stored runs trained
OPENING_KD = "distill.kd_at_opening=true"
UNTIL_OPENING = "quickstart until 2026-12-07 (KD at the opening)"


def kd_everywhere(*overrides: str) -> tuple[str, ...]:
    """A quickstart row that mixes in KD, with KD at every target as it was measured: the
    quickstart leaves the stop targets (``distill.kd_at_stop false``, since 2026-12-06) and the
    answers' first tokens (``distill.kd_at_opening false``, since 2026-12-07) to CE, and the rows
    measured before (every pure-KD row among them: with ``kd_ratio 1`` a target without KD learns
    nothing) keep KD there, as they were measured on 2026-12-01."""
    return (*overrides, "distill.kd_at_stop=true", OPENING_KD)


def warm_kd_at_stop(*overrides: str) -> tuple[str, ...]:
    """A warm row with KD at the stop targets, spelled as its stored runs were (their recipes
    name a warm start's folder, so the store finds them by command alone, not by what they
    trained): they predate ``distill.kd_at_opening`` and trained with KD at the openings too."""
    return (*overrides, "distill.kd_at_stop=true")


def losses_section() -> Section:
    """The quickstart pair: every built-in loss, and CE/KD mixes, against CE-only."""
    pure = ("fkl", "rkl", "js", "skl", "srkl", "tvd", "akl")
    # every run is also judged on its greedy answers (SCORED); the twin's and the quickstart's
    # commands are the answers section's, so their runs are shared
    rows = [Row("quickstart (as shipped)", SCORED, headline=True),
            Row(UNTIL_OPENING, (OPENING_KD, *SCORED), headline=True),
            Row("quickstart, KD at every target", kd_everywhere(*SCORED), headline=True),
            # the evidence `teacher.dtype: auto` needs before it may become the default (bf16 where
            # the CPU or GPU multiplies bf16 natively): within 0.5% of the fp32 teacher's row (measured
            # against the quickstart of its day, the row above)
            Row("quickstart with a bf16 teacher", ("teacher.dtype=bfloat16", OPENING_KD, *SCORED), headline=True)]
    rows += [Row(f"{loss} kd_ratio=1", (*kd_everywhere(f"distill.loss={loss}", "distill.kd_ratio=1"), *SCORED))
             for loss in pure]
    rows += [Row(f"{loss} kd_ratio={r}", (*kd_everywhere(f"distill.loss={loss}", f"distill.kd_ratio={r}"), *SCORED))
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
               "stop targets (end of turn, EOS) to CE (`distill.kd_at_stop false`, since 2026-12-06) and the "
               "answers' first tokens too (`distill.kd_at_opening false`, since 2026-12-07; `" + UNTIL_OPENING + "` is "
               "the recipe before); every other KD row keeps KD at every target (`distill.kd_at_stop=true "
               "distill.kd_at_opening=true`), as it was measured on 2026-12-01. After training, "
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
    # its stored runs were scored with overlap in DSKD's place, from exports made before they held
    # the trained projectors (kdcore eval restores them now, from hf/aligners/); greedy answers do
    # not involve the aligner, and the row keeps that command so that its stored runs stay its own
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
        rows=tuple(Row(p, kd_everywhere(*short, f"distill.rollout={p}")) for p in policies),
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
            Row("quickstart, KD at stop targets", warm_kd_at_stop(*cont), headline=True)]
    rows += [Row(p, warm_kd_at_stop(*cont, f"distill.rollout={p}"), headline=p == "on_policy")
             for p in ("on_policy", "mixed", "seqkd", "adaptive")]
    rows += [Row(f"{loss} kd_ratio=1", warm_kd_at_stop(*cont, f"distill.loss={loss}", "distill.kd_ratio=1"))
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
               "every other KD row keeps KD there (`distill.kd_at_stop=true`). Every run here predates "
               "`distill.kd_at_opening` (2026-12-07): each KD row, `quickstart (as shipped)` included, trained with "
               "KD at the answers' first tokens, as the quickstart then did; a rerun of this section trains the "
               "quickstart as it is now."),
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
        rows=(Row("KD repair (quickstart mix)", (*budget, OPENING_KD), headline=True),
              Row("KD repair, pure fkl", kd_everywhere(*budget, "distill.loss=fkl", "distill.kd_ratio=1"))),
        metrics=TOKENS_AND_ANSWERS,
        quick_rows=("KD repair (quickstart mix)",),
        generation=True,
        curves=True,
        about=("The quickstart's pruned start (4 evenly spaced of SmolLM2-135M-Instruct's 30 layers, held-out ppl "
               "1.65e7 at step 0), repaired for 200 steps of 8 rows at the quickstart's lr 1e-3: with CE only (the "
               "twin), with the quickstart's mix (fkl + CE, `kd_ratio 0.5`, no KD at the stop targets; KD at the "
               "answers' first tokens, as the quickstart had it until 2026-12-07) and with "
               "pure logit KD (fkl, `kd_ratio 1`, KD at the stop targets: Minitron's repair uses the teacher's "
               "logits alone). The budget was chosen from the CE twin's own held-out curve (below): it has "
               "flattened by step 200 (ppl 98.6 → 86.9 over the last 50 steps against 383 → 153 over the first "
               "100), so the comparison is not taken in the first free fall. After training, `kdcore eval` answers "
               "the 64 held-out prompts greedily (at most 32 tokens), scored as in the warm section."),
    )


# KD on the teacher's own greedy answers (cut at 32 tokens, as scored), CE on the references
SEQKD_CE_ON_DATA = ("distill.rollout=seqkd", "distill.rollout_options.ce=data", "rollout.max_new_tokens=32")


def answers_section() -> Section:
    """The quickstart as shipped, judged on its greedy answers as well (the issue's generation bar)."""
    # the recipe's own 60 steps; answers of at most 32 tokens to all 64 held-out prompts. Rows: the
    # candidates measured for answers that loop no more than the twin's (sampled rollouts keep the CE
    # half on the references; a smaller KD share; no KD at the answers' first tokens, now shipped)
    return Section(
        name="answers",
        title="The quickstart as shipped, judged on its answers too",
        recipe="quickstart",
        baseline=Row("CE only", ("distill.kd_ratio=0", *SCORED), headline=True),
        rows=(Row("quickstart (as shipped)", SCORED, headline=True),
              # the one-change candidates below were measured from the recipe of their day, this row
              Row(UNTIL_OPENING, (OPENING_KD, *SCORED), headline=True),
              Row("on_policy", (*SCORED, OPENING_KD, "distill.rollout=on_policy", "rollout.max_new_tokens=32")),
              Row("mixed", (*SCORED, OPENING_KD, "distill.rollout=mixed", "rollout.max_new_tokens=32")),
              Row("kd_ratio=0.25", (*SCORED, OPENING_KD, "distill.kd_ratio=0.25")),
              # the losses section's row of the same command (its runs shared): a smaller KD share
              # with KD at the stop targets too
              Row("kd_ratio=0.25, KD at every target",
                  (*kd_everywhere("distill.loss=fkl", "distill.kd_ratio=0.25"), *SCORED)),
              # the shipped recipe with KD at the stop targets again (they stay with CE: this row)
              Row("KD at stop targets but not the first token", (*SCORED, "distill.kd_at_stop=true")),
              # and with the smaller KD share of the closest row before (kd_ratio=0.25, KD at every target)
              Row("kd_ratio=0.25 and KD at stop targets but not the first token",
                  (*SCORED, "distill.kd_ratio=0.25", "distill.kd_at_stop=true")),
              # the shipped recipe with the smaller KD share alone
              Row("shipped with kd_ratio=0.25", (*SCORED, "distill.kd_ratio=0.25")),
              # DistiLLM's skew KL in place of fkl: mode-seeking where fkl spreads the student over
              # the teacher's many continuations (greedy answers then take the most generic one)
              Row("shipped with skl", (*SCORED, "distill.loss=skl")),
              # between the shipped share (no loops, answers far from the teacher's) and 0.25
              # (closer, loops)
              Row("shipped with kd_ratio=0.4", (*SCORED, "distill.kd_ratio=0.4")),
              # the student learns the answers it is judged against
              Row("seqkd with CE on the references", (*SCORED, *SEQKD_CE_ON_DATA)),
              # its answers run long where they loop: a smaller share for the teacher's answers
              Row("seqkd with CE on the references and kd_ratio=0.25",
                  (*SCORED, *SEQKD_CE_ON_DATA, "distill.kd_ratio=0.25")),
              # the teacher's answers never end: cut near the references' median length (14
              # tokens), so KD no longer argues against stopping where the references stop
              Row("seqkd with CE on the references and the teacher's answers cut at 16 tokens",
                  (*SCORED, *SEQKD_CE_ON_DATA, "rollout.max_new_tokens=16")),
              # the teacher's answers ended after their first sentence, that stop taught by CE: the
              # teacher's own answers never end, so the student saw an end only in the references
              Row("seqkd with CE on the references and the teacher's answers ended after one sentence",
                  (*SCORED, *SEQKD_CE_ON_DATA, "distill.rollout_options.end=sentence")),
              # KD at the first token of the teacher's answers too (the references take no KD under
              # ce: data): the opening the teacher then continues, unlike the references' openings
              Row("seqkd with CE on the references and KD at the answers' first tokens",
                  (*SCORED, *SEQKD_CE_ON_DATA, "distill.kd_at_opening=true")),
              # both: the teacher's openings by KD, its answers ended after one sentence
              Row("seqkd with CE on the references and KD at the first tokens and one-sentence answers",
                  (*SCORED, *SEQKD_CE_ON_DATA, "distill.kd_at_opening=true", "distill.rollout_options.end=sentence"))),
        metrics=TOKENS_AND_ANSWERS,
        quick_rows=("quickstart (as shipped)",),
        generation=True,
        about=("The quickstart recipe as shipped (60 steps, fkl + CE at `kd_ratio 0.5`, no KD at the stop "
               "targets nor at the answers' first tokens) and its CE-only twin, then `kdcore eval` on each run: "
               "greedy answers (at most 32 tokens) to the 64 held-out prompts, scored as in the warm section. `"
               + UNTIL_OPENING + "` is the recipe before 2026-12-07, with KD at the answers' first tokens: the "
               "teacher opens 40 of its 64 held-out answers with a backtick (`python -m bench first_token`), the "
               "student learned that opening before it could write what follows, and its answers looped (seed 0). "
               "The shipped recipe's seeds 2 and 3 were run after 0 and 1, to match the twin's four, and are shown "
               "as they came out. "
               "The rows after those two change one thing each from the recipe before 2026-12-07: "
               "student-sampled rollouts (`on_policy`, and `mixed` at λ 0.5; the CE half stays on the "
               "references, samples of at most 32 tokens) or a smaller KD share (`kd_ratio 0.25`, also with KD at "
               "the stop targets: the losses section's `fkl kd_ratio=0.25` row, the same runs, and two more "
               "seeds). The next three rows change the shipped recipe: KD at the stop targets again, that with "
               "`kd_ratio 0.25` as well, and `kd_ratio 0.25` alone. The last five (2026-12-07/08) change it too: "
               "skew KL (`skl`, DistiLLM's) in place of fkl, `kd_ratio 0.4`, and sequence-level KD with the CE "
               "half on the references (`seqkd` with `ce: data`, `recipes/seqkd.yaml`: the teacher's greedy "
               "answers, cut at 32 tokens, take KD alone; with `kd_ratio 0` they get neither KD nor CE, so the "
               "twin is its twin), also with `kd_ratio 0.25` or with the teacher's answers cut at 16 tokens. "
               "Each ran on seeds 0 and 1, and `seqkd with CE on the references` on seeds 2 and 3 as well, "
               "whatever those showed (the 16-token cut, behind the teacher-KL bar on seeds 0 and 1, was not "
               "extended). Three more seqkd rows (2026-12-08): the teacher's answers ended after their first "
               "sentence (`end: sentence`: cut at the first `.`, `!` or `?` outside backticks that a space or "
               "the end follows, the answer-end token put there and taught by CE alone), KD at the answers' first "
               "tokens (`kd_at_opening: true`; under `ce: data` only the teacher's answers take KD, so it adds KD "
               "at their openings alone), and both. Each ran on seeds 0 and 1; the KD-at-the-first-tokens row, "
               "ahead on three of the four criteria there, on seeds 2 and 3 as well, whatever those showed."),
    )


DISTINCT = Metric("answer_words_student_distinct", "distinct answers ↑", "{:.2f}", higher_is_better=True)
# the teacher's instruction in the context section: of five probed (a scratch probe of the teacher on
# the 64 held-out rows, not committed), the one that put most on stopping where a reference ends:
# p(stop) 0.036 -> 0.67, ppl of the reference answers 37 -> 24, argmax opening '`' on 40 prompts -> 4
BRIEF = 'Answer in one short sentence, starting with a verb (for example "Return ..."), without code or backticks.\n\n'
WITH_BRIEF = (f"data.teacher_context.text={BRIEF}", "distill.aligner=overlap")


def context_section() -> Section:
    """The quickstart with the teacher asked to answer as the references do (context distillation)."""
    # the teacher answers at twice the references' length and opens with a backticked name the
    # 60-step student cannot yet write (see the answers section): asked, in a context only the
    # teacher reads, to answer briefly, it puts 0.67 on stopping where a reference ends. The twin
    # gets the same context, so that both are judged against the same teacher answers and KL.
    return Section(
        name="context",
        title="The quickstart with the teacher asked to answer briefly (context distillation)",
        recipe="quickstart",
        baseline=Row("CE only", (*WITH_BRIEF, "distill.kd_ratio=0", *SCORED), headline=True),
        rows=(Row("quickstart, teacher asked to answer briefly", (*WITH_BRIEF, OPENING_KD, *SCORED), headline=True),
              # the answers section's closest to the bar (a smaller KD share), with the context
              Row("and kd_ratio=0.25", (*WITH_BRIEF, OPENING_KD, "distill.kd_ratio=0.25", *SCORED), headline=True),
              # recipes/seqkd.yaml with the briefed teacher answering: answers that end (the teacher
              # alone never ends within 32 tokens) and loop less than the twin's (its own: 0.003)
              Row("seqkd with CE on the references and the teacher asked to answer briefly",
                  (*WITH_BRIEF, *SEQKD_CE_ON_DATA, *SCORED))),
        metrics=(*TOKENS_AND_ANSWERS, DISTINCT),
        quick_rows=("quickstart, teacher asked to answer briefly",),
        generation=True,
        about=("The quickstart recipe (60 steps, fkl + CE at `kd_ratio 0.5`, no KD at the stop targets; KD at the "
               "answers' first tokens, as the quickstart had it until 2026-12-07) with "
               "`data.teacher_context`: the teacher reads `" + BRIEF.strip() + "` before each question, the "
               "student never does (the `overlap` aligner pairs the two by character offsets; the vocabularies "
               "are the same). The CE-only twin has the same context, which it never uses in training: `kdcore "
               "eval` scores both against the teacher with its context (teacher-KL on the held-out split, its "
               "greedy answers), so the twin's training equals the answers section's twin's and its scores "
               "differ only by that teacher. The second row also takes the answers section's smaller KD share "
               "(`kd_ratio 0.25`). The third (2026-12-08, seeds 0 and 1) is `recipes/seqkd.yaml` (shipped "
               "defaults: no KD at the first tokens) with the briefed teacher answering the training prompts: "
               "it generates with the context and reads each answer after it. Top-1 is not reported through "
               "the `overlap` aligner. `distinct answers`: different student answers ÷ prompts (1/64 when one "
               "template answers every prompt)."),
    )


# the quickstart's steps within its 10-minute budget (one quiet lane on 2 cores: about 10 min for 110
# steps, held-out evaluations included; 60 steps leave both students answering with templates)
BRIEF_STEPS = "train.max_steps=110"


def brief_section() -> Section:
    """The context section's teacher, with the steps the quickstart's budget allows."""
    # at 60 steps both students answer the 64 prompts with a few templates, so ROUGE-L compares
    # template words; at 110 steps (a scratch run) the KD student answers the questions (0.53
    # distinct answers against the twin's 0.19) but loops a little more. The rows after the first
    # each change one thing aimed at the loops: a smaller KD share, or KD at the stop targets too
    # (a teacher asked to answer briefly puts 0.67 on stopping where a reference ends, not 0.04)
    return Section(
        name="brief",
        title="The quickstart with the teacher asked to answer briefly, 110 steps",
        recipe="quickstart",
        baseline=Row("CE only", (*WITH_BRIEF, BRIEF_STEPS, "distill.kd_ratio=0", *SCORED), headline=True),
        rows=(Row("teacher asked to answer briefly", (*WITH_BRIEF, BRIEF_STEPS, OPENING_KD, *SCORED), headline=True),
              Row("and kd_ratio=0.25", (*WITH_BRIEF, BRIEF_STEPS, OPENING_KD, "distill.kd_ratio=0.25", *SCORED),
                  headline=True),
              Row("and KD at stop targets", (*kd_everywhere(*WITH_BRIEF, BRIEF_STEPS), *SCORED), headline=True)),
        metrics=(*TOKENS_AND_ANSWERS, DISTINCT),
        quick_rows=("teacher asked to answer briefly",),
        generation=True,
        about=("The context section's rows at 110 steps instead of 60 (the most the quickstart's 10-minute "
               "budget allows: a 110-step run with this context took about 10 min on one lane of 2 cores, "
               "`kdcore eval` included), the twin too, with the same context. The last two rows each change "
               "one thing aimed at answers that loop: a smaller KD share (`kd_ratio 0.25`), or KD at the stop "
               "targets as well (`distill.kd_at_stop=true`: asked to answer briefly, the teacher puts 0.67 on "
               "stopping where a reference ends, against 0.04 without the context). `kd_ratio 0.25` was the "
               "nearest to the generation bar on seeds 0 and 1; seeds 2 and 3 of it and of the twin were "
               "decided on before they ran, and every seed run is shown."),
    )


def longer_section() -> Section:
    """The quickstart as shipped and its twin with the steps its budget allows."""
    # at 60 steps both students answer with templates (answers section); the brief section's 110
    # steps, the most the 10-minute budget allows, without the brief teacher
    return Section(
        name="longer",
        title="The quickstart as shipped at 110 steps",
        recipe="quickstart",
        baseline=Row("CE only", ("distill.kd_ratio=0", *SCORED, BRIEF_STEPS), headline=True),
        rows=(Row("quickstart (as shipped)", (*SCORED, BRIEF_STEPS), headline=True),),
        metrics=(*TOKENS_AND_ANSWERS, DISTINCT),
        quick_rows=("quickstart (as shipped)",),
        generation=True,
        about=("The answers section's first two rows (the shipped recipe: fkl + CE at `kd_ratio 0.5`, no KD at "
               "the stop targets nor at the answers' first tokens; its CE-only twin) at 110 steps instead of 60, "
               "the most the quickstart's 10-minute budget allows, scored on greedy answers the same way."),
    )


# a new section: a function returning a Section, registered here
SECTIONS: dict[str, Callable[[], Section]] = {"losses": losses_section, "xtok": xtok_section,
                                            "rollouts": rollouts_section, "warm": warm_section,
                                            "repair": repair_section, "answers": answers_section,
                                            "context": context_section, "brief": brief_section,
                                            "longer": longer_section}
