"""The SGLang path on one GPU, in one script of under 10 minutes (issue 27): what CPU contract
tests (tests/integration/test_sglang_contracts.py) cannot show.

    python checks/gpu/gpu_check_sglang.py [--out DIR]      # on a CUDA machine with sglang==0.5.23 installed
    python checks/gpu/gpu_check_sglang.py --dry-run        # anywhere: builds every input, runs nothing on a GPU

Parts, in order (each under its own time cap; the whole under ``--budget`` seconds, 540 by default):

  env          versions, CUDA, sglang runnable (not just importable), kdflow's plugin registered
  teacher      SGLangTeacher on a random 4-layer Llama (hidden 256): the hook transport, the
               post-norm probe, rows against transformers' final-norm states (bf16 tolerances)
  weights      teacher.update_weights(final norm x 2) inside a weight-update session: rows double
  sleep_wake   sleep, wake, the same rows again (the teacher's server runs colocated: one start serves
               teacher, weights and sleep_wake)
  rollout      SGLangRolloutEngine: sync, greedy equal to the hf copy, a seeded repeat identical
  hf_cuda      the hf engine on CUDA against the same model on CPU
  device_index the hf child on the parent's current device (the last GPU): its reported device

The last line printed is always one line, ``gpu_check_sglang: ran A, B; passed A; not run: C (why),
D (why)``; exit 0 only when every part ran and passed (2 when some could not run, 1 on a failure).
Results: ``DIR/gpu_check_sglang.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]  # checks/gpu/ -> the repository
sys.path.insert(0, str(REPO))
HS_COS_MIN, HS_REL_L2_MAX = 0.99, 0.05  # sglang vs transformers rows, bf16 (as checks/gpu/gpu_check.py part (b))
PARTS = ("env", "teacher", "weights", "sleep_wake", "rollout", "hf_cuda", "device_index")
NEEDS_SGLANG = {"teacher", "weights", "sleep_wake", "rollout"}
NEEDS_CUDA = {"teacher", "weights", "sleep_wake", "rollout", "hf_cuda", "device_index"}


def blockers() -> dict[str, str]:
    """Why parts cannot run here: 'cuda' and/or 'sglang' -> reason (empty when all can)."""
    from importlib import metadata, util

    out = {}
    import torch

    if not torch.cuda.is_available():
        out["cuda"] = f"no CUDA GPU (torch {torch.__version__})"
    try:
        version = metadata.version("sglang")
    except metadata.PackageNotFoundError:
        version = None
    from kdcore.engines.sglang.config import SGLANG_VERSION

    if version is None:
        out["sglang"] = "sglang is not installed"
    elif version != SGLANG_VERSION:
        out["sglang"] = f"sglang {version} installed, kdflow is written against {SGLANG_VERSION}"
    else:
        # the CPU contract install has sglang's Python code only (--no-deps): a server needs its kernels
        absent = [d for d in ("sglang-kernel", "flashinfer-python", "triton")
                  if not _has_dist(d, metadata)] + [m for m in ("fastapi", "uvicorn") if util.find_spec(m) is None]
        if absent:
            out["sglang"] = f"sglang {version} is importable but cannot serve (missing {', '.join(absent)})"
    return out


def _has_dist(name, metadata) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def reason_not_run(part: str, why: dict[str, str]) -> str | None:
    reasons = [why[k] for k in ("cuda", "sglang") if k in why and part in (NEEDS_CUDA if k == "cuda" else NEEDS_SGLANG)]
    return "; ".join(reasons) or None


# ----------------------------------------------------------------------------- inputs


def tiny_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").is_file():
        cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            model.model.norm.weight.copy_(torch.rand(256) + 0.5)  # a final norm the probe can tell apart
        model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def padded_request(vocab: int = 512):
    import torch

    from kdcore.engines import HiddenRequest

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (4, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    mask[2, 40:] = 0
    return HiddenRequest(ids, mask, [list(range(0, 47, 3)), list(range(10, 48, 2)), list(range(0, 40)), [5, 47, 9]])


def reference_rows(folder: Path, req, device: str):
    """transformers' final-norm states (``last_hidden_state``) at the requested positions."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    rows = []
    with torch.no_grad():
        for b, pos in enumerate(req.positions):
            keep = req.attention_mask[b].bool()
            ids = req.input_ids[b][keep].unsqueeze(0).to(device)
            h = model.model(input_ids=ids).last_hidden_state[0].float().cpu()
            rank = keep.long().cumsum(-1) - 1
            rows += [h[int(rank[p])] for p in pos]
    return torch.stack(rows), model


def compare(a, b) -> dict:
    import torch

    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    rel = (a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1).clamp_min(1e-6)
    res = {"rows": int(a.shape[0]), "cos_min": float(cos.min()), "rel_l2_mean": float(rel.mean())}
    res["passed"] = res["cos_min"] >= HS_COS_MIN and res["rel_l2_mean"] <= HS_REL_L2_MAX
    return res


# ----------------------------------------------------------------------------- parts


def part_env(ctx) -> dict:
    sys.path.insert(0, str(REPO / "checks" / "gpu"))
    from gpu_check import env_report

    info, problems = env_report("b")
    # a report: what it finds missing decides which parts run (blockers()), not this part's verdict
    return {"info": info, "problems": problems, "passed": True}


def _teacher(ctx, **scfg):
    from kdcore.recipe.loading import SGLangConfig
    from kdcore.engines.sglang.teacher import SGLangTeacher

    cfg = SimpleNamespace(path=str(ctx.folder), dtype="bfloat16", sglang=SGLangConfig(mem_fraction_static=0.2, **scfg))
    return SGLangTeacher(cfg, max_rows=256)


def part_teacher(ctx) -> dict:
    req = padded_request()
    ref, model = reference_rows(ctx.folder, req, "cuda")
    ctx.reference, ctx.model = ref, model
    # one colocated server (memory saver on) for this part, weights and sleep_wake: one start, not three
    eng = ctx.engine = _teacher(ctx, transport="hook", colocate=True).start()
    with eng.hidden_states(req) as h:
        rows = h.float().cpu()
    info = {k: v for k, v in eng.info.items() if k not in ("folder",)}
    res = compare(rows, ref)
    res.update(info=info)
    res["passed"] = res["passed"] and info.get("transport") == "hook"
    return res


def part_weights(ctx) -> dict:
    import torch

    req = padded_request()
    eng = ctx.engine
    with eng.hidden_states(req) as h:
        before = h.float().cpu()
    w = ctx.model.model.norm.weight.detach().clone()
    eng.update_weights({"model.norm.weight": w * 2})  # one session: begin, update, end
    with eng.hidden_states(req) as h:
        after = h.float().cpu()
    eng.update_weights({"model.norm.weight": w})  # back, for sleep_wake
    ratio = float((after.norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-6)).mean())
    return {"norm_ratio_after_x2": ratio, "passed": abs(ratio - 2.0) < 0.05 and torch.isfinite(after).all().item()}


def part_sleep_wake(ctx) -> dict:
    req = padded_request()
    eng = ctx.engine
    with eng.hidden_states(req) as h:
        first = h.float().cpu()
    t0 = time.perf_counter()
    eng.sleep()
    eng.wake()
    cycle = time.perf_counter() - t0
    with eng.hidden_states(req) as h:
        again = h.float().cpu()
    diff = float((again - first).abs().max())
    return {"sleep_wake_s": round(cycle, 2), "max_abs_diff": diff, "passed": diff <= 1e-2}


def part_rollout(ctx) -> dict:
    sys.path.insert(0, str(REPO / "checks" / "gpu"))
    from gpu_check import rollout_check

    return rollout_check(str(ctx.folder), real=False)  # random weights: greedy near-ties reported, not failed


def part_hf_cuda(ctx) -> dict:
    from kdcore.engines.hf import HFTeacher

    req = padded_request()
    with HFTeacher(str(ctx.folder), dtype="float32", device="cuda", max_rows=256) as eng, eng.hidden_states(req) as h:
        gpu = h.float().cpu()
    with HFTeacher(str(ctx.folder), dtype="float32", device="cpu", max_rows=256) as eng, eng.hidden_states(req) as h:
        cpu = h.float().cpu()
    diff = float((gpu - cpu).abs().max())
    return {"max_abs_diff_fp32": diff, "passed": diff <= 1e-3}


def part_device_index(ctx) -> dict:
    import torch

    from kdcore.engines.hf import HFTeacher

    last = torch.cuda.device_count() - 1
    torch.cuda.set_device(last)  # as init_distributed does for LOCAL_RANK=last
    try:
        with HFTeacher(str(ctx.folder), dtype="bfloat16", device="cuda", max_rows=64) as eng:
            child = eng.info.get("device")
            channel = str(eng.channel.data.device)
    finally:
        torch.cuda.set_device(0)
    return {"gpus": last + 1, "child_device": child, "channel_device": channel,
            "passed": child == f"cuda:{last}" == channel}


# ----------------------------------------------------------------------------- main


def dry_run(ctx) -> dict:
    """Everything a real run builds before it touches a GPU: the model folder, the requests,
    every launch command and request body (also checked by the CPU contract tests)."""
    from kdcore.recipe.loading import SGLangConfig
    from kdcore.engines.sglang import server as sg_server
    from kdcore.engines.sglang import teacher as sg_teacher

    req = padded_request()
    batch = sg_teacher.build_prompts(req)
    body = sg_teacher.hidden_request_body(batch, transport="hook", dest="DRY-RUN", slot=0)
    cmds = {}
    for name, scfg, role in (("teacher", SGLangConfig(mem_fraction_static=0.2), "teacher"),
                             ("teacher_colocated", SGLangConfig(colocate=True), "teacher"),
                             ("rollout", SGLangConfig(mem_fraction_static=0.15), "rollout")):
        kw = sg_server.server_kwargs(scfg, model_path=str(ctx.folder), dtype="bfloat16", max_rows=256, port=30000,
                                     role=role)
        cmds[name] = " ".join(sg_server.launch_command(kw)[1:])
    return {"folder": str(ctx.folder), "rows": batch.rows, "prompts": len(batch.prompts),
            "generate_body_keys": sorted(body), "launch": cmds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="checks/gpu/gpu_check_sglang.py")
    ap.add_argument("--out", default=str(REPO / "outputs" / "gpu_check"))
    ap.add_argument("--dry-run", action="store_true", help="build every input, run no part (works without a GPU)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all parts (they stop starting after it)")
    ap.add_argument("--parts", default=",".join(PARTS))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kdflow-gpu-check-sglang-"))
    ctx = SimpleNamespace(folder=tiny_llama(work / "llama"), reference=None, model=None, engine=None)
    why = blockers()
    wanted = [p for p in args.parts.split(",") if p]
    result: dict = {"blockers": why, "parts": {}}
    if args.dry_run:
        result["dry_run"] = dry_run(ctx)
        print(json.dumps(result["dry_run"], indent=1))
    ran, passed, not_run = [], [], []
    current = {"part": None}

    def overrun():  # a hung part: still one line, then out (the machine's 10 minutes are the limit)
        print(f"gpu_check_sglang: TIMEOUT in {current['part']} after {args.budget + 45:.0f} s; ran {', '.join(ran)}; "
              f"passed {', '.join(passed) or 'nothing'}; not run: the rest (time)", flush=True)
        os._exit(1)

    import threading

    watchdog = threading.Timer(args.budget + 45, overrun)
    watchdog.daemon = True
    if not args.dry_run:
        watchdog.start()
    for part in wanted:
        if part == "rollout" and ctx.engine is not None:  # the teacher's server gives its memory back first
            ctx.engine.close()
            ctx.engine = None
        current["part"] = part
        reason = reason_not_run(part, why)
        if args.dry_run and part != "env":
            reason = "dry run" + (f"; and here {reason}" if reason else "")
        if reason is None and part in ("weights", "sleep_wake") and ctx.engine is None:
            reason = "needs the teacher part's server"
        if reason is None and time.perf_counter() - t_start > args.budget:
            reason = f"time budget of {args.budget:.0f} s spent"
        if reason:
            not_run.append((part, reason))
            continue
        t0 = time.perf_counter()
        try:
            res = globals()[f"part_{part}"](ctx)
        except Exception as exc:  # noqa: BLE001 - one part's failure is reported, the others still run
            res = {"passed": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        result["parts"][part] = res
        ran.append(part)
        if res.get("passed"):
            passed.append(part)
        print(f"[{part}] {'PASS' if res.get('passed') else 'FAIL'} {json.dumps(res, default=str)[:600]}", flush=True)
    watchdog.cancel()
    if ctx.engine is not None:
        ctx.engine.close()
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    groups: dict[str, list[str]] = {}
    for part, reason in not_run:
        groups.setdefault(reason, []).append(part)
    result["not_run"] = {", ".join(parts): reason for reason, parts in groups.items()}
    (out / ("gpu_check_sglang_dry_run.json" if args.dry_run else "gpu_check_sglang.json")).write_text(
        json.dumps(result, indent=2, default=str))
    skipped = "; ".join(f"{', '.join(parts)} ({reason})" for reason, parts in groups.items())
    print(f"gpu_check_sglang: ran {', '.join(ran) or 'nothing'}; passed {', '.join(passed) or 'nothing'}; "
          f"not run: {skipped or 'nothing'} [{result['total_s']:.0f} s]")
    if args.dry_run:  # a plan, not a verdict: only a crash building the inputs fails it
        return 0
    if set(ran) - set(passed):
        return 1
    return 2 if not_run else 0


if __name__ == "__main__":
    sys.exit(main())
