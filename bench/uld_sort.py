"""Where ULD's time goes, and what moving the teacher's sort into the teacher process would buy.

    .venv/bin/python -m bench uld_sort                     # the xtok table's shapes, 2 threads
    .venv/bin/python -m bench uld_sort --rows 512 --repeats 7 --top-k 256,1024,4096

ULD (``algorithms/aligners/uld.py``) compares the teacher's and the student's probabilities
sorted in decreasing order. Today both sorts run in the student process, inside the chunked
loss: per chunk of rows, the teacher's logits ``h_t·W_tᵀ``, softmax and sort (no gradient), then
the student's logits, softmax, sort, the L1 distance and the backward pass. The teacher's part
does not depend on the student's weights, so the teacher process could compute it instead and
send the sorted probabilities over the channel (issue 30's candidate). This measures, on the
shapes of ``bench/results.md``'s cross-tokenizer table (teacher V = 49152, H = 512; student
V = 32000, H = 256; 4×128 rows; chunks of 256; fp32), in this one process:

- ``whole``: one step of the loss as it runs now (both parts, forward and backward);
- ``teacher part``: the teacher's logits, softmax and sort alone — the most the student's step
  could lose if the teacher process took it over, and what the teacher process would add;
- ``student part``: the rest, given the teacher's sorted probabilities (what the student's step
  would be);
- the channel bytes per micro-batch now (teacher hidden states, ``N × H_t`` fp32) and with
  sorted probabilities (``N × V_t`` fp32);
- the ``top_k`` option (the partial sort ULD already has: the k largest of each side plus the
  remaining mass): its time and how far its distance and gradient are from the exact ones, on
  random-init shapes (near-uniform distributions: the worst case for a partial sort) and, with
  ``--student FOLDER``, on the quickstart's real SmolLM2 teacher (the PyPI-shipped model) and a
  trained 4-layer student on the held-out data (same vocabulary: only the partial sort's error).

Medians of ``--repeats`` timed steps after one warm-up; the load average is printed (timings
need a quiet machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_ms(fn, repeats: int) -> tuple[float, float, float]:
    fn()  # warm-up: first-touch page faults and one-time kernel choices
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def _teacher_part(h_t, w_t, chunk: int):
    from kdflow_algorithms.aligners.uld import sorted_descending

    with torch.no_grad():
        return [sorted_descending(torch.softmax(h_t[i:i + chunk] @ w_t.T, dim=-1)) for i in range(0, h_t.shape[0], chunk)]


def _student_part(h_s, w_s, teacher_sorted, chunk: int, top_k: int = 0):
    from kdflow_algorithms.aligners.uld import sorted_descending

    total = 0.0
    for j, i in enumerate(range(0, h_s.shape[0], chunk)):
        q = torch.softmax(h_s[i:i + chunk] @ w_s.T, dim=-1)
        ps = teacher_sorted[j]
        if top_k:
            qs = q.topk(top_k, dim=-1).values
            d = (ps[:, :top_k] - qs).abs().sum(-1) + (ps[:, :top_k].sum(-1) - qs.sum(-1)).abs()
        else:
            qs = sorted_descending(q)
            w = min(ps.shape[1], qs.shape[1])
            d = (ps[:, :w] - qs[:, :w]).abs().sum(-1) + ps[:, w:].sum(-1)
        loss = d.sum()
        loss.backward()  # per chunk, as the chunked driver frees each chunk's graph
        total += float(loss.detach())
    return total


def _topk_teacher(h_t, w_t, chunk: int, k: int):
    with torch.no_grad():
        return [torch.softmax(h_t[i:i + chunk] @ w_t.T, dim=-1).topk(k, dim=-1).values
                for i in range(0, h_t.shape[0], chunk)]


def timing(rows: int, repeats: int, chunk: int, top_ks: list[int]) -> list[str]:
    g = torch.Generator().manual_seed(0)
    h_t, w_t = torch.randn(rows, 512, generator=g), torch.randn(49152, 512, generator=g) * 0.02
    h_s = torch.randn(rows, 256, generator=g)
    w_s = (torch.randn(32000, 256, generator=g) * 0.02).requires_grad_()
    h_s.requires_grad_()

    def whole():
        return _student_part(h_s, w_s, _teacher_part(h_t, w_t, chunk), chunk)

    sorted_t = _teacher_part(h_t, w_t, chunk)
    whole_ms = _median_ms(whole, repeats)
    teacher_ms = _median_ms(lambda: _teacher_part(h_t, w_t, chunk), repeats)
    student_ms = _median_ms(lambda: _student_part(h_s, w_s, sorted_t, chunk), repeats)
    lines = [f"| whole loss step (now) | {whole_ms[0]:.0f} ({whole_ms[1]:.0f}–{whole_ms[2]:.0f}) | 1.00× |",
             f"| teacher part (logits, softmax, sort) | {teacher_ms[0]:.0f} ({teacher_ms[1]:.0f}–{teacher_ms[2]:.0f}) "
             f"| {teacher_ms[0] / whole_ms[0]:.2f}× |",
             f"| student part, given sorted teacher probabilities | {student_ms[0]:.0f} "
             f"({student_ms[1]:.0f}–{student_ms[2]:.0f}) | {student_ms[0] / whole_ms[0]:.2f}× |"]
    for k in top_ks:
        ms = _median_ms(lambda k=k: _student_part(h_s, w_s, _topk_teacher(h_t, w_t, chunk, k), chunk, top_k=k), repeats)
        lines.append(f"| whole loss step, top_k={k} | {ms[0]:.0f} ({ms[1]:.0f}–{ms[2]:.0f}) | {ms[0] / whole_ms[0]:.2f}× |")
    return lines


def topk_error(top_ks: list[int], rows: int, student: str) -> list[str]:
    """Relative error of the top-k distance and cosine of its gradient vs the exact ones, on the
    random bench shapes and on the quickstart's real models (held-out rows)."""
    from kdflow_algorithms.aligners.uld import uld_distance

    cases = []
    g = torch.Generator().manual_seed(0)
    cases.append(("random-init bench shapes (V 49152 vs 32000)", torch.randn(rows, 49152, generator=g) * 0.4,
                  torch.randn(rows, 32000, generator=g) * 0.4))
    real = _real_logits(rows, student)
    if real is not None:
        cases.append(("SmolLM2-135M teacher vs a trained 4-layer student (--student), held-out text", *real))
    out = []
    for name, zt, zs in cases:
        zs = zs.clone().requires_grad_()
        exact = uld_distance(zs, zt).mean()
        (g_exact,) = torch.autograd.grad(exact, zs)
        for k in top_ks:
            approx = uld_distance(zs, zt, top_k=k).mean()
            (g_k,) = torch.autograd.grad(approx, zs)
            cos = torch.nn.functional.cosine_similarity(g_exact.flatten(), g_k.flatten(), dim=0)
            out.append(f"| {name} | {k} | {float(exact):.4f} | {float(approx):.4f} | "
                       f"{abs(float(approx) - float(exact)) / float(exact):.2%} | {float(cos):.4f} |")
    return out


def _real_logits(rows: int, student: str):
    """The quickstart teacher's and ``student``'s (a folder, e.g. the quality benchmark's warm
    start export) logits on the first ``rows`` tokens of the held-out data; None without a student."""
    if not student:
        return None
    import json

    from transformers import AutoTokenizer

    from kdcore.modeling.models import load_causal_lm
    from kdcore.recipe.loading import load_recipe

    cfg = load_recipe("quickstart")
    tok = AutoTokenizer.from_pretrained(student)
    ids: list[int] = []
    for line in open(cfg.data.eval):
        if line.strip():
            row = json.loads(line)
            ids += tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        if len(ids) >= rows:
            break
    x = torch.tensor([ids[:rows]])
    with torch.no_grad():
        return (load_causal_lm(cfg.teacher.path)(x).logits[0].float(),
                load_causal_lm(student)(x).logits[0].float())


def main(argv=None) -> int:
    import os

    p = argparse.ArgumentParser(prog="python -m bench uld_sort", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512, help="loss rows per step (4×128 in the xtok table)")
    p.add_argument("--chunk", type=int, default=256, help="rows per chunk (the recipes' distill.chunk_size)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="the benchmark tables' budget")
    p.add_argument("--top-k", default="256,1024,4096", help="partial sorts to measure (comma-separated)")
    p.add_argument("--student", default="", help="a trained quickstart student's folder (e.g. the quality "
                   "benchmark's warm start, <warm-dir>/warm-seed0-*/hf): the partial sort's error on real distributions")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    top_ks = [int(k) for k in args.top_k.split(",") if k]
    load0 = os.getloadavg()
    print(f"# ULD: where the time goes ({args.rows} rows, chunks of {args.chunk}, {args.threads} threads, "
          f"load {load0[0]:.1f})\n")
    print("| part | ms per step, median (min–max) | ÷ whole |\n|:---|---:|---:|")
    print("\n".join(timing(args.rows, args.repeats, args.chunk, top_ks)))
    mb_hidden, mb_sorted = args.rows * 512 * 4 / 1e6, args.rows * 49152 * 4 / 1e6
    print(f"\nChannel per micro-batch: teacher hidden states {mb_hidden:.1f} MB now; sorted teacher probabilities "
          f"{mb_sorted:.1f} MB fp32 ({mb_sorted / 2:.1f} MB bf16).\n")
    print("| distributions | top_k | exact ULD | top-k ULD | relative error | gradient cosine |\n"
          "|:---|---:|---:|---:|---:|---:|")
    print("\n".join(topk_error(top_ks, args.rows, args.student)))
    print(f"\nload at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
