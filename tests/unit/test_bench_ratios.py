"""bench/run_all.py compares kdflow with the best TRL trainer of each row: the fastest for speed,
the leanest for memory (they need not be the same trainer), and best-vs-best over allocators."""

from __future__ import annotations

from types import SimpleNamespace

from bench import run_all as ra


def _run(step_s: float, peak_gb: float):
    return SimpleNamespace(ok=True, result={"step_times": [step_s] * 3, "tokens_per_step": 512, "final_loss": 0.1},
                           peak_mem=peak_gb * ra.GB, cpu_share=0.9, load_before=1.0, load_after=1.0,
                           peak_parts={"launcher": peak_gb * ra.GB})


def test_each_row_is_compared_with_the_fastest_and_the_leanest_trl_trainer():
    cfgs = []
    # (GKDTrainer, DistillationTrainer, kdflow) as (s/step, peak GB)
    for alloc, (gkd, dist, kd) in {"default": ((2.0, 3.0), (1.5, 2.0), (1.0, 2.5)),
                                   "tuned": ((1.0, 4.0), (1.2, 1.8), (0.9, 2.2))}.items():
        c = ra.Config("offpolicy", "pair", "s", "t", 128, 4, alloc, 3, 1, 1)
        c.runs = {"trl": [_run(*gkd)], "trl_distill": [_run(*dist)], "kdflow": [_run(*kd)]}
        cfgs.append(c)
    rows = {r[2]: r for r in ra.ratio_rows(cfgs)}
    assert rows["default"][3:] == ["TRL DistillationTrainer", "1.50×", "met", "TRL DistillationTrainer", "1.25×",
                                   "missed by 1.25×"]
    assert rows["tuned"][3:] == ["TRL GKDTrainer", "1.11×", "met", "TRL DistillationTrainer", "1.22×",
                                 "missed by 1.22×"]
    best = rows["best (kdflow tuned, TRL tuned)"]
    # kdflow's leanest run (tuned, 2.2 GB) against TRL's leanest (DistillationTrainer tuned, 1.8 GB)
    assert best[3:] == ["TRL GKDTrainer, tuned", "1.11×", "met", "TRL DistillationTrainer, tuned", "1.22×",
                        "missed by 1.22×"]
