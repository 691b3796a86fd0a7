"""The exact teacher cache (``teacher.engine: cache``): bytes per token, exactness, speed.

    nice -n 10 python -m bench teacher_cache        # writes bench/teacher_cache.md

1. Bytes per token of the exact cache (hidden states, ``H`` values per token) against top-k
   logit caches (k ids as int32 + k values as bf16) and full logits, for SmolLM2-135M and a
   7B-class shape: arithmetic, plus the measured size of a real cache of the quickstart pair
   (safetensors headers and the per-sample index included).
2. Exactness: a short quickstart run from an fp32 cache against the live teacher (losses
   compared digit for digit), and from a bf16 cache (the largest loss difference).
3. Speed: the same short runs' wall time and s/step, and the one-time build cost.
4. What exactness buys: held-out teacher-KL after the same steps trained from the exact cache
   and from what a top-20 logit cache gives (the teacher distribution restricted to its 20
   largest logits and renormalised), both read from the one cache; the metric is always
   against the full teacher distribution.
5. Two students of different depths (2 and 4 truncated layers) trained from one cache folder,
   which neither run rebuilds.

``--only new`` runs 4 and 5 alone and replaces their sections in the existing report.

Small on purpose (``data.limit`` rows, a few steps): it runs beside other work on a CPU box.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"SmolLM2-135M": (576, 49152), "7B-class (Qwen2.5-7B)": (4096, 152064)}
LIMIT, STEPS = 64, 6
SHORT = [f"data.limit={LIMIT}", f"train.max_steps={STEPS}", "train.eval_every=0", "train.eval_batches=1",
         "checkpoint.every=0", "checkpoint.export_hf=false", "logging.progress=false"]


def kdcore(*args: str) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "kdcore", *args], capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"kdcore {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train(tmp: Path, name: str, *extra: str) -> dict:
    out = tmp / name
    wall = kdcore("train", "quickstart", *SHORT, f"train.output_dir={out}", *extra)
    recs = records(out)
    steps = [r for r in recs if "loss" in r]
    return {"wall_s": wall, "step_s": sum(r["step_time_s"] for r in steps[1:]) / max(len(steps) - 1, 1),
            "losses": [r["loss"] for r in steps] + [r["eval_kd"] for r in recs if "eval_kd" in r]}


def cache_size(folder: Path) -> tuple[int, int]:
    m = json.loads((folder / "manifest.json").read_text())
    return sum(s["bytes"] for s in m["shards"]), sum(s["rows"] for s in m["shards"])


def padding_noise(n: int = 8) -> float:
    """The live teacher's own fp32 noise: the largest difference between a sample's hidden
    states computed alone and computed padded beside the longest training sample (the
    trainer's batches differ from the build's, so this bounds what "exact" can mean)."""
    import torch

    from kdcore.recipe.loading import load_recipe
    from kdcore.data import prepare_data
    from kdcore.engines import HiddenRequest, create_teacher_engine
    from kdcore.modeling.tokenizers import load_tokenizer

    cfg = load_recipe("quickstart", [f"data.limit={LIMIT}"])
    tok = load_tokenizer(cfg.teacher.path)
    samples = prepare_data(cfg.data, tok, None, seed=cfg.train.seed).train
    longest = max(samples, key=len)
    worst = 0.0
    with create_teacher_engine(cfg.teacher, max_rows=2 * len(longest)) as eng:
        for s in samples[:n]:
            ids, pos = list(s.student.input_ids), list(s.student.loss_positions)
            with eng.hidden_states(HiddenRequest(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                                 [pos])) as h:
                alone = h.clone()
            pad = len(longest) - len(ids)
            batch = torch.tensor([ids + [0] * pad, list(longest.student.input_ids)])
            mask = torch.tensor([[1] * len(ids) + [0] * pad, [1] * len(longest)])
            with eng.hidden_states(HiddenRequest(batch, mask, [pos, []])) as h:
                worst = max(worst, float((h - alone).abs().max()))
    return worst


TOPK, VALUE_STEPS, DEPTH_STEPS = 20, 30, 10
NEW_HEADING = "## What exactness buys"


def topk_fkl(student_logits, teacher_logits, *, temperature: float = 1.0):
    """Forward KL from the teacher's top-20 renormalised to the full student distribution.

    What a top-20 logit cache can train on: ``p`` is the softmax of the row's 20 largest teacher
    logits (0 elsewhere) and ``q`` the student's softmax over the whole vocabulary, so mass the
    student puts outside the 20 is still penalised (masking the teacher to -inf and calling the
    built-in ``fkl`` would drop those entries from the student side too).
    """
    import torch

    s = student_logits.float() / temperature
    top, kept = (teacher_logits.float() / temperature).topk(TOPK, dim=-1)
    logp = torch.log_softmax(top, dim=-1)
    logq = torch.log_softmax(s, dim=-1).gather(-1, kept)
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def train_in_process(out: Path, overrides: list[str]) -> dict:
    """One quickstart run in this process (so an in-process loss plugin is visible)."""
    from kdcore import load_recipe
    from kdcore.training import train as run_training

    t0 = time.perf_counter()
    run_training(load_recipe("quickstart", [*SHORT, f"train.output_dir={out}", *overrides]))
    recs = records(out)
    steps = [r for r in recs if "loss" in r]
    return {"wall_s": time.perf_counter() - t0, "steps": len(steps),
            "step_s": sum(r["step_time_s"] for r in steps[1:]) / max(len(steps) - 1, 1),
            "kl": [r["eval_teacher_kl"] for r in recs if "eval_teacher_kl" in r][-1]}


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*") if f.is_file()}


def new_sections() -> list[str]:
    """Sections 4 and 5: both read one fp32 cache built here once."""
    import types

    from kdcore import hookimpl, register_plugin, unregister_plugin

    def register_losses(register):
        register(f"top{TOPK}_fkl", topk_fkl, options=None)

    register_plugin(types.SimpleNamespace(register_losses=hookimpl(register_losses)), "bench-topk")
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            folder = tmp / "cache"
            build_s = kdcore("cache-teacher", "quickstart", f"data.limit={LIMIT}", "logging.progress=false",
                             "--out", str(folder), "--dtype", "float32")
            before = folder_state(folder)
            cache = ["teacher.engine=cache", f"teacher.cache={folder}"]
            value = {name: train_in_process(tmp / name, [*cache, f"train.max_steps={VALUE_STEPS}", f"distill.loss={loss}"])
                     for name, loss in (("exact", "fkl"), (f"top{TOPK}", f"top{TOPK}_fkl"))}
            depths = {n: train_in_process(tmp / f"depth{n}", [*cache, f"train.max_steps={DEPTH_STEPS}",
                                                              f"student.num_layers={n}"]) for n in (2, 4)}
            unchanged = folder_state(folder) == before
    finally:
        unregister_plugin("bench-topk")
    exact, top = value["exact"], value[f"top{TOPK}"]
    lines = [NEW_HEADING, "",
             f"Held-out teacher-KL (`eval_teacher_kl`, always against the full teacher distribution) after "
             f"{VALUE_STEPS} steps, same seed and batches, both from one fp32 cache (built in {build_s:.1f} s). "
             f"The top-{TOPK} run trains on what a top-{TOPK} logit cache gives: the teacher distribution "
             f"restricted to its {TOPK} largest logits and renormalised, against the student's softmax "
             f"over the whole vocabulary (an in-process loss plugin, `bench/teacher_cache.py: topk_fkl`).", "",
             "| teacher signal | steps | final eval_teacher_kl | s/step (steps 2+) |", "|---|---|---|---|",
             f"| exact (full vocabulary) | {exact['steps']} | {exact['kl']:.4f} | {exact['step_s']:.2f} |",
             f"| top-{TOPK} renormalised | {top['steps']} | {top['kl']:.4f} | {top['step_s']:.2f} |", "",
             f"Ratio top-{TOPK} / exact: **{top['kl'] / exact['kl']:.3f}**.", "",
             "## Two students of different depths from one cache", "",
             f"`student.num_layers=2` and `=4` (`init: truncate`), {DEPTH_STEPS} steps each, both reading the "
             f"one cache folder: its files (names, sizes, modification times) are "
             f"{'unchanged' if unchanged else 'CHANGED'} after both runs, so neither rebuilt it.", "",
             "| student layers | steps | final eval_teacher_kl | s/step (steps 2+) | wall s (in-process) |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['steps']} | {r['kl']:.4f} | {r['step_s']:.2f} | {r['wall_s']:.1f} |" for n, r in depths.items()]
    lines += ["", "Notes: measured on a machine shared with other work, so s/step and wall times are noisy; "
              "the KLs depend only on the seed and the steps. The top-20 loss keeps the student's full "
              "softmax, so mass outside the teacher's 20 is still pushed down (masking the teacher to -inf and "
              "calling the built-in `fkl` would renormalise the student over the 20 as well, a weaker signal). "
              f"Both depths start from the teacher's layers (`init: truncate`, evenly spaced); {DEPTH_STEPS} steps "
              "is a smoke-sized comparison, not a quality ranking."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["all", "new"], default="all",
                        help="'new': run sections 4-5 only, keeping the report's other sections")
    args = parser.parse_args()
    out = Path(__file__).with_suffix(".md")
    if args.only == "new":
        old = out.read_text().split(NEW_HEADING)[0].rstrip("\n").splitlines()
        out.write_text("\n".join(old + [""] + new_sections()) + "\n")
        print(out.read_text())
        return
    run_all(out)


def run_all(out: Path) -> None:
    lines = ["# Teacher cache: bytes per token, exactness, speed", "",
             f"Generated by `bench/teacher_cache.py` (quickstart pair, `data.limit={LIMIT}`, {STEPS} steps).", ""]
    lines += ["## Bytes per teacher token", "",
              "| shape | exact bf16 | exact fp32 | top-20 (id+bf16) | top-100 (id+bf16) | full logits bf16 | full logits fp32 |",
              "|---|---|---|---|---|---|---|"]
    for name, (h, v) in SHAPES.items():
        cells = [2 * h, 4 * h, 20 * 6, 100 * 6, 2 * v, 4 * v]
        lines.append(f"| {name} (H={h}, V={v}) | " + " | ".join(f"{c:,}" for c in cells) + " |")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        builds = {}
        for dtype in ("bfloat16", "float32"):
            folder = tmp / f"cache_{dtype}"
            wall = kdcore("cache-teacher", "quickstart", f"data.limit={LIMIT}", "logging.progress=false",
                          "--out", str(folder), "--dtype", dtype)
            size, rows = cache_size(folder)
            builds[dtype] = (folder, wall, size, rows)
        live = train(tmp, "live")
        runs = {d: train(tmp, d, "teacher.engine=cache", f"teacher.cache={f}") for d, (f, *_) in builds.items()}
    lines += ["", "Measured (SmolLM2-135M, safetensors headers and the per-sample index included):", ""]
    for dtype, (_, wall, size, rows) in builds.items():
        lines.append(f"- {dtype}: {size:,} bytes for {rows:,} teacher tokens = **{size / rows:,.1f} bytes/token**; "
                     f"built in {wall:.1f} s (process start and data preparation included)")
    noise = padding_noise()
    diffs = {d: max(abs(a - b) for a, b in zip(r["losses"], live["losses"])) for d, r in runs.items()}
    lines += ["", "## Exactness (train losses and eval_kd of the same run)", "",
              f"- fp32 cache vs live teacher: largest absolute difference {diffs['float32']:.2e} over "
              f"{len(live['losses'])} values (losses around {live['losses'][0]:.3f})",
              f"- bf16 cache vs live teacher: largest absolute difference {diffs['bfloat16']:.2e}",
              f"- the live fp32 teacher's own noise: a sample's hidden states alone vs padded in a batch "
              f"differ by up to {noise:.2e} (the build's batches are not the trainer's)", "",
              "## Speed (wall time includes process start, data preparation, model loading)", "",
              "| teacher | wall s | s/step (steps 2+) |", "|---|---|---|",
              f"| live hf | {live['wall_s']:.1f} | {live['step_s']:.2f} |"]
    for dtype, r in runs.items():
        lines.append(f"| cache {dtype} | {r['wall_s']:.1f} | {r['step_s']:.2f} |")
    lines += [""] + new_sections()
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
