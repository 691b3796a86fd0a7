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


def test_the_header_names_the_cpu_model_and_its_bf16_support():
    from bench.common import cpu_model

    amx = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
           "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
           "processor\t: 1\nmodel name\t: another\n")
    assert cpu_model(amx) == "Intel(R) Xeon(R) Processor (family 6 model 143; avx512_bf16 amx_bf16)"
    epyc = "processor\t: 0\ncpu family\t: 23\nmodel\t\t: 49\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu avx2\n"
    assert cpu_model(epyc) == "AMD EPYC 7B12 (family 23 model 49; no bf16 matmul instructions)"


def test_the_header_says_whether_other_work_shared_the_cpus():
    from bench.run_all import load_reading

    assert load_reading(1.8, 2).startswith("no more than the run's own 2 threads")
    assert load_reading(2.6, 2).startswith("above the run's own 2, so other work shared")


def test_a_memory_miss_is_explained_from_the_runs_own_per_process_peaks():
    def run(step_s, parts):
        r = _run(step_s, sum(parts.values()))
        r.peak_parts = {k: v * ra.GB for k, v in parts.items()}
        return r

    missed = ra.Config("real", "pair", "s", "t", 128, 4, "default", 3, 1, 1)
    missed.runs = {"trl": [run(2.0, {"launcher": 3.5})], "trl_distill": [run(3.0, {"launcher": 2.5})],
                   "kdflow": [run(1.0, {"student": 2.0, "teacher": 0.9, "launcher": 0.02})]}
    met = ra.Config("real", "pair", "s", "t", 512, 4, "default", 3, 1, 1)
    met.runs = {"trl_distill": [run(9.0, {"launcher": 5.0})],
                "kdflow": [run(4.0, {"student": 2.5, "teacher": 1.0, "launcher": 0.02})]}
    (line,) = ra.memory_miss_reasons([missed, met])
    assert line.startswith("pair, 4×128, default: kdflow 2.92 GB against TRL DistillationTrainer 2.50 GB.")
    assert "student process alone peaked at 2.00 GB (0.80× the peer's whole run)" in line
    assert "teacher process adds 0.90 GB" in line


def test_the_on_policy_and_uld_sides_get_a_verdict_against_the_fastest_and_the_leanest_peer():
    def stats(step_s, parts):
        r = _run(step_s, sum(parts.values()))
        r.peak_parts = {k: v * ra.GB for k, v in parts.items()}
        return ra.side_stats([r])

    peers = {"TRL GKDTrainer λ=1": stats(2.5, {"launcher": 3.9}), "TRL DistillationTrainer": stats(2.7, {"launcher": 1.7})}
    two = ra.verdict("kdflow on_policy", stats(1.5, {"student": 1.3, "teacher": 0.6, "launcher": 0.02}), peers, "on-policy")
    assert two.startswith("kdflow on_policy: 1.67× the speed of the fastest TRL trainer (TRL GKDTrainer λ=1), met; "
                          "1.13× the peak memory of the leanest (TRL DistillationTrainer), missed by 1.13×.")
    assert "Why memory missed: on-policy: kdflow 1.92 GB against TRL DistillationTrainer 1.70 GB." in two
    assert "teacher process adds 0.60 GB" in two
    one = ra.verdict("kdflow, inline", stats(1.6, {"student": 1.6, "launcher": 0.02}), peers, "on-policy")
    assert one.endswith("0.95× the peak memory of the leanest (TRL DistillationTrainer), met.")
    slow = ra.verdict("kdflow, inline", stats(3.0, {"student": 1.8, "launcher": 0.02}), peers, "on-policy")
    assert "missed by 1.20×;" in slow and "so there is no teacher process." in slow
    assert ra.verdict("kdflow", None, peers, "x") == "" and ra.verdict("kdflow", stats(1, {"student": 1}), {}, "x") == ""


def test_the_scaling_sweep_reuses_a_configuration_the_off_policy_table_measured():
    done = ra.Config("offpolicy", "pair", "s", "t", 512, 4, "tuned", 3, 1, 1)
    done.runs = {side: [_run(1.0, 2.0)] for side in ra.SIDES}
    two = {k: ra.SIDES[k] for k in ("trl", "kdflow")}
    same = ra.Config("scaling", "sequence", "s", "t", 512, 4, "tuned", 2, 1, 1, sides=dict(two))
    longer = ra.Config("scaling", "sequence", "s", "t", 1024, 2, "tuned", 2, 1, 1)
    other_alloc = ra.Config("scaling", "sequence", "s", "t", 512, 4, "default", 2, 1, 1)
    assert ra.measured_already(same, [done]) is done
    assert ra.measured_already(longer, [done]) is None
    assert ra.measured_already(other_alloc, [done]) is None
    unmeasured = ra.Config("offpolicy", "pair", "s", "t", 512, 4, "tuned", 3, 1, 1)
    unmeasured.runs = {"trl": [_run(1.0, 2.0)]}  # its kdflow side never ran: nothing to reuse
    assert ra.measured_already(same, [unmeasured]) is None
    failed = ra.Config("offpolicy", "pair", "s", "t", 512, 4, "tuned", 3, 1, 1)
    failed.runs = {side: [_run(1.0, 2.0)] for side in ra.SIDES}
    failed.runs["kdflow"][0].ok = False  # a failed run is measured again, not reused
    assert ra.measured_already(same, [failed]) is None
    shorter = ra.Config("offpolicy", "pair", "s", "t", 512, 4, "tuned", 1, 1, 1)
    shorter.runs = {side: [_run(1.0, 2.0)] for side in ra.SIDES}
    assert ra.measured_already(same, [shorter]) is None  # fewer steps than the sweep asks for


def test_the_median_of_an_even_number_of_steps_is_their_mean():
    r = _run(1.0, 2.0)
    r.result["step_times"] = [1.0, 3.0]
    assert ra.side_stats([r])["median_step"] == 2.0
