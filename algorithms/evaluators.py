"""Built-in generation evaluators for ``kdcore eval`` (see ``register_evaluators`` in kdcore.hookspecs).

============  =============================================================================
rouge_l       ROUGE-L F1 (longest common subsequence of words; Lin 2004) of the student's
              greedy answers against the references and against the teacher's greedy answers
answer_words  mean words per answer (student, teacher, reference) and the share of empty
              student answers: a ROUGE-L of 0 from a student that stops at once shows here
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
    """How long the answers are, in whitespace-separated words."""
    g = generations

    def mean_words(texts) -> float:
        return sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0

    return {"student": mean_words(g.student), "teacher": mean_words(g.teacher), "reference": mean_words(g.references),
            "student_empty": sum(not t.strip() for t in g.student) / len(g.student) if g.student else 0.0}


@hookimpl
def register_evaluators(register):
    register("rouge_l", rouge_l, options=RougeLOptions)
    register("answer_words", answer_words)
