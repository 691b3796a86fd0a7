"""The ``cache`` teacher engine end to end: `kdcore cache-teacher` builds a folder once from the
live teacher, `kdcore train teacher.engine=cache` reads it (tiny models, real tokenizers, real
data). Covers exactness (an fp32 cache trains to the digit like the live engine), the
manifest checks (each mismatch named), resuming an interrupted build (same bytes), every
aligner, two epochs, the refusals of what needs a live teacher, and damaged shards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.assets import ROOT, save_tiny_llama
from helpers.train import KDCORE, run_train, train_steps, write_recipe
from helpers.xtok import MISTRAL_V1, xtok_recipe
from helpers.teacher_cache import build, cached


def losses(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("kd_loss"), r.get("eval_kd"), r.get("eval_teacher_kl")) for r in rows]


@pytest.fixture(scope="module")
def fp32_cache(tmp_path_factory, tiny_teacher):
    """The default tiny recipe (same tokenizer, same_vocab) and its fp32 cache."""
    tmp = tmp_path_factory.mktemp("cache_fp32")
    recipe = write_recipe(tmp, tiny_teacher, train={"max_steps": 3}, checkpoint={"every": 0, "export_hf": False})
    res = build(recipe, tmp / "cache", "--dtype", "float32")
    assert res.returncode == 0, res.stderr[-3000:]
    return recipe, tmp / "cache", res.stdout


def test_build_writes_verified_shards_and_a_complete_manifest(fp32_cache):
    recipe, cache, stdout = fp32_cache
    m = json.loads((cache / "manifest.json").read_text())
    assert m["complete"] and m["dtype"] == "float32" and m["hidden_size"] == 64
    assert len(m["shards"]) > 2, "the small shard size must spread the cache over several shards"
    import hashlib

    from safetensors import safe_open

    samples = rows = 0
    for s in m["shards"]:
        path = cache / s["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"] and path.stat().st_size == s["bytes"]
        with safe_open(str(path), "pt") as f:
            h, offsets = f.get_tensor("hidden"), f.get_tensor("offsets")
            assert h.shape == (s["rows"], 64) and offsets.diff().tolist() == s["rows_per_sample"]
        samples += s["samples"]
        rows += s["rows"]
    # 48 training rows (data.limit) and the 64-row eval file, one entry each
    assert samples == 48 + 64
    assert f"{samples} samples, {rows} teacher rows" in stdout and "verified" in stdout
    assert {"teacher tokenizer", "student tokenizer", "data"} <= set(m["fingerprints"])
    assert m["identity"]["data.max_length"] == 64 and m["aligner"]["name"] == "same_vocab"
    assert not list(cache.glob("*.tmp"))


def test_fp32_cache_trains_to_the_digit_like_the_live_teacher(fp32_cache, tmp_path):
    recipe, cache, _ = fp32_cache
    live = run_train(recipe, f"train.output_dir={tmp_path / 'live'}")
    assert live.returncode == 0, live.stderr[-3000:]
    res = run_train(recipe, f"train.output_dir={tmp_path / 'cache'}", *cached(cache))
    assert res.returncode == 0, res.stderr[-3000:]
    assert losses(tmp_path / "cache") == losses(tmp_path / "live")
    assert len(train_steps(tmp_path / "cache")) == 3


@pytest.mark.long  # kept out of the default command (README, Tests)
def test_two_epochs_and_resume_from_the_cache(fp32_cache, tmp_path):
    """48 samples / 8 per step = 6 steps an epoch: 8 steps go into the second epoch; a run
    killed after its step-4 checkpoint and resumed ends bit for bit like the unbroken one."""
    recipe, cache, _ = fp32_cache
    out = tmp_path / "out"
    common = [f"train.output_dir={out}", *cached(cache), "train.micro_batch_size=8", "train.max_steps=8",
              "checkpoint.every=4", "checkpoint.keep=3"]
    whole = run_train(recipe, *common)
    assert whole.returncode == 0, whole.stderr[-3000:]
    unbroken = {r["step"]: r["loss"] for r in train_steps(out)}
    assert sorted(unbroken) == list(range(1, 9))
    shutil.rmtree(out / "checkpoints" / "step_8")
    (out / "metrics.jsonl").unlink()
    rest = run_train(recipe, *common, resume=True)
    assert rest.returncode == 0, rest.stderr[-3000:]
    resumed = {r["step"]: r["loss"] for r in train_steps(out)}
    assert resumed == {s: unbroken[s] for s in range(5, 9)}


@pytest.mark.long  # kept out of the default command (README, Tests)
def test_interrupted_build_keeps_its_shards_and_ends_identical(fp32_cache, tmp_path):
    recipe, cache, _ = fp32_cache
    m = json.loads((cache / "manifest.json").read_text())
    part = tmp_path / "part"
    part.mkdir()
    # what a build killed while writing its second shard leaves: the first shard recorded,
    # the second half-written under its temporary name, and one unrecorded stray
    shutil.copy(cache / m["shards"][0]["file"], part)
    (part / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")
    (part / "shard-00002.safetensors").write_bytes((cache / m["shards"][2]["file"]).read_bytes()[:100])
    (part / "manifest.json").write_text(json.dumps(dict(m, complete=False, shards=m["shards"][:1])))
    res = build(recipe, part, "--dtype", "float32")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"({len(m['shards']) - 1} built now)" in res.stdout
    assert sorted(p.name for p in part.iterdir()) == sorted(p.name for p in cache.iterdir())
    for s in m["shards"]:
        assert (part / s["file"]).read_bytes() == (cache / s["file"]).read_bytes(), s["file"]
    assert json.loads((part / "manifest.json").read_text()) == m
    again = build(recipe, part, "--dtype", "float32")  # complete: verified, nothing rebuilt
    assert again.returncode == 0 and "(0 built now)" in again.stdout
    other = build(recipe, part, "--dtype", "bfloat16")
    assert other.returncode == 1 and "holds a cache built with other settings (dtype)" in other.stderr


def test_manifest_mismatches_are_named(fp32_cache, tmp_path, smollm2_tokenizer):
    from kdcore.recipe.loading import load_raw, validate_raw

    recipe, cache, _ = fp32_cache

    def problems(*overrides):
        _, raw = load_raw(str(recipe), [*cached(cache), *overrides])
        return validate_raw(raw)

    assert problems() == []
    assert problems("data.max_length=32") == ["teacher.cache: built for data.max_length 64, the recipe has 32"]
    assert problems("data.limit=40") == ["teacher.cache: built for data.limit 48, the recipe has 40"]
    assert problems("distill.aligner=overlap") == [
        "teacher.cache: built for distill.aligner 'same_vocab', the recipe has 'overlap'"]
    other = save_tiny_llama(tmp_path / "other_teacher", smollm2_tokenizer, hidden=64, layers=2, seed=1)
    (got,) = problems(f"teacher.path={other}")
    assert got.startswith("teacher.cache: built for teacher weights '")
    (got,) = problems(f"student.tokenizer={MISTRAL_V1}")
    assert got.startswith("teacher.cache: built for student tokenizer files '")
    raw = load_raw(str(recipe))[1]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(Path(raw["data"]["train"]).read_text().splitlines()[1:]) + "\n")
    (got,) = problems(f"data.train={data}")
    assert got.startswith("teacher.cache: built for data.train file '")
    # the same copied elsewhere: content, not paths or mtimes, decides
    copy = tmp_path / "teacher_copy"
    shutil.copytree(raw["teacher"]["path"], copy)
    assert problems(f"teacher.path={copy}") == []


def test_sampling_rollouts_are_refused(fp32_cache):
    from kdcore.recipe.loading import load_raw, validate_raw

    def line(rollout: str) -> str:
        return (f"teacher.engine: 'cache' serves stored teacher states, but distill.rollout '{rollout}' samples new "
                f"sequences, which need a live teacher (use teacher.engine hf or sglang)")

    # each sampling policy in process (a `kdcore validate` per policy cost a process start each)
    for rollout in ("on_policy", "mixed", "seqkd", "adaptive"):
        _, raw = load_raw(str(fp32_cache[0]), [*cached(fp32_cache[1]), f"distill.rollout={rollout}"])
        assert line(rollout) in validate_raw(raw), (rollout, validate_raw(raw))
    # and the command line once: exit 2, the same line (ending by naming the override that chose
    # the engine: [command line: teacher.engine=cache])
    res = subprocess.run(KDCORE + ["validate", str(fp32_cache[0]), *cached(fp32_cache[1]), "distill.rollout=seqkd"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2
    assert f"  - {line('seqkd')}" in res.stderr


def test_self_distillation_missing_folder_and_no_manifest_are_refused(fp32_cache, tmp_path):
    from kdcore.recipe.loading import load_raw, validate_raw

    recipe, cache, _ = fp32_cache
    _, raw = load_raw(str(recipe), [*cached(cache), "teacher.self_distill_every=2"])
    assert validate_raw(raw) == ["teacher.engine: 'cache' serves a fixed stored teacher, but teacher.self_distill_every"
                                 "=2 refreshes the teacher's weights (use teacher.engine hf or sglang)"]
    _, raw = load_raw(str(recipe), ["teacher.engine=cache", f"teacher.cache={tmp_path / 'nope'}"])
    assert validate_raw(raw) == [f"teacher.cache: no such folder '{tmp_path / 'nope'}'"]
    _, raw = load_raw(str(recipe), ["teacher.engine=cache", f"teacher.cache={tmp_path}"])
    assert validate_raw(raw) == [f"teacher.cache: no manifest.json in '{tmp_path}' (build it with `kdcore cache-teacher`)"]
    _, raw = load_raw(str(recipe), ["teacher.engine=cache"])
    assert validate_raw(raw) == ["teacher.cache: required with teacher.engine 'cache' (a `kdcore cache-teacher` folder)"]


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_shard_stops_the_run_before_its_first_step(fp32_cache, tmp_path, damage):
    recipe, cache, _ = fp32_cache
    bad = tmp_path / "bad"
    shutil.copytree(cache, bad)
    shard = bad / "shard-00001.safetensors"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-64])
    else:
        shard.unlink()
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    out = tmp_path / "out"
    res = run_train(recipe, f"train.output_dir={out}", *cached(bad))
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kdcore: error: teacher.cache: shard {shard} ")
    assert ("truncated" in last) if damage == "truncated" else last.endswith("is missing")
    # a run folder holds its recipe, its lock and its data fingerprints from the start
    # (kdcore/storage/run_folder.py); nothing else is written
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"recipe.yaml", ".kdcore.lock", "data_fingerprint.json"}, \
        "nothing written before step 1"
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before, "the cache is only read"


def test_the_engine_answers_by_content_and_names_a_sample_it_lacks(fp32_cache):
    """In process: a request's rows are the shard's rows for its sample, with left or right
    padding alike; a sample the build never saw is an error naming it; n_slots bound tickets."""
    import torch
    from safetensors import safe_open

    from kdcore.infra.channel import ChannelError
    from kdcore.recipe.loading import load_recipe
    from kdcore.data import prepare_data
    from kdcore.engines import HiddenRequest
    from kdcore.engines.cache.teacher import CacheRunError, CacheTeacher
    from kdcore.modeling.tokenizers import load_tokenizer

    recipe, cache, _ = fp32_cache
    cfg = load_recipe(str(recipe))
    tok = load_tokenizer(cfg.teacher.path)
    sample = prepare_data(cfg.data, tok, None, seed=cfg.train.seed).train[5]
    ids = list(sample.student.input_ids)
    pos = list(sample.student.loss_positions)  # same_vocab asks for the student's loss positions
    manifest = json.loads((cache / "manifest.json").read_text())
    for s in manifest["shards"]:
        with safe_open(str(cache / s["file"]), "pt") as f:
            which = (f.get_tensor("sample_ids") == torch.tensor([0, 5])).all(1).nonzero()
            if which.numel():
                i = int(which[0])
                lo, hi = f.get_tensor("offsets")[i:i + 2].tolist()
                want = f.get_tensor("hidden")[lo:hi].clone()
    eng = CacheTeacher(cache, teacher_path=cfg.teacher.path, max_rows=256).start()
    right = HiddenRequest(torch.tensor([ids + [0, 0]]), torch.tensor([[1] * len(ids) + [0, 0]]), [pos])
    left = HiddenRequest(torch.tensor([[0, 0, 0] + ids]), torch.tensor([[0, 0, 0] + [1] * len(ids)]),
                         [[p + 3 for p in pos]])
    with eng.hidden_states(right) as h:
        assert torch.equal(h, want)
    t1, t2 = eng.submit(left), eng.submit(right)
    assert torch.equal(eng.result(t1), want) and torch.equal(eng.result(t2), want)
    with pytest.raises(ChannelError, match="2 requests already in flight"):
        eng.submit(right)
    eng.release(t1), eng.release(t2)
    wrong = HiddenRequest(torch.tensor([ids, ids]), torch.ones(2, len(ids), dtype=torch.long), [pos, pos[:-1]])
    with pytest.raises(CacheRunError, match=rf"^teacher.cache: sample 1 of the request \({len(ids)} teacher tokens, "
                                            rf"{len(pos) - 1} positions, key [0-9a-f]+\) is not in {cache}"):
        eng.submit(wrong)
    eng.close()


@pytest.mark.long  # kept out of the default command (README, Tests)
@pytest.mark.parametrize("aligner", ["overlap", "dskd", "uld", "mined"])
def test_every_cross_tokenizer_aligner_trains_from_a_cache(tmp_path, tiny_teacher, aligner):
    recipe = xtok_recipe(tmp_path, tiny_teacher, aligner, data={"limit": 12, "eval": None, "eval_size": 4},
                         train={"max_steps": 2, "eval_batches": 1})
    res = build(recipe, tmp_path / "cache", "--dtype", "float32")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["aligner"]["name"] == aligner
    res = run_train(recipe, *cached(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr[-3000:]
    steps = train_steps(tmp_path / "out")
    assert [r["step"] for r in steps] == [1, 2] and "align_ratio" in steps[0]
    if aligner == "dskd":  # the one with trained projectors and extra inputs: exact against live too
        live = run_train(recipe, f"train.output_dir={tmp_path / 'live'}", "train.max_steps=1")
        assert live.returncode == 0, live.stderr[-3000:]
        assert losses(tmp_path / "out")[:2] == losses(tmp_path / "live")[:2]  # step-0 eval and step 1
