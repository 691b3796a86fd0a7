"""The embedded hf teacher engine: a real spawned transformers process on a tiny Llama."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kdcore.infra.channel import ChannelError, ChannelTimeout, TeacherDiedError, pid_alive
from kdcore.infra.distributed import default_threads
from kdcore.engines import HiddenRequest, TeacherError
from kdcore.engines.hf import HFTeacher
from helpers.teacher_hf import HIDDEN, VOCAB, check_update_weights, make_batch, model_dir, ref_hidden, reference


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = HFTeacher(str(model_dir), threads=1, max_rows=64, n_slots=2).start()
    yield eng
    pid = eng.pid
    eng.close()
    assert not pid_alive(pid)  # closed means gone, not a zombie


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_hidden_states_at_requested_positions_match_a_reference_forward(engine, reference, left):
    lengths, L = [9, 5, 12], 12
    ids, mask, seqs = make_batch(lengths, L, left=left, seed=int(left))
    want = [[0, 4, 8, 2], [4, 1], [11, 0, 5]]  # per sample, in sequence coordinates, any order
    shift = [L - n if left else 0 for n in lengths]
    positions = [[p + s for p in ps] for ps, s in zip(want, shift)]
    with engine.hidden_states(HiddenRequest(ids, mask, positions)) as h:
        assert h.shape == (9, HIDDEN) and h.dtype == torch.float32
        expected = torch.cat([ref_hidden(reference, s)[ps] for s, ps in zip(seqs, want)])
        # independent unpadded forwards: same math, other matmul shapes (fp32 rounding only)
        torch.testing.assert_close(h, expected, rtol=0, atol=1e-5)
        # the same padded batch in-process: identical up to thread-count reduction order
        pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            full = reference.get_decoder()(input_ids=ids.clamp(min=0), attention_mask=mask,
                                           position_ids=pos_ids).last_hidden_state
        same = torch.cat([full[b, p] for b, p in enumerate(positions)])
        torch.testing.assert_close(h, same, rtol=0, atol=1e-6)


def test_views_are_the_channel_slots_themselves(engine):
    ids, mask, _ = make_batch([6, 6], 6)
    req = HiddenRequest(ids, mask, [[1, 2], [3]])
    ptrs = []
    for _ in range(4):
        t = engine.submit(req)
        h = engine.result(t)
        slot = engine.channel.slot_of(t.seq)
        assert h.data_ptr() == engine.channel.slot_tensor(slot).data_ptr()
        assert h.untyped_storage().data_ptr() == engine.channel.data.untyped_storage().data_ptr()
        assert engine.result(t).data_ptr() == h.data_ptr()  # reading again: same memory, no wait
        ptrs.append((slot, h.data_ptr()))
        engine.release(t)
    assert ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3] and ptrs[0] != ptrs[1]


def test_two_tickets_in_flight_while_the_student_holds_one(engine, reference):
    ids0, mask0, seqs0 = make_batch([7], 7, seed=10)
    ids1, mask1, seqs1 = make_batch([5], 5, seed=11)
    ids2, mask2, seqs2 = make_batch([8], 8, seed=12)
    t0 = engine.submit(HiddenRequest(ids0, mask0, [[6]]))
    h0 = engine.result(t0)
    t1 = engine.submit(HiddenRequest(ids1, mask1, [[0, 4]]))  # batch k+1 while we hold batch k
    with pytest.raises(ChannelError, match="2 requests already in flight"):
        engine.submit(HiddenRequest(ids2, mask2, [[0]]))
    h1 = engine.result(t1)  # completes without releasing t0: the teacher did not wait for us
    torch.testing.assert_close(h0, ref_hidden(reference, seqs0[0])[[6]], rtol=0, atol=1e-5)
    torch.testing.assert_close(h1, ref_hidden(reference, seqs1[0])[[0, 4]], rtol=0, atol=1e-5)
    engine.release(t0)
    t2 = engine.submit(HiddenRequest(ids2, mask2, [[7, 3, 0]]))
    h2 = engine.result(t2)
    torch.testing.assert_close(h2, ref_hidden(reference, seqs2[0])[[7, 3, 0]], rtol=0, atol=1e-5)
    torch.testing.assert_close(h1, ref_hidden(reference, seqs1[0])[[0, 4]], rtol=0, atol=1e-5)  # untouched
    engine.release(t1)
    engine.release(t2)
    with pytest.raises(ChannelError, match="not outstanding"):
        engine.release(t2)


def test_bad_requests_are_refused_in_the_parent_and_the_engine_keeps_working(engine, reference):
    ids, mask, seqs = make_batch([4, 2], 4)
    cases = [
        (HiddenRequest(ids, mask, [[1], [3]]), "sample 1: position 3 is padding"),
        (HiddenRequest(ids, mask, [[4], []]), "position 4 outside the sequence length 4"),
        (HiddenRequest(ids, mask, [[1]]), "1 entries for a batch of 2"),
        (HiddenRequest(ids.float(), mask, [[1], [0]]), "integer token ids"),
        (HiddenRequest(ids.masked_fill(mask.bool() & (ids > 50), VOCAB + 5), mask, [[1], [0]]),
         f"token id {VOCAB + 5} is outside the teacher's vocabulary"),
        (HiddenRequest(torch.zeros((1, 80), dtype=torch.long), torch.ones((1, 80)), [list(range(70))]),
         "70 hidden-state rows but channel slots hold 64"),
    ]
    if not bool((ids[mask.bool()] > 50).any()):
        cases.pop(4)
    for req, msg in cases:
        with pytest.raises(TeacherError, match=msg):
            engine.submit(req)
    with engine.hidden_states(HiddenRequest(ids, mask, [[3], [1]])) as h:
        torch.testing.assert_close(h[0], ref_hidden(reference, seqs[0])[3], rtol=0, atol=1e-5)


def test_greedy_generation_matches_in_process_generate(engine, reference):
    ids, mask, seqs = make_batch([5, 3], 5, seed=3)  # right-padded prompts: the engine re-pads left
    got = engine.generate(ids, mask, max_new_tokens=6, do_sample=False)
    for s, new in zip(seqs, got):
        with torch.no_grad():
            out = reference.generate(input_ids=s[None], attention_mask=torch.ones_like(s)[None],
                                     max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
        ref = out[0, len(s):].tolist()
        if 2 in ref:
            ref = ref[:ref.index(2) + 1]
        assert new == ref
    a = engine.generate(ids, mask, max_new_tokens=5, do_sample=True, seed=7)
    b = engine.generate(ids, mask, max_new_tokens=5, do_sample=True, seed=7)
    assert a == b and all(len(x) <= 5 for x in a)


def test_update_weights_changes_the_teacher_and_rejects_unknown_names(engine, reference):
    check_update_weights(engine, reference)


def test_sleep_refuses_work_until_wake_and_lm_head_is_the_checkpoints(engine, reference):
    ids, mask, _ = make_batch([3], 3)
    engine.sleep()
    with pytest.raises(TeacherError, match="asleep"):
        engine.submit(HiddenRequest(ids, mask, [[0]]))
    engine.wake()
    engine.hidden_states(HiddenRequest(ids, mask, [[0]])).release()
    head = engine.lm_head()
    assert head.shape == (VOCAB, HIDDEN) and torch.equal(head, reference.lm_head.weight)
    assert engine.lm_head("bfloat16").dtype == torch.bfloat16


def test_child_runs_with_its_own_threads_and_allocator_settings(engine):
    assert engine.info["threads"] == 1 and engine.info["hidden_size"] == HIDDEN
    env = dict(kv.split("=", 1) for kv in open(f"/proc/{engine.pid}/environ").read().split("\0") if "=" in kv)
    assert env["MALLOC_MMAP_MAX_"] == "0" and env["MALLOC_TRIM_THRESHOLD_"] == "68719476736"
    assert env["OMP_NUM_THREADS"] == "1" and env["TQDM_DISABLE"] == "1"
    # workers sleep while waiting (they share the cores with the student) unless the user chose
    assert env["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    assert os.environ.get("TQDM_DISABLE") != "1" or "TQDM_DISABLE" in os.environ  # parent untouched


def test_default_threads_are_all_of_a_ranks_cores(model_dir, monkeypatch):
    """One thread policy for teacher and student: every core of the rank (split across local ranks)."""
    cores = len(os.sched_getaffinity(0))
    assert default_threads(1) == cores and default_threads(cores * 2) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert HFTeacher(str(model_dir), threads=None).threads == cores  # built, not started: no process
    assert HFTeacher(str(model_dir), threads=3).threads == 3


def test_hung_then_killed_teacher_raises_clear_errors_and_the_exception_closes_it(model_dir):
    ids, mask, _ = make_batch([4], 4)
    req = HiddenRequest(ids, mask, [[0]])
    with pytest.raises(TeacherDiedError, match="killed by SIGKILL") as died:
        with HFTeacher(str(model_dir), threads=1, max_rows=64, progress_timeout=1.0) as eng:
            eng.hidden_states(req).release()
            pid = eng.pid
            os.kill(pid, signal.SIGSTOP)  # alive but making no progress
            t = eng.submit(req)
            t0 = time.monotonic()
            with pytest.raises(ChannelTimeout, match="no progress"):
                eng.result(t)
            assert time.monotonic() - t0 < 5
            os.kill(pid, signal.SIGKILL)  # e.g. the OOM killer, while the request is pending
            t0 = time.monotonic()
            try:
                eng.result(t)  # raises, and the error leaves the with-block
            finally:
                assert time.monotonic() - t0 < 5
    assert f"pid {pid}" in str(died.value)
    assert not pid_alive(pid)  # closed on the way out: reaped, no zombie
    with pytest.raises(TeacherError, match="closed"):
        eng.submit(req)


def test_an_exception_in_the_child_reaches_the_parent(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + b"\0" * 64)
    eng = HFTeacher(str(broken), threads=1, max_rows=8)
    t0 = time.monotonic()
    eng.start(wait=False)  # returns while the child loads
    assert eng.pid is not None and not eng.info
    with pytest.raises(TeacherDiedError, match=r"(exited with code 1|failed):[\s\S]*Traceback[\s\S]*(afetensor|header|deserializ)"):
        eng.wait_ready()
    assert time.monotonic() - t0 < 60
    assert eng.pid is not None and not pid_alive(eng.pid)


def test_no_orphan_teacher_after_its_parent_is_killed(model_dir):
    script = textwrap.dedent(f"""
        import time
        from kdcore.engines.hf import HFTeacher
        if __name__ == "__main__":
            t = HFTeacher({str(model_dir)!r}, threads=1, max_rows=8).start()
            print("running", t.pid, flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        second = proc.stdout.readline().split()
        assert second[0] == "running", second
        child = int(second[1])
        assert pid_alive(child)
        proc.kill()  # SIGKILL: no atexit, no finally in the parent
        proc.wait(10)
        deadline = time.monotonic() + 10
        while pid_alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(child), "teacher outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
