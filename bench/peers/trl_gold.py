"""TRL's GOLDTrainer (trl 1.16: ``trl.experimental.gold``) with the ULD loss, off-policy, as a
benchmark child: the cross-tokenizer peer of :func:`bench.sides.kdflow_xtok.run_uld`.

What runs: ``GOLDTrainer`` with ``use_uld_loss=True``, ``teacher_tokenizer_name_or_path`` = the
teacher's folder (SmolLM2 byte-level BPE) and the student's own tokenizer (Mistral v1
SentencePiece) as ``processing_class``; ``lmbda=0.0`` (never samples from the student:
off-policy), ``seq_kd=False``. Every step GOLD re-tokenizes each row's prompt and completion
text with the teacher tokenizer, runs the teacher on that, and compares the two distributions
by sorted-probability L1 distance.

Settings chosen to match kdflow's run, not GOLD's defaults:

- pure distillation: ``uld_crossentropy_weight=0`` (GOLD's default) and
  ``uld_distillation_weight=1``; student and teacher ULD temperatures 1; no hybrid
  (``uld_use_hybrid_loss=False``: plain ULD on the whole vocabulary, as kdflow's ``top_k: 0``).
- ``use_extended_uld=False``: required, not chosen. GOLD's byte-offset alignment
  (``encode_with_byte_offsets``) raises ``NotImplementedError`` for a non-ByteLevel tokenizer,
  and the student's is SentencePiece; GOLD then pairs completion positions by index, truncated
  to the shorter side (the original ULD paper). kdflow pairs positions that have read the same
  characters, see :mod:`bench.sides.kdflow_xtok` for every definitional difference.
- ``uld_token_merge_strategy="observed"`` (GOLD's default; with positional pairing it only
  decides whether the compared logits are shifted by one).
- fp32 (``bf16=False``), no gradient checkpointing, constant learning rate, no warm-up, no
  weight decay, clip 1.0, AdamW (the transformers default), one process, batch ``batch``.
- data order: GOLD's sampler (``RepeatSampler(shuffle=True)``) ignores
  ``train_sampling_strategy``; :class:`_SequentialGOLD` overrides ``_get_train_sampler`` with
  the same sampler unshuffled, so step k trains on rows ``k·batch … k·batch + batch − 1`` of
  the file, as kdflow (``data.shuffle=false``) does.
- data: the same ``{"prompt", "completion"}`` rows as kdflow (:func:`bench.sides.kdflow_xtok.xtok_rows`:
  one student token of prompt, ``seq_len − 3`` of completion, both plain text). GOLD tokenizes
  the student text without specials and appends EOS (``seq_len − 1`` student tokens, kdflow has a
  BOS more); ``max_length=seq_len`` so nothing is cut. A one-token prompt because GOLD's collator
  rejects rows whose prompt is empty (a ``text`` row would be all completion).
  ``max_completion_length`` only bounds generation, which ``lmbda=0`` never runs; it is set
  below ``max_length`` because GOLDConfig requires that.

Time per step is the wall time between consecutive ``on_step_end`` callbacks (teacher
re-tokenization, both forwards, backward, optimizer, logging); the first ``warmup`` steps are
excluded. Run it through :func:`bench.common.run_isolated`, which fixes threads and allocator.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.peers import step_clock


def run(student: str, teacher: str, data: str, seq_len: int, batch: int = 4, steps: int = 5, warmup: int = 1,
        lr: float = 1e-4, seed: int = 0) -> dict:
    """Train ``warmup + steps`` optimizer steps; return per-step times, losses and memory.

    ``student`` / ``teacher``: HF model folders (``bench.models.ensure_model``), each with its
    own tokenizer; ``data``: a jsonl of texts each ≥ ``seq_len`` student tokens
    (``bench.models.ensure_data(tokenizer_folder(32000), ...)``).
    """
    t_setup = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.sides.kdflow_xtok import xtok_rows
    from trl.experimental.gold import GOLDConfig, GOLDTrainer
    from trl.trainer.utils import RepeatSampler

    class _SequentialGOLD(GOLDTrainer):
        """GOLDTrainer whose batches follow the file order (its own sampler always shuffles)."""

        def _get_train_sampler(self, dataset=None):
            return RepeatSampler(
                data_source=self.train_dataset if dataset is None else dataset,
                mini_repeat_count=self.num_generations,
                batch_size=self.args.generation_batch_size * self.accelerator.num_processes,
                repeat_count=self.args.gradient_accumulation_steps, shuffle=False, seed=self.args.seed,
            )

    total = warmup + steps
    tok = AutoTokenizer.from_pretrained(student)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with tempfile.TemporaryDirectory(prefix="trl-gold-rows-") as tmp:
        rows_file = xtok_rows(student, data, seq_len, batch * total, Path(tmp) / "rows.jsonl")
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    train = Dataset.from_list(rows)

    student_model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)

    clock = step_clock()
    seen: list[dict] = []

    class _Recorder(_SequentialGOLD):
        """Records what each step fed the student (token counts) and its first row's text (order check)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                seen.append({
                    "student_tokens": int(inputs["attention_mask"].sum()),
                    "student_loss_tokens": int((inputs["labels"] != -100).sum()),
                    "first_row": inputs["original_prompt_text"][0] + inputs["original_completion_text"][0],
                })
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    with tempfile.TemporaryDirectory(prefix="trl-gold-") as out:
        cfg = GOLDConfig(
            output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            max_steps=total, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, bf16=False, fp16=False, seed=seed, data_seed=seed,
            train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
            gradient_checkpointing=False, max_length=seq_len, max_completion_length=seq_len - 1,
            lmbda=0.0, seq_kd=False, temperature=1.0, top_p=1.0,
            use_uld_loss=True, use_extended_uld=False, teacher_tokenizer_name_or_path=teacher,
            uld_crossentropy_weight=0.0, uld_distillation_weight=1.0,
            uld_student_temperature=1.0, uld_teacher_temperature=1.0, uld_use_hybrid_loss=False,
        )
        trainer = _Recorder(model=student_model, teacher_model=teacher_model, args=cfg, train_dataset=train,
                            processing_class=tok, callbacks=[clock])
        setup_s = time.perf_counter() - t_setup
        trainer.train()
    expected = [r["prompt"] + r["completion"] for r in rows[::batch]][:total]
    return {
        **clock.result("trl-gold-uld", total, warmup, setup_s),
        "tokens_per_step": seen[-1]["student_tokens"] if seen else batch * (seq_len - 1),
        "loss_tokens_per_step": seen[-1]["student_loss_tokens"] if seen else None,
        "student_tokens": [s["student_tokens"] for s in seen],
        "file_order": [s["first_row"] for s in seen] == expected,
    }
