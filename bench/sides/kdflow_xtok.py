"""kdflow's side of the cross-tokenizer ULD pair (peer: :mod:`bench.peers.trl_gold`).

Models: the bench ``teacher`` (Llama 512×8, SmolLM2 byte-level BPE, V = 49152) and
``student-v32000`` (256×4, Mistral v1 SentencePiece, V = 32000): two tokenizer families, so the
teacher's distribution is compared with the student's by ULD (Boizard et al. 2024), the L1
distance between the two *sorted* probability vectors (shorter one padded with zeros).

Data (:func:`xtok_rows`, used by both sides so they train on the same characters): each text of
the ``ensure_data`` file is cut after its first ``seq_len − 2`` student tokens, at a token
boundary of the student tokenizer, and split into ``{"prompt": <first student token's text>,
"completion": <the rest>}``. kdflow (``format: prompt_completion``) then sees
``BOS + content + EOS`` = exactly ``seq_len`` student tokens. A prompt is needed at all because
GOLD's collator refuses rows whose prompt is empty; one token is the least it accepts, and using
the same rows on both sides keeps the trained region the same (the completion).

:func:`run_uld` runs kdflow as a user would (``recipe_dict`` + ``_timed_train`` from
:mod:`bench.sides.kdflow`: ``python -m kdcore train``) with ``distill.aligner: uld`` (``top_k: 0``: whole vocabularies
sorted, the exact distance, as GOLD computes it), ``off_policy``, ``kd_ratio: 1`` (pure
distillation: the CE term has weight 0, as GOLD's ``uld_crossentropy_weight=0``),
temperature 1 (GOLD's ``uld_student_temperature = uld_teacher_temperature = 1``), fp32,
constant LR, no warm-up, clip 1.0, no weight decay, rows in file order, batch ``batch``.
``distill.loss`` is set to ``fkl`` only because the recipe needs a name: the uld aligner's
sorted-L1 distance *is* the divergence and the loss function is not called.

Where the two ULD definitions differ (the aligner's own semantics, not settings):

- **Which positions are compared.** kdflow pairs a student position with the teacher position
  that has read exactly the same characters (``algorithms/aligners/offsets.py``); positions
  inside a span that the two tokenizers cut differently are not compared at all. GOLD, with a
  SentencePiece student, must run ``use_extended_uld=False`` (its byte-offset alignment raises
  ``NotImplementedError`` for non-ByteLevel tokenizers) and then pairs the i-th student
  completion position with the i-th teacher completion position, truncated to the shorter
  side (the original paper's positional pairing), whatever text each has read.
- **Which rows.** kdflow's rows are its loss positions: the last prompt token through the last
  completion token (targets: completion + EOS), then the offset pairing keeps a subset. GOLD's
  default ``uld_token_merge_strategy="observed"`` takes the logits *at* the completion tokens
  with the EOS position dropped (``uld_skip_*_eos``), i.e. the distributions predicting
  completion tokens 2…n and EOS.
- **Averaging.** kdflow: the mean over all aligned pairs of the batch (a token mean). GOLD: per
  sequence the mean over its paired positions, then the mean over sequences. Equal when every
  sequence has the same number of pairs; close otherwise.
- kdflow's student sequence starts with the tokenizer's BOS (``<s>``); GOLD tokenizes the
  student text with ``add_special_tokens=False`` (``seq_len − 1`` tokens, no BOS). Both append
  EOS to student and teacher sequences; the teacher tokenizer (SmolLM2) adds no BOS. GOLD
  tokenizes the teacher's prompt and completion separately (kdflow: the whole string once).

Both losses are per-position sorted-L1 distances in [0, 2] at T = 1, so the values are on the
same scale, but they are averages over different position sets. With the random-init bench
models every distribution is nearly the same shape, so which positions are paired hardly
matters and the two losses agree to about 3 digits; with trained models GOLD's index pairing
(which drifts by up to ~20 tokens over a 128-token row here: the teacher needs fewer tokens)
would compare distributions of different contexts and the values would part.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.sides.kdflow import _timed_train, prepare_in_subprocess, recipe_dict


def xtok_rows(student: str, data: str, seq_len: int, rows: int, out: str | Path) -> Path:
    """Write ``rows`` ``{"prompt", "completion"}`` rows to ``out`` (jsonl); see the module doc.

    Each row's ``prompt + completion`` is a prefix of the data text ending at a student token
    boundary and re-tokenizes (no specials) to exactly ``seq_len − 2`` student tokens; the prompt
    is the first of them. Raises when a text is too short or the re-tokenization differs.
    """
    from transformers import AutoTokenizer

    from bench.models import read_texts

    if seq_len < 4:
        raise ValueError(f"seq_len {seq_len}: need at least 4 (BOS, prompt token, completion token, EOS)")
    tok = AutoTokenizer.from_pretrained(student)
    texts = read_texts(data)
    if len(texts) < rows:
        raise ValueError(f"data '{data}' has {len(texts)} rows; {rows} needed")
    content = seq_len - 2  # kdflow adds BOS and EOS around it
    out = Path(out)
    with open(out, "w") as f:
        for i, text in enumerate(texts[:rows]):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            if len(enc["input_ids"]) < content:
                raise ValueError(f"row {i} has {len(enc['input_ids'])} student tokens, fewer than {content}")
            offs = enc["offset_mapping"]
            cut, split = offs[content - 1][1], offs[0][1]
            prompt, completion = text[:split], text[split:cut]
            again = tok(prompt + completion, add_special_tokens=False)["input_ids"]
            if again != enc["input_ids"][:content]:
                raise ValueError(f"row {i}: the cut text does not re-tokenize to the same {content} student tokens")
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return out


def run_uld(student: str, teacher: str, data: str, seq_len: int, batch: int = 4, steps: int = 5, warmup: int = 1,
            lr: float = 1e-4, seed: int = 0, overrides: list[str] | None = None) -> dict:
    """kdflow ``uld`` off-policy, pure distillation; ``warmup + steps`` steps (``overrides``: dotlist). Returns the keys of
    :func:`bench.sides.kdflow.run` (``side``, ``step_times``, ``warmup_times``, ``losses``,
    ``final_loss``, ``kd_loss``, ``ce_loss``, ``kdflow_*``, ``teacher_wait_s``, ``timing``,
    ``train_wall_s``, ``child_maxrss``, ``tokens_per_step``, ``loss_tokens_per_step``,
    ``setup_s``) plus ``align_ratio`` (per step: aligned student rows / student loss rows)
    and ``rows`` (the prompt/completion rows trained on, for comparison with the peer)."""
    t_setup = time.perf_counter()
    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix="kdflow-xtok-") as tmp:
        rows_file = str(Path(tmp) / "rows.jsonl")
        prepare_in_subprocess("bench.sides.kdflow_xtok:xtok_rows", student=student, data=data, seq_len=seq_len,
                              rows=batch * total, out=rows_file)
        recipe = recipe_dict(student, teacher, rows_file, seq_len, batch, total, "", lr=lr, precision="fp32",
                             seed=seed)
        recipe["data"].update(format="prompt_completion", max_length=seq_len, overlong="truncate")
        recipe["distill"] = {"loss": "fkl", "aligner": "uld", "aligner_options": {"top_k": 0},
                             "rollout": "off_policy", "kd_ratio": 1.0, "temperature": 1.0}
        res = _timed_train(recipe, overrides, warmup, total)
    recs = res.pop("records")
    res.update(side="kdflow-uld", tokens_per_step=batch * seq_len,
               loss_tokens_per_step=batch * (seq_len - 2),  # completion + EOS targets (before pairing)
               align_ratio=[r.get("align_ratio") for r in recs],
               setup_s=time.perf_counter() - t_setup - res["train_wall_s"])
    return res
