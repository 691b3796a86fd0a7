"""The trainer's colocated schedule (``teacher.sglang.colocate``), exercised on CPU with the hf engine.

On CPU the hf engine's ``sleep()`` frees nothing but refuses every request until ``wake()``, so
a run that touched the teacher outside a teacher phase would fail. The colocated schedule
(one phase per step: every micro-batch computed and read, then the teacher sleeps while the
student trains) must give exactly the losses of the pipelined one. The SGLang server side of
colocation (memory release/resume) needs a GPU and is not run here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from helpers.train import evals, run_train, train_steps, write_recipe

SCRIPT = textwrap.dedent('''
    import json, sys, types
    import kdcore
    from kdcore.training import trainer as T
    from kdcore.engines.hf.spec import HFEngine


    class ColocatedHF(HFEngine):
        """The hf engine flagged colocated: the sglang engine's switch, on CPU."""

        roles = ("teacher",)

        def create_teacher(self, teacher_cfg, *, max_rows, threads=None, micro_batches_per_step=1, **kwargs):
            engine = super().create_teacher(teacher_cfg, max_rows=max_rows, threads=threads,
                                            n_slots=max(2, micro_batches_per_step), **kwargs)
            engine.colocated = True
            engine.offloads_optimizer = True
            return engine


    def register_engines(register):
        register("hf_colocated", ColocatedHF())


    if __name__ == "__main__":  # the teacher process is spawned: this must not rerun there
        kdcore.register_plugin(types.SimpleNamespace(register_engines=kdcore.hookimpl(register_engines)), "coloc")
        cfg = kdcore.load_recipe(sys.argv[1], ["teacher.engine=hf_colocated"])
        t = T.Trainer(cfg)
        t.run()
        json.dump({"phases": t.schedule.colocation.phases, "slots": t.schedule.colocation.engine.n_slots}, open(sys.argv[2], "w"))
''')


def test_colocated_schedule_matches_the_pipelined_one(tmp_path, tiny_teacher):
    sections = dict(train={"max_steps": 3, "micro_batch_size": 2, "grad_accum": 3, "eval_every": 2, "threads": 1},
                    teacher={"threads": 1}, checkpoint={"export_hf": False})
    piped = write_recipe(tmp_path / "piped", tiny_teacher, **sections)
    coloc = write_recipe(tmp_path / "coloc", tiny_teacher, **sections)
    res = run_train(piped)
    assert res.returncode == 0, res.stderr[-3000:]
    script = tmp_path / "coloc.py"
    script.write_text(SCRIPT)
    out = tmp_path / "coloc.json"
    proc = subprocess.run([sys.executable, str(script), str(coloc), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = train_steps(tmp_path / "piped" / "out"), train_steps(tmp_path / "coloc" / "out")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6, abs=0)
    ev = evals(tmp_path / "coloc" / "out")
    assert [e["eval_teacher_kl"] for e in evals(tmp_path / "piped" / "out")] == pytest.approx(
        [e["eval_teacher_kl"] for e in ev], rel=1e-6)
    info = json.loads(out.read_text())
    # one phase per step and one per evaluation (before training, at step 2, at the end)
    assert info["phases"] == 3 + len(ev) and len(ev) == 3
    assert info["slots"] == 3  # a whole step (grad_accum micro-batches) fits before the teacher sleeps
