"""Running `kdcore eval`, and the dense reference its KL, perplexity and top-1 columns must equal."""

from __future__ import annotations

from pathlib import Path
import math
import subprocess
import sys

from helpers.assets import ROOT


KDCORE = [sys.executable, "-m", "kdcore"]


def run_eval(*args, timeout=300):
    return subprocess.run(KDCORE + ["eval", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def dense_reference(recipe: Path, student_dir: Path) -> dict:
    """KL(teacher || student), perplexity and top-1 agreement from full logits, one sample at a
    time, over the held-out samples the evaluator scores (the first eval_batches micro-batches)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdcore.recipe.loading import load_recipe
    from kdcore.data import prepare_data
    from kdcore.modeling.tokenizers import load_tokenizer

    cfg = load_recipe(str(recipe))
    tok = load_tokenizer(str(cfg.teacher.path))
    held_out = prepare_data(cfg.data, tok, seed=cfg.train.seed).eval
    held_out = held_out[: cfg.train.micro_batch_size * cfg.train.eval_batches]
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher.path, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    kl = ce = hits = n = 0.0
    with torch.no_grad():
        for s in held_out:
            ids = torch.tensor([s.student.input_ids])
            pos = torch.tensor(s.student.loss_positions)
            log_p = torch.log_softmax(teacher(ids).logits[0, pos].double(), -1)
            log_q = torch.log_softmax(student(ids).logits[0, pos].double(), -1)
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            ce -= float(log_q.gather(1, ids[0, pos + 1][:, None]).sum())
            hits += float((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            n += len(pos)
    return {"eval_teacher_kl": kl / n, "eval_ppl": math.exp(ce / n), "eval_top1_agreement": hits / n,
            "eval_tokens": int(n)}
