"""Every benchmark table in one command: ``python -m bench run_all`` → ``bench/results.md``.

Tables (``--tables``, comma-separated; default all but ``channel``, which measures the ``hf``
engine's shared-memory channel and is not on the default engine's path: ``--tables channel``
or ``python -m bench channel_bytes``; left out so that the whole run fits the 30 minutes it is
given on 2 cores):

- ``limit``    fp32 / bf16 matmul GFLOP/s of this machine at the thread budget;
- ``channel``  bytes and time per step: hidden states at loss positions vs full teacher logits;
- ``offpolicy`` kdflow (``js`` β=0.5, ``off_policy``) vs TRL GKDTrainer (λ=0, β=0.5) on the
  bench pair (student 256×4, teacher 512×8, V=49152), 4×128 and 4×512, both allocator settings,
  with the kdflow/TRL ratios against the issue's targets;
- ``real``     the same with the real SmolLM2-135M teacher and a 576-wide 4-layer student;
- ``scaling``  tokens/s and peak memory as the sequence grows (2048 tokens per step: 8×256,
  4×512, 1×2048) and as the vocabulary grows (32000, 49152, 152064 at 4×256), tuned allocator;
- ``onpolicy`` kdflow ``on_policy`` vs TRL GKDTrainer λ=1 and DistillationTrainer: the same
  prompts, max_new_tokens and sampling settings; a step includes generation;
- ``bf16``     the real-teacher pair with bf16 on both sides (kdflow ``train.precision=bf16``, its
  teacher in bf16; TRL ``bf16=True``) and with only the teacher's inference in bf16 (kdflow
  ``teacher.dtype=bfloat16``; TRL's teacher loaded in bf16), losses beside the fp32 run's;
- ``xtok``     cross-tokenizer ULD: kdflow's ``uld`` aligner vs TRL GOLDTrainer
  (``use_uld_loss=True``), SmolLM2-BPE teacher 512×8 → Mistral-SentencePiece student 256×4.

Every configuration runs in a fresh child process pinned to ``--threads`` CPUs (both sides get
the same CPU budget); sides alternate within each repeat so machine drift hits both. Rows
whose kdflow trainer is missing say so and the peer rows are still written. Progress goes to
stderr; the markdown goes to ``--out`` and stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, models  # noqa: E402
from bench.common import GB, fmt_range, md_table  # noqa: E402

ALL_TABLES = ("limit", "channel", "offpolicy", "real", "bf16", "scaling", "onpolicy", "xtok")
DEFAULT_TABLES = tuple(t for t in ALL_TABLES if t != "channel")  # why: the module docstring
ONPOLICY_SIDES = {"TRL GKDTrainer λ=1": ("bench.peers.trl_onpolicy:run_gkd", {}),
                  "TRL DistillationTrainer": ("bench.peers.trl_onpolicy:run_distillation", {}),
                  "kdflow on_policy": ("bench.sides.kdflow:run_onpolicy", {})}
# every TRL trainer that can run the row; the ratio tables compare kdflow with the best of them
SIDES = {"trl": "bench.peers.trl_gkd:run", "trl_distill": "bench.peers.trl_distill:run",
         "kdflow": "bench.sides.kdflow:run"}
SIDE_NAMES = {"trl": "TRL GKDTrainer", "trl_distill": "TRL DistillationTrainer", "kdflow": "kdflow"}
TRL_SIDES = ("trl", "trl_distill")
XTOK_SIDES = {"trl": "bench.peers.trl_gold:run", "kdflow": "bench.sides.kdflow_xtok:run_uld"}
XTOK_NAMES = {"trl": "TRL GOLDTrainer (ULD)", "kdflow": "kdflow uld"}
# side -> (module:function, its own keyword arguments); pairs compared: (kdflow side, TRL side)
BF16_SIDES = {"trl": ("bench.peers.trl_gkd:run", {"precision": "bf16"}),
              "trl_distill": ("bench.peers.trl_distill:run", {"precision": "bf16"}),
              "kdflow": ("bench.sides.kdflow:run", {"precision": "bf16"}),
              "trl_tbf16": ("bench.peers.trl_gkd:run", {"teacher_dtype": "bfloat16"}),
              "trl_distill_tbf16": ("bench.peers.trl_distill:run", {"teacher_dtype": "bfloat16"}),
              "kdflow_tbf16": ("bench.sides.kdflow:run", {"overrides": ["teacher.dtype=bfloat16"]})}
BF16_NAMES = {"trl": "TRL GKDTrainer bf16=True", "trl_distill": "TRL DistillationTrainer bf16=True",
              "kdflow": "kdflow train.precision=bf16",
              "trl_tbf16": "TRL GKDTrainer, teacher bf16", "trl_distill_tbf16": "TRL DistillationTrainer, teacher bf16",
              "kdflow_tbf16": "kdflow teacher.dtype=bfloat16"}
# (kdflow side, the TRL sides it is compared with: the best of them)
BF16_PAIRS = (("kdflow", ("trl", "trl_distill")), ("kdflow_tbf16", ("trl_tbf16", "trl_distill_tbf16")))


def base_side(side: str) -> str:
    """``kdflow_tbf16`` is a variant of side ``kdflow``, ``trl_distill`` a TRL side: what ``--sides`` selects."""
    return side.split("_")[0]


def fp32_side(side: str) -> str:
    """The side of the fp32 tables whose loss a bf16 side is compared with (its own trainer's)."""
    return side.removesuffix("_tbf16")
# kdflow's side only launches `python -m kdcore train`: no torch in the launcher (bench.common)
LAUNCHER_ENV = {"BENCH_CHILD_TORCH": "0"}


@dataclass
class Config:
    """One row group: the same models, data and settings for every side."""

    table: str
    label: str
    student: str
    teacher: str
    seq_len: int
    batch: int
    allocator: str
    steps: int
    warmup: int
    repeats: int
    vocab: int = 49152  # the data is built for this vocabulary's tokenizer (the student's)
    sides: dict = field(default_factory=lambda: dict(SIDES))  # side -> "module:function"
    runs: dict = field(default_factory=dict)  # side -> list[RunResult]

    def kwargs(self, data: str) -> dict:
        return dict(student=self.student, teacher=self.teacher, data=data, seq_len=self.seq_len, batch=self.batch,
                    steps=self.steps, warmup=self.warmup)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- running


def run_config(cfg: Config, args, kdflow_ok: bool) -> None:
    """All repeats of every side of one configuration, sides alternating within a repeat."""
    import psutil

    tok_dir = models.tokenizer_folder(cfg.vocab)
    data = str(models.ensure_data(tok_dir, cfg.seq_len, max(32, cfg.batch * (cfg.steps + cfg.warmup))))
    sides = [s for s in cfg.sides if base_side(s) in args.sides]
    for rep in range(cfg.repeats):
        for side in (sides if rep % 2 == 0 else sides[::-1]):
            is_kdflow = base_side(side) == "kdflow"
            if is_kdflow and not kdflow_ok:
                continue
            target, extra = cfg.sides[side] if isinstance(cfg.sides[side], tuple) else (cfg.sides[side], {})
            cap = int(psutil.virtual_memory().available * 0.9)  # never push the machine into the OOM killer
            r = common.run_isolated(target, {**cfg.kwargs(data), **extra}, threads=args.threads,
                                    allocator=cfg.allocator, timeout=args.timeout, mem_cap=cap,
                                    env_extra=LAUNCHER_ENV if is_kdflow else None)
            cfg.runs.setdefault(side, []).append(r)
            if r.ok:
                st = r.result["step_times"]
                log(f"{cfg.table} {cfg.label} {cfg.allocator} {side} #{rep + 1}: "
                    f"{fmt_range(st)} s/step, peak {r.peak_mem / GB:.2f} GB ({parts_text(r)}), "
                    f"loss {r.result.get('final_loss')}, "
                    f"cpu share {r.cpu_share:.2f}, load {r.load_before:.1f}->{r.load_after:.1f}, "
                    f"wall {r.wall_s:.0f} s")
            else:
                log(f"{cfg.table} {cfg.label} {cfg.allocator} {side} #{rep + 1}: FAILED {r.error}\n{r.log_tail[-1500:]}")


def measured_already(cfg: Config, done: list[Config]) -> Config | None:
    """A configuration of ``done`` that runs the same work as ``cfg`` (models, shape, allocator,
    vocabulary, sides), whose runs ``cfg`` can reuse instead of measuring it again."""
    what = lambda c: (c.student, c.teacher, c.seq_len, c.batch, c.allocator, c.vocab, c.warmup)  # noqa: E731
    return next((c for c in done if what(c) == what(cfg) and c.steps >= cfg.steps
                 and all(c.sides.get(k) == v and any(r.ok for r in c.runs.get(k, [])) for k, v in cfg.sides.items())),
                None)


def parts_text(r) -> str:
    """The peak's split by process role, e.g. ``student 1.91 + teacher 1.02``."""
    return " + ".join(f"{k} {v / GB:.2f}" for k, v in sorted(r.peak_parts.items(), key=lambda kv: -kv[1]))


def side_stats(runs: list) -> dict | None:
    """Pool step times over runs; per-run peaks and losses."""
    good = [r for r in runs if r.ok]
    if not good:
        return None
    steps = [t for r in good for t in r.result["step_times"]]
    tps = good[0].result["tokens_per_step"]
    mid = sorted(good, key=lambda r: r.peak_mem)[len(good) // 2]  # the median-peak run (its split too)
    return {
        "runs": len(good), "failed": len(runs) - len(good), "steps_per_run": len(good[0].result["step_times"]),
        "step_s": steps, "tok_s": [tps / t for t in steps], "peak_gb": [r.peak_mem / GB for r in good],
        "loss": [r.result["final_loss"] for r in good if r.result.get("final_loss") is not None],
        "median_step": statistics.median(steps), "median_peak": mid.peak_mem,
        "cpu_share": [r.cpu_share for r in good], "load": [r.load_before for r in good] + [r.load_after for r in good],
        "parts": parts_text(mid), "part_bytes": dict(mid.peak_parts),
    }


# ----------------------------------------------------------------------------- tables


def limit_table(args) -> tuple[str, dict]:
    r = common.run_isolated("bench.limit:measure_all", {"n": args.matmul_n, "repeats": args.matmul_repeats},
                            threads=args.threads, allocator="tuned", timeout=600)
    if not r.ok:
        return f"matmul measurement failed: {r.error}", {}
    rows = [[dt, f"{res['n']}×{res['n']}", res["threads"], len(res["gflops"]), fmt_range(res["gflops"], "{:.1f}")]
            for dt, res in r.result.items()]
    peak = {dt: res["median"] for dt, res in r.result.items()}
    text = md_table(["dtype", "matmul", "threads", "repeats", "GFLOP/s median (min–max)"], rows, "llrrr")
    return text, peak


def channel_table(args) -> str:
    import statistics

    r = common.run_isolated("bench.channel_bytes:measure", {"repeats": args.channel_repeats},
                            threads=args.threads, allocator="tuned", timeout=900)
    if not r.ok:
        return f"channel measurement failed: {r.error}"
    res = r.result
    rows, by = [], {}
    for x in res["rows"]:
        by[(x["case"], x["payload"], x["dtype"])] = x
    for x in res["rows"]:
        hid = by[(x["case"], "hidden", x["dtype"])]
        ratio = x["bytes"] / hid["bytes"]
        rows.append([x["case"], x["vocab"], x["teacher_hidden"], x["payload"], x["dtype"].replace("bfloat16", "bf16").replace("float32", "fp32"),
                     f"[{x['rows']}, {x['cols']}]", f"{x['bytes'] / 1e6:.1f}", f"{ratio:.0f}×",
                     fmt_range([t * 1e3 for t in x["write_s"]], "{:.2f}"), fmt_range([t * 1e3 for t in x["read_s"]], "{:.2f}"),
                     fmt_range([t * 1e3 for t in x["total_s"]], "{:.2f}")])
    note = (f"N = {res['n']} loss positions (a 4×512 batch), {res['repeats']} repeats after one warm-up; "
            "producer copies into preallocated shared memory, consumer copies out; total includes the signal. "
            f"Median of the total: {statistics.median([t for x in res['rows'] for t in x['total_s']]) * 1e3:.1f} ms over all cases.")
    return md_table(["case", "V", "H_t", "payload", "dtype", "shape", "MB/step", "× hidden", "write ms",
                     "read ms", "total ms"], rows, "lrrllrrrrrr") + "\n\n" + note


def flops_of(cfg: Config) -> float:
    from bench.limit import Dims, step_flops

    return step_flops(Dims.from_folder(cfg.student), Dims.from_folder(cfg.teacher), cfg.batch, cfg.seq_len)["total"]


def peer_rows(cfgs: list[Config], peak_fp32: float | None, why_no_kdflow: str,
              names: dict = SIDE_NAMES) -> list[list]:
    rows = []
    for cfg in cfgs:
        flops = flops_of(cfg) if names is SIDE_NAMES else None  # the FLOP model covers same-vocab KD only
        for side in names:
            st = side_stats(cfg.runs.get(side, []))
            name = names[side]
            shape = f"{cfg.batch}×{cfg.seq_len}"
            if st is None:
                reason = why_no_kdflow if base_side(side) == "kdflow" and why_no_kdflow else (
                    cfg.runs[side][-1].error if cfg.runs.get(side) else "not run")
                rows.append([cfg.label, shape, cfg.allocator, name, "—", "—", "—", "—", "—", "—", "—", reason[:120]])
                continue
            pct = f"{100 * flops / st['median_step'] / 1e9 / peak_fp32:.0f}%" if peak_fp32 and flops else "—"
            rows.append([cfg.label, shape, cfg.allocator, name, f"{st['runs']}×{st['steps_per_run']}",
                         fmt_range(st["step_s"]), fmt_range(st["tok_s"], "{:.0f}"), fmt_range(st["peak_gb"]),
                         st["parts"], fmt_range(st["loss"], "{:.4f}"), pct,
                         f"cpu {fmt_range(st['cpu_share'])}; load {fmt_range(st['load'], '{:.1f}')}"])
    return rows


PEER_HEADERS = ["models", "batch", "allocator", "side", "runs×steps", "s/step", "tokens/s", "peak GB",
                "peak by process GB", "loss after N", "% fp32 peak", "noise"]
PEER_ALIGN = "lllllrrrlrrl"


def best_trl(cfg: Config, key: str) -> tuple[dict | None, str]:
    """The TRL trainer of this configuration with the smallest median ``key`` (its stats, its side)."""
    cands = [(side_stats(cfg.runs.get(s, [])), s) for s in TRL_SIDES]
    cands = [(st, s) for st, s in cands if st]
    return min(cands, key=lambda x: x[0][key]) if cands else (None, "")


def _met(ratio: float, target: float, higher: bool) -> str:
    ok = ratio >= target if higher else ratio <= target
    return "met" if ok else f"missed by {(target / ratio if higher else ratio / target):.2f}×"


def ratio_rows(cfgs: list[Config]) -> list[list]:
    """kdflow against the best TRL trainer of each configuration (speed and memory separately: the
    fastest TRL trainer need not be the leanest), and best-vs-best across allocator settings."""
    rows = []
    groups: dict[tuple, dict[str, Config]] = {}
    for cfg in cfgs:
        groups.setdefault((cfg.label, cfg.batch, cfg.seq_len), {})[cfg.allocator] = cfg
    for (label, b, L), by_alloc in groups.items():
        entries = list(by_alloc.items())
        for alloc, cfg in entries + [("best", None)]:
            if cfg is not None:
                k = side_stats(cfg.runs.get("kdflow", []))
                (ts, tside), (tm, mside) = best_trl(cfg, "median_step"), best_trl(cfg, "median_peak")
                km, tag, ta, ma = k, alloc, "", ""
            else:
                if len(entries) < 2:
                    continue
                ks = [(side_stats(c.runs.get("kdflow", [])), a) for a, c in entries]
                ks = [(x, a) for x, a in ks if x]
                speed = [(best_trl(c, "median_step"), a) for a, c in entries]
                mem = [(best_trl(c, "median_peak"), a) for a, c in entries]
                speed, mem = [x for x in speed if x[0][0]], [x for x in mem if x[0][0]]
                if not (ks and speed and mem):
                    continue
                (k, ka) = min(ks, key=lambda x: x[0]["median_step"])
                (km, kma) = min(ks, key=lambda x: x[0]["median_peak"])
                ((ts, tside), ta) = min(speed, key=lambda x: x[0][0]["median_step"])
                ((tm, mside), ma) = min(mem, key=lambda x: x[0][0]["median_peak"])
                tag = f"best (kdflow {ka}, TRL {ta})"
                ta, ma = f", {ta}", f", {ma}"
            if k and ts and tm:
                speed = ts["median_step"] / k["median_step"]
                memr = km["median_peak"] / tm["median_peak"]
                rows.append([label, f"{b}×{L}", tag, SIDE_NAMES[tside] + ta, f"{speed:.2f}×", _met(speed, 1.0, True),
                             SIDE_NAMES[mside] + ma, f"{memr:.2f}×", _met(memr, 1.0, False)])
            else:
                rows.append([label, f"{b}×{L}", tag, "—", "—", "kdflow or TRL missing", "—", "—", "—"])
    return rows


def why_memory_missed(what: str, k: dict, peer: dict, peer_name: str) -> str:
    """Where kdflow's excess sits, from the run's own per-process peaks (the default engine,
    inline, runs the teacher in the trainer's process, as the peer does; the hf engine in a
    second one)."""
    parts = k["part_bytes"]
    student, teacher = parts.get("student", 0), parts.get("teacher", 0)
    peak = peer["median_peak"]
    text = (f"{what}: kdflow {k['median_peak'] / GB:.2f} GB against {peer_name} {peak / GB:.2f} GB. kdflow's student "
            f"process alone peaked at {student / GB:.2f} GB ({student / peak:.2f}× the peer's whole run)")
    if not teacher:
        return text + "; the teacher runs inside it (engine inline), so there is no teacher process."
    return text + (f"; its teacher process adds {teacher / GB:.2f} GB: the teacher's weights, which the peer holds "
                   "too, plus a second interpreter with torch and transformers, which the peer does not pay, plus "
                   "pages the two processes share (the channel, libraries), which the meter counts in both.")


def verdict(name: str, k: dict | None, peers: dict[str, dict], what: str) -> str:
    """One kdflow side against the fastest and the leanest peer (medians), met or missed, and why
    memory missed where it did."""
    if not (k and peers):
        return ""
    fast = min(peers, key=lambda n: peers[n]["median_step"])
    lean = min(peers, key=lambda n: peers[n]["median_peak"])
    speed = peers[fast]["median_step"] / k["median_step"]
    mem = k["median_peak"] / peers[lean]["median_peak"]
    line = (f"{name}: {speed:.2f}× the speed of the fastest TRL trainer ({fast}), {_met(speed, 1.0, True)}; "
            f"{mem:.2f}× the peak memory of the leanest ({lean}), {_met(mem, 1.0, False)}.")
    if mem > 1.0:
        line += " Why memory missed: " + why_memory_missed(what, k, peers[lean], lean)
    return line


def memory_miss_reasons(cfgs: list[Config]) -> list[str]:
    """For each configuration whose kdflow peak is above the leanest TRL trainer's: where the
    excess sits, from this run's own per-process peaks (kdflow runs the teacher in a second
    process; the peer is one process holding both models)."""
    lines = []
    for cfg in cfgs:
        k = side_stats(cfg.runs.get("kdflow", []))
        tm, mside = best_trl(cfg, "median_peak")
        if not (k and tm) or k["median_peak"] <= tm["median_peak"]:
            continue
        lines.append(why_memory_missed(f"{cfg.label}, {cfg.batch}×{cfg.seq_len}, {cfg.allocator}", k, tm,
                                       SIDE_NAMES[mside]))
    return lines


RATIO_HEADERS = ["models", "batch", "allocator", "fastest TRL", "tokens/s kdflow÷TRL", "≥ 1.0×", "leanest TRL",
                 "peak mem kdflow÷TRL", "≤ 1.0×"]


def scaling_rows(cfgs: list[Config], why_no_kdflow: str) -> list[list]:
    rows = []
    for cfg in cfgs:
        cells = [cfg.label, f"{cfg.batch}×{cfg.seq_len}", cfg.vocab]
        stats = {s: side_stats(cfg.runs.get(s, [])) for s in SIDES}
        for side in ("trl", "kdflow"):
            st = stats[side]
            if st:
                cells += [fmt_range(st["tok_s"], "{:.0f}"), fmt_range(st["peak_gb"])]
            else:
                cells += ["—", "—"]
        k, t = stats["kdflow"], stats["trl"]
        failed = "; ".join(f"{SIDE_NAMES[side]}: {cfg.runs[side][-1].error}"[:100] for side in ("trl", "kdflow")
                           if not stats[side] and cfg.runs.get(side))
        cells.append(f"{t['median_step'] / k['median_step']:.2f}×" if k and t else
                     (why_no_kdflow[:60] if not k and why_no_kdflow else failed or "—"))
        rows.append(cells)
    return rows


SCALING_HEADERS = ["sweep", "batch", "V", "TRL tokens/s", "TRL peak GB", "kdflow tokens/s", "kdflow peak GB",
                   "kdflow÷TRL tokens/s"]


def onpolicy_table(args, kdflow_ok: bool, why: str) -> str:
    """On-policy: kdflow and the TRL peers on the same prompts, lengths and sampling settings."""
    import psutil

    s, t = str(models.ensure_model("student")), str(models.ensure_model("teacher"))
    P, M, B = args.prompt_len, args.max_new_tokens, 4
    data = str(models.ensure_data(models.tokenizer_folder(), P + M, max(32, B * (args.warmup + args.onpolicy_steps))))
    runs: dict[str, list] = {name: [] for name in ONPOLICY_SIDES}
    names = [n for n in ONPOLICY_SIDES if kdflow_ok or not n.startswith("kdflow")]
    for rep in range(args.onpolicy_repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            target, extra = ONPOLICY_SIDES[name]
            r = common.run_isolated(target, dict(student=s, teacher=t, data=data, prompt_len=P, max_new_tokens=M,
                                                 batch=B, steps=args.onpolicy_steps, warmup=args.warmup, **extra),
                                    threads=args.threads, allocator="tuned", timeout=args.timeout,
                                    mem_cap=int(psutil.virtual_memory().available * 0.9),
                                    env_extra=LAUNCHER_ENV if name.startswith("kdflow") else None)
            log(f"onpolicy {name} #{rep + 1}: " + (f"{fmt_range(r.result['step_times'])} s/step, "
                                                   f"generated {r.result['generated_tokens']}" if r.ok else
                                                   f"FAILED {r.error}\n{r.log_tail[-1500:]}"))
            runs[name].append(r)
    rows, medians = [], {}
    for name in ONPOLICY_SIDES:
        st = side_stats(runs[name])
        if st is None:
            reason = why if name.startswith("kdflow") and not kdflow_ok else (
                runs[name][-1].error if runs[name] else "not run")
            rows.append([name, f"{B}×({P}+{M})", "tuned", "—", "—", "—", "—", "—", "—", reason[:120]])
            continue
        gen = [g for r in runs[name] if r.ok for g in r.result["generated_tokens"]]
        gen_tps = [g / t for g, t in zip(gen, st["step_s"])] if len(gen) == len(st["step_s"]) else []
        medians[name] = st
        samp = [x for r in runs[name] if r.ok for x in (r.result.get("sample_s") or []) if x is not None]
        rows.append([name, f"{B}×({P}+{M})", "tuned", f"{st['runs']}×{st['steps_per_run']}", fmt_range(st["step_s"]),
                     fmt_range(samp) if samp else "—", fmt_range(gen_tps, "{:.0f}"), fmt_range(st["peak_gb"]),
                     fmt_range(st["loss"], "{:.4f}"),
                     f"cpu {fmt_range(st['cpu_share'])}; load {fmt_range(st['load'], '{:.1f}')}"])
    text = md_table(["trainer", "prompts×(prompt+new)", "allocator", "runs×steps", "s/step", "of which sampling s",
                     "generated tokens/s", "peak GB", "loss after N", "noise"], rows, "lllrrrrrrl")
    peers = {n: st for n, st in medians.items() if not n.startswith("kdflow")}
    verdicts = [verdict(n, st, peers, f"on-policy, {B}×({P}+{M})") for n, st in medians.items() if n.startswith("kdflow")]
    return (text + f"\n\nBench pair, student sampling at temperature 1, no top-k, top-p 1, up to {M} new tokens "
            "(EOS may end a response earlier; `generated tokens/s` counts what was generated), β = 0.5, weights "
            "synced every step; a step includes generation. `of which sampling s` is kdflow's own `sample_s` "
            "(the TRL trainers do not report theirs)."
            + "".join(f"\n\n{v}" for v in verdicts if v))


def bf16_table(args, kdflow_ok: bool, why: str, fp32_cfgs: list[Config]) -> str:
    """The real-teacher pair in bf16, both ways, beside the same pair's fp32 losses."""
    cfgs = [Config("bf16", c.label, c.student, c.teacher, c.seq_len, c.batch, "tuned", c.steps, c.warmup, 1,
                   sides=dict(BF16_SIDES)) for c in real_configs(args) if c.allocator == args.allocators[-1]]
    for cfg in cfgs:
        run_config(cfg, args, kdflow_ok)
    text = md_table(PEER_HEADERS, peer_rows(cfgs, None, "" if kdflow_ok else why, names=BF16_NAMES), PEER_ALIGN)
    fp32 = {(c.seq_len, c.allocator): c for c in fp32_cfgs}
    lines = []
    for cfg in cfgs:
        ref = fp32.get((cfg.seq_len, cfg.allocator))
        for k_side, t_sides in BF16_PAIRS:
            k = side_stats(cfg.runs.get(k_side, []))
            ts = [(side_stats(cfg.runs.get(s, [])), s) for s in t_sides]
            ts = [(st, s) for st, s in ts if st]
            if not (k and ts):
                continue
            t, t_side = min(ts, key=lambda x: x[0]["median_step"])
            m, m_side = min(ts, key=lambda x: x[0]["median_peak"])
            line = (f"{cfg.batch}×{cfg.seq_len}, {BF16_NAMES[k_side]}: {t['median_step'] / k['median_step']:.2f}× the "
                    f"speed of the fastest TRL ({BF16_NAMES[t_side]}), {k['median_peak'] / m['median_peak']:.2f}× the "
                    f"peak memory of the leanest ({BF16_NAMES[m_side]})")
            for side, st in [(k_side, k)] + [(s, x) for x, s in ts]:
                base = side_stats(ref.runs.get(fp32_side(side), [])) if ref else None
                if base and base["loss"] and st["loss"]:
                    rel = st["loss"][0] / base["loss"][0] - 1
                    line += (f"; {SIDE_NAMES[fp32_side(side)]} loss {st['loss'][0]:.4f} vs fp32 {base['loss'][0]:.4f} "
                             f"({100 * rel:+.2f}%)")
            lines.append(line + ".")
    return (text + "\n\n" + "\n".join(f"- {x}" for x in lines) + "\n\nSame models, data, steps and settings as the "
            "real-teacher table, tuned allocator. Losses are the training loss after the last step (fp32 reference: "
            "the real-teacher table's run with the same batch and allocator); bf16 changes each side's numerics, so "
            "the two sides' bf16 losses are compared with their own fp32 runs, not with each other.")


def xtok_table(args, kdflow_ok: bool, why: str) -> str:
    s, t = str(models.ensure_model("student-v32000")), str(models.ensure_model("teacher"))
    cfg = Config("xtok", "Mistral-SP 256×4 ← SmolLM2-BPE 512×8", s, t, 128, 4, "tuned", args.xtok_steps, args.warmup,
                 args.xtok_repeats, vocab=32000, sides=dict(XTOK_SIDES))
    run_config(cfg, args, kdflow_ok)
    text = md_table(PEER_HEADERS, peer_rows([cfg], None, "" if kdflow_ok else why, names=XTOK_NAMES), PEER_ALIGN)
    g = side_stats(cfg.runs.get("trl", []))
    peers = {XTOK_NAMES["trl"]: g} if g else {}
    verdicts = [verdict(XTOK_NAMES[side], side_stats(cfg.runs.get(side, [])), peers, f"ULD, {cfg.batch}×{cfg.seq_len}")
                for side in XTOK_SIDES if base_side(side) == "kdflow"]
    return (text + "".join(f"\n\n{v}" for v in verdicts if v) + "\n\nOff-policy, pure ULD (sorted-probability L1, whole vocabularies, T = 1), "
            "the same prompt/completion rows on both sides. The two ULDs pair positions differently (kdflow: "
            "positions that have read the same characters; GOLD, with a SentencePiece student, must pair by "
            "index), so the loss values are on the same scale but not the same average; see bench/sides/kdflow_xtok.py.")


# ----------------------------------------------------------------------------- configurations


def offpolicy_configs(args) -> list[Config]:
    s, t = str(models.ensure_model("student")), str(models.ensure_model("teacher"))
    lens = (128,) if args.quick else (128, 512)
    return [Config("offpolicy", "bench 256×4 ← 512×8", s, t, L, 4, a, args.steps, args.warmup, args.repeats)
            for L in lens for a in args.allocators]


def real_configs(args) -> list[Config]:
    s, t = str(models.ensure_model("smollm2-student-576x4")), str(models.ensure_model("smollm2-135m"))
    lens = (128,) if args.quick else (128, 512)
    return [Config("real", "576×4 ← SmolLM2-135M", s, t, L, 4, a, args.steps, args.warmup, args.real_repeats)
            for L in lens for a in args.allocators]


def scaling_configs(args) -> list[Config]:
    s, t = str(models.ensure_model("student")), str(models.ensure_model("teacher"))
    alloc = "tuned"  # the peer's best setting: what is left is the algorithm, not page faults
    # the ends and the off-policy table's 4×512 (2×1024 dropped to keep the run within 30 min)
    seq = [(2048 // L, L) for L in ((256, 512) if args.quick else (256, 512, 2048))]
    two = {k: SIDES[k] for k in ("trl", "kdflow")}  # GKDTrainer only: the sweep's cost doubles with each peer
    out = [Config("scaling", "sequence (2048 tok/step)", s, t, L, b, alloc, args.scaling_steps, args.warmup, 1,
                  sides=dict(two)) for b, L in seq]
    for V in ((32000, 49152) if args.quick else (32000, 49152, 152064)):
        sv = s if V == 49152 else str(models.ensure_model(f"student-v{V}"))
        tv = t if V == 49152 else str(models.ensure_model(f"teacher-v{V}"))
        out.append(Config("scaling", "vocabulary", sv, tv, 256, 4, alloc, args.scaling_steps, args.warmup, 1, vocab=V,
                          sides=dict(two)))
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default=",".join(DEFAULT_TABLES), help=f"comma-separated subset of {', '.join(ALL_TABLES)}")
    p.add_argument("--threads", type=int, default=len(common.available_cpus()),
                   help="total CPU threads for each run, both sides (default: all available CPUs)")
    p.add_argument("--allocators", default="default,tuned", help="allocator settings to compare (bench.common.ALLOCATORS)")
    p.add_argument("--sides", default="trl,kdflow", help="which sides to run")
    # 3 steps, 1 run per side and 2 per scaling point: 32 min on 2 cores (5 steps and 2 runs for the
    # bench pair took 44 min), close to the 30; most ratios are well outside a row's
    # step-to-step spread, which the min-max cells show (read the ones near 1x with that spread)
    p.add_argument("--steps", type=int, default=3, help="measured steps per run (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and not measured")
    p.add_argument("--repeats", type=int, default=1, help="fresh-process runs per side, off-policy table")
    p.add_argument("--real-repeats", type=int, default=1, help="runs per side, real-teacher table")
    p.add_argument("--scaling-steps", type=int, default=2, help="measured steps per scaling run")
    p.add_argument("--onpolicy-steps", type=int, default=3, help="measured steps per on-policy run")
    p.add_argument("--onpolicy-repeats", type=int, default=1)
    p.add_argument("--xtok-steps", type=int, default=3, help="measured steps per cross-tokenizer run")
    p.add_argument("--xtok-repeats", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64, help="on-policy prompt tokens")
    p.add_argument("--max-new-tokens", type=int, default=64, help="on-policy completion tokens (both sides)")
    p.add_argument("--matmul-n", type=int, default=4096)
    p.add_argument("--matmul-repeats", type=int, default=5)
    p.add_argument("--channel-repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1200, help="seconds before one run is killed")
    p.add_argument("--quick", action="store_true", help="smoke run: 4×128 only, 2 steps, 1 repeat, short sweeps")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results.md"))
    p.add_argument("--no-write", action="store_true", help="print only; leave --out untouched")
    args = p.parse_args(argv)
    args.tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    bad = [t for t in args.tables if t not in ALL_TABLES]
    if bad:
        p.error(f"unknown table(s) {bad}; choose from {', '.join(ALL_TABLES)}")
    args.allocators = [a.strip() for a in args.allocators.split(",") if a.strip()]
    bad = [a for a in args.allocators if a not in common.ALLOCATORS]
    if bad:
        p.error(f"unknown allocator(s) {bad}; choose from {', '.join(common.ALLOCATORS)}")
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if [s for s in args.sides if s not in SIDES]:
        p.error(f"--sides: choose from {', '.join(SIDES)}")
    if args.quick:
        args.steps, args.repeats, args.real_repeats, args.scaling_steps, args.onpolicy_steps = 2, 1, 1, 1, 1
        args.xtok_steps = 1
        args.max_new_tokens = 16
        args.matmul_n, args.matmul_repeats, args.channel_repeats = 2048, 3, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    from bench.sides.kdflow import trainer_available

    kdflow_ok, why = trainer_available()
    if not kdflow_ok:
        log(why + " — kdflow rows are left empty, peer rows still run")
    info = common.machine_info()
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load0 = common.load_average()
    sections: list[str] = []
    peak: dict = {}

    if "limit" in args.tables:
        log("limit: matmul throughput")
        text, peak = limit_table(args)
        sections.append("## The machine's matmul rate\n\n" + text)
    if "channel" in args.tables:
        log("channel: hidden states vs logits through shared memory")
        sections.append("## Channel: bytes and time per step\n\n" + channel_table(args))

    peak_fp32 = peak.get("float32")
    made: dict[str, list[Config]] = {}
    for table, make, title in (("offpolicy", offpolicy_configs, "Off-policy vs TRL (bench pair)"),
                               ("real", real_configs, "Off-policy vs TRL (real SmolLM2-135M teacher)")):
        if table not in args.tables:
            continue
        cfgs = made[table] = make(args)
        for cfg in cfgs:
            run_config(cfg, args, kdflow_ok)
        sections.append(f"## {title}\n\n" + md_table(PEER_HEADERS, peer_rows(cfgs, peak_fp32, "" if kdflow_ok else why),
                                                      PEER_ALIGN)
                        + "\n\nkdflow against the best TRL trainer of each row (medians; speed and memory each against the TRL "
                        "trainer best at it):\n\n"
                        + md_table(RATIO_HEADERS, ratio_rows(cfgs), "llllrllrl")
                        + "".join(f"\n\nWhy memory missed: {x}" for x in memory_miss_reasons(cfgs)))
    if "bf16" in args.tables:
        log("bf16: both sides in bf16, and bf16 teacher inference alone")
        sections.append("## bf16 (real SmolLM2-135M teacher)\n\n" + bf16_table(args, kdflow_ok, why, made.get("real", [])))
    if "scaling" in args.tables:
        cfgs = scaling_configs(args)
        for cfg in cfgs:
            if (same := measured_already(cfg, made.get("offpolicy", []))) is not None:
                # the sequence sweep's 4×512 point is the off-policy table's tuned row
                cfg.runs = {k: same.runs[k] for k in cfg.sides}
                log(f"scaling {cfg.label} {cfg.batch}×{cfg.seq_len}: the off-policy table's runs of this configuration")
                continue
            run_config(cfg, args, kdflow_ok)
        sections.append("## Scaling (tuned allocator)\n\n"
                        + md_table(SCALING_HEADERS, scaling_rows(cfgs, "" if kdflow_ok else why), "llrrrrrr"))

    if "onpolicy" in args.tables:
        sections.append("## On-policy vs TRL\n\n" + onpolicy_table(args, kdflow_ok, why))
    if "xtok" in args.tables:
        log("xtok: cross-tokenizer ULD vs GOLD")
        sections.append("## Cross-tokenizer ULD vs TRL GOLDTrainer\n\n" + xtok_table(args, kdflow_ok, why))
    minutes = (time.perf_counter() - t0) / 60
    header = _header(args, info, started, load0, minutes, kdflow_ok, why)
    text = header + "\n\n" + "\n\n".join(sections) + "\n"
    if not args.no_write:
        Path(args.out).write_text(text)
        log(f"wrote {args.out} ({minutes:.1f} min)")
    print(text)
    return 0


def load_reading(load: float, threads: int) -> str:
    """What the load average says about the times: a run pinned to ``threads`` CPUs is itself a
    load of about ``threads``; more than that means other work shared the CPUs."""
    if load > threads + 0.5:
        return (f"above the run's own {threads}, so other work shared the CPUs and the times are inflated (see "
                "each row's cpu share: CPU seconds ÷ (wall × threads)).")
    return (f"no more than the run's own {threads} threads, so no other work of note shared the CPUs (each row's "
            "cpu share: CPU seconds ÷ (wall × threads)).")


def _header(args, info: dict, started: str, load0, minutes: float, kdflow_ok: bool, why: str) -> str:
    load1 = common.load_average()
    cmd = "python -m bench run_all" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    lines = [
        "# kdflow benchmarks",
        "",
        f"Command: `{cmd}` — started {started}, took {minutes:.1f} min.",
        "",
        f"Machine: {info.get('cpu', '?')}, {info.get('cpus_available')} CPUs available, "
        f"{info.get('memory_gb')} GiB; {args.threads} threads per run (pinned; the whole process tree of each side). "
        f"Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}, "
        f"{info['glibc']}.",
        "",
        f"Load average (1/5/15 min) at start {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, at end "
        f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f}: " + load_reading(max(load0[0], load1[0]), args.threads),
        "",
        "How to read: every run is a fresh process; `runs×steps` = fresh-process runs × measured steps each "
        f"(after {args.warmup} warm-up step); cells are median (min–max) over all measured steps (times) or runs "
        "(memory, loss). `peak GB` = the largest sum, over the processes of the run's tree alive at one sample "
        "(every 0.2 s), of each process's peak resident set (the kernel's VmHWM; bench/common.py TreeMemory): an "
        "upper bound that counts pages two processes share (libraries, the shared-memory channel) in both, so it "
        "errs against kdflow when it runs two processes (`teacher.engine: hf`); `peak by process` splits it (`launcher` = the benchmark child, "
        "which is the whole TRL run). Until 2026-12-01 this column was PSS read every 0.1 s, which slowed the "
        "measured runs (kdflow 1.98 vs 1.60 s/step, TRL 3.60 vs 2.75 on the real teacher at 4×128): the speed "
        "ratios of earlier runs were partly the meter's. `tokens/s` = batch × sequence length ÷ step time. `% fp32 peak` = useful FLOPs "
        "(bench/limit.py: 6·N_student + 2·N_teacher per token, attention, student head and teacher-logit rebuild "
        "at loss positions) per second ÷ the fp32 matmul rate below. Allocator `default` = glibc as shipped, "
        "`tuned` = `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736` in the run's environment "
        "(kdflow, run as `python -m kdcore train`, also tunes its own processes by default: the allocator and "
        "passive OpenMP waits; its default teacher engine, `inline`, computes in the trainer's process with every "
        "pinned core).",
    ]
    if not kdflow_ok:
        lines += ["", f"**{why}** — kdflow rows are empty in this run."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
