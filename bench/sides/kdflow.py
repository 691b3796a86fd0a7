"""kdflow's side of the peer tables, run exactly as a user would: a recipe plus overrides,
through the command line (``python -m kdcore train RECIPE OVERRIDES...`` in a child process,
so kdflow's process-level defaults apply as they do for users).

``run`` writes a recipe for the bench models and data (the same files the peers load), applies
``overrides`` (dotlist, as on the command line), trains ``warmup + steps`` steps and reads
``<output_dir>/metrics.jsonl`` (records with ``step``, ``loss``, ``kd_loss``, ``ce_loss``,
``lr``, ``tokens_per_s``).

Time per step, in order of preference: the wall time between consecutive records, stamped by
a thread that watches the file (``logging.log_every=1``; valid when the trainer writes each
record as the step ends) — the same definition as the peers' (step end to step end,
everything included); otherwise the trainer's own ``step_time_s``; otherwise
``tokens_per_step / tokens_per_s``. The trainer's own figures are returned beside it. Which one was used is returned as
``timing``. The first ``warmup`` steps are excluded.

The recipe mirrors the peer's settings: ``js`` with ``beta`` (TRL's GKD β), ``off_policy``,
pure KD (``kd_ratio=1``), T = 1, fp32, constant learning rate (``warmup_steps=0
min_lr_ratio=1``), clip 1.0, rows in file order, ``format: text`` truncated to ``seq_len``.
Threads are not set: the benchmark pins the whole process tree to the CPU budget and kdflow
splits it between teacher and student itself.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def trainer_available() -> tuple[bool, str]:
    """(True, "") when ``kdcore.training.train`` can be imported, else (False, why). Imports torch:
    for the parent process (``run_all``), not the benchmark children."""
    try:
        from kdcore import training as trainer  # noqa: F401
    except Exception as exc:  # ImportError, or a half-written module
        return False, f"kdflow trainer not available ({type(exc).__name__}: {exc})"
    if not callable(getattr(trainer, "train", None)):
        return False, "kdflow trainer not available (kdcore.training has no train())"
    return True, ""


def recipe_dict(student: str, teacher: str, data: str, seq_len: int, batch: int, total_steps: int,
                output_dir: str, lr: float = 1e-4, precision: str = "fp32", seed: int = 0, beta: float = 0.5) -> dict:
    """The benchmark recipe (a plain mapping; YAML-dumped by :func:`run`)."""
    return {
        "teacher": {"path": teacher, "dtype": "bfloat16" if precision == "bf16" else "float32"},
        "student": {"path": student, "init": "pretrained"},
        "data": {"train": data, "eval": data, "format": "text", "max_length": seq_len, "overlong": "truncate",
                 "shuffle": False, "limit": batch * total_steps},
        "distill": {"loss": "js", "loss_options": {"beta": beta}, "rollout": "off_policy", "kd_ratio": 1.0,
                    "temperature": 1.0},
        "train": {"output_dir": output_dir, "seed": seed, "max_steps": total_steps, "micro_batch_size": batch,
                  "lr": lr, "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "precision": precision, "eval_every": 0, "eval_batches": 1},
        "checkpoint": {"every": 0, "export_hf": False},
        "logging": {"log_every": 1, "progress": False},
    }


class _Watcher(threading.Thread):
    """Stamps each complete line appended to a file with the time it appeared."""

    def __init__(self, path: Path, interval: float = 0.005):
        super().__init__(daemon=True)
        self.path, self.interval = path, interval
        self.stamps: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        pos, buf = 0, b""
        while not self.stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                pos += len(chunk)
                buf += chunk
                now = time.perf_counter()
                while b"\n" in buf:
                    _, buf = buf.split(b"\n", 1)
                    self.stamps.append(now)
            time.sleep(self.interval)


def prepare_in_subprocess(target: str, **kwargs) -> None:
    """Run ``target`` (``"module:function"``, writing a data file) in a short-lived process.

    The benchmark child that launches ``kdcore train`` stays free of torch and transformers, so
    the memory measured for kdflow's process tree is kdflow's own: tokenizing the bench rows
    would otherwise leave a few hundred MB of libraries resident beside the training run.
    """
    code = ("import json, sys; from importlib import import_module; m, _, f = sys.argv[1].partition(':'); "
            "getattr(import_module(m), f)(**json.loads(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, target, json.dumps(kwargs)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{target} failed: {proc.stderr[-2000:]}")


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _timed_train(recipe: dict, overrides: list[str] | None, warmup: int, total: int) -> dict:
    """Train ``recipe`` through the public API; per-step times (see the module doc) and records."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="kdflow-bench-") as tmp:
        out_dir = Path(tmp) / "out"
        # no held-out evaluation before step 1: the peers start training at once, and the table
        # times steps, not the trainer's baseline (memory_breakdown keeps the recipe's default)
        recipe = dict(recipe, train=dict(recipe["train"], output_dir=str(out_dir), eval_at_start=False))
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(recipe))
        metrics_file = out_dir / "metrics.jsonl"
        watcher = _Watcher(metrics_file)
        watcher.start()
        t_train = time.perf_counter()
        try:
            # the command a user runs, in its own process (whose memory the tree measurement counts)
            proc = subprocess.run([sys.executable, "-m", "kdcore", "train", str(path), *list(overrides or [])],
                                  capture_output=True, text=True)
        finally:
            watcher.stop.set()
            watcher.join()
        train_wall = time.perf_counter() - t_train
        if proc.returncode != 0:
            raise RuntimeError(f"kdcore train exited {proc.returncode}: {(proc.stderr or proc.stdout)[-3000:]}")
        records = read_metrics(metrics_file)
    stamps = watcher.stamps
    train_idx = [i for i, r in enumerate(records) if "step" in r and "loss" in r and "tokens_per_s" in r]
    if len(train_idx) != total:
        raise RuntimeError(f"metrics.jsonl has {len(train_idx)} training records, expected {total} "
                           f"(log_every=1); keys seen: {sorted({k for r in records for k in r})}")
    train_recs = [records[i] for i in train_idx]
    own = [r.get("step_time_s", r.get("step_time")) for r in train_recs]
    if len(stamps) == len(records) and _spread(stamps, train_idx):
        # same definition as the peers: wall time between consecutive step ends, everything included
        marks = [stamps[i] for i in train_idx]
        step_times = [t_train_start_gap(marks, t_train)] + [b - a for a, b in zip(marks, marks[1:])]
        timing = "metrics.jsonl record times"
    elif all(t is not None for t in own):
        step_times, timing = [float(t) for t in own], "trainer's step_time_s"
    else:
        step_times = [float(r["tokens"]) / float(r["tokens_per_s"]) for r in train_recs]
        timing = "tokens / tokens_per_s"
    losses = [float(r["loss"]) for r in train_recs]
    return {
        "side": "kdflow",
        "step_times": step_times[warmup:],
        "warmup_times": step_times[:warmup],
        "losses": losses,
        "final_loss": losses[-1],
        "kd_loss": train_recs[-1].get("kd_loss"),
        "ce_loss": train_recs[-1].get("ce_loss"),
        "kdflow_tokens_per_s": [float(r["tokens_per_s"]) for r in train_recs[warmup:]],
        "kdflow_step_time_s": [None if t is None else float(t) for t in own[warmup:]],
        "kdflow_tokens": [r.get("tokens") for r in train_recs[warmup:]],
        "teacher_wait_s": [r.get("teacher_wait_s") for r in train_recs[warmup:]],
        "records": train_recs,
        "timing": timing,
        "train_wall_s": train_wall,
        "child_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


def run(student: str, teacher: str, data: str, seq_len: int, batch: int = 4, steps: int = 5, warmup: int = 1,
        lr: float = 1e-4, precision: str = "fp32", seed: int = 0, beta: float = 0.5,
        overrides: list[str] | None = None) -> dict:
    """Off-policy: train through kdflow's public API; per-step times, losses and kdflow's own figures."""
    t_setup = time.perf_counter()
    total = warmup + steps
    recipe = recipe_dict(student, teacher, data, seq_len, batch, total, "", lr=lr, precision=precision, seed=seed,
                         beta=beta)
    res = _timed_train(recipe, overrides, warmup, total)
    res.pop("records")
    res.update(tokens_per_step=batch * seq_len, loss_tokens_per_step=batch * (seq_len - 1),
               setup_s=time.perf_counter() - t_setup - res["train_wall_s"])
    return res


def prompt_data(student: str, data: str, prompt_len: int, completion_len: int, rows: int, out: Path) -> Path:
    """``{"prompt", "completion"}`` rows: the first ``prompt_len`` tokens of each text and the next
    ``completion_len`` (decoded; the peers' prompts are the same ids, decoded the same way)."""
    from transformers import AutoTokenizer

    from bench.models import read_texts, tokenize_fixed

    tok = AutoTokenizer.from_pretrained(student)
    ids = tokenize_fixed(tok, read_texts(data)[:rows], prompt_len + completion_len)
    with open(out, "w") as f:
        for x in ids:
            f.write(json.dumps({"prompt": tok.decode(x[:prompt_len]), "completion": tok.decode(x[prompt_len:])}) + "\n")
    return out


def onpolicy_recipe(recipe: dict, prompts: str, prompt_len: int, max_new_tokens: int) -> dict:
    """The off-policy bench recipe turned on-policy on ``prompts`` (prompt/completion rows): every
    batch sampled from the live student (temperature 1, top-p 1), weights synced every step."""
    recipe["data"].update(train=prompts, eval=prompts, format="prompt_completion",
                          max_length=prompt_len + max_new_tokens + 8)
    recipe["distill"]["rollout"] = "on_policy"
    recipe["rollout"] = {"max_new_tokens": max_new_tokens, "temperature": 1.0, "top_p": 1.0, "n": 1, "sync_every": 1}
    return recipe


def run_onpolicy(student: str, teacher: str, data: str, prompt_len: int = 64, max_new_tokens: int = 64,
                 batch: int = 4, steps: int = 3, warmup: int = 1, lr: float = 1e-4, precision: str = "fp32",
                 seed: int = 0, beta: float = 0.5, overrides: list[str] | None = None) -> dict:
    """On-policy (every batch sampled from the live student, weights synced after every step),
    ``js`` β, temperature 1, top-p 1, ``max_new_tokens`` per response, unless EOS comes first:
    the settings of the TRL on-policy rows. A step includes generation. ``overrides``: dotlist."""
    t_setup = time.perf_counter()
    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-prompts-") as tmp:
        pdata = str(Path(tmp) / "prompts.jsonl")
        prepare_in_subprocess("bench.sides.kdflow:prompt_data", student=student, data=data, prompt_len=prompt_len,
                              completion_len=max_new_tokens, rows=batch * total, out=pdata)
        recipe = onpolicy_recipe(recipe_dict(student, teacher, pdata, prompt_len + max_new_tokens, batch, total, "",
                                             lr=lr, precision=precision, seed=seed, beta=beta),
                                 pdata, prompt_len, max_new_tokens)
        res = _timed_train(recipe, overrides, warmup, total)
    recs = res.pop("records")
    gen = [round(r["rollout_response_len"] * r["rollout_samples"]) for r in recs]
    res.update(side="kdflow-onpolicy", generated_tokens=gen[warmup:], tokens_per_step=round(sum(gen) / len(gen)),
               prompt_tokens_per_step=batch * prompt_len,
               sample_s=[r.get("sample_s") for r in recs[warmup:]], sync_s=[r.get("sync_s") for r in recs[warmup:]],
               eos_frac=[r.get("rollout_eos_frac") for r in recs[warmup:]],
               setup_s=time.perf_counter() - t_setup - res["train_wall_s"])
    return res


def t_train_start_gap(marks: list[float], t_train: float) -> float:
    """The first step's time includes setup inside train() (teacher start, data): warm-up only."""
    return marks[0] - t_train


def _spread(stamps: list[float], idx: list[int]) -> bool:
    """Records arrived over time (flushed per step), not all at once at the end."""
    sel = [stamps[i] for i in idx]
    return len(sel) < 2 or (sel[-1] - sel[0]) > 0.01 * (len(sel) - 1)
