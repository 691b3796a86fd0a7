"""Built-in rollout policies: which sequences the student learns on.

=============  ===============================================================================
off_policy     the data set's own responses (supervised KD)
on_policy      the student's own samples (GKD with λ = 1; Agarwal et al. 2024)
mixed          GKD: with probability λ a micro-batch is student-sampled, else data/teacher
seqkd          sequence-level KD: the teacher's responses (Kim & Rush 2016)
adaptive       DistiLLM's adaptive off-policy: replay buffer + validation-driven probability
=============  ===============================================================================

Sampling settings (max_new_tokens, temperature, top_p, n, sync_every) live in the recipe's
``rollout`` section and are shared by all policies; the options below are each algorithm's own.
Decisions are drawn per micro-batch from ``ctx.rng`` (seeded from ``train.seed`` and the rank).

With ``kd_ratio`` < 1 the CE half stays on the data's references whatever a policy selects: the
trainer gives the student's own samples the KD term only and adds the references of their
prompts as CE-only rows (``kdcore/training/steps.py``). Teacher samples (``seqkd``, ``mixed``
with ``off_policy: teacher``) keep their CE, which is what sequence-level KD trains on, unless
``seqkd``'s ``ce`` option is ``data``. ``seqkd``'s ``end: sentence`` ends each teacher answer
after its first sentence; that stop token is the sampler's (``drawn_end``), learned by CE alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdcore import hookimpl
from kdcore.training.rollout_policy import RolloutPolicy, require
from kdflow_algorithms.checks import check_choice, check_range


def _check_probability(name: str, value: float) -> None:
    check_range(name, value, low=0.0, high=1.0)


class OffPolicy(RolloutPolicy):
    """The data set's own responses (supervised KD, as in Hinton et al. 2015 / DistilBERT)."""

    def select(self, batch, ctx):
        return batch


def off_policy(options=None) -> RolloutPolicy:
    """The data set's own responses: supervised KD on the recipe's data (the default)."""
    return OffPolicy()


class OnPolicy(RolloutPolicy):
    """Student-generated responses only: on-policy distillation, GKD with λ = 1.

    Source: R. Agarwal et al., "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes", ICLR 2024 (arXiv:2306.13649). The student answers each prompt of
    the micro-batch from its current weights and learns the teacher's distribution on its own
    tokens, removing the train/inference mismatch of teacher-forced data.
    """

    needs_sampling = True
    sample_sources = ("student",)

    def select(self, batch, ctx):
        return require(ctx.sample_student, "on_policy", "student sampling")(batch)


def on_policy(options=None) -> RolloutPolicy:
    """Student samples only (GKD λ = 1, Agarwal et al. 2024)."""
    return OnPolicy()


@dataclass
class MixedOptions:
    # λ, the fraction of student-generated batches. 0.5: TRL's GKDTrainer default, and one of
    # the settings the paper recommends (λ = 1 is on_policy, λ = 0 supervised KD).
    lam: float = 0.5
    # the other (1 − λ) batches: the data set's responses (GKD's fixed data set) or fresh
    # teacher samples (the paper's "teacher-generated" fixed data, sampled on the fly)
    off_policy: str = field(default="data", metadata={"choices": ("data", "teacher")})

    def __post_init__(self):
        _check_probability("lam", self.lam)
        check_choice("off_policy", self.off_policy, ("data", "teacher"))


class Mixed(RolloutPolicy):
    """Generalized KD (GKD) mixing: with probability λ a micro-batch is the student's own samples.

    Source: R. Agarwal et al., "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes", ICLR 2024, Algorithm 1: draw u ~ U(0, 1); if u ≤ λ, generate the
    outputs with the student, else take them from the fixed data set (here: the data's own
    responses, or teacher samples with ``off_policy: teacher``); then minimise the divergence
    on those outputs. Drawn independently per micro-batch and rank.
    """

    needs_sampling = True

    def __init__(self, options: MixedOptions):
        self.options = options
        self.sample_sources = ("student", "teacher") if options.off_policy == "teacher" else ("student",)
        self.student_batches = 0
        self.batches = 0

    def select(self, batch, ctx):
        self.batches += 1
        if ctx.rng.random() < self.options.lam:
            self.student_batches += 1
            return require(ctx.sample_student, "mixed", "student sampling")(batch)
        if self.options.off_policy == "teacher":
            return require(ctx.sample_teacher, "mixed", "teacher sampling")(batch)
        return batch

    def metrics(self):
        out = {"rollout_student_batch_frac": self.student_batches / self.batches} if self.batches else {}
        self.student_batches = self.batches = 0
        return out


def mixed(options: MixedOptions) -> RolloutPolicy:
    """GKD (Agarwal et al. 2024): student samples with probability λ, else data (or teacher) responses."""
    return Mixed(options)


@dataclass
class SeqKDOptions:
    # Kim & Rush train on the teacher's beam-search output, an approximation of its mode;
    # greedy decoding is beam size 1. False samples at rollout.temperature instead.
    greedy: bool = True
    # The teacher is frozen, so each prompt's response is generated once and reused in later
    # epochs (Kim & Rush distil the data set once, offline). Refreshed when self-distillation
    # updates the teacher.
    reuse: bool = True
    # what the CE half (kd_ratio < 1) learns: "teacher", the teacher's answers (Kim & Rush's
    # sequence-level KD); "data", the data's references, the teacher's answers taking KD alone
    # (their word-level KD on the teacher's answers with the supervised term kept on the data)
    ce: str = field(default="teacher", metadata={"choices": ("teacher", "data")})
    # where a teacher answer ends: "generated", where the teacher stopped (or max_new_tokens cut
    # it); "sentence", after its first sentence (first_sentence_end), with the answer-end token
    # put there. A teacher that answers at length never shows the student an end within the
    # token cap (bench/quality.md, answers section); that end is learned by CE alone, even
    # with ce: data, since the teacher's own distribution there says "go on"
    end: str = field(default="generated", metadata={"choices": ("generated", "sentence")})

    def __post_init__(self):
        check_choice("ce", self.ce, ("teacher", "data"))
        check_choice("end", self.end, ("generated", "sentence"))


def first_sentence_end(text: str):
    """Index just past the first sentence of ``text``: the first ``.``, ``!`` or ``?`` followed
    by white space or the end of the text, outside backtick code spans (neither ``os.path`` nor a
    period inside backticks ends one); None when no sentence ends. An abbreviation (``e.g. x``)
    ends one too: a plain rule, not a sentence splitter."""
    code = False
    for i, ch in enumerate(text):
        if ch == "`":
            code = not code
        elif ch in ".!?" and not code and (i + 1 == len(text) or text[i + 1].isspace()):
            return i + 1
    return None


class SeqKD(RolloutPolicy):
    """Sequence-level KD: the student learns on the teacher's own responses.

    Source: Y. Kim and A. M. Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016: the
    training targets are replaced by the teacher's beam-search outputs (here greedy, or
    sampled), and the student is trained on them — here with the recipe's token-level loss
    on top (their "word-level + sequence-level" combination when kd_ratio < 1).
    """

    needs_sampling = True
    sample_sources = ("teacher",)

    def __init__(self, options: SeqKDOptions):
        self.options = options
        if options.ce == "data":
            self.ce_from_data = ("student", "teacher")
        self.cache: dict[int, tuple[object, int, list]] = {}  # id(data sample) -> (sample, teacher version, samples)
        self.generated = self.reused = 0

    def select(self, batch, ctx):
        sample = require(ctx.sample_teacher, "seqkd", "teacher sampling")
        kw = {"temperature": 0.0} if self.options.greedy else {}
        if self.options.end == "sentence":
            kw["end_at"] = first_sentence_end
        todo = [s for s in batch if not self._cached(s, ctx)]
        if todo:
            for s, group in zip(todo, sample(todo, grouped=True, **kw)):
                self.cache[id(s)] = (s, ctx.teacher_version, group)
            self.generated += len(todo)
        self.reused += len(batch) - len(todo)
        out = [x for s in batch for x in self.cache[id(s)][2]]
        if not self.options.reuse:
            self.cache.clear()
        return out

    def _cached(self, s, ctx) -> bool:
        hit = self.cache.get(id(s))
        return hit is not None and hit[0] is s and hit[1] == ctx.teacher_version

    def metrics(self):
        out = {"rollout_teacher_generated": self.generated, "rollout_teacher_reused": self.reused}
        self.generated = self.reused = 0
        return out


def seqkd(options: SeqKDOptions) -> RolloutPolicy:
    """Sequence-level KD (Kim & Rush 2016): learn on teacher-generated responses."""
    return SeqKD(options)


@dataclass
class AdaptiveOptions:
    # φ0, the initial probability of student-generated outputs. The authors' scripts start
    # at 0 (pure off-policy) and let validation losses raise it.
    init_probability: float = 0.0
    # how much φ rises each time the validation loss rises (the authors' fixed 0.1)
    probability_step: float = 0.1
    # ε: a validation loss counts as risen when it reaches the reference + ε (authors: 0.1)
    loss_eps: float = 0.1
    # replay buffer size in samples (authors: 1000); fresh samples push out the oldest
    capacity: int = 1000
    # share of φ spent on fresh samples once the buffer is full, over training progress
    # t/T: decreasing φ·(1 − t/T) (the authors' default), constant φ/2, increasing φ·t/T
    schedule: str = field(default="decreasing", metadata={"choices": ("decreasing", "constant", "increasing")})
    # the validation loss that drives φ: "ce" = the student's cross-entropy on held-out
    # references (what DistiLLM evaluates), "kd" = the recipe's own KD loss on them
    signal: str = field(default="ce", metadata={"choices": ("ce", "kd")})

    def __post_init__(self):
        _check_probability("init_probability", self.init_probability)
        _check_probability("probability_step", self.probability_step)
        check_range("loss_eps", self.loss_eps, low=0.0)
        check_range("capacity", self.capacity, low=1)
        check_choice("schedule", self.schedule, ("decreasing", "constant", "increasing"))
        check_choice("signal", self.signal, ("ce", "kd"))


class Adaptive(RolloutPolicy):
    """DistiLLM's adaptive off-policy approach: a replay buffer of student-generated outputs
    (SGOs) and a probability φ of using them that rises when the validation loss rises.

    Source: J. Ko, S. Kim, T. Chen, S.-Y. Yun, "DistiLLM: Towards Streamlined Distillation for
    Large Language Models", ICML 2024 (arXiv:2402.03898), §3.2 and Algorithm 1, as in the
    authors' code (github.com/jongwooko/distillm, ``finetune.py``, type ``adaptive-*``):

    per micro-batch, draw r ~ U(0, 1) and, with the fresh-sample threshold
    θ = φ·(1 − t/T) (``schedule: decreasing``; φ/2 constant, φ·t/T increasing),

    - r < θ, or r < φ while the buffer is not yet full: the student generates responses for
      the batch's prompts; they go into the buffer (oldest out beyond ``capacity``) and are
      trained on now;
    - else r < φ (buffer full): a batch drawn uniformly from the buffer is trained on again
      (reuse: SGOs of earlier, slightly older students, which the paper shows is nearly as
      good as fresh sampling at a fraction of the generation cost);
    - else: the data set's own responses.

    After each evaluation: if the validation loss ≥ reference + ε, φ ← min(φ + 0.1, 1) and the
    reference becomes that loss (the reference starts at the first evaluation, before
    training, and only moves when φ rises). A rising validation loss is read as the student
    drifting from what it will face at inference, so it is given more of its own outputs.
    """

    needs_sampling = True
    sample_sources = ("student",)

    def __init__(self, options: AdaptiveOptions):
        self.options = options
        self.probability = options.init_probability
        self.reference: float | None = None
        self.seen_eval_step: int | None = None
        self.buffer: list = []
        self.counts = {"fresh": 0, "reused": 0, "data": 0}

    def threshold(self, step: int, max_steps: int) -> float:
        """θ: the probability of fresh student samples once the buffer is full."""
        progress = min(1.0, step / max_steps) if max_steps else 0.0
        sched = self.options.schedule
        factor = 0.5 if sched == "constant" else progress if sched == "increasing" else 1.0 - progress
        return self.probability * factor

    def observe(self, evaluation: dict | None) -> None:
        """Apply the φ update for a new evaluation record (once per record)."""
        if not evaluation or evaluation.get("step") == self.seen_eval_step:
            return
        self.seen_eval_step = evaluation.get("step")
        loss = self._signal(evaluation)
        if loss is None:
            return
        if self.reference is None:
            self.reference = loss
        elif loss >= self.reference + self.options.loss_eps:
            self.probability = min(1.0, self.probability + self.options.probability_step)
            self.reference = loss

    def _signal(self, evaluation: dict) -> float | None:
        import math

        if self.options.signal == "kd":
            return evaluation.get("eval_kd")
        ppl = evaluation.get("eval_ppl")
        return math.log(ppl) if ppl else None  # eval_ppl = exp(CE): back to the CE loss

    def select(self, batch, ctx):
        self.buffer = ctx.buffer
        self.observe(ctx.last_eval)
        r = ctx.rng.random()
        phi = self.probability
        full = len(ctx.buffer) >= self.options.capacity
        if r < self.threshold(ctx.step, ctx.max_steps) or (r < phi and not full):
            fresh = require(ctx.sample_student, "adaptive", "student sampling")(batch)
            generated = [s for s in fresh if getattr(s, "origin", "data") == "student"]
            ctx.buffer.extend(generated)
            del ctx.buffer[: max(0, len(ctx.buffer) - self.options.capacity)]
            self.counts["fresh"] += 1
            return fresh
        if r < phi:
            self.counts["reused"] += 1
            return ctx.rng.sample(ctx.buffer, k=min(len(batch), len(ctx.buffer)))
        self.counts["data"] += 1
        return batch

    def metrics(self):
        total = sum(self.counts.values())
        out = {"rollout_probability": self.probability, "rollout_buffer_size": len(self.buffer)}
        if total:
            out.update({f"rollout_{k}_batch_frac": v / total for k, v in self.counts.items()})
        self.counts = dict.fromkeys(self.counts, 0)
        return out

    def state_dict(self):
        return {"probability": self.probability, "reference": self.reference, "seen_eval_step": self.seen_eval_step}

    def load_state_dict(self, state):
        self.probability = state.get("probability", self.probability)
        self.reference = state.get("reference", self.reference)
        self.seen_eval_step = state.get("seen_eval_step", self.seen_eval_step)


def adaptive(options: AdaptiveOptions) -> RolloutPolicy:
    """DistiLLM (Ko et al. 2024): replay buffer of student samples, probability adapted from validation loss."""
    return Adaptive(options)


@hookimpl
def register_rollouts(register):
    register("off_policy", off_policy)
    register("on_policy", on_policy)
    register("mixed", mixed, options=MixedOptions)
    register("seqkd", seqkd, options=SeqKDOptions)
    register("adaptive", adaptive, options=AdaptiveOptions)
