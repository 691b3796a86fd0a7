"""TRL's GKDTrainer (trl 1.16: ``trl.experimental.gkd``), off-policy, as a benchmark child.

What runs: ``GKDTrainer`` with ``lmbda=0.0`` (never samples from the student: off-policy),
``seq_kd=False`` and ``beta=0.5`` (generalized JSD, M = β·p_teacher + (1−β)·q_student, the same
convention as kdflow's ``js`` loss), on fixed-length sequences: every row is exactly
``seq_len`` tokens (the tokenizer's own specials, truncated), all positions are labels, so a
step has ``batch × (seq_len − 1)`` loss tokens, exactly like kdflow with ``format: text``.

Settings chosen to match kdflow's run, not TRL's defaults: fp32 (``bf16=False``; SFTConfig
defaults to bf16), no gradient checkpointing (SFTConfig defaults to it; kdflow's default is
off), a constant learning rate (kdflow runs with ``warmup_steps=0 min_lr_ratio=1``), AdamW
fused (the transformers default on torch ≥ 2.8, as kdflow's), grad-norm clip 1.0, the dataset
in file order (``train_sampling_strategy="sequential"``; kdflow ``data.shuffle=false``).

Time per step is the wall time between consecutive ``on_step_end`` callbacks (forward,
backward, optimizer, logging: everything a step costs); the first ``warmup`` steps are
excluded. Run it through :func:`bench.common.run_isolated`, which fixes threads and allocator.
"""

from __future__ import annotations

import tempfile
import time

from bench.peers import step_clock


def run(student: str, teacher: str, data: str, seq_len: int, batch: int = 4, steps: int = 5,
        warmup: int = 1, lr: float = 1e-4, precision: str = "fp32", seed: int = 0, beta: float = 0.5,
        gradient_checkpointing: bool = False, teacher_dtype: str = "float32") -> dict:
    """Train ``warmup + steps`` optimizer steps; return per-step times, losses and memory.

    ``precision="bf16"`` is TRL's ``bf16=True`` (autocast around student and teacher forwards);
    ``teacher_dtype="bfloat16"`` loads the teacher in bf16 (inference in bf16, the student fp32).

    ``student`` / ``teacher``: HF model folders (``bench.models.ensure_model``); ``data``: a
    jsonl of texts each ≥ ``seq_len`` tokens (``bench.models.ensure_data``).
    """
    t_setup = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.models import fixed_batches
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision '{precision}' is not fp32 or bf16")
    total = warmup + steps
    tok = AutoTokenizer.from_pretrained(student)
    ids = fixed_batches(tok, data, batch, total, seq_len)
    train = Dataset.from_dict({"input_ids": ids})

    def collate(features):
        x = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    student_model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=getattr(torch, teacher_dtype))

    clock = step_clock()
    with tempfile.TemporaryDirectory(prefix="trl-gkd-") as out:
        cfg = GKDConfig(
            output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            max_steps=total, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, bf16=precision == "bf16", fp16=False, seed=seed, data_seed=seed,
            train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
            lmbda=0.0, beta=beta, seq_kd=False, temperature=1.0, max_length=seq_len,
            gradient_checkpointing=gradient_checkpointing,
        )
        trainer = GKDTrainer(model=student_model, teacher_model=teacher_model, args=cfg, data_collator=collate,
                             train_dataset=train, processing_class=tok, callbacks=[clock])
        setup_s = time.perf_counter() - t_setup
        trainer.train()
    return {**clock.result("trl-gkd", total, warmup, setup_s),
            "tokens_per_step": batch * seq_len, "loss_tokens_per_step": batch * (seq_len - 1)}
