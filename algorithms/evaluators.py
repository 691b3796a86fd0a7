"""Built-in generation evaluators for ``kdcore eval`` (see ``register_evaluators`` in kdcore.plugin_system.hookspecs).

============  =============================================================================
rouge_l       ROUGE-L F1 (longest common subsequence of words; Lin 2004) of the student's
              greedy answers against the references and against the teacher's greedy answers
answer_words  mean words per answer (student, teacher, reference) and the share of empty
              student answers: a ROUGE-L of 0 from a student that stops at once shows here
repetition    how much each side's answers repeat themselves: the share of word n-grams that
              repeat an earlier n-gram of the same answer (seq-rep-n; Welleck et al. 2020),
              0 for an answer without loops, near 1 for "a b a b a b ..."
draft         the student as a draft model for its teacher (speculative decoding, greedy;
              DistillSpec, Zhou et al. 2024): mean draft tokens the teacher accepts per block
              of ``gamma``; same tokenizer only (a cross-tokenizer pair reports nothing)
============  =============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcore import hookimpl


@dataclass
class RougeLOptions:
    use_stemmer: bool = False  # the package's default; its Porter stemmer only suits English


def _mean_f1(scorer, targets, predictions) -> float:
    scores = [scorer.score(t, p)["rougeL"].fmeasure for t, p in zip(targets, predictions)]
    return sum(scores) / len(scores) if scores else 0.0


def rouge_l(generations, options: RougeLOptions | None = None) -> dict[str, float]:
    """ROUGE-L F1 of the student's answers vs the references and vs the teacher's answers."""
    from rouge_score import rouge_scorer

    options = options or RougeLOptions()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=options.use_stemmer)
    g = generations
    return {
        "vs_reference": _mean_f1(scorer, g.references, g.student),
        "vs_teacher": _mean_f1(scorer, g.teacher, g.student),
        # the teacher's own score: the ceiling a faithful student approaches
        "teacher_vs_reference": _mean_f1(scorer, g.references, g.teacher),
    }


def answer_words(generations, options=None) -> dict[str, float]:
    """How long the answers are, in whitespace-separated words; the share of empty student
    answers; and the share of distinct student answers (``student_distinct``: 1.0 when every
    prompt gets its own answer, 1/n when one template answers all n, whatever its ROUGE)."""
    g = generations

    def mean_words(texts) -> float:
        return sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0

    def share(count: int) -> float:
        return count / len(g.student) if g.student else 0.0

    return {"student": mean_words(g.student), "teacher": mean_words(g.teacher), "reference": mean_words(g.references),
            "student_empty": share(sum(not t.strip() for t in g.student)),
            "student_distinct": share(len({" ".join(t.split()) for t in g.student}))}


@dataclass
class RepetitionOptions:
    # n-gram order: 4 as in Welleck et al.'s seq-rep-4; a loop of a single word or a short
    # phrase repeats its 4-grams as surely as its bigrams, while 4-grams rarely repeat by chance
    # in fluent answers of a few dozen words
    n: int = 4

    def __post_init__(self):
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")


def repeated_share(text: str, n: int) -> float | None:
    """1 − distinct n-grams / n-grams of one answer's words (None: fewer than n words)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else None


def repetition(generations, options: RepetitionOptions | None = None) -> dict[str, float]:
    """Mean over answers (those with at least n words) of the share of repeated word n-grams."""
    n = (options or RepetitionOptions()).n
    g = generations

    def mean_rep(texts) -> float:
        shares = [r for t in texts if (r := repeated_share(t, n)) is not None]
        return sum(shares) / len(shares) if shares else 0.0

    return {"student": mean_rep(g.student), "teacher": mean_rep(g.teacher), "reference": mean_rep(g.references)}


@dataclass
class DraftOptions:
    # draft tokens per block: DistillSpec's and transformers' assisted-generation default
    gamma: int = 4

    def __post_init__(self):
        if not isinstance(self.gamma, int) or isinstance(self.gamma, bool) or self.gamma < 1:
            raise ValueError(f"gamma must be an integer >= 1, got {self.gamma!r}")


def draft_blocks(hits: list[bool], gamma: int) -> list[tuple[int, int]]:
    """``(accepted, drafted)`` per block of greedy speculative decoding over one teacher answer.

    ``hits[j]``: the student's greedy next token after the prompt + the teacher's first ``j``
    answer tokens is the teacher's token ``j``. A block starting at ``j`` drafts
    ``min(gamma, len - j)`` tokens (the answer ends there); drafts after the first accepted
    ones are conditioned on the teacher's own tokens, so the student's teacher-forced greedy
    choices are exactly its drafts up to the first miss, where the teacher's token replaces
    the draft (or follows the γ accepted ones as the bonus token) and the next block starts."""
    blocks, j, length = [], 0, len(hits)
    while j < length:
        drafted = min(gamma, length - j)
        accepted = 0
        while accepted < drafted and hits[j + accepted]:
            accepted += 1
        blocks.append((accepted, drafted))
        j += accepted + 1
    return blocks


def draft(generations, options: DraftOptions | None = None) -> dict[str, float]:
    """Greedy speculative decoding with the student drafting for the teacher, counted from one
    teacher-forced student forward per answer (see :func:`draft_blocks`)."""
    import torch

    from kdcore.modeling.tokenizers import same_tokenizer

    gamma = (options or DraftOptions()).gamma
    g = generations
    model = g.student_model
    if model is None or not g.student_prompt_ids or not same_tokenizer(g.student_tokenizer, g.teacher_tokenizer):
        return {}  # n/a: drafting needs the student and the teacher's vocabulary
    device = next(model.parameters()).device
    blocks: list[tuple[int, int]] = []
    tokens = 0
    with torch.inference_mode():
        # the student drafts from its own prompt (without data.teacher_context's context, which
        # only the teacher reads); the teacher's greedy answer is what its drafts must match
        for prompt, answer in zip(g.student_prompt_ids, g.teacher_ids):
            if not answer:
                continue
            ids = torch.tensor([list(prompt) + list(answer)], device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            start = len(prompt) - 1  # the position that predicts the answer's first token
            guess = logits[start:start + len(answer)].argmax(-1).tolist()
            blocks += draft_blocks([a == b for a, b in zip(guess, answer)], gamma)
            tokens += len(answer)
    full = [a for a, d in blocks if d == gamma]
    drafted = sum(d for _, d in blocks)
    return {
        # the headline: blocks with room for gamma drafts (a shorter last block would count a
        # perfect student's final tokens as misses)
        "accepted_per_block": sum(full) / len(full) if full else 0.0,
        "acceptance_rate": sum(a for a, _ in blocks) / drafted if drafted else 0.0,
        # the bound on the speed-up (draft cost aside): answer tokens per teacher forward
        "tokens_per_block": tokens / len(blocks) if blocks else 0.0,
    }


@hookimpl
def register_evaluators(register):
    register("rouge_l", rouge_l, options=RougeLOptions)
    register("answer_words", answer_words)
    register("repetition", repetition, options=RepetitionOptions)
    register("draft", draft, options=DraftOptions)
