"""What each of kdflow's two processes holds, phase by phase, in one real ``kdcore train`` run.

``python -m bench memory_breakdown [--pair bench|real] [--seq-len 128] [--batch 4] [--on-policy] [-o overrides...]``

The run is the bench recipe of ``bench/sides/kdflow.py`` (the off-policy table's), trained in
this process through ``kdcore.commands.cli`` with the trainer's own methods wrapped by probes. At each
phase boundary a probe reads both processes' ``VmRSS`` and resets their ``VmHWM`` (writing 5 to
``/proc/PID/clear_refs``, Linux ≥ 4.0), so each phase's peak is its own: no sampling, no
guessing, and the load of the machine does not change a byte of it. The teacher process is
read from outside through its pid. Tensor sizes (weights, gradients, optimizer state, the
teacher head, the channel) are counted from the tensors themselves and printed beside the RSS
figures: the RSS deltas include the allocator's and libraries' own overheads, the tensor bytes
do not.

Phases (student process): ``runtime`` = RSS when the Trainer starts (interpreter, torch,
transformers, kdcore); ``data``; ``student weights`` (build_student); ``teacher head``
(setup_heads); ``wrap + optimizer`` (Student.from_recipe); ``teachers start`` (the channel);
``step 1`` forward/backward (activations and gradients: peak above the RSS before it) and
``optimizer step 1`` (AdamW's state appears); the other steps; the final ``evaluate`` and
``checkpoint``. Teacher process: RSS once loaded (runtime + weights), its peak during the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MB = 1024 * 1024


def _status(pid: int | str = "self") -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_peak(pid: int | str = "self") -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def resident_frames(pid: int | str) -> dict[str, "object"]:
    """The physical frames a process has resident, by kind of mapping (``libraries`` = shared
    objects, ``other files`` = any other file-backed mapping, ``shared memory`` = /dev/shm and
    memfd, ``private`` = anonymous memory, heap and stack), read from ``/proc/PID/pagemap``.
    Empty when the frames cannot be read: frame numbers need root, and a process that exits
    while being read gives nothing rather than a partial count."""
    import numpy as np

    kinds: dict[str, list] = {"libraries": [], "other files": [], "shared memory": [], "private": []}
    page = os.sysconf("SC_PAGE_SIZE")
    chunk = 1 << 20  # pagemap entries per read (8 MB): a large reserved range is read in pieces
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, end = (int(x, 16) // page for x in fields[0].split("-"))
                name = fields[5] if len(fields) > 5 else ""
                if name.startswith(("[vsyscall", "[vvar", "[vdso")):
                    continue  # the kernel's own pages, mapped into every process alike
                kind = ("shared memory" if name.startswith(("/dev/shm", "/memfd:")) else
                        "libraries" if name.startswith("/") and ".so" in name else
                        "other files" if name.startswith("/") else "private")
                for first in range(start, end, chunk):
                    count = min(chunk, end - first)
                    pagemap.seek(first * 8)
                    raw = pagemap.read(count * 8)
                    if len(raw) != count * 8:
                        return {}  # the process went away mid-read
                    entries = np.frombuffer(raw, dtype=np.uint64)
                    present = entries[(entries >> np.uint64(63)) & np.uint64(1) == 1]
                    frames = present & np.uint64((1 << 55) - 1)
                    if frames.size and not frames.any():
                        return {}  # frame numbers hidden (not root): nothing can be matched
                    kinds[kind].append(frames)
    except OSError:
        return {}
    return {k: np.unique(np.concatenate(v)) if v else np.empty(0, np.uint64) for k, v in kinds.items()}


def shared_between(pid_a: int | str, pid_b: int) -> dict[str, int]:
    """Bytes resident in both processes at once (the same physical frames), by kind of mapping:
    what a sum of the two processes' RSS counts twice."""
    import numpy as np

    a, b = resident_frames(pid_a), resident_frames(pid_b)
    if not a or not b:
        return {}
    page = os.sysconf("SC_PAGE_SIZE")
    every_b = np.concatenate(list(b.values()))
    return {k: int(np.intersect1d(v, every_b).size) * page for k, v in a.items()}


class Probe:
    """Phase records for this process and the teacher child."""

    def __init__(self):
        self.rows: list[dict] = []
        self.teacher_pid: int | None = None
        self.phase, self.before, self.t_before = None, {}, {}

    def begin(self, name: str) -> None:
        self.phase = name
        self.before = _status()
        _reset_peak()
        if self.teacher_pid:
            self.t_before = _status(self.teacher_pid)
            _reset_peak(self.teacher_pid)

    def end(self, **extra) -> None:
        now = _status()
        row = {"phase": self.phase, "rss_before": self.before.get("VmRSS", 0), "rss_after": now.get("VmRSS", 0),
               "peak": now.get("VmHWM", 0), "anon_after": now.get("RssAnon", 0), "shmem_after": now.get("RssShmem", 0),
               **extra}
        if self.teacher_pid:
            t = _status(self.teacher_pid)
            row.update(t_rss_before=self.t_before.get("VmRSS", 0), t_rss_after=t.get("VmRSS", 0),
                       t_peak=t.get("VmHWM", 0), t_shmem=t.get("RssShmem", 0))
        self.rows.append(row)

    def wrap(self, obj, name: str, label, extra=None, after=None):
        """``extra(args, out)``: figures for the phase's row, taken before its memory is read;
        ``after(row)``: measurements that allocate, added once the row's figures are read."""
        fn = getattr(obj, name)

        def wrapped(*a, **kw):
            self.begin(label() if callable(label) else label)
            out = fn(*a, **kw)
            self.end(**(extra(a, out) if extra else {}))
            if after:
                after(self.rows[-1])
            return out

        setattr(obj, name, wrapped)


def tensor_bytes(ts) -> int:
    seen, total = set(), 0
    for t in ts:
        if t is None:
            continue
        if hasattr(t, "to_local"):  # an FSDP2 DTensor: this rank's shard is what it holds
            t = t.to_local()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def install(probe: Probe) -> None:
    import torch

    from kdcore.modeling import student as kstudent
    from kdcore.training import run_parts, trainer

    T = trainer.Trainer
    probe.wrap(run_parts.RunParts, "from_recipe", "tokenizers, aligners")
    probe.wrap(T, "_data", "data")
    probe.wrap(kstudent, "build_student", "student weights",
               lambda a, m: {"bytes": tensor_bytes(m.parameters()) + tensor_bytes(m.buffers())})
    probe.wrap(run_parts.RunParts, "setup_heads", "teacher head",
               lambda a, out: {"bytes": tensor_bytes(p.head for p in a[0].teachers)})
    probe.wrap(kstudent.Student, "from_recipe", "wrap + optimizer")

    def started(a, out):
        self = a[0]
        engine = self.parts[0].engine
        probe.teacher_pid = getattr(engine, "pid", None)
        ch = getattr(engine, "channel", None)
        return {"bytes": ch.nbytes if ch is not None and hasattr(ch, "nbytes") else None}
    probe.wrap(T, "_start_teachers", "teachers start", started)
    n = {"mb": 0, "step": 0}

    def mb_label():
        n["mb"] += 1
        return f"step {n['mb']} forward+backward"

    def grads(a, out):
        model = a[0].student.model
        return {"bytes": tensor_bytes(p.grad for p in model.parameters())}
    probe.wrap(T, "train_micro_batch", mb_label, grads)

    def st_label():
        n["step"] += 1
        return f"step {n['step']} optimizer"

    def opt_state(a, out):
        opt = a[0].student.optimizer
        return {"bytes": tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))}
    probe.wrap(T, "finish_step", st_label, opt_state)
    probe.wrap(T, "evaluate", "evaluate")
    from kdcore.training import sampler

    probe.wrap(sampler.RolloutSampler, "sample_student", "sampling (rollout engine and its copy of the weights)")
    from kdcore.training import checkpointing

    def count_shared(row):  # the frame tables this builds stay out of the checkpoint row's figures
        if probe.teacher_pid:
            row["shared"] = shared_between("self", probe.teacher_pid)
    probe.wrap(checkpointing.Checkpointer, "save", "checkpoint", after=count_shared)

    # the teacher's own RSS once loaded: read when the first request is answered
    from kdcore.engines.hf import teacher as hf

    orig_ready = hf.HFTeacher.wait_ready

    def wait_ready(self):
        out = orig_ready(self)
        probe.teacher_loaded = _status(self.pid)
        return out
    hf.HFTeacher.wait_ready = wait_ready


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", choices=("bench", "real"), default="bench")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--on-policy", action="store_true", help="the on-policy table's recipe (prompts of --seq-len/2 "
                   "tokens, as many new tokens sampled by the student every step)")
    p.add_argument("-o", "--override", action="append", default=[], help="recipe dotlist override (repeatable)")
    p.add_argument("--json", help="write the records here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `kdcore train` sets it before torch loads
    import yaml

    from bench import models
    from bench.sides.kdflow import recipe_dict

    names = {"bench": ("student", "teacher"), "real": ("smollm2-student-576x4", "smollm2-135m")}[args.pair]
    s, t = (str(models.ensure_model(x)) for x in names)
    data = str(models.ensure_data(models.tokenizer_folder(), args.seq_len, max(32, args.batch * args.steps)))
    probe = Probe()
    probe.teacher_loaded = {}
    install(probe)
    from kdcore.commands import cli

    with tempfile.TemporaryDirectory(prefix="kdflow-mem-") as tmp:
        recipe = recipe_dict(s, t, data, args.seq_len, args.batch, args.steps, str(Path(tmp) / "out"))
        if args.on_policy:  # as bench.sides.kdflow.run_onpolicy: prompt rows, the student samples every step
            from bench.sides.kdflow import onpolicy_recipe, prompt_data

            half = args.seq_len // 2
            pdata = prompt_data(s, data, half, half, max(32, args.batch * args.steps), Path(tmp) / "prompts.jsonl")
            recipe = onpolicy_recipe(recipe, str(pdata), half, half)
        path = Path(tmp) / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        runtime = _status()
        t0 = time.perf_counter()
        rc = cli.main(["train", str(path), *args.override])
        wall = time.perf_counter() - t0
    out = {"pair": args.pair, "batch": args.batch, "seq_len": args.seq_len, "overrides": args.override, "rc": rc,
           "runtime": runtime, "teacher_loaded": probe.teacher_loaded, "phases": probe.rows, "wall_s": wall}
    print(render(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if not rc else 1


def render(out: dict) -> str:
    f = lambda b: "—" if b is None else f"{b / MB:.0f}"  # noqa: E731
    lines = [f"pair {out['pair']} {out['batch']}×{out['seq_len']} {' '.join(out['overrides'])}",
             f"student process runtime (imports, before the Trainer): RSS {f(out['runtime'].get('VmRSS'))} MB",
             f"teacher process once loaded: RSS {f(out['teacher_loaded'].get('VmRSS'))} MB "
             f"(peak while loading {f(out['teacher_loaded'].get('VmHWM'))} MB)",
             "| phase | student RSS before → after MB | student peak in phase MB | tensors MB | teacher RSS → MB | "
             "teacher peak MB |", "|:---|---:|---:|---:|---:|---:|"]
    for r in out["phases"]:
        lines.append(f"| {r['phase']} | {f(r['rss_before'])} → {f(r['rss_after'])} | {f(r['peak'])} | "
                     f"{f(r.get('bytes'))} | {f(r.get('t_rss_after')) if 't_rss_after' in r else '—'} | "
                     f"{f(r.get('t_peak')) if 't_peak' in r else '—'} |")
    shared = next((r["shared"] for r in reversed(out["phases"]) if r.get("shared")), None)
    if shared:
        lines.append(f"resident in both processes at the end (counted in each one's RSS): {f(sum(shared.values()))} MB "
                     "(" + ", ".join(f"{k} {f(v)}" for k, v in shared.items()) + ")")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
