"""TRL's ``DistillationTrainer`` (trl 1.16) off-policy, as a benchmark child.

``DistillationTrainer`` is TRL's maintained distillation trainer: a chunked generalized JSD
from the two models' last hidden states and ``lm_head`` weights (the full ``[B, L, V]`` logits
are never built), the closest peer to kdflow's design. In trl 1.16 it always samples its
completions from the student (on-policy); it has no ``lmbda`` knob. The off-policy rows need
it to train on the data's own tokens, so :class:`_Fixed` replaces only the sampling
(``_generate``) with the data row: prompt = the row's first token, completion = the other
``seq_len − 1`` tokens. Everything after that is TRL's own code path (its batching,
``_compute_loss``, ``_chunked_divergence_loss``, optimizer), so a step has exactly the
``batch × (seq_len − 1)`` loss positions of the GKDTrainer and kdflow rows.

``beta=0.5`` is the same symmetric generalized JSD as GKD's β = 0.5 and kdflow's ``js``
``beta: 0.5`` (the two conventions differ only away from 0.5). Settings otherwise as
``peers.trl_gkd`` (fp32, no gradient checkpointing, constant lr, AdamW fused, clip 1.0, rows
in file order).
"""

from __future__ import annotations

import tempfile
import time

from bench.peers import step_clock


def run(student: str, teacher: str, data: str, seq_len: int, batch: int = 4, steps: int = 5,
        warmup: int = 1, lr: float = 1e-4, precision: str = "fp32", seed: int = 0, beta: float = 0.5,
        teacher_dtype: str = "float32") -> dict:
    """Train ``warmup + steps`` optimizer steps off-policy; per-step times, losses, memory.

    Same arguments as :func:`bench.peers.trl_gkd.run` (``precision="bf16"`` is TRL's
    ``bf16=True``; ``teacher_dtype="bfloat16"`` loads the teacher in bf16).
    """
    t_setup = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.models import fixed_batches
    from bench.peers.trl_onpolicy import _train_kwargs
    from trl import DistillationConfig, DistillationTrainer

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision '{precision}' is not fp32 or bf16")
    total = warmup + steps
    tok = AutoTokenizer.from_pretrained(student, padding_side="left")
    ids = fixed_batches(tok, data, batch, total, seq_len)
    # The trainer hands its sampler the "prompt" strings; a row key is all _Fixed needs to find the row.
    rows = {f"row {i}": x for i, x in enumerate(ids)}

    class _Fixed(DistillationTrainer):
        def _generate(self, prompts: list):
            picked = [rows[p] for p in prompts]
            return [x[:1] for x in picked], [x[1:] for x in picked], None, None, []

    student_model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=getattr(torch, teacher_dtype))

    clock = step_clock()
    with tempfile.TemporaryDirectory(prefix="trl-distill-off-") as out:
        cfg = DistillationConfig(**_train_kwargs(out, batch, total, lr, precision, seed), shuffle_dataset=False,
                                 beta=beta, temperature=1.0, max_completion_length=seq_len, disable_dropout=True)
        trainer = _Fixed(model=student_model, teacher_model=teacher_model, args=cfg,
                         train_dataset=Dataset.from_dict({"prompt": list(rows)}), processing_class=tok,
                         callbacks=[clock])
        setup_s = time.perf_counter() - t_setup
        trainer.train()
    return {**clock.result("trl-distillation-offpolicy", total, warmup, setup_s),
            "tokens_per_step": batch * seq_len, "loss_tokens_per_step": batch * (seq_len - 1)}
