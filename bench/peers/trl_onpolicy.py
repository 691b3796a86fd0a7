"""TRL's on-policy distillation trainers (trl 1.16) as benchmark children, for the on-policy rows.

- ``run_gkd``: ``GKDTrainer`` with ``lmbda=1.0`` (every batch sampled from the student),
  ``beta``; sampling temperature 1, ``top_k=0``, ``top_p=1`` (GKD's fixed generation kwargs).
- ``run_distillation``: ``trl.DistillationTrainer`` (the maintained on-policy trainer: it
  samples with the student and computes a chunked generalized JSD from hidden states and the
  two ``lm_head`` weights, the closest peer to kdflow's design), ``beta``, temperature 1,
  ``top_k=0``, ``top_p=1``.

Prompts are the first ``prompt_len`` tokens of each data row; completions are
``max_new_tokens`` long unless the student emits EOS first (the generated token count per
step is returned). Same precision / optimizer / schedule settings as ``peers.trl_gkd``. Time
per step includes generation.
"""

from __future__ import annotations

import tempfile
import time

from bench.peers import step_clock


def _common(student: str, teacher: str, data: str, prompt_len: int, rows: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.models import read_texts, tokenize_fixed

    tok = AutoTokenizer.from_pretrained(student, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = read_texts(data)
    if len(texts) < rows:
        raise ValueError(f"data '{data}' has {len(texts)} rows; {rows} needed")
    ids = tokenize_fixed(tok, texts[:rows], prompt_len)
    s = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    return tok, ids, s, t


def _common_ids(tok, data: str, length: int, rows: int) -> list[list[int]]:
    from bench.models import read_texts, tokenize_fixed

    return tokenize_fixed(tok, read_texts(data)[:rows], length)


def _result(side: str, clock, warmup: int, total: int, batch: int, prompt_len: int, generated: list[int],
            setup_s: float) -> dict:
    result = clock.result(side, total, warmup, setup_s)
    gen = generated[warmup:] if len(generated) == total else generated
    return {
        **result,
        # tokens the loss covers per step (generated completions); prompt tokens come on top
        "generated_tokens": gen,
        "tokens_per_step": round(sum(gen) / len(gen)) if gen else batch,
        "prompt_tokens_per_step": batch * prompt_len,
    }


def _train_kwargs(out: str, batch: int, total: int, lr: float, precision: str, seed: int) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=total,
                learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=precision == "bf16",
                fp16=False, seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
                gradient_checkpointing=False)


def run_gkd(student: str, teacher: str, data: str, prompt_len: int = 64, max_new_tokens: int = 64, batch: int = 4,
            steps: int = 3, warmup: int = 1, lr: float = 1e-4, precision: str = "fp32", seed: int = 0,
            beta: float = 0.5) -> dict:
    """GKDTrainer fully on-policy (λ = 1)."""
    t_setup = time.perf_counter()
    import torch
    from datasets import Dataset

    from trl.experimental.gkd import GKDConfig, GKDTrainer

    total = warmup + steps
    tok, ids, s, t = _common(student, teacher, data, prompt_len, batch * total)
    generated: list[int] = []

    class CountingGKD(GKDTrainer):
        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            out = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            generated.append(int((out[2] != -100).sum()))
            return out

    full = _common_ids(tok, data, prompt_len + max_new_tokens, batch * total)

    def collate(features):
        # The Trainer counts loss tokens (num_items_in_batch) on these labels *before* GKD replaces the
        # batch with the student's samples, and GKD divides by that count: give it the data's own
        # continuation of max_new_tokens, so the loss is a per-generated-token mean (exact unless the
        # student stops early).
        x = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        labels = x.clone()
        labels[:, :prompt_len] = -100
        prompt = x[:, :prompt_len]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels,
                "prompts": prompt, "prompt_attention_mask": torch.ones_like(prompt)}

    clock = step_clock()
    with tempfile.TemporaryDirectory(prefix="trl-gkd-onp-") as out:
        cfg = GKDConfig(**_train_kwargs(out, batch, total, lr, precision, seed), train_sampling_strategy="sequential",
                        lmbda=1.0, beta=beta, seq_kd=False, temperature=1.0, max_new_tokens=max_new_tokens,
                        max_length=prompt_len + max_new_tokens)
        trainer = CountingGKD(model=s, teacher_model=t, args=cfg, data_collator=collate,
                              train_dataset=Dataset.from_dict({"input_ids": full}), processing_class=tok,
                              callbacks=[clock])
        setup_s = time.perf_counter() - t_setup
        trainer.train()
    return _result("trl-gkd-onpolicy", clock, warmup, total, batch, prompt_len, generated, setup_s)


def run_distillation(student: str, teacher: str, data: str, prompt_len: int = 64, max_new_tokens: int = 64,
                     batch: int = 4, steps: int = 3, warmup: int = 1, lr: float = 1e-4, precision: str = "fp32",
                     seed: int = 0, beta: float = 0.5) -> dict:
    """trl.DistillationTrainer (on-policy, chunked JSD from hidden states)."""
    t_setup = time.perf_counter()
    from datasets import Dataset

    from trl import DistillationConfig, DistillationTrainer

    total = warmup + steps
    tok, ids, s, t = _common(student, teacher, data, prompt_len, batch * total)
    # It takes text prompts and tokenizes them itself; decoded fixed-length prompts re-encode to the same ids.
    prompts = tok.batch_decode(ids, skip_special_tokens=False)
    generated: list[int] = []

    class CountingDistillation(DistillationTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            generated.append(int(out["completion_mask"].sum()))
            return out

    clock = step_clock()
    with tempfile.TemporaryDirectory(prefix="trl-distill-") as out:
        cfg = DistillationConfig(**_train_kwargs(out, batch, total, lr, precision, seed), shuffle_dataset=False,
                                 beta=beta, temperature=1.0, top_k=0, top_p=1.0,
                                 max_completion_length=max_new_tokens, disable_dropout=True)
        trainer = CountingDistillation(model=s, teacher_model=t, args=cfg,
                                       train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                                       callbacks=[clock])
        setup_s = time.perf_counter() - t_setup
        trainer.train()
    return _result("trl-distillation", clock, warmup, total, batch, prompt_len, generated, setup_s)
